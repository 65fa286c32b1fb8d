defmodule Vllm.AsyncLLMEngine do
  @moduledoc """
  A running engine: one process owning the native engine (a NIF resource) whose
  continuous-batching loop runs on its own threads.

      {:ok, engine} = Vllm.AsyncLLMEngine.new(model: "SmolLM2-135M-Instruct.Q4_1.gguf")
      {:ok, stream} = Vllm.AsyncLLMEngine.generate(engine, "Once upon a time", [max_tokens: 32], "req-1")
      Enum.each(stream, fn out -> IO.write(hd(out.outputs).text) end)

  Requests are independent: many processes may submit at once and the engine batches
  them. Outputs go straight from the engine threads to the requesting process as
  `{:vllm, request_id, %Vllm.RequestOutput{}}` messages (or `{:vllm_error, request_id,
  {category, message}}` when the engine cannot finish it). The engine process monitors
  each request's owner and aborts its requests when it dies, freeing their KV blocks.
  """
  use GenServer

  alias Vllm.{EngineOptions, Error, Native, Prompt, RequestStream, SamplingParams}

  @enforce_keys [:pid, :resource]
  defstruct [:pid, :resource]

  @opaque t :: %__MODULE__{pid: pid(), resource: reference()}
  @type request_id :: String.t()

  @request_opts [
    :lora_request,
    :priority,
    :arrival_time,
    :trace_headers,
    :tokenization_kwargs,
    :data_parallel_rank,
    :to,
    :__runtime__
  ]
  @default_load_timeout :timer.minutes(10)

  ## Starting and stopping

  @doc """
  Loads a model and starts an engine linked to the caller. Returns once the model is
  loaded (model loading runs on an engine thread, never on a BEAM scheduler).

  `new(opts)` or `new(model, opts)`. Options (vLLM's EngineArgs names): `model`, `dtype`,
  `seed`, `max_model_len`, `max_num_seqs`, `max_num_batched_tokens`, `block_size`,
  `kv_cache_memory_bytes`, `enable_prefix_caching`, `enable_chunked_prefill`, `device`
  (`"auto"` or `"cpu"`), `tokenizer`, `num_threads`, `trust_remote_code` (ignored),
  `gpu_memory_utilization`/`enforce_eager` (ignored on the CPU), `name` (process name),
  `__runtime__: [timeout: ms]` (load timeout).

  Errors: a missing model is `:not_found`, a corrupt file or a bad option `:validation`.
  """
  @spec new(String.t() | keyword(), keyword()) :: {:ok, t()} | {:error, Error.t()}
  def new(model_or_opts, opts \\ [])

  def new(model, opts) when is_binary(model) and is_list(opts),
    do: new(Keyword.put(opts, :model, model), [])

  def new(opts, []) when is_list(opts) or is_map(opts), do: start(opts, :link)
  def new(opts, extra) when is_list(opts) and is_list(extra), do: start(opts ++ extra, :link)

  def new(other, _),
    do: {:error, Error.validation("engine options must be a keyword list, got #{inspect(other)}")}

  @doc "Like `new/2` but raises `Vllm.Error`."
  @spec new!(String.t() | keyword(), keyword()) :: t()
  def new!(model_or_opts, opts \\ []), do: model_or_opts |> new(opts) |> Error.unwrap!()

  @doc "Same as `new/2` (vLLM's constructor name)."
  @spec from_engine_args(keyword(), keyword()) :: {:ok, t()} | {:error, Error.t()}
  def from_engine_args(args, opts \\ []), do: new(args, opts)

  @doc "Like `from_engine_args/2` but raises `Vllm.Error`."
  @spec from_engine_args!(keyword(), keyword()) :: t()
  def from_engine_args!(args, opts \\ []), do: new!(args, opts)

  @doc "For supervision trees: `{Vllm.AsyncLLMEngine, model: path, name: MyEngine}`."
  @spec child_spec(keyword()) :: Supervisor.child_spec()
  def child_spec(opts) do
    %{
      id: Keyword.get(opts, :name, __MODULE__),
      start: {__MODULE__, :start_link, [opts]},
      type: :worker
    }
  end

  @doc "Starts a linked engine and returns its pid (the `child_spec/1` entry point)."
  @spec start_link(keyword()) :: {:ok, pid()} | {:error, Error.t()}
  def start_link(opts) do
    with {:ok, engine} <- start(opts, :link), do: {:ok, engine.pid}
  end

  @doc "The engine handle of a started engine process (by pid or registered name)."
  @spec whereis(GenServer.server()) :: {:ok, t()} | {:error, Error.t()}
  def whereis(server) do
    {:ok, GenServer.call(server, :handle)}
  catch
    :exit, _ -> {:error, Error.new(:engine_dead, "no engine process #{inspect(server)}")}
  end

  @doc "Aborts every request and stops the engine. Idempotent."
  @spec shutdown(t()) :: :ok
  def shutdown(%__MODULE__{pid: pid, resource: resource}) do
    Native.shutdown(resource)

    try do
      GenServer.stop(pid, :normal, :infinity)
    catch
      :exit, _ -> :ok
    end

    :ok
  end

  @doc "Like `shutdown/1` (kept for symmetry with the other `!` functions)."
  @spec shutdown!(t()) :: :ok
  def shutdown!(engine), do: shutdown(engine)

  defp start(opts, link) do
    with {:ok, native, opts} <- EngineOptions.validate(opts),
         {:ok, resource} <- load(native, EngineOptions.timeout(opts, @default_load_timeout)) do
      gen_opts = if opts[:name], do: [name: opts[:name]], else: []
      starter = if link == :link, do: &GenServer.start_link/3, else: &GenServer.start/3

      case starter.(__MODULE__, resource, gen_opts) do
        {:ok, pid} ->
          {:ok, %__MODULE__{pid: pid, resource: resource}}

        {:error, reason} ->
          {:error, Error.new(:internal, "cannot start the engine process: #{inspect(reason)}")}
      end
    end
  end

  # The NIF loads on its own thread and answers with a message; this process only waits.
  defp load(native_opts, timeout) do
    ref = make_ref()

    case Native.engine_start(native_opts, self(), ref) do
      :ok ->
        receive do
          {:vllm_engine_started, ^ref, {:ok, resource}} -> {:ok, resource}
          {:vllm_engine_started, ^ref, {:error, reason}} -> {:error, Error.from_native(reason)}
        after
          timeout -> {:error, Error.new(:timeout, "the model did not load within #{timeout} ms")}
        end

      {:error, reason} ->
        {:error, Error.from_native(reason)}
    end
  end

  ## Requests

  @doc """
  Submits a request and returns `{:ok, stream}`: a `Stream` of `%Vllm.RequestOutput{}`,
  one per engine step that produced tokens for it (as `output_kind` says), ending with
  `finished: true`. Halting the stream early (`Enum.take/2`, an exception...) aborts the
  request. The request starts at once and its outputs come to the calling process, which
  must be the one that runs the stream.

  `prompt`: a string, `%{prompt: s}`, `%{prompt_token_ids: ids}` or a chat conversation
  (a list of `%{"role" => _, "content" => _}` maps, rendered with the chat template). `sampling_params`: a
  `%Vllm.SamplingParams{}`, a keyword list of its fields, or nil (defaults). Opts:
  `priority`, `__runtime__: [timeout: ms]` (longest wait for the next output; the request
  is aborted and the stream raises `:timeout`), and vLLM's `arrival_time`,
  `trace_headers`, `tokenization_kwargs`, `data_parallel_rank` (ignored) and
  `lora_request` (not supported yet).
  """
  @spec generate(t(), Prompt.t(), SamplingParams.t() | keyword() | nil, request_id(), keyword()) ::
          {:ok, Enumerable.t()} | {:error, Error.t()}
  def generate(engine, prompt, sampling_params, request_id, opts \\ []) do
    with :ok <- check_opts(opts, Keyword.delete(@request_opts, :to)),
         :ok <- add_request(engine, request_id, prompt, sampling_params, opts) do
      {:ok, RequestStream.new(engine, request_id, EngineOptions.timeout(opts, :infinity))}
    end
  end

  @doc "Like `generate/5` but raises `Vllm.Error`."
  @spec generate!(t(), Prompt.t(), SamplingParams.t() | keyword() | nil, request_id(), keyword()) ::
          Enumerable.t()
  def generate!(engine, prompt, sampling_params, request_id, opts \\ []),
    do: engine |> generate(prompt, sampling_params, request_id, opts) |> Error.unwrap!()

  @doc """
  Submits a request whose outputs arrive as messages: `{:vllm, request_id,
  %Vllm.RequestOutput{}}` until one has `finished: true`, or `{:vllm_error, request_id,
  {category, message}}`. They go to the caller, or to the pid in the `to:` option (that
  process then owns the request: when it dies, the request is aborted). A duplicate live
  `request_id` is a `:validation` error. Other opts as `generate/5`.
  """
  @spec add_request(
          t(),
          request_id(),
          Prompt.t(),
          SamplingParams.t() | keyword() | nil,
          keyword()
        ) ::
          :ok | {:error, Error.t()}
  def add_request(%__MODULE__{pid: pid} = engine, request_id, prompt, sampling_params, opts \\ []) do
    owner = Keyword.get(opts, :to, self())

    with :ok <- check_opts(opts, @request_opts),
         :ok <- check_request_id(request_id),
         {:ok, prompt} <- render_conversation(engine, prompt),
         {:ok, prompt} <- Prompt.normalize(prompt),
         {:ok, params} <- sampling_params(sampling_params),
         :ok <- SamplingParams.check_supported(params),
         :ok <- check_request_opts(opts, owner) do
      request_opts = %{priority: Keyword.get(opts, :priority, 0)}
      call(pid, {:add_request, request_id, prompt, Map.from_struct(params), owner, request_opts})
    end
  end

  @doc "Like `add_request/5` but raises `Vllm.Error`."
  @spec add_request!(
          t(),
          request_id(),
          Prompt.t(),
          SamplingParams.t() | keyword() | nil,
          keyword()
        ) :: :ok
  def add_request!(engine, request_id, prompt, sampling_params, opts \\ []),
    do: engine |> add_request(request_id, prompt, sampling_params, opts) |> Error.unwrap!()

  @doc """
  Aborts one request or a list of them. Each live one gets a final output with
  `finish_reason: :abort` and its KV blocks are freed; unknown or finished ids are ignored.
  """
  @spec abort(t(), request_id() | [request_id()], keyword()) :: :ok | {:error, Error.t()}
  def abort(%__MODULE__{resource: resource}, ids, opts \\ []) do
    with :ok <- check_opts(opts, [:__runtime__]) do
      ids
      |> List.wrap()
      |> Enum.reduce_while(:ok, fn id, :ok ->
        case Native.abort(resource, id) do
          :ok -> {:cont, :ok}
          {:error, reason} -> {:halt, {:error, Error.from_native(reason)}}
        end
      end)
    end
  end

  @doc "Like `abort/3` but raises `Vllm.Error`."
  @spec abort!(t(), request_id() | [request_id()], keyword()) :: :ok
  def abort!(engine, ids, opts \\ []), do: engine |> abort(ids, opts) |> Error.unwrap!()

  @doc """
  Engine counters: `%{total_blocks, free_blocks, num_running, num_waiting}` (KV cache
  blocks and request counts). When nothing is in flight, `free_blocks == total_blocks`.
  """
  @spec stats(t()) :: {:ok, map()} | {:error, Error.t()}
  def stats(%__MODULE__{resource: resource}), do: native_result(Native.stats(resource))

  @doc "Like `stats/1` but raises `Vllm.Error`."
  @spec stats!(t()) :: map()
  def stats!(engine), do: engine |> stats() |> Error.unwrap!()

  @doc "Tokenizes `text` with the model's tokenizer."
  @spec encode_text(t(), String.t(), boolean()) ::
          {:ok, [non_neg_integer()]} | {:error, Error.t()}
  def encode_text(%__MODULE__{resource: resource}, text, add_special_tokens \\ true)
      when is_binary(text),
      do: native_result(Native.encode(resource, text, add_special_tokens))

  @doc "Detokenizes token ids with the model's tokenizer."
  @spec decode_tokens(t(), [non_neg_integer()], boolean()) ::
          {:ok, String.t()} | {:error, Error.t()}
  def decode_tokens(%__MODULE__{resource: resource}, ids, skip_special_tokens \\ true)
      when is_list(ids),
      do: native_result(Native.decode(resource, ids, skip_special_tokens))

  @doc """
  Renders a conversation (a list of `%{"role" => _, "content" => _}` maps, atom keys too)
  into a prompt with the model's chat template (`chat_template:` overrides it).
  `add_generation_prompt` appends the opening of the assistant's turn.
  """
  @spec apply_chat_template(t(), [map()], boolean(), keyword()) ::
          {:ok, String.t()} | {:error, Error.t()}
  def apply_chat_template(
        %__MODULE__{resource: resource},
        messages,
        add_generation_prompt \\ true,
        opts \\ []
      ) do
    template = Keyword.get(opts, :chat_template)

    cond do
      not (is_list(messages) and Enum.all?(messages, &is_map/1)) ->
        {:error,
         Error.validation("messages must be a list of %{\"role\" => _, \"content\" => _} maps")}

      not is_boolean(add_generation_prompt) ->
        {:error, Error.validation("add_generation_prompt must be a boolean")}

      not (is_nil(template) or is_binary(template)) ->
        {:error, Error.validation("option :chat_template must be a string")}

      true ->
        with :ok <- check_opts(opts, [:chat_template]) do
          native_result(
            Native.apply_chat_template(resource, messages, add_generation_prompt, template)
          )
        end
    end
  end

  @doc "Like `apply_chat_template/4` but raises `Vllm.Error`."
  @spec apply_chat_template!(t(), [map()], boolean(), keyword()) :: String.t()
  def apply_chat_template!(engine, messages, add_generation_prompt \\ true, opts \\ []),
    do: engine |> apply_chat_template(messages, add_generation_prompt, opts) |> Error.unwrap!()

  @doc "True while the engine process is alive."
  @spec is_running(t()) :: boolean()
  def is_running(%__MODULE__{pid: pid}), do: Process.alive?(pid)

  ## Pooling models (Vllm.Pooling)

  @doc """
  Submits a pooling request (vLLM's `AsyncLLM.encode`) and returns `{:ok, stream}` yielding
  its one `%Vllm.PoolingRequestOutput{finished: true}`. `pooling_params`: a
  `%Vllm.PoolingParams{}`, keyword list or nil; its `task` (default "encode") picks embed,
  encode, classify or score (then `prompt` is `{text_a, text_b}`). Opts: `task`,
  `__runtime__: [timeout: ms]`. A generation model answers `:unsupported`.
  """
  def encode(engine, prompt, pooling_params, request_id, opts \\ [])

  def encode(engine, prompt, pooling_params, request_id, opts) when is_list(opts),
    do:
      Vllm.Pooling.stream(
        engine,
        prompt,
        pooling_params,
        request_id,
        with_task(pooling_params, opts)
      )

  def encode(_engine, _prompt, _pooling_params, _request_id, opts),
    do: {:error, Error.validation("options must be a keyword list, got #{inspect(opts)}")}

  @doc "vLLM's argument order with `lora_request` (must be nil: LoRA is not supported here)."
  def encode(engine, prompt, pooling_params, request_id, nil, opts),
    do: encode(engine, prompt, pooling_params, request_id, opts)

  def encode(_engine, _prompt, _pooling_params, _request_id, lora_request, _opts),
    do:
      {:error,
       Error.new(
         :unsupported,
         "encode with a lora_request is not supported, got #{inspect(lora_request)}"
       )}

  @doc """
  The message form of `encode/5`: the answer comes to the caller (or `to:`) as
  `{:vllm_pooling, request_id, %Vllm.PoolingRequestOutput{}}` or
  `{:vllm_error, request_id, {category, message}}`. Opts: `task`, `to`.
  """
  def add_pooling_request(engine, request_id, prompt, pooling_params, opts \\ []) do
    opts = with_task(pooling_params, opts)

    Vllm.Pooling.submit(
      engine,
      request_id,
      prompt,
      Keyword.get(opts, :task, "encode"),
      pooling_params,
      Keyword.get(opts, :to, self())
    )
  end

  @doc "The tasks the loaded model serves: `[\"generate\"]`, or e.g. `[\"encode\", \"embed\"]`."
  def get_supported_tasks(engine), do: Vllm.Pooling.supported_tasks(engine)

  # PoolingParams.task, when given, is the default task.
  defp with_task(%Vllm.PoolingParams{task: task}, opts) when is_binary(task),
    do: Keyword.put_new(opts, :task, task)

  defp with_task(params, opts) when is_list(params) do
    case Keyword.keyword?(params) && Keyword.get(params, :task) do
      task when is_binary(task) -> Keyword.put_new(opts, :task, task)
      _ -> opts
    end
  end

  defp with_task(_params, opts), do: opts

  ## Helpers shared with Vllm.LLM

  @doc false
  def sampling_params(nil), do: {:ok, %SamplingParams{}}
  def sampling_params(params), do: SamplingParams.new(params)

  # A chat conversation (a non-empty list of maps) becomes text through the chat template.
  defp render_conversation(engine, [%{} | _] = messages),
    do: apply_chat_template(engine, messages, true)

  defp render_conversation(_engine, prompt), do: {:ok, prompt}

  defp check_request_id(id) when is_binary(id) and id != "", do: :ok

  defp check_request_id(id),
    do: {:error, Error.validation("request_id must be a non-empty string, got #{inspect(id)}")}

  defp check_request_opts(opts, owner) do
    cond do
      not is_pid(owner) or node(owner) != node() ->
        {:error, Error.validation("option :to must be a local pid, got #{inspect(owner)}")}

      not is_integer(Keyword.get(opts, :priority, 0)) ->
        {:error,
         Error.validation("option :priority must be an integer, got #{inspect(opts[:priority])}")}

      Keyword.get(opts, :lora_request) != nil ->
        {:error, Error.new(:unsupported, "LoRA requests are not supported yet")}

      true ->
        :ok
    end
  end

  @doc false
  def check_opts(opts, allowed) do
    cond do
      not Keyword.keyword?(opts) ->
        {:error, Error.validation("options must be a keyword list, got #{inspect(opts)}")}

      key = Enum.find(Keyword.keys(opts), &(&1 not in allowed)) ->
        {:error,
         Error.validation(
           "unknown option #{inspect(key)}; allowed: #{Enum.map_join(allowed, ", ", &inspect/1)}"
         )}

      true ->
        :ok
    end
  end

  defp native_result({:ok, value}), do: {:ok, value}
  defp native_result({:error, reason}), do: {:error, Error.from_native(reason)}

  defp call(pid, message) do
    GenServer.call(pid, message, :infinity)
  catch
    :exit, _ -> {:error, Error.new(:engine_dead, "the engine process is not running")}
  end

  ## GenServer: a registry of live requests and their owners' monitors

  @impl true
  def init(resource) do
    Process.flag(:trap_exit, true)
    {:ok, %{resource: resource, requests: %{}, owners: %{}}}
  end

  @impl true
  def handle_call(:handle, _from, state),
    do: {:reply, %__MODULE__{pid: self(), resource: state.resource}, state}

  def handle_call({:add_request, id, prompt, params, owner, request_opts}, _from, state) do
    if Map.has_key?(state.requests, id) do
      {:reply,
       {:error,
        Error.validation("request_id #{inspect(id)} is already in use by a live request")}, state}
    else
      # The engine tells this process when the request ends, so the registry stays small.
      case native_add_request(state.resource, id, prompt, params, owner, request_opts) do
        :ok -> {:reply, :ok, register(state, id, owner)}
        {:error, reason} -> {:reply, {:error, Error.from_native(reason)}, state}
      end
    end
  end

  @impl true
  def handle_info({:vllm_request_done, id}, state), do: {:noreply, unregister(state, id)}

  def handle_info({:DOWN, _ref, :process, owner, _reason}, state) do
    case Map.pop(state.owners, owner) do
      {nil, _} ->
        {:noreply, state}

      {{_ref, ids}, owners} ->
        Enum.each(ids, &Native.abort(state.resource, &1))

        {:noreply,
         %{state | owners: owners, requests: Map.drop(state.requests, MapSet.to_list(ids))}}
    end
  end

  # Exits are trapped so that terminate/2 shuts the engine down; like an untrapped link,
  # a normal exit of a linked process does not stop the engine.
  def handle_info({:EXIT, _pid, :normal}, state), do: {:noreply, state}
  def handle_info({:EXIT, _pid, reason}, state), do: {:stop, reason, state}
  def handle_info(_other, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, state) do
    Native.shutdown(state.resource)
    :ok
  end

  # A NIF exception must not take the engine process (and every request) down with it.
  defp native_add_request(resource, id, prompt, params, owner, request_opts) do
    Native.add_request(
      resource,
      id,
      prompt,
      params,
      owner,
      Map.put(request_opts, :watcher, self())
    )
  rescue
    exception -> {:error, {:internal, "add_request failed: " <> Exception.message(exception)}}
  end

  defp register(state, id, owner) do
    owners =
      Map.update(state.owners, owner, {Process.monitor(owner), MapSet.new([id])}, fn {ref, ids} ->
        {ref, MapSet.put(ids, id)}
      end)

    %{state | requests: Map.put(state.requests, id, owner), owners: owners}
  end

  defp unregister(state, id) do
    case Map.pop(state.requests, id) do
      {nil, _} ->
        state

      {owner, requests} ->
        owners =
          case Map.fetch(state.owners, owner) do
            {:ok, {ref, ids}} ->
              ids = MapSet.delete(ids, id)

              if MapSet.size(ids) == 0 do
                Process.demonitor(ref, [:flush])
                Map.delete(state.owners, owner)
              else
                Map.put(state.owners, owner, {ref, ids})
              end

            :error ->
              state.owners
          end

        %{state | requests: requests, owners: owners}
    end
  end
end
