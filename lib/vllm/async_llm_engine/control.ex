defmodule Vllm.AsyncLLMEngine.Control do
  @moduledoc """
  The control functions of `Vllm.AsyncLLMEngine` (each is also callable there, with the
  same name and a `!` twin): health, pause and resume, sleep and wake-up, drain,
  data-parallel scaling, worker RPCs, profiling, stats logging, tokenizer and task info.
  """

  alias Vllm.{AsyncLLMEngine, Error, Native}

  @type engine :: AsyncLLMEngine.t()

  ## Health

  @doc """
  `:ok` when the engine process and every engine core answer (each core thread replies to
  a ping between two steps); `{:error, %Vllm.Error{category: :engine_dead}}` otherwise.
  """
  @spec check_health(engine()) :: :ok | {:error, Error.t()}
  def check_health(engine) do
    with {:ok, cores} <- AsyncLLMEngine.cores(engine) do
      Enum.reduce_while(cores, :ok, fn {rank, r}, :ok ->
        case Native.ping(r, 5_000) do
          :ok ->
            {:cont, :ok}

          {:error, {_, message}} ->
            {:halt, {:error, Error.new(:engine_dead, "engine core #{rank}: #{message}")}}
        end
      end)
    end
  end

  @doc "`{:ok, true}` when the engine stopped because of an error (not a shutdown)."
  @spec errored(engine()) :: {:ok, boolean()}
  def errored(%AsyncLLMEngine{pid: pid, resource: resource}) do
    {:ok, Process.alive?(pid) and not Native.is_alive(resource)}
  end

  @doc "`{:ok, true}` while the engine process runs and its cores can serve."
  @spec is_running(engine()) :: {:ok, boolean()}
  def is_running(%AsyncLLMEngine{pid: pid, resource: resource}),
    do: {:ok, Process.alive?(pid) and Native.is_alive(resource)}

  @doc "`{:ok, true}` once the engine was shut down or its process is gone."
  @spec is_stopped(engine()) :: {:ok, boolean()}
  def is_stopped(%AsyncLLMEngine{pid: pid}), do: {:ok, not Process.alive?(pid)}

  @doc """
  `{:ok, %Vllm.Error{category: :engine_dead}}` describing why the engine cannot serve, or
  `{:ok, nil}` while it can.
  """
  @spec dead_error(engine()) :: {:ok, Error.t() | nil}
  def dead_error(engine) do
    case check_health(engine) do
      :ok -> {:ok, nil}
      {:error, error} -> {:ok, error}
    end
  end

  ## Pause and resume

  @doc """
  Pauses generation (vLLM 0.14 semantics): new requests are accepted but wait, not lost,
  until `resume_generation/1`. `wait_for_inflight_requests: false` (default) aborts the
  requests in flight (they end with `finish_reason: :abort`); `true` lets them finish
  first. Returns once nothing runs. `clear_cache: true` (default) then resets the prefix
  cache.
  """
  @spec pause_generation(engine(), keyword()) :: :ok | {:error, Error.t()}
  def pause_generation(engine, opts \\ []) do
    with :ok <- check(opts, wait_for_inflight_requests: false, clear_cache: true),
         {:ok, wait} <- boolean(opts, :wait_for_inflight_requests, false),
         {:ok, clear} <- boolean(opts, :clear_cache, true) do
      AsyncLLMEngine.call(engine, {:pause, wait, clear})
    end
  end

  @doc "Resumes generation: the requests that waited start, in arrival order."
  @spec resume_generation(engine()) :: :ok | {:error, Error.t()}
  def resume_generation(engine), do: AsyncLLMEngine.call(engine, :resume)

  @doc "`{:ok, true}` while generation is paused."
  @spec is_paused(engine()) :: {:ok, boolean()} | {:error, Error.t()}
  def is_paused(engine), do: status(engine, :paused)

  @doc """
  Waits until no request runs (requests held by a pause do not count).
  `drain_timeout:` seconds (default 300); past it, a `:timeout` error.
  """
  @spec wait_for_requests_to_drain(engine(), keyword()) :: :ok | {:error, Error.t()}
  def wait_for_requests_to_drain(engine, opts \\ []) do
    with :ok <- check(opts, drain_timeout: 300),
         {:ok, ms} <- seconds(opts, :drain_timeout, 300) do
      AsyncLLMEngine.call(engine, {:drain, ms})
    end
  end

  ## Sleep

  @doc """
  Frees the engine's memory. `level: 1` (default) releases the KV cache memory (on the
  CPU the weights already live in host memory and stay); `level: 2` also drops the
  weights, reloaded from disk by `wake_up/2`. Requests in flight are aborted; new ones
  wait until the engine is awake. `memory_usage/1` shows what was released.
  """
  @spec sleep(engine(), keyword()) :: :ok | {:error, Error.t()}
  def sleep(engine, opts \\ []) do
    with :ok <- check(opts, level: 1),
         level when level in [1, 2] <- Keyword.get(opts, :level, 1) do
      AsyncLLMEngine.call(engine, {:sleep, level})
    else
      {:error, _} = error -> error
      level -> {:error, Error.validation("sleep level must be 1 or 2, got #{inspect(level)}")}
    end
  end

  @doc """
  Wakes the engine: `tags: nil` (default) restores everything; `tags: ["weights"]` or
  `["kv_cache"]` one part (vLLM's way to reload weights before reallocating the cache).
  Held requests start once the engine is fully awake.
  """
  @spec wake_up(engine(), keyword()) :: :ok | {:error, Error.t()}
  def wake_up(engine, opts \\ []) do
    with :ok <- check(opts, tags: nil) do
      case Keyword.get(opts, :tags) do
        nil ->
          AsyncLLMEngine.call(engine, {:wake_up, true, true})

        tags when is_list(tags) ->
          tags = Enum.map(tags, &to_string/1)

          case tags -- ["weights", "kv_cache"] do
            [] ->
              AsyncLLMEngine.call(
                engine,
                {:wake_up, "weights" in tags, "kv_cache" in tags}
              )

            unknown ->
              {:error,
               Error.validation(
                 "unknown wake_up tags #{inspect(unknown)}: use \"weights\" and \"kv_cache\""
               )}
          end

        other ->
          {:error, Error.validation("tags must be nil or a list, got #{inspect(other)}")}
      end
    end
  end

  @doc "`{:ok, true}` while any part of the engine sleeps."
  @spec is_sleeping(engine()) :: {:ok, boolean()} | {:error, Error.t()}
  def is_sleeping(engine) do
    with {:ok, level} <- status(engine, :sleep_level), do: {:ok, level > 0}
  end

  @doc """
  The engine's memory, summed over its cores: `%{weights_bytes, kv_cache_bytes,
  total_bytes, sleep_level}` (bytes the engine holds now; sleep releases them).
  """
  @spec memory_usage(engine()) :: {:ok, map()} | {:error, Error.t()}
  def memory_usage(engine) do
    with {:ok, per_core} <- collective_rpc(engine, "memory_usage") do
      sum = fn key -> per_core |> Enum.map(& &1[key]) |> Enum.sum() end

      {:ok,
       %{
         weights_bytes: sum.(:weights_bytes),
         kv_cache_bytes: sum.(:kv_cache_bytes),
         total_bytes: sum.(:weights_bytes) + sum.(:kv_cache_bytes),
         sleep_level: per_core |> Enum.map(& &1.sleep_level) |> Enum.max()
       }}
    end
  end

  ## Caches

  @doc """
  Forgets every cached prefix on every core: `{:ok, true}` when done. While requests hold
  KV blocks the answer is `{:ok, false}` (nothing reset), unless
  `reset_running_requests: true`, which preempts them first (they recompute and go on).
  """
  @spec reset_prefix_cache(engine(), keyword()) :: {:ok, boolean()} | {:error, Error.t()}
  def reset_prefix_cache(engine, opts \\ []) do
    with :ok <- check(opts, reset_running_requests: false),
         {:ok, running?} <- boolean(opts, :reset_running_requests, false),
         {:ok, cores} <- AsyncLLMEngine.cores(engine) do
      Enum.reduce_while(cores, {:ok, true}, fn {_rank, r}, {:ok, all?} ->
        case Native.reset_prefix_cache(r, running?) do
          {:ok, done?} -> {:cont, {:ok, all? and done?}}
          {:error, reason} -> {:halt, {:error, Error.from_native(reason)}}
        end
      end)
    end
  end

  @doc "`:ok`: no multimodal model is supported yet, so there is no multimodal cache."
  @spec reset_mm_cache(engine()) :: :ok | {:error, Error.t()}
  def reset_mm_cache(engine), do: check_health(engine)

  ## Info

  @doc ~s(The tasks the model serves: `["generate"]`, or e.g. `["encode", "embed"]`.)
  @spec get_supported_tasks(engine()) :: {:ok, [String.t()]} | {:error, Error.t()}
  def get_supported_tasks(engine) do
    with :ok <- alive(engine), do: Vllm.Pooling.supported_tasks(engine)
  end

  @doc "The model's tokenizer as a `%Vllm.Tokenizer{}`."
  @spec get_tokenizer(engine()) :: {:ok, Vllm.Tokenizer.t()} | {:error, Error.t()}
  def get_tokenizer(engine), do: Vllm.Tokenizer.from_engine(engine)

  @doc "Same as `get_tokenizer/1`."
  @spec tokenizer(engine()) :: {:ok, Vllm.Tokenizer.t()} | {:error, Error.t()}
  def tokenizer(engine), do: get_tokenizer(engine)

  @doc """
  `{:ok, false}`: OpenTelemetry request tracing (vLLM's `otlp_traces_endpoint`) is not
  built in; `start_profile/1` records engine steps instead.
  """
  @spec is_tracing_enabled(engine()) :: {:ok, boolean()} | {:error, Error.t()}
  def is_tracing_enabled(engine) do
    with :ok <- alive(engine), do: {:ok, false}
  end

  @doc """
  Logs one line like vLLM's stat logger: prompt and generation throughput (tokens/s)
  since the previous call, running and waiting requests, KV cache usage and prefix
  cache hit rate.
  """
  @spec do_log_stats(engine()) :: :ok | {:error, Error.t()}
  def do_log_stats(engine), do: AsyncLLMEngine.call(engine, :log_stats)

  ## Profiling

  @doc """
  Starts recording every engine step (schedule, forward, sample, detokenize, with batch
  sizes) on every core.
  """
  @spec start_profile(engine()) :: :ok | {:error, Error.t()}
  def start_profile(engine) do
    with {:ok, dir} <- profiler_dir(engine),
         do: AsyncLLMEngine.call(engine, {:start_profile, dir})
  end

  @doc """
  Stops recording and writes a Chrome trace JSON (open it in Perfetto or
  chrome://tracing) into the profiler directory (engine option `profiler_dir`, else
  `$VLLM_TORCH_PROFILER_DIR`, else `<tmp>/vllm_profile`). Returns its path, or one path
  per core when there are several.
  """
  @spec stop_profile(engine()) :: {:ok, Path.t() | [Path.t()]} | {:error, Error.t()}
  def stop_profile(engine), do: AsyncLLMEngine.call(engine, :stop_profile)

  defp profiler_dir(engine) do
    with {:ok, dir} <- status(engine, :profiler_dir) do
      case File.mkdir_p(dir) do
        :ok -> {:ok, dir}
        {:error, why} -> {:error, Error.validation("cannot create profiler_dir #{dir}: #{why}")}
      end
    end
  end

  ## Workers

  @doc """
  Runs `method` on every engine core (worker) and returns one result per core, in rank
  order. Methods: `"ping"` (`"pong"` from the core thread), `"device_info"`,
  `"memory_usage"`, `"num_free_blocks"`; others are `:unsupported`. Opts: `timeout:`
  seconds (for `"ping"`), `args: []`, `kwargs: %{}` (no method takes any).
  """
  @spec collective_rpc(engine(), String.t() | atom(), keyword()) ::
          {:ok, [term()]} | {:error, Error.t()}
  def collective_rpc(engine, method, opts \\ []) do
    method = to_string(method)

    with :ok <- check(opts, timeout: nil, args: [], kwargs: %{}),
         :ok <- no_arguments(opts),
         {:ok, timeout_ms} <- seconds(opts, :timeout, 5),
         {:ok, fun} <- rpc(method, timeout_ms),
         {:ok, cores} <- AsyncLLMEngine.cores(engine) do
      Enum.reduce_while(cores, {:ok, []}, fn {rank, r}, {:ok, acc} ->
        case fun.(rank, r) do
          {:ok, value} -> {:cont, {:ok, [value | acc]}}
          {:error, reason} -> {:halt, {:error, Error.from_native(reason)}}
        end
      end)
      |> case do
        {:ok, results} -> {:ok, Enum.reverse(results)}
        error -> error
      end
    end
  end

  defp rpc("ping", timeout_ms) do
    {:ok,
     fn _rank, r ->
       with :ok <- Native.ping(r, timeout_ms), do: {:ok, "pong"}
     end}
  end

  defp rpc("device_info", _) do
    {:ok,
     fn rank, r ->
       with {:ok, info} <- Native.engine_info(r) do
         {:ok,
          %{
            rank: rank,
            device: "cpu",
            dtype: "float32",
            architecture: info.architecture,
            num_blocks: info.num_blocks,
            block_size: info.block_size,
            schedulers_online: System.schedulers_online()
          }}
       end
     end}
  end

  defp rpc("memory_usage", _) do
    {:ok,
     fn _rank, r ->
       with {:ok, m} <- Native.memory_usage(r),
            do: {:ok, Map.put(m, :total_bytes, m.weights_bytes + m.kv_cache_bytes)}
     end}
  end

  defp rpc("num_free_blocks", _) do
    {:ok, fn _rank, r -> with {:ok, s} <- Native.stats(r), do: {:ok, s.free_blocks} end}
  end

  # Test-only fault injection: panics each core's thread. The NIF refuses it
  # (:unsupported) unless the OS environment has VLLM_FAULT_INJECTION=1, so production
  # code cannot reach it by accident; deliberately left out of the list below.
  defp rpc("__inject_fault__", _) do
    {:ok, fn _rank, r -> with :ok <- Native.inject_fault(r), do: {:ok, :fault_injected} end}
  end

  defp rpc(other, _) do
    {:error,
     Error.new(
       :unsupported,
       "collective_rpc method #{inspect(other)} is not supported: use \"ping\", \"device_info\", \"memory_usage\" or \"num_free_blocks\""
     )}
  end

  defp no_arguments(opts) do
    if Keyword.get(opts, :args, []) in [[], nil] and
         Keyword.get(opts, :kwargs, %{}) in [%{}, [], nil],
       do: :ok,
       else: {:error, Error.validation("collective_rpc methods take no args or kwargs")}
  end

  ## Data-parallel scaling

  @doc """
  Grows or shrinks the engine to `new_data_parallel_size` cores (data-parallel replicas,
  each with its own model copy, KV cache and threads). Growing loads the new cores;
  shrinking stops routing to the highest ranks and removes them once their requests
  finish (none is dropped); past `drain_timeout:` seconds (default 120) the shrink is
  cancelled with a `:timeout` error. New requests go to the least-loaded core.
  """
  @spec scale_elastic_ep(engine(), pos_integer(), keyword()) :: :ok | {:error, Error.t()}
  def scale_elastic_ep(engine, new_data_parallel_size, opts \\ [])

  def scale_elastic_ep(engine, n, opts) when is_integer(n) and n >= 1 do
    with :ok <- check(opts, drain_timeout: 120),
         {:ok, ms} <- seconds(opts, :drain_timeout, 120) do
      AsyncLLMEngine.call(engine, {:scale, n, ms})
    end
  end

  def scale_elastic_ep(_engine, n, _opts),
    do:
      {:error,
       Error.validation("new_data_parallel_size must be a positive integer, got #{inspect(n)}")}

  ## Pooling and LoRA (later issues)

  @doc """
  Loads and registers a LoRA adapter (`%Vllm.LoRARequest{}`) on every core: `{:ok, true}`
  when added, `{:ok, false}` when that id already names that path. Needs
  `enable_lora: true`. A missing directory is `:not_found`; a rank above `max_lora_rank`, a
  target module the model lacks, bad shapes, or an id already used for another path are
  `:validation`.
  """
  @spec add_lora(engine(), Vllm.LoRARequest.t()) :: {:ok, boolean()} | {:error, Error.t()}
  def add_lora(engine, lora_request) do
    with {:ok, lora} <- Vllm.LoRARequest.to_native(lora_request),
         :ok <- if(lora, do: :ok, else: {:error, Error.validation("add_lora needs a LoRA request")}) do
      each_core(engine, false, fn r -> Native.add_lora(r, lora) end, &or/2)
    end
  end

  @doc "Forgets an adapter (running requests keep it): `{:ok, removed?}`."
  @spec remove_lora(engine(), pos_integer()) :: {:ok, boolean()} | {:error, Error.t()}
  def remove_lora(engine, lora_int_id),
    do: each_core(engine, false, &Native.remove_lora(&1, lora_int_id), &or/2)

  @doc """
  Keeps an added adapter resident in one of the `max_loras` slots until removed:
  `{:ok, true}`; an unknown id is `:not_found`.
  """
  @spec pin_lora(engine(), pos_integer()) :: {:ok, boolean()} | {:error, Error.t()}
  def pin_lora(engine, lora_int_id),
    do: each_core(engine, true, &Native.pin_lora(&1, lora_int_id), &and/2)

  @doc "The added adapters (of the first core): `{:ok, [%{lora_name, lora_int_id, lora_path, pinned}]}`."
  @spec list_loras(engine()) :: {:ok, [map()]} | {:error, Error.t()}
  def list_loras(engine) do
    with :ok <- alive(engine), {:ok, [{_rank, r} | _]} <- AsyncLLMEngine.cores(engine) do
      case Native.list_loras(r) do
        {:ok, list} -> {:ok, list}
        {:error, reason} -> {:error, Error.from_native(reason)}
      end
    end
  end

  defp each_core(engine, initial, fun, combine) do
    with {:ok, cores} <- AsyncLLMEngine.cores(engine) do
      Enum.reduce_while(cores, {:ok, initial}, fn {_rank, r}, {:ok, acc} ->
        case fun.(r) do
          {:ok, value} -> {:cont, {:ok, combine.(acc, value)}}
          {:error, reason} -> {:halt, {:error, Error.from_native(reason)}}
        end
      end)
    end
  end

  ## Helpers

  defp status(engine, key) do
    case AsyncLLMEngine.call(engine, :status) do
      %{} = status -> {:ok, Map.fetch!(status, key)}
      {:error, _} = error -> error
    end
  end

  defp alive(engine) do
    case AsyncLLMEngine.call(engine, :status) do
      %{} -> :ok
      error -> error
    end
  end

  defp check(opts, defaults),
    do: AsyncLLMEngine.check_opts(opts, [:__runtime__ | Keyword.keys(defaults)])

  defp boolean(opts, key, default) do
    case Keyword.get(opts, key, default) do
      value when is_boolean(value) ->
        {:ok, value}

      other ->
        {:error,
         Error.validation("option #{inspect(key)} must be a boolean, got #{inspect(other)}")}
    end
  end

  # vLLM's timeouts are in seconds; nil means the default.
  defp seconds(opts, key, default) do
    case Keyword.get(opts, key) || default do
      s when is_number(s) and s >= 0 ->
        {:ok, round(s * 1000)}

      other ->
        {:error,
         Error.validation(
           "option #{inspect(key)} must be seconds (a number >= 0), got #{inspect(other)}"
         )}
    end
  end
end
