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

  ## Back-pressure and limits

  The engine never queues outputs for a slow reader: each engine step's output is sent
  at once, so memory held by the engine does not grow with unread outputs. What a reader
  does not read waits in its own mailbox, and that is bounded too:

    * a `generate/5` stream acknowledges each output it takes; when 32 of a request's
      outputs are unread, the engine merges the next ones into a single pending output
      (`:delta` texts and token ids concatenated, a `:cumulative` output replaced by the
      newer one) and sends it once the reader catches up or the request finishes. A
      stream that is never read holds at most 33 outputs per request, and the last one
      is still complete.
    * the message form (`add_request/5`) sends one message per step that produced
      tokens: at most `max_tokens + 1` per request.
    * `max_num_seqs` requests run at once; with the engine option
      `max_waiting_requests: w`, at most `w` more wait (in the engine, or here while
      generation is paused or asleep): the next `add_request`/`generate` is
      `{:error, %Vllm.Error{category: :resource_exhausted}}` rather than unbounded memory.
      Without it the waiting queue is unbounded, as in vLLM.

  ## When the engine dies

  If an engine core dies of an internal error (a panic in a step), every request in
  flight ends with `{:vllm_error, id, {:engine_dead, message}}` (a stream raises
  `Vllm.Error` `:engine_dead`), and the engine process exits with
  `{:shutdown, {:engine_dead, message}}`: a supervisor restarts it, and handles to the old
  one answer `:engine_dead`.
  """
  alias Vllm.{EngineOptions, Error, Native, Prompt, RequestStream, SamplingParams}
  alias Vllm.AsyncLLMEngine.Server

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
  # Outputs of one generate/5 stream that may wait unread before the engine merges new
  # ones (see "Back-pressure" in the moduledoc).
  @max_unread_outputs 32

  ## Starting and stopping

  @doc """
  Loads a model and starts an engine linked to the caller. Returns once the model is
  loaded (model loading runs on an engine thread, never on a BEAM scheduler).

  `new(opts)` or `new(model, opts)`. Options (vLLM's EngineArgs names): `model`, `dtype`,
  `seed`, `max_model_len`, `max_num_seqs`, `max_num_batched_tokens`, `block_size`,
  `kv_cache_memory_bytes`, `enable_prefix_caching`, `enable_chunked_prefill`, `device`
  (`"auto"`, `"cpu"`, `"cuda"` or `"cuda:N"`; CUDA needs a NIF built with the cargo feature
  `cuda`, a CPU-only build answers `:unsupported`), `load_format` (`"auto"`, or `"dummy"`:
  random weights from the model's config, for benchmarks), `tokenizer`, `num_threads`, `quantization` (`"gguf"`: keep a
  GGUF file's matrices quantized), `data_parallel_size` (engine cores, each a replica with
  its own KV cache; see `scale_elastic_ep/3`), `profiler_dir` (where `stop_profile/1`
  writes), `trust_remote_code` (ignored), `gpu_memory_utilization` (the share of the GPU the
  engine may take; sizes the KV cache) and `enforce_eager` (no CUDA graphs for decode
  steps) — on the CPU accepted with no effect, `served_model_name` (the name other nodes
  reach the engine by, see `Vllm.Cluster`), `enable_lora` with `max_loras`
  (adapters resident at once), `max_lora_rank` and `max_cpu_loras` (adapters kept in host
  memory), `max_waiting_requests` (requests allowed to wait beyond `max_num_seqs`;
  more are `:resource_exhausted`; default no limit), `name` (process name),
  `__runtime__: [timeout: ms]` (load timeout), `tensor_parallel_size` (GPUs one model
  is split over, from the `device` named: its heads and MLP columns, an NCCL all-reduce
  after o_proj and down_proj; with `data_parallel_size`, core i takes the next N GPUs;
  a size that does not divide the heads or more GPUs than present is `:validation`).
  Refused with `:unsupported` and the reason: `tensor_parallel_size` > 1 without a CUDA
  `device`, a CUDA `device` in a CPU-only build,
  a `dtype` other than float32 on the CPU, a `revision`, a `quantization` other
  than `"gguf"`.

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

  @doc """
  Starts an engine from a vLLM-style config: a map or keyword list of engine options,
  flat or grouped as vLLM's `VllmConfig` groups them (`model_config`, `cache_config`,
  `scheduler_config`, `parallel_config`, `device_config`: their keys are merged).
  """
  @spec from_vllm_config(map() | keyword(), keyword()) :: {:ok, t()} | {:error, Error.t()}
  def from_vllm_config(config, opts \\ [])

  def from_vllm_config(config, opts) when (is_map(config) or is_list(config)) and is_list(opts) do
    groups =
      ~w(model_config cache_config scheduler_config parallel_config device_config load_config)

    flat =
      Enum.flat_map(config, fn {key, value} ->
        if to_string(key) in groups and (is_map(value) or Keyword.keyword?(value)),
          do: Enum.to_list(value),
          else: [{key, value}]
      end)

    new(flat, opts)
  end

  def from_vllm_config(other, _),
    do:
      {:error,
       Error.validation("a vLLM config must be a map or keyword list, got #{inspect(other)}")}

  @doc "Like `from_vllm_config/2` but raises `Vllm.Error`."
  @spec from_vllm_config!(map() | keyword(), keyword()) :: t()
  def from_vllm_config!(config, opts \\ []),
    do: config |> from_vllm_config(opts) |> Error.unwrap!()

  @doc """
  For supervision trees: `{Vllm.AsyncLLMEngine, model: path, name: MyEngine}`. The child
  is the engine process; a restarted engine is a new process (handles to the old one
  answer `:engine_dead`; look the new one up with `whereis/1`).
  """
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
    with {:ok, [{0, resource} | _]} <- call(server, :cores) do
      pid = if is_pid(server), do: server, else: GenServer.whereis(server)
      {:ok, %__MODULE__{pid: pid, resource: resource}}
    end
  end

  @doc """
  Stops the engine: every request in flight ends with `finish_reason: :abort` (requests
  held by a pause end the same way), the engine cores' threads are joined and the process
  exits. Idempotent.
  """
  @spec shutdown(t()) :: :ok
  def shutdown(%__MODULE__{pid: pid, resource: resource} = engine) do
    case call(engine, :shutdown) do
      :ok -> :ok
      # Already gone: make sure the native engine is too.
      {:error, _} -> Native.shutdown(resource)
    end

    ref = Process.monitor(pid)

    receive do
      {:DOWN, ^ref, :process, _, _} -> :ok
    end
  end

  @doc "Like `shutdown/1` (kept for symmetry with the other `!` functions)."
  @spec shutdown!(t()) :: :ok
  def shutdown!(engine), do: shutdown(engine)

  defp start(opts, link) do
    with {:ok, native, opts} <- EngineOptions.validate(opts),
         timeout = EngineOptions.timeout(opts, @default_load_timeout),
         {:ok, [primary | _] = cores} <-
           Server.load_cores(native, Keyword.get(opts, :data_parallel_size) || 1, timeout) do
      opts = Keyword.put(opts, :profiler_dir, EngineOptions.profiler_dir(opts))

      case Server.start(cores, native, opts, link == :link) do
        {:ok, pid} ->
          {:ok, %__MODULE__{pid: pid, resource: primary}}

        {:error, reason} ->
          Enum.each(cores, &Native.shutdown/1)
          {:error, Error.new(:internal, "cannot start the engine process: #{inspect(reason)}")}
      end
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
  is aborted and the stream raises `:timeout`), `data_parallel_rank` (the engine core
  that runs it; default: the least loaded), vLLM's `arrival_time`, `trace_headers`,
  `tokenization_kwargs` (ignored) and `lora_request` (a `%Vllm.LoRARequest{}`; the engine
  needs `enable_lora: true`). While the engine
  is paused or asleep the request waits, then runs.

  Across nodes (`Vllm.Cluster`): with a model name in place of `engine`, or with
  `cluster: true`, the request goes to the least-loaded engine serving that model on any
  connected node and its outputs stream back here; `retry: true` resubmits it elsewhere
  when that engine's node goes down (otherwise the stream raises `:engine_dead`).
  """
  @spec generate(
          t() | String.t(),
          Prompt.t(),
          SamplingParams.t() | keyword() | nil,
          request_id(),
          keyword()
        ) ::
          {:ok, Enumerable.t()} | {:error, Error.t()}
  def generate(engine, prompt, sampling_params, request_id, opts \\ []) do
    if cluster?(engine, opts) do
      with :ok <- check_cluster_opts(opts, List.delete(@request_opts, :to)),
           do: Vllm.Cluster.generate(engine, prompt, sampling_params, request_id, opts)
    else
      generate_here(engine, prompt, sampling_params, request_id, drop_cluster_false(opts))
    end
  end

  defp generate_here(engine, prompt, sampling_params, request_id, opts) do
    credit = Native.new_credit()
    flow = %{credit: credit, max_unread: @max_unread_outputs}

    with :ok <- check_opts(opts, List.delete(@request_opts, :to)),
         :ok <- submit(engine, request_id, prompt, sampling_params, opts, flow) do
      {:ok, RequestStream.new(engine, request_id, EngineOptions.timeout(opts, :infinity), credit)}
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
  def add_request(engine, request_id, prompt, sampling_params, opts \\ []),
    do: submit(engine, request_id, prompt, sampling_params, opts, %{})

  defp submit(%__MODULE__{} = engine, request_id, prompt, sampling_params, opts, flow) do
    owner = Keyword.get(opts, :to, self())

    with :ok <- check_opts(opts, @request_opts),
         :ok <- check_request_id(request_id),
         {:ok, prompt} <- render_conversation(engine, prompt),
         {:ok, prompt} <- Prompt.normalize(prompt),
         {:ok, params} <- sampling_params(sampling_params),
         :ok <- SamplingParams.check_supported(params),
         :ok <- check_request_opts(opts, owner),
         {:ok, lora} <- Vllm.LoRARequest.to_native(Keyword.get(opts, :lora_request)) do
      request_opts = %{
        priority: Keyword.get(opts, :priority, 0),
        data_parallel_rank: Keyword.get(opts, :data_parallel_rank),
        lora_request: lora
      }

      request_opts = Map.merge(request_opts, flow)

      call(
        engine,
        {:add_request, request_id, prompt, Map.from_struct(params), owner, request_opts}
      )
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
  def abort(engine, ids, opts \\ []) do
    ids = List.wrap(ids)

    if Enum.all?(ids, &is_binary/1) do
      with :ok <- check_opts(opts, [:__runtime__]), do: call(engine, {:abort, ids})
    else
      {:error, Error.validation("request ids must be strings, got #{inspect(ids, limit: 5)}")}
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
  def stats(engine) do
    with {:ok, cores} <- cores(engine) do
      Enum.reduce_while(cores, {:ok, %{}}, fn {_rank, r}, {:ok, acc} ->
        case Native.stats(r) do
          {:ok, s} -> {:cont, {:ok, Map.merge(acc, s, fn _k, a, b -> a + b end)}}
          {:error, reason} -> {:halt, {:error, Error.from_native(reason)}}
        end
      end)
    end
  end

  @doc "Like `stats/1` but raises `Vllm.Error`."
  @spec stats!(t()) :: map()
  def stats!(engine), do: engine |> stats() |> Error.unwrap!()

  @doc "Tokenizes `text` with the model's tokenizer."
  @spec encode_text(t(), String.t(), boolean()) ::
          {:ok, [non_neg_integer()]} | {:error, Error.t()}
  def encode_text(engine, text, add_special_tokens \\ true)

  def encode_text(%__MODULE__{resource: resource} = engine, text, add_special_tokens)
      when is_binary(text) and is_boolean(add_special_tokens) do
    with :ok <- check_alive(engine),
         do: native_result(Native.encode(resource, text, add_special_tokens))
  end

  def encode_text(_engine, text, add_special_tokens),
    do:
      {:error,
       Error.validation(
         "text must be a string and add_special_tokens a boolean, got #{inspect(text, limit: 5)}, #{inspect(add_special_tokens)}"
       )}

  @doc "Detokenizes token ids with the model's tokenizer."
  @spec decode_tokens(t(), [non_neg_integer()], boolean()) ::
          {:ok, String.t()} | {:error, Error.t()}
  def decode_tokens(engine, ids, skip_special_tokens \\ true)

  def decode_tokens(%__MODULE__{resource: resource} = engine, ids, skip_special_tokens)
      when is_list(ids) and is_boolean(skip_special_tokens) do
    with :ok <- check_alive(engine),
         do: native_result(Native.decode(resource, ids, skip_special_tokens))
  end

  def decode_tokens(_engine, ids, skip_special_tokens),
    do:
      {:error,
       Error.validation(
         "token ids must be a list and skip_special_tokens a boolean, got #{inspect(ids, limit: 5)}, #{inspect(skip_special_tokens)}"
       )}

  @doc false
  # The tokenizer helpers run in the NIF without the engine process: refuse them once
  # the engine was shut down (or died), as every other call.
  def check_alive(%__MODULE__{pid: pid, resource: resource}) do
    if Process.alive?(pid) and Native.is_alive(resource),
      do: :ok,
      else: {:error, Error.new(:engine_dead, "the engine has been shut down or has died")}
  end

  @doc """
  Renders a conversation (a list of `%{"role" => _, "content" => _}` maps, atom keys too)
  into a prompt with the model's chat template (`chat_template:` overrides it).
  `add_generation_prompt` appends the opening of the assistant's turn.
  """
  @spec apply_chat_template(t(), [map()], boolean(), keyword()) ::
          {:ok, String.t()} | {:error, Error.t()}
  def apply_chat_template(
        %__MODULE__{resource: resource} = engine,
        messages,
        add_generation_prompt \\ true,
        opts \\ []
      ) do
    template = if Keyword.keyword?(opts), do: Keyword.get(opts, :chat_template)

    cond do
      not (is_list(messages) and not List.improper?(messages) and Enum.all?(messages, &is_map/1)) ->
        {:error,
         Error.validation("messages must be a list of %{\"role\" => _, \"content\" => _} maps")}

      not is_boolean(add_generation_prompt) ->
        {:error, Error.validation("add_generation_prompt must be a boolean")}

      not (is_nil(template) or is_binary(template)) ->
        {:error, Error.validation("option :chat_template must be a string")}

      true ->
        with :ok <- check_opts(opts, [:chat_template]),
             :ok <- check_alive(engine) do
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

  ## Pooling models (Vllm.Pooling)

  @doc """
  Submits a pooling request (vLLM's `AsyncLLM.encode`) and returns `{:ok, stream}` yielding
  its one `%Vllm.PoolingRequestOutput{finished: true}`. `pooling_params`: a
  `%Vllm.PoolingParams{}`, keyword list or nil; its `task` (default "encode") picks embed,
  encode, classify or score (then `prompt` is `{text_a, text_b}`). Opts: `task`,
  `__runtime__: [timeout: ms]`. A generation model answers `:unsupported`.
  """
  def encode(engine, prompt, pooling_params, request_id, opts \\ [])

  def encode(engine, prompt, pooling_params, request_id, opts) when is_list(opts) do
    opts = with_task(pooling_params, opts)

    if cluster?(engine, opts) do
      with :ok <- check_cluster_opts(opts, [:task, :__runtime__]),
           do: Vllm.Cluster.encode(engine, prompt, pooling_params, request_id, opts)
    else
      Vllm.Pooling.stream(engine, prompt, pooling_params, request_id, drop_cluster_false(opts))
    end
  end

  def encode(_engine, _prompt, _pooling_params, _request_id, opts),
    do: {:error, Error.validation("options must be a keyword list, got #{inspect(opts)}")}

  @doc "Like `encode/5` but raises `Vllm.Error`."
  def encode!(engine, prompt, pooling_params, request_id, opts \\ []),
    do: engine |> encode(prompt, pooling_params, request_id, opts) |> Error.unwrap!()

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

  # A model name instead of an engine, or `cluster: true`: routed by Vllm.Cluster.
  defp cluster?(target, _opts) when is_binary(target), do: true
  defp cluster?(_engine, opts), do: Keyword.keyword?(opts) and Keyword.get(opts, :cluster) == true

  defp drop_cluster_false(opts) do
    if Keyword.keyword?(opts) and Keyword.get(opts, :cluster) == false,
      do: Keyword.delete(opts, :cluster),
      else: opts
  end

  defp check_cluster_opts(opts, allowed) do
    with :ok <- check_opts(opts, allowed ++ Vllm.Cluster.request_opts()) do
      if is_boolean(Keyword.get(opts, :cluster, true)),
        do: :ok,
        else: {:error, Error.validation("option :cluster must be a boolean")}
    end
  end

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

      not valid_runtime?(opts[:__runtime__]) ->
        {:error,
         Error.validation(
           "option :__runtime__ must be a keyword list whose :timeout is a non-negative integer (ms) or :infinity, got #{inspect(opts[:__runtime__])}"
         )}

      not is_integer(Keyword.get(opts, :priority, 0)) ->
        {:error,
         Error.validation("option :priority must be an integer, got #{inspect(opts[:priority])}")}

      not (is_nil(opts[:data_parallel_rank]) or
               (is_integer(opts[:data_parallel_rank]) and opts[:data_parallel_rank] >= 0)) ->
        {:error,
         Error.validation(
           "option :data_parallel_rank must be a non-negative integer, got #{inspect(opts[:data_parallel_rank])}"
         )}

      true ->
        :ok
    end
  end

  defp valid_runtime?(nil), do: true

  defp valid_runtime?(runtime) do
    Keyword.keyword?(runtime) and
      case Keyword.get(runtime, :timeout) do
        nil -> true
        :infinity -> true
        ms -> is_integer(ms) and ms >= 0
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

  ## Control: every function of Vllm.AsyncLLMEngine.Control, and its `!` twin

  for {name, arity} <- Vllm.AsyncLLMEngine.Control.__info__(:functions) do
    args = Macro.generate_arguments(arity, __MODULE__)
    @doc "See `Vllm.AsyncLLMEngine.Control.#{name}/#{arity}`."
    defdelegate unquote(name)(unquote_splicing(args)), to: Vllm.AsyncLLMEngine.Control

    @doc "Like `#{name}/#{arity}` but raises `Vllm.Error`."
    def unquote(:"#{name}!")(unquote_splicing(args)) do
      Vllm.AsyncLLMEngine.Control.unquote(name)(unquote_splicing(args)) |> Error.unwrap!()
    end
  end

  @doc false
  # A call to the engine process; a dead (or restarted) engine is :engine_dead.
  def call(%__MODULE__{pid: pid}, message), do: call(pid, message)

  def call(server, message) do
    GenServer.call(server, message, :infinity)
  catch
    :exit, _ -> {:error, Error.new(:engine_dead, "the engine process is not running")}
  end

  @doc false
  # `[{rank, resource}]` of the engine cores.
  def cores(engine), do: call(engine, :cores)
end
