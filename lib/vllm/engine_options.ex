defmodule Vllm.EngineOptions do
  @moduledoc false
  # Validates engine options (vLLM's EngineArgs names) before they reach the NIF: unknown
  # keys and wrong types are :validation errors naming the key.

  alias Vllm.Error

  # key => {check, what it must be}; nil is accepted for every key (= the default).
  defp checks,
    do: %{
      model: {&is_binary/1, "a path to a .gguf file or a model directory"},
      tokenizer: {&is_binary/1, "a path to a tokenizer.json or its directory"},
      dtype:
        {&(&1 in ["auto", "float32", "float", "bfloat16", "float16", "half"]),
         ~s("auto", "float32", "bfloat16" or "float16")},
      device: {&is_binary/1, ~s("auto", "cpu", "cuda" or "cuda:N")},
      load_format: {&(&1 in ["auto", "dummy"]), ~s("auto" or "dummy")},
      seed: {&(is_integer(&1) and &1 >= 0), "a non-negative integer"},
      max_model_len: {&(is_integer(&1) and &1 > 0), "a positive integer"},
      max_num_seqs: {&(is_integer(&1) and &1 > 0), "a positive integer"},
      max_waiting_requests: {&(is_integer(&1) and &1 >= 0), "a non-negative integer"},
      max_num_batched_tokens: {&(is_integer(&1) and &1 > 0), "a positive integer"},
      block_size: {&(is_integer(&1) and &1 > 0 and &1 <= 256), "an integer in 1..256"},
      kv_cache_memory_bytes: {&(is_integer(&1) and &1 > 0), "a positive integer"},
      gpu_memory_utilization: {&(is_number(&1) and &1 > 0 and &1 <= 1), "a number in (0, 1]"},
      enable_prefix_caching: {&is_boolean/1, "a boolean"},
      enable_chunked_prefill: {&is_boolean/1, "a boolean"},
      enforce_eager: {&is_boolean/1, "a boolean"},
      num_threads: {&(is_integer(&1) and &1 > 0), "a positive integer"},
      enable_lora: {&is_boolean/1, "a boolean"},
      max_loras: {&(is_integer(&1) and &1 > 0), "a positive integer"},
      max_lora_rank: {&(is_integer(&1) and &1 > 0), "a positive integer"},
      max_cpu_loras: {&(is_integer(&1) and &1 > 0), "a positive integer"},
      tensor_parallel_size: {&(is_integer(&1) and &1 > 0), "a positive integer"},
      data_parallel_size: {&(is_integer(&1) and &1 > 0), "a positive integer"},
      revision: {&is_binary/1, "a string"},
      runner: {&(&1 in ["auto", "generate", "pooling"]), ~s("auto", "generate" or "pooling")},
      quantization: {&is_binary/1, "a string"},
      profiler_dir: {&is_binary/1, "a directory path"},
      trust_remote_code: {&is_boolean/1, "a boolean"},
      __runtime__: {&Keyword.keyword?/1, "a keyword list"},
      name: {&(is_atom(&1) or is_tuple(&1)), "a process name"},
      # The model name the engine serves under in Vllm.Cluster (default: the model's base name).
      served_model_name: {&(is_binary(&1) and &1 != ""), "a non-empty string"}
    }

  # Passed to the NIF; the rest are Elixir-side only (or accepted and ignored).
  @native_keys [
    :model,
    :tokenizer,
    :dtype,
    :device,
    :load_format,
    :enforce_eager,
    :tensor_parallel_size,
    :gpu_memory_utilization,
    :seed,
    :max_model_len,
    :max_num_seqs,
    :max_waiting_requests,
    :max_num_batched_tokens,
    :block_size,
    :kv_cache_memory_bytes,
    :enable_prefix_caching,
    :enable_chunked_prefill,
    :num_threads,
    :quantization,
    :enable_lora,
    :max_loras,
    :max_lora_rank,
    :max_cpu_loras,
    :runner
  ]

  @doc "The accepted option keys."
  def keys, do: Map.keys(checks())

  @doc "Validates `opts` (keyword or map); returns `{:ok, native_map, opts}`."
  @spec validate(keyword() | map()) :: {:ok, map(), keyword()} | {:error, Error.t()}
  def validate(opts) when is_list(opts) or is_map(opts) do
    with {:ok, opts} <- to_keyword(opts),
         :ok <- check_each(opts),
         {:ok, opts} <- resolve_model(opts),
         :ok <- check_device(opts[:device]),
         :ok <- check_supported(opts) do
      native =
        opts |> Keyword.take(@native_keys) |> Enum.reject(fn {_, v} -> is_nil(v) end) |> Map.new()

      {:ok, native, opts}
    end
  end

  def validate(other),
    do: {:error, Error.validation("engine options must be a keyword list, got #{inspect(other)}")}

  @doc """
  Where `stop_profile` writes traces: the `profiler_dir` option, else
  `$VLLM_TORCH_PROFILER_DIR` (vLLM's variable), else `<tmp>/vllm_profile`.
  """
  def profiler_dir(opts) do
    opts[:profiler_dir] || System.get_env("VLLM_TORCH_PROFILER_DIR") ||
      Path.join(System.tmp_dir!(), "vllm_profile")
  end

  @doc "The `__runtime__: [timeout: ms]` option, or `default`."
  def timeout(opts, default) do
    case Keyword.get(opts, :__runtime__) do
      runtime when is_list(runtime) ->
        Keyword.get(runtime, :timeout) ||
          VLLM.timeout_profile_ms(Keyword.get(runtime, :timeout_profile)) || default

      _ ->
        default
    end
  end

  defp to_keyword(opts) do
    Enum.reduce_while(opts, {:ok, []}, fn
      {key, value}, {:ok, acc} when is_atom(key) ->
        {:cont, {:ok, [{key, value} | acc]}}

      {key, value}, {:ok, acc} when is_binary(key) ->
        case Enum.find(keys(), &(Atom.to_string(&1) == key)) do
          nil -> {:halt, {:error, Error.validation("unknown engine option #{inspect(key)}")}}
          atom -> {:cont, {:ok, [{atom, value} | acc]}}
        end

      other, _ ->
        {:halt,
         {:error,
          Error.validation("engine options must be key-value pairs, got #{inspect(other)}")}}
    end)
    |> case do
      {:ok, acc} -> {:ok, Enum.reverse(acc)}
      error -> error
    end
  end

  defp check_each(opts) do
    Enum.find_value(opts, :ok, fn {key, value} ->
      case Map.fetch(checks(), key) do
        :error ->
          {:error,
           Error.validation(
             "unknown engine option #{inspect(key)}; known options: #{Enum.join(Enum.sort(keys()), ", ")}"
           )}

        {:ok, {ok?, expected}} ->
          unless is_nil(value) or ok?.(value) do
            {:error,
             Error.validation(
               "engine option #{inspect(key)} must be #{expected}, got #{inspect(value)}"
             )}
          end
      end
    end)
  end

  # A hub id becomes its snapshot directory in the local Hugging Face cache.
  defp resolve_model(opts) do
    with :ok <- check_model(opts[:model]),
         {:ok, path} <- Vllm.Hub.resolve(opts[:model]) do
      {:ok, Keyword.put(opts, :model, path)}
    end
  end

  defp check_model(nil),
    do:
      {:error,
       Error.validation("engine option :model is required (a .gguf file or a model directory)")}

  defp check_model(_model), do: :ok

  # CPU and CUDA devices go to the NIF, which refuses CUDA in a CPU-only build
  # (:unsupported, naming the cargo feature); other names are not devices at all.
  defp check_device(device) when device in [nil, "auto", "cpu", "cuda", "gpu"], do: :ok

  defp check_device("cuda:" <> ordinal = device) do
    case Integer.parse(ordinal) do
      {n, ""} when n >= 0 -> :ok
      _ -> bad_device(device)
    end
  end

  defp check_device(device), do: bad_device(device)

  defp bad_device(device),
    do:
      {:error,
       Error.validation(
         ~s(engine option :device must be "auto", "cpu", "cuda" or "cuda:N", got #{inspect(device)})
       )}

  defp cuda?(device), do: device in ["cuda", "gpu"] or String.starts_with?(device || "", "cuda:")

  # Options this build cannot honour are refused with the reason, never silently dropped.
  # gpu_memory_utilization and enforce_eager act on the CUDA backend (KV cache sizing, CUDA
  # graphs); on the CPU they have nothing to act on.
  defp check_supported(opts) do
    cond do
      opts[:dtype] in ["bfloat16", "float16", "half"] and not cuda?(opts[:device]) ->
        unsupported(
          "dtype #{inspect(opts[:dtype])}: the CPU backend computes in float32; use \"auto\" or \"float32\""
        )

      (opts[:tensor_parallel_size] || 1) > 1 and not cuda?(opts[:device]) ->
        unsupported(
          "tensor_parallel_size #{opts[:tensor_parallel_size]}: tensor parallelism splits a model over GPUs; it needs a CUDA device (device: \"cuda\")"
        )

      opts[:revision] not in [nil, "main"] ->
        unsupported(
          "revision #{inspect(opts[:revision])}: models load from local paths, which have no revisions"
        )

      opts[:quantization] not in [nil, "gguf"] ->
        unsupported(
          "quantization #{inspect(opts[:quantization])}: only \"gguf\" (a GGUF file's quantized matrices kept quantized) is supported"
        )

      opts[:quantization] == "gguf" and not String.ends_with?(opts[:model] || "", ".gguf") ->
        {:error, Error.validation(~s(quantization "gguf" needs a .gguf model file))}

      true ->
        :ok
    end
  end

  defp unsupported(message), do: {:error, Error.new(:unsupported, message)}
end
