defmodule Vllm.LLM do
  @moduledoc """
  Offline batch inference (vLLM's `LLM` class): submit many prompts, get their final
  outputs back in prompt order. The engine batches them together.

      {:ok, llm} = Vllm.LLM.new("SmolLM2-135M-Instruct.Q4_1.gguf")
      {:ok, [out]} = Vllm.LLM.generate(llm, "Once upon a time", max_tokens: 32, temperature: 0.0)
      hd(out.outputs).text
  """

  alias Vllm.{AsyncLLMEngine, Error, RequestOutput, SamplingParams}

  @enforce_keys [:engine, :model]
  defstruct [:engine, :model]

  @type t :: %__MODULE__{engine: AsyncLLMEngine.t(), model: String.t()}
  @type prompts :: Vllm.Prompt.t() | [Vllm.Prompt.t()]

  @generate_opts [:lora_request, :priority, :use_tqdm, :__runtime__]
  @template_opts [:chat_template, :add_generation_prompt]

  @doc """
  Loads `model` (a `.gguf` file or a model directory) with engine options `opts` (see
  `Vllm.AsyncLLMEngine.new/2`). The engine process is linked to the caller.
  """
  @spec new(String.t() | keyword(), keyword()) :: {:ok, t()} | {:error, Error.t()}
  def new(model, opts \\ [])

  def new(model, opts) when is_binary(model) do
    with {:ok, engine} <- AsyncLLMEngine.new(model, opts),
         do: {:ok, %__MODULE__{engine: engine, model: model}}
  end

  def new(opts, []) when is_list(opts) do
    case Keyword.fetch(opts, :model) do
      {:ok, model} when is_binary(model) -> new(model, Keyword.delete(opts, :model))
      _ -> {:error, Error.validation("Vllm.LLM.new/1 needs a :model option (a path)")}
    end
  end

  def new(other, _),
    do: {:error, Error.validation("model must be a path string, got #{inspect(other)}")}

  @doc "Like `new/2` but raises `Vllm.Error`."
  @spec new!(String.t() | keyword(), keyword()) :: t()
  def new!(model, opts \\ []), do: model |> new(opts) |> Error.unwrap!()

  @doc """
  Generates a completion for each prompt and returns the finished `%Vllm.RequestOutput{}`s
  in prompt order. `prompts` is one prompt or a list (a string, `%{prompt: s}` or
  `%{prompt_token_ids: ids}`); `sampling_params` is nil (defaults), one
  `%Vllm.SamplingParams{}`/keyword list for all, or a list with one per prompt. A keyword
  list of options in the `sampling_params` position is taken as `opts`.
  Opts: `priority`, `__runtime__: [timeout: ms]` (whole call), `use_tqdm: true` (a
  progress bar on stderr: prompts done, output tokens/s).
  """
  @spec generate(
          t(),
          prompts(),
          SamplingParams.t() | keyword() | [SamplingParams.t()] | nil,
          keyword()
        ) ::
          {:ok, [RequestOutput.t()]} | {:error, Error.t()}
  def generate(llm, prompts, sampling_params \\ nil, opts \\ [])

  def generate(%__MODULE__{} = llm, prompts, sampling_params, opts) do
    {sampling_params, opts} = split_opts(sampling_params, opts, @generate_opts)
    prompts = List.wrap(prompts)

    with :ok <- AsyncLLMEngine.check_opts(opts, @generate_opts),
         {:ok, params} <- per_prompt_params(sampling_params, length(prompts)),
         {:ok, loras} <- per_prompt_loras(Keyword.get(opts, :lora_request), length(prompts)) do
      run_batch(llm.engine, prompts, params, Keyword.put(opts, :lora_request, loras))
    end
  end

  def generate(other, _, _, _),
    do: {:error, Error.validation("expected a %Vllm.LLM{}, got #{inspect(other)}")}

  @doc "Like `generate/4` but raises `Vllm.Error`."
  @spec generate!(t(), prompts(), term(), keyword()) :: [RequestOutput.t()]
  def generate!(llm, prompts, sampling_params \\ nil, opts \\ []),
    do: llm |> generate(prompts, sampling_params, opts) |> Error.unwrap!()

  @doc """
  Replies to each conversation (vLLM's `LLM.chat`): renders it with the model's chat
  template and generates from it, returning finished `%Vllm.RequestOutput{}`s in order.
  `conversations` is one conversation (a list of `%{"role" => _, "content" => _}` maps,
  atom keys accepted) or a list of conversations. `sampling_params` as in `generate/4`.
  Opts: `chat_template:` (a Jinja template instead of the model's),
  `add_generation_prompt:` (default true), and those of `generate/4`.
  """
  @spec chat(t(), [map()] | [[map()]], SamplingParams.t() | keyword() | list() | nil, keyword()) ::
          {:ok, [RequestOutput.t()]} | {:error, Error.t()}
  def chat(llm, conversations, sampling_params \\ nil, opts \\ [])

  def chat(%__MODULE__{} = llm, conversations, sampling_params, opts) do
    {sampling_params, opts} = split_opts(sampling_params, opts, @template_opts ++ @generate_opts)
    {template_opts, opts} = Keyword.split(opts, @template_opts)

    with {:ok, conversations} <- conversations(conversations),
         {:ok, rendered} <- render_all(llm.engine, conversations, template_opts),
         prompts = Enum.map(rendered, fn {_text, ids} -> %{prompt_token_ids: ids} end),
         {:ok, outputs} <- generate(llm, prompts, sampling_params, opts) do
      {:ok, Enum.zip_with(outputs, rendered, fn out, {text, _ids} -> %{out | prompt: text} end)}
    end
  end

  def chat(other, _, _, _),
    do: {:error, Error.validation("expected a %Vllm.LLM{}, got #{inspect(other)}")}

  @doc "Like `chat/4` but raises `Vllm.Error`."
  @spec chat!(t(), [map()] | [[map()]], term(), keyword()) :: [RequestOutput.t()]
  def chat!(llm, conversations, sampling_params \\ nil, opts \\ []),
    do: llm |> chat(conversations, sampling_params, opts) |> Error.unwrap!()

  # One conversation (a list of message maps) or a list of them.
  defp conversations([%{} | _] = conversation), do: {:ok, [conversation]}

  defp conversations([_ | _] = conversations) do
    if Enum.all?(conversations, &match?([%{} | _], &1)),
      do: {:ok, conversations},
      else: conversation_error(conversations)
  end

  defp conversations(other), do: conversation_error(other)

  defp conversation_error(other),
    do:
      {:error,
       Error.validation(
         "conversations must be a non-empty list of %{\"role\" => _, \"content\" => _} maps, or a list of them, got #{inspect(other, limit: 5)}"
       )}

  # Each conversation as {prompt text, its token ids}. As vLLM, the rendered text is
  # tokenized without adding special tokens: the template already has them.
  defp render_all(engine, conversations, template_opts) do
    add_generation_prompt = Keyword.get(template_opts, :add_generation_prompt, true)
    template = Keyword.take(template_opts, [:chat_template])

    conversations
    |> Enum.map(fn messages ->
      with {:ok, text} <-
             AsyncLLMEngine.apply_chat_template(engine, messages, add_generation_prompt, template),
           {:ok, ids} <- AsyncLLMEngine.encode_text(engine, text, false),
           do: {:ok, {text, ids}}
    end)
    |> collect()
  end

  @doc "The default sampling parameters (vLLM's defaults)."
  @spec get_default_sampling_params(t()) :: {:ok, SamplingParams.t()}
  def get_default_sampling_params(%__MODULE__{}), do: {:ok, %SamplingParams{}}

  ## Pooling models (Vllm.Pooling): embed, encode, classify, score

  @doc """
  Sentence embeddings (vLLM's `LLM.embed`): one `%Vllm.PoolingRequestOutput{}` per prompt,
  in order, whose `outputs` is a `%Vllm.EmbeddingOutput{embedding: [float]}`. Opts:
  `pooling_params:` (one or one per prompt), `dimensions:` (Matryoshka truncation),
  `normalize:`, `__runtime__: [timeout: ms]`. A generation model answers `:unsupported`.
  """
  def embed(llm, prompts, opts \\ [])

  def embed(%__MODULE__{engine: e}, prompts, opts),
    do: Vllm.Pooling.call(e, List.wrap(prompts), "embed", nil, opts)

  def embed(other, _, _), do: not_llm(other)

  @doc "Like `embed/3` but raises `Vllm.Error`."
  def embed!(llm, prompts, opts \\ []), do: llm |> embed(prompts, opts) |> Error.unwrap!()

  @doc """
  The pooler's output for each prompt (vLLM's `LLM.encode`); `pooling_task:` in opts
  picks another task ("embed", "classify"). Options as `embed/3`.
  """
  def encode(llm, prompts, pooling_params \\ nil, opts \\ [])

  def encode(%__MODULE__{engine: e}, prompts, pooling_params, opts) when is_list(opts) do
    task = Keyword.get(opts, :pooling_task, "encode")
    Vllm.Pooling.call(e, List.wrap(prompts), task, pooling_params, opts)
  end

  def encode(%__MODULE__{}, _, _, opts),
    do: {:error, Error.validation("options must be a keyword list, got #{inspect(opts)}")}

  def encode(other, _, _, _), do: not_llm(other)

  @doc "Like `encode/4` but raises `Vllm.Error`."
  def encode!(llm, prompts, pooling_params \\ nil, opts \\ []),
    do: llm |> encode(prompts, pooling_params, opts) |> Error.unwrap!()

  @doc """
  Label probabilities from a sequence-classification head (vLLM's `LLM.classify`):
  `outputs` is a `%Vllm.ClassificationOutput{probs: [float]}`; `use_activation: false`
  gives the raw logits.
  """
  def classify(llm, prompts, opts \\ [])

  def classify(%__MODULE__{engine: e}, prompts, opts),
    do: Vllm.Pooling.call(e, List.wrap(prompts), "classify", nil, opts)

  def classify(other, _, _), do: not_llm(other)

  @doc "Like `classify/3` but raises `Vllm.Error`."
  def classify!(llm, prompts, opts \\ []), do: llm |> classify(prompts, opts) |> Error.unwrap!()

  @doc """
  Cross-encoder scores (vLLM's `LLM.score`): `text_1` against each `text_2` (or pairwise
  for two equal-length lists); `outputs` is a `%Vllm.ScoringOutput{score: float}`.
  """
  def score(llm, text_1, text_2, opts \\ [])

  def score(%__MODULE__{engine: e}, text_1, text_2, opts) do
    with {:ok, pairs} <- Vllm.Pooling.score_pairs(text_1, text_2),
         do: Vllm.Pooling.call(e, pairs, "score", nil, opts)
  end

  def score(other, _, _, _), do: not_llm(other)

  @doc "Like `score/4` but raises `Vllm.Error`."
  def score!(llm, text_1, text_2, opts \\ []),
    do: llm |> score(text_1, text_2, opts) |> Error.unwrap!()

  @doc "The tasks the loaded model serves: `[\"generate\"]`, or e.g. `[\"encode\", \"embed\"]`."
  def get_supported_tasks(%__MODULE__{engine: e}), do: Vllm.Pooling.supported_tasks(e)

  defp not_llm(other),
    do: {:error, Error.validation("expected a %Vllm.LLM{}, got #{inspect(other)}")}

  @doc "Stops the engine."
  @spec shutdown(t()) :: :ok
  def shutdown(%__MODULE__{engine: engine}), do: AsyncLLMEngine.shutdown(engine)

  @doc "The model's tokenizer (`Vllm.Tokenizer`)."
  @spec get_tokenizer(t()) :: {:ok, Vllm.Tokenizer.t()} | {:error, Error.t()}
  def get_tokenizer(%__MODULE__{engine: engine}), do: AsyncLLMEngine.get_tokenizer(engine)
  @doc "Like `get_tokenizer/1` but raises `Vllm.Error`."
  def get_tokenizer!(llm), do: llm |> get_tokenizer() |> Error.unwrap!()

  @doc "Like `get_default_sampling_params/1`, unwrapped."
  def get_default_sampling_params!(llm),
    do: llm |> get_default_sampling_params() |> Error.unwrap!()

  @doc "Resets the prefix cache (`Vllm.AsyncLLMEngine.reset_prefix_cache/2`)."
  def reset_prefix_cache(%__MODULE__{engine: engine}),
    do: AsyncLLMEngine.reset_prefix_cache(engine)

  @doc "Like `reset_prefix_cache/1` but raises `Vllm.Error`."
  def reset_prefix_cache!(llm), do: llm |> reset_prefix_cache() |> Error.unwrap!()

  @doc "Puts the engine to sleep (`level: 1 | 2`, see `Vllm.AsyncLLMEngine.sleep/2`)."
  def sleep(%__MODULE__{engine: engine}, opts \\ []), do: AsyncLLMEngine.sleep(engine, opts)
  @doc "Like `sleep/2` but raises `Vllm.Error`."
  def sleep!(llm, opts \\ []), do: llm |> sleep(opts) |> Error.unwrap!()

  @doc "Wakes the engine (`tags:`, see `Vllm.AsyncLLMEngine.wake_up/2`)."
  def wake_up(%__MODULE__{engine: engine}, opts \\ []), do: AsyncLLMEngine.wake_up(engine, opts)
  @doc "Like `wake_up/2` but raises `Vllm.Error`."
  def wake_up!(llm, opts \\ []), do: llm |> wake_up(opts) |> Error.unwrap!()

  @doc """
  The engine's metrics as vLLM names them, a list of `%{name, type, value}` (type
  `:counter` or `:gauge`): `vllm:num_requests_running`, `vllm:num_requests_waiting`,
  `vllm:kv_cache_usage_perc`, `vllm:prompt_tokens`, `vllm:generation_tokens`,
  `vllm:num_preemptions`, `vllm:prefix_cache_queries`, `vllm:prefix_cache_hits` (prompt
  tokens looked up / found in the prefix cache), `vllm:engine_memory_bytes`.
  """
  @spec get_metrics(t()) :: {:ok, [map()]} | {:error, Error.t()}
  def get_metrics(%__MODULE__{engine: engine}) do
    with {:ok, stats} <- AsyncLLMEngine.stats(engine),
         {:ok, cores} <- AsyncLLMEngine.cores(engine),
         {:ok, memory} <- AsyncLLMEngine.memory_usage(engine) do
      counters =
        Enum.reduce(cores, %{}, fn {_, r}, acc ->
          case Vllm.Native.counters(r) do
            {:ok, c} -> Map.merge(acc, c, fn _, a, b -> a + b end)
            _ -> acc
          end
        end)

      usage =
        if stats.total_blocks > 0,
          do: (stats.total_blocks - stats.free_blocks) / stats.total_blocks,
          else: 0.0

      {:ok,
       [
         %{name: "vllm:num_requests_running", type: :gauge, value: stats.num_running},
         %{name: "vllm:num_requests_waiting", type: :gauge, value: stats.num_waiting},
         %{name: "vllm:kv_cache_usage_perc", type: :gauge, value: usage},
         %{
           name: "vllm:prompt_tokens",
           type: :counter,
           value: Map.get(counters, :prompt_tokens, 0)
         },
         %{
           name: "vllm:generation_tokens",
           type: :counter,
           value: Map.get(counters, :generation_tokens, 0)
         },
         %{
           name: "vllm:num_preemptions",
           type: :counter,
           value: Map.get(counters, :num_preemptions, 0)
         },
         %{
           name: "vllm:prefix_cache_queries",
           type: :counter,
           value: Map.get(counters, :prefix_cache_queries, 0)
         },
         %{
           name: "vllm:prefix_cache_hits",
           type: :counter,
           value: Map.get(counters, :prefix_cache_hits, 0)
         },
         %{name: "vllm:engine_memory_bytes", type: :gauge, value: memory.total_bytes}
       ]}
    end
  end

  @doc "Like `get_metrics/1` but raises `Vllm.Error`."
  def get_metrics!(llm), do: llm |> get_metrics() |> Error.unwrap!()

  # Old-package habit: `generate(llm, prompts, sampling_params: ..., priority: ...)`.
  defp split_opts(params, [], known) when is_list(params) and params != [] do
    if Keyword.keyword?(params) and
         Enum.any?(Keyword.keys(params), &(&1 in [:sampling_params | known])) do
      Keyword.pop(params, :sampling_params)
    else
      {params, []}
    end
  end

  defp split_opts(params, opts, _known), do: {params, opts}

  defp per_prompt_params(params, count) when is_list(params) and params != [] do
    if Keyword.keyword?(params) do
      one_for_all(params, count)
    else
      if length(params) == count,
        do: collect(Enum.map(params, &AsyncLLMEngine.sampling_params/1)),
        else:
          {:error,
           Error.validation(
             "sampling_params: got #{length(params)} for #{count} prompts (give one, or one per prompt)"
           )}
    end
  end

  defp per_prompt_params(params, count), do: one_for_all(params, count)

  # As vLLM: one LoRA request for every prompt, or a list with one (or nil) per prompt.
  defp per_prompt_loras(loras, count) when is_list(loras) and loras != [] do
    if Keyword.keyword?(loras) do
      {:ok, List.duplicate(loras, count)}
    else
      if length(loras) == count,
        do: {:ok, loras},
        else:
          {:error,
           Error.validation("lora_request has #{length(loras)} entries for #{count} prompts")}
    end
  end

  defp per_prompt_loras(lora, count), do: {:ok, List.duplicate(lora, count)}

  defp one_for_all(params, count) do
    with {:ok, p} <- AsyncLLMEngine.sampling_params(params), do: {:ok, List.duplicate(p, count)}
  end

  defp collect(results) do
    Enum.reduce_while(results, {:ok, []}, fn
      {:ok, v}, {:ok, acc} -> {:cont, {:ok, [v | acc]}}
      {:error, _} = e, _ -> {:halt, e}
    end)
    |> case do
      {:ok, acc} -> {:ok, Enum.reverse(acc)}
      e -> e
    end
  end

  defp run_batch(engine, prompts, params, opts) do
    batch = "llm-#{System.unique_integer([:positive])}"
    request_opts = Keyword.take(opts, [:priority])
    loras = Keyword.get(opts, :lora_request) || List.duplicate(nil, length(prompts))

    submitted =
      prompts
      |> Enum.zip(params)
      |> Enum.zip(loras)
      |> Enum.with_index()
      |> Enum.reduce_while({:ok, []}, fn {{{prompt, p}, lora}, i}, {:ok, ids} ->
        id = "#{batch}-#{i}"
        # Only the final output matters here: skip the per-step messages.
        case AsyncLLMEngine.add_request(
               engine,
               id,
               prompt,
               %{p | output_kind: :final_only},
               Keyword.put(request_opts, :lora_request, lora)
             ) do
          :ok -> {:cont, {:ok, [id | ids]}}
          {:error, error} -> {:halt, {:error, error, ids}}
        end
      end)

    case submitted do
      {:ok, ids} ->
        ids = Enum.reverse(ids)
        deadline = deadline(Vllm.EngineOptions.timeout(opts, :infinity))

        progress = if opts[:use_tqdm], do: Vllm.Progress.new(length(ids))

        case collect_outputs(engine, Map.new(ids, &{&1, true}), %{}, deadline, progress) do
          {:ok, outputs} -> {:ok, Enum.map(ids, &Map.fetch!(outputs, &1))}
          {:error, error} -> abort_and_fail(engine, ids, error)
        end

      {:error, error, ids} ->
        abort_and_fail(engine, ids, error)
    end
  end

  defp abort_and_fail(engine, ids, error) do
    AsyncLLMEngine.abort(engine, ids)
    {:error, error}
  end

  defp deadline(:infinity), do: :infinity
  defp deadline(ms), do: System.monotonic_time(:millisecond) + ms

  defp remaining(:infinity), do: :infinity
  defp remaining(deadline), do: max(deadline - System.monotonic_time(:millisecond), 0)

  defp collect_outputs(engine, pending, done, deadline, progress) do
    if map_size(pending) == 0 do
      Vllm.Progress.finish(progress)
      {:ok, done}
    else
      receive do
        {:vllm, id, %RequestOutput{finished: true} = out} when is_map_key(pending, id) ->
          progress = Vllm.Progress.advance(progress, out)

          collect_outputs(
            engine,
            Map.delete(pending, id),
            Map.put(done, id, out),
            deadline,
            progress
          )

        {:vllm_error, id, reason} when is_map_key(pending, id) ->
          {:error, Error.from_native(reason)}
      after
        remaining(deadline) ->
          {:error,
           Error.new(:timeout, "generation did not finish within the :timeout of __runtime__")}
      end
    end
  end
end
