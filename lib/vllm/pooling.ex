defmodule Vllm.Pooling do
  @moduledoc """
  Pooling requests on a pooling model (BERT encoders such as all-MiniLM-L6-v2): `embed`,
  `encode`, `classify` and `score`. The engine batches them like generation requests
  (prefill only). `Vllm.LLM`, `VLLM` and `Vllm.AsyncLLMEngine` expose these functions;
  this module holds the shared work.

  Each request is answered by one message to its owner:
  `{:vllm_pooling, request_id, %Vllm.PoolingRequestOutput{}}` or
  `{:vllm_error, request_id, {category, message}}`.
  """

  alias Vllm.{AsyncLLMEngine, Error, Native, PoolingParams, PoolingRequestOutput}

  @type prompt :: Vllm.Prompt.t() | {String.t(), String.t()}

  @doc "The tasks the loaded model serves: `[\"generate\"]` or e.g. `[\"encode\", \"embed\"]`."
  @spec supported_tasks(AsyncLLMEngine.t()) :: {:ok, [String.t()]} | {:error, Error.t()}
  def supported_tasks(%AsyncLLMEngine{resource: resource}),
    do: native(Native.supported_tasks(resource))

  @doc """
  Queues one pooling request whose output goes to `to` (default: the caller). `task`:
  "embed", "encode", "classify" or "score" (then `prompt` is a `{text_a, text_b}` pair);
  `params` a `%Vllm.PoolingParams{}`, keyword list or nil.
  """
  @spec submit(AsyncLLMEngine.t(), String.t(), prompt(), String.t(), term(), pid()) ::
          :ok | {:error, Error.t()}
  def submit(%AsyncLLMEngine{resource: resource}, request_id, prompt, task, params, to \\ self()) do
    with :ok <- check_request_id(request_id),
         {:ok, prompt} <- normalize_prompt(prompt, task),
         {:ok, params} <- params(params),
         {:ok, task} <- task(params, task) do
      native_params =
        Map.take(Map.from_struct(params), [:dimensions, :normalize, :use_activation])

      native(Native.pooling_request(resource, request_id, prompt, task, native_params, to))
    end
  end

  @doc """
  One request as a stream (the form of `Vllm.AsyncLLMEngine.generate/5`): `{:ok, stream}`
  yielding its single `%Vllm.PoolingRequestOutput{}`. Opts: `task` (default "encode"),
  `__runtime__: [timeout: ms]`.
  """
  def stream(engine, prompt, params, request_id, opts \\ []) do
    task = Keyword.get(opts, :task, "encode")
    timeout = Vllm.EngineOptions.timeout(opts, :infinity)

    with :ok <- submit(engine, request_id, prompt, task, params) do
      {:ok,
       Stream.resource(
         fn -> :pending end,
         fn
           :pending ->
             case await(request_id, timeout) do
               {:ok, output} -> {[output], :done}
               {:error, error} -> raise error
             end

           :done ->
             {:halt, :done}
         end,
         fn _ -> :ok end
       )}
    end
  end

  @doc """
  Runs `prompts` (one or a list) through `task` and returns their outputs in order.
  `params`: nil, one `%Vllm.PoolingParams{}`/keyword list for all, or one per prompt.
  """
  @spec run(AsyncLLMEngine.t(), [prompt()], String.t(), term(), keyword()) ::
          {:ok, [PoolingRequestOutput.t()]} | {:error, Error.t()}
  def run(engine, prompts, task, params, opts \\ []) do
    batch = "pool-#{System.unique_integer([:positive])}"
    timeout = Vllm.EngineOptions.timeout(opts, :infinity)

    with {:ok, per_prompt} <- per_prompt(params, length(prompts)) do
      submitted =
        prompts
        |> Enum.zip(per_prompt)
        |> Enum.with_index()
        |> Enum.reduce_while({:ok, []}, fn {{prompt, p}, i}, {:ok, ids} ->
          id = "#{batch}-#{i}"

          case submit(engine, id, prompt, task, p) do
            :ok -> {:cont, {:ok, [id | ids]}}
            {:error, error} -> {:halt, {:error, error, ids}}
          end
        end)

      case submitted do
        {:ok, ids} -> collect(engine, Enum.reverse(ids), timeout)
        {:error, error, ids} -> fail(engine, ids, error)
      end
    end
  end

  defp collect(engine, ids, timeout) do
    Enum.reduce_while(ids, {:ok, []}, fn id, {:ok, acc} ->
      case await(id, timeout) do
        {:ok, output} -> {:cont, {:ok, [output | acc]}}
        {:error, error} -> {:halt, {:error, error}}
      end
    end)
    |> case do
      {:ok, outputs} -> {:ok, Enum.reverse(outputs)}
      {:error, error} -> fail(engine, ids, error)
    end
  end

  # Drops whatever is still queued; late answers are flushed from the mailbox.
  defp fail(%AsyncLLMEngine{resource: resource}, ids, error) do
    Enum.each(ids, &Native.abort(resource, &1))

    Enum.each(ids, fn id ->
      receive do
        {:vllm_pooling, ^id, _} -> :ok
        {:vllm_error, ^id, _} -> :ok
      after
        0 -> :ok
      end
    end)

    {:error, error}
  end

  @doc "Waits for request `id`'s answer."
  def await(id, timeout) do
    receive do
      {:vllm_pooling, ^id, %PoolingRequestOutput{} = output} -> {:ok, output}
      {:vllm_error, ^id, reason} -> {:error, Error.from_native(reason)}
    after
      timeout ->
        {:error, Error.new(:timeout, "pooling request #{id} did not finish within #{timeout} ms")}
    end
  end

  @call_opts [
    :pooling_params,
    :pooling_task,
    :dimensions,
    :normalize,
    :use_activation,
    :use_tqdm,
    :__runtime__
  ]

  @doc """
  The offline call behind `Vllm.LLM.embed/3` and friends: `params` (nil, one, or one per
  prompt) with opts `pooling_params:` and the shorthand fields `dimensions:`, `normalize:`,
  `use_activation:` applied on top; `__runtime__: [timeout: ms]`; `use_tqdm` is ignored.
  """
  def call(engine, prompts, task, params, opts) when is_list(opts) do
    unknown = opts |> Keyword.keys() |> Enum.reject(&(&1 in @call_opts))

    cond do
      not Keyword.keyword?(opts) ->
        {:error, Error.validation("options must be a keyword list, got #{inspect(opts)}")}

      unknown != [] ->
        {:error,
         Error.validation(
           "unknown option(s) #{inspect(unknown)}; accepted: #{Enum.map_join(@call_opts, ", ", &inspect/1)}"
         )}

      true ->
        params = params || Keyword.get(opts, :pooling_params)
        overrides = Keyword.take(opts, [:dimensions, :normalize, :use_activation])

        with {:ok, params} <- with_overrides(params, overrides, length(prompts)),
             do: run(engine, prompts, task, params, opts)
    end
  end

  def call(_engine, _prompts, _task, _params, opts),
    do: {:error, Error.validation("options must be a keyword list, got #{inspect(opts)}")}

  defp with_overrides(params, [], _n), do: {:ok, params}

  defp with_overrides(params, overrides, n) do
    with {:ok, list} <- per_prompt(params, n) do
      list
      |> Enum.reduce_while({:ok, []}, fn p, {:ok, acc} ->
        case params(p) do
          {:ok, p} ->
            case PoolingParams.clone(p, overrides) do
              {:ok, p} -> {:cont, {:ok, [p | acc]}}
              error -> {:halt, error}
            end

          error ->
            {:halt, error}
        end
      end)
      |> case do
        {:ok, list} -> {:ok, Enum.reverse(list)}
        error -> error
      end
    end
  end

  @doc """
  vLLM's pairing of score inputs: one text against many, or two lists of equal length.
  """
  def score_pairs(text_1, text_2) do
    case {List.wrap(text_1), List.wrap(text_2)} do
      {[a], bs} when bs != [] ->
        {:ok, Enum.map(bs, &{a, &1})}

      {as, bs} when length(as) == length(bs) and as != [] ->
        {:ok, Enum.zip(as, bs)}

      {as, bs} ->
        {:error,
         Error.validation(
           "score needs one text_1 for many text_2, or lists of equal length; got #{length(as)} and #{length(bs)}"
         )}
    end
  end

  @doc "Just the vectors of embed outputs."
  def embeddings(outputs), do: Enum.map(outputs, & &1.outputs.embedding)

  defp per_prompt(params, n) when is_list(params) and params != [] do
    if Keyword.keyword?(params),
      do: List.duplicate(params, n) |> ok(),
      else: list_params(params, n)
  end

  defp per_prompt(params, n), do: {:ok, List.duplicate(params, n)}

  defp list_params(params, n) when length(params) == n, do: {:ok, params}

  defp list_params(params, n),
    do:
      {:error,
       Error.validation(
         "got #{length(params)} pooling params for #{n} prompts (give one or one each)"
       )}

  defp ok(x), do: {:ok, x}

  defp params(nil), do: {:ok, %PoolingParams{}}
  defp params(params), do: PoolingParams.new(params)

  # PoolingParams.task, when set, must agree with the call's task.
  defp task(%PoolingParams{task: nil}, task), do: {:ok, task}
  defp task(%PoolingParams{task: task}, task), do: {:ok, task}

  defp task(%PoolingParams{task: given}, task),
    do:
      {:error,
       Error.validation("pooling params task #{inspect(given)} does not match #{inspect(task)}")}

  defp normalize_prompt({a, b}, "score") when is_binary(a) and is_binary(b), do: {:ok, {a, b}}

  defp normalize_prompt(other, "score"),
    do:
      {:error,
       Error.validation(
         "score takes {text_a, text_b} pairs of strings, got #{inspect(other, limit: 5)}"
       )}

  defp normalize_prompt(prompt, _task), do: Vllm.Prompt.normalize(prompt)

  defp check_request_id(id) when is_binary(id) and id != "", do: :ok

  defp check_request_id(id),
    do: {:error, Error.validation("request_id must be a non-empty string, got #{inspect(id)}")}

  defp native(:ok), do: :ok
  defp native({:ok, value}), do: {:ok, value}
  defp native({:error, reason}), do: {:error, Error.from_native(reason)}
end
