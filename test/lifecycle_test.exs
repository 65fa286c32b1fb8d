defmodule Vllm.LifecycleTest do
  # Starting engines every documented way, stopping them, and engines that die.
  use ExUnit.Case

  import Vllm.TestModel
  alias Vllm.{AsyncLLMEngine, Error, Native, RequestOutput}

  @small [dtype: "float32", seed: 0, kv_cache_memory_bytes: 32 * 1024 * 1024]

  defp engine_threads do
    "/proc/self/task/*/comm"
    |> Path.wildcard()
    |> Enum.count(fn f -> File.read(f) == {:ok, "vllm-engine-cor\n"} end)
  end

  test "shutdown ends in-flight requests with :abort; the engine's threads are gone after" do
    engine = AsyncLLMEngine.from_engine_args!(Keyword.put(@small, :model, path!()))
    threads = engine_threads()
    id = request_id()

    :ok =
      AsyncLLMEngine.add_request(engine, id, "Once upon a time", max_tokens: 400, ignore_eos: true)

    assert_receive {:vllm, ^id, %RequestOutput{finished: false}}, 30_000

    assert :ok = AsyncLLMEngine.shutdown(engine)

    assert_receive {:vllm, ^id,
                    %RequestOutput{finished: true, outputs: [%{finish_reason: :abort}]}},
                   5_000

    assert engine_threads() == threads - 1
    refute Native.is_alive(engine.resource)

    assert {:ok, true} = AsyncLLMEngine.is_stopped(engine)
    assert {:ok, false} = AsyncLLMEngine.is_running(engine)
    assert {:error, %Error{category: :engine_dead}} = AsyncLLMEngine.check_health(engine)
    assert {:ok, %Error{category: :engine_dead}} = AsyncLLMEngine.dead_error(engine)

    assert {:error, %Error{category: :engine_dead}} =
             AsyncLLMEngine.add_request(engine, "x", "Hi", nil)
  end

  test "from_vllm_config takes vLLM's grouped config" do
    config = %{
      model_config: [model: path!(), dtype: "float32", max_model_len: 512],
      cache_config: %{block_size: 32, kv_cache_memory_bytes: 16 * 1024 * 1024},
      scheduler_config: [max_num_seqs: 4]
    }

    engine = AsyncLLMEngine.from_vllm_config!(config)
    {:ok, [info]} = AsyncLLMEngine.collective_rpc(engine, "device_info")
    assert info.block_size == 32
    {:ok, tok} = AsyncLLMEngine.tokenizer(engine)
    assert tok.max_model_len == 512
    AsyncLLMEngine.shutdown(engine)

    assert {:error, %Error{category: :validation}} = AsyncLLMEngine.from_vllm_config(:nope)
  end

  test "every engine option is accepted or refused with a reason" do
    refused = [
      {[tensor_parallel_size: 2], :unsupported, "needs a CUDA device"},
      {[tensor_parallel_size: 0], :validation, "tensor_parallel_size"},
      {[device: "cuda"], :unsupported, "CPU"},
      {[runner: "pooling"], :unsupported, "GGUF"},
      {[dtype: "bfloat16"], :unsupported, "float32"},
      {[quantization: "awq"], :unsupported, "GGUF"},
      {[revision: "v2"], :unsupported, "local paths"},
      {[data_parallel_size: 0], :validation, "data_parallel_size"},
      {[max_loras: -1], :validation, "max_loras"},
      {[no_such_option: 1], :validation, "no_such_option"}
    ]

    for {opts, category, words} <- refused do
      assert {:error, %Error{category: ^category, message: m}} =
               AsyncLLMEngine.new(path!(), opts),
             inspect(opts)

      assert m =~ words, "#{inspect(opts)}: #{m}"
    end

    accepted = [
      gpu_memory_utilization: 0.5,
      enforce_eager: true,
      enable_lora: false,
      max_loras: 2,
      max_lora_rank: 8,
      max_cpu_loras: 2,
      tensor_parallel_size: 1,
      data_parallel_size: 1,
      runner: "generate",
      quantization: "gguf",
      trust_remote_code: true,
      enable_prefix_caching: true,
      enable_chunked_prefill: true,
      __runtime__: [timeout_profile: :ml_inference]
    ]

    engine = AsyncLLMEngine.new!(path!(), @small ++ accepted)
    assert :ok = AsyncLLMEngine.check_health(engine)
    AsyncLLMEngine.shutdown(engine)
  end

  test "an engine under a supervisor: killed, it is restarted; callers of the old one get :engine_dead" do
    start_supervised!({AsyncLLMEngine, [model: path!(), name: :restartable_engine] ++ @small})
    {:ok, old} = AsyncLLMEngine.whereis(:restartable_engine)

    Process.exit(old.pid, :kill)
    new_pid = wait_for_restart(:restartable_engine, old.pid)
    assert new_pid != old.pid

    assert {:error, %Error{category: :engine_dead}} =
             AsyncLLMEngine.generate(old, "Hello", [max_tokens: 2], request_id())

    assert {:error, %Error{category: :engine_dead}} = AsyncLLMEngine.check_health(old)
    assert {:error, %Error{category: :engine_dead}} = AsyncLLMEngine.pause_generation(old)
    # The old native engine went down with its process (it monitors its owner).
    assert wait_until(fn -> not Native.is_alive(old.resource) end)

    {:ok, new} = AsyncLLMEngine.whereis(:restartable_engine)
    {:ok, stream} = AsyncLLMEngine.generate(new, "Hello", [max_tokens: 2], request_id())
    assert %RequestOutput{finished: true} = stream |> Enum.to_list() |> List.last()
  end

  defp wait_for_restart(name, old_pid, tries \\ 600) do
    case Process.whereis(name) do
      pid when is_pid(pid) and pid != old_pid ->
        pid

      _ when tries > 0 ->
        Process.sleep(100)
        wait_for_restart(name, old_pid, tries - 1)

      _ ->
        flunk("#{inspect(name)} was not restarted")
    end
  end

  defp wait_until(fun, tries \\ 100) do
    cond do
      fun.() -> true
      tries == 0 -> false
      true -> Process.sleep(50) && wait_until(fun, tries - 1)
    end
  end
end
