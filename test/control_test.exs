defmodule Vllm.ControlTest do
  # The engine's control functions, each observed through its effect on one shared engine.
  use ExUnit.Case

  import ExUnit.CaptureLog
  import Vllm.TestModel
  alias Vllm.{AsyncLLMEngine, Error, RequestOutput}

  @long [temperature: 0.0, max_tokens: 400, ignore_eos: true]
  @short [temperature: 0.0, max_tokens: 12, ignore_eos: true]

  setup_all do
    dir = Path.join(System.tmp_dir!(), "vllm-control-test-#{System.unique_integer([:positive])}")
    engine = start_engine!(kv_cache_memory_bytes: 64 * 1024 * 1024, profiler_dir: dir)
    {:ok, reference} = complete(engine, "Once upon a time", @short)
    {:ok, engine: engine, reference: reference, profiler_dir: dir}
  end

  setup %{engine: engine} do
    assert_all_blocks_free(engine)
    :ok
  end

  defp complete(engine, prompt, params) do
    with {:ok, stream} <- AsyncLLMEngine.generate(engine, prompt, params, request_id()) do
      {:ok, stream |> Enum.to_list() |> List.last()}
    end
  end

  defp receive_final(id, timeout \\ 60_000) do
    receive do
      {:vllm, ^id, %RequestOutput{finished: true} = out} -> out
      {:vllm, ^id, _} -> receive_final(id, timeout)
    after
      timeout -> flunk("request #{id} did not finish")
    end
  end

  test "paused: a new request produces nothing until resume, then completes; in-flight ones are aborted",
       %{engine: engine} do
    running = request_id()
    :ok = AsyncLLMEngine.add_request(engine, running, "Once upon a time", @long)
    assert_receive {:vllm, ^running, %RequestOutput{finished: false}}, 30_000

    assert :ok = AsyncLLMEngine.pause_generation(engine)
    assert {:ok, true} = AsyncLLMEngine.is_paused(engine)
    assert hd(receive_final(running).outputs).finish_reason == :abort

    waiting = request_id()
    assert :ok = AsyncLLMEngine.add_request(engine, waiting, "Hello", @short)
    refute_receive {:vllm, ^waiting, _}, 500
    assert %{num_running: 0, num_waiting: 0} = AsyncLLMEngine.stats!(engine)

    assert :ok = AsyncLLMEngine.resume_generation(engine)
    assert {:ok, false} = AsyncLLMEngine.is_paused(engine)
    final = receive_final(waiting)
    assert hd(final.outputs).finish_reason == :length
    assert length(hd(final.outputs).token_ids) == 12
  end

  test "a request held by a pause can be aborted", %{engine: engine} do
    :ok = AsyncLLMEngine.pause_generation(engine)
    id = request_id()
    :ok = AsyncLLMEngine.add_request(engine, id, "Hello", @short)
    :ok = AsyncLLMEngine.abort(engine, id)
    assert hd(receive_final(id).outputs).finish_reason == :abort
    :ok = AsyncLLMEngine.resume_generation(engine)
    refute_receive {:vllm, ^id, _}, 300
  end

  test "pause with wait_for_inflight_requests lets running requests finish", %{engine: engine} do
    id = request_id()
    :ok = AsyncLLMEngine.add_request(engine, id, "Once upon a time", @short)
    assert :ok = AsyncLLMEngine.pause_generation(engine, wait_for_inflight_requests: true)
    # pause returned only after the request ended: its final output is already here.
    assert_received {:vllm, ^id, %RequestOutput{finished: true} = final}
    assert hd(final.outputs).finish_reason == :length
    :ok = AsyncLLMEngine.resume_generation(engine)

    assert {:error, %Error{category: :validation}} =
             AsyncLLMEngine.pause_generation(engine, wait_for_inflight_requests: :yes)
  end

  test "wait_for_requests_to_drain returns only when nothing runs", %{engine: engine} do
    ids = for _ <- 1..3, do: request_id()
    Enum.each(ids, &(:ok = AsyncLLMEngine.add_request(engine, &1, "Once upon a time", @short)))
    assert :ok = AsyncLLMEngine.wait_for_requests_to_drain(engine, drain_timeout: 60)
    for id <- ids, do: assert_received({:vllm, ^id, %RequestOutput{finished: true}})
    assert %{num_running: 0, num_waiting: 0} = AsyncLLMEngine.stats!(engine)

    long = request_id()
    :ok = AsyncLLMEngine.add_request(engine, long, "Once upon a time", @long)

    assert {:error, %Error{category: :timeout}} =
             AsyncLLMEngine.wait_for_requests_to_drain(engine, drain_timeout: 0.2)

    :ok = AsyncLLMEngine.abort(engine, long)
    receive_final(long)
  end

  test "sleep level 1 frees the KV cache; requests wait; the same greedy output after wake_up",
       %{engine: engine, reference: reference} do
    {:ok, awake} = AsyncLLMEngine.memory_usage(engine)
    assert awake.kv_cache_bytes > 0 and awake.weights_bytes > 0
    assert awake.sleep_level == 0

    assert :ok = AsyncLLMEngine.sleep(engine, level: 1)
    assert {:ok, true} = AsyncLLMEngine.is_sleeping(engine)
    {:ok, asleep} = AsyncLLMEngine.memory_usage(engine)
    assert asleep.kv_cache_bytes == 0
    assert asleep.weights_bytes == awake.weights_bytes
    assert asleep.sleep_level == 1

    id = request_id()
    :ok = AsyncLLMEngine.add_request(engine, id, "Once upon a time", @short)
    refute_receive {:vllm, ^id, _}, 300

    assert :ok = AsyncLLMEngine.wake_up(engine)
    assert {:ok, false} = AsyncLLMEngine.is_sleeping(engine)
    assert {:ok, ^awake} = AsyncLLMEngine.memory_usage(engine)
    assert text(receive_final(id)) == text(reference)
  end

  test "sleep level 2 drops the weights; wake_up by tags reloads them from disk",
       %{engine: engine, reference: reference} do
    {:ok, awake} = AsyncLLMEngine.memory_usage(engine)
    assert :ok = AsyncLLMEngine.sleep(engine, level: 2)

    assert {:ok, %{weights_bytes: 0, kv_cache_bytes: 0, sleep_level: 2}} =
             AsyncLLMEngine.memory_usage(engine)

    assert :ok = AsyncLLMEngine.wake_up(engine, tags: ["weights"])
    {:ok, half} = AsyncLLMEngine.memory_usage(engine)
    assert half.weights_bytes == awake.weights_bytes and half.kv_cache_bytes == 0
    assert {:ok, true} = AsyncLLMEngine.is_sleeping(engine)

    assert :ok = AsyncLLMEngine.wake_up(engine, tags: ["kv_cache"])
    assert {:ok, false} = AsyncLLMEngine.is_sleeping(engine)
    assert {:ok, out} = complete(engine, "Once upon a time", @short)
    assert text(out) == text(reference)

    assert {:error, %Error{category: :validation}} = AsyncLLMEngine.sleep(engine, level: 3)
    assert {:error, %Error{category: :validation}} = AsyncLLMEngine.wake_up(engine, tags: ["gpu"])
  end

  test "health checks on a live engine", %{engine: engine} do
    assert :ok = AsyncLLMEngine.check_health(engine)
    assert {:ok, false} = AsyncLLMEngine.errored(engine)
    assert {:ok, true} = AsyncLLMEngine.is_running(engine)
    assert {:ok, false} = AsyncLLMEngine.is_stopped(engine)
    assert {:ok, nil} = AsyncLLMEngine.dead_error(engine)
    assert AsyncLLMEngine.check_health!(engine) == :ok
  end

  test "collective_rpc runs a method on every worker", %{engine: engine} do
    assert {:ok, ["pong"]} = AsyncLLMEngine.collective_rpc(engine, "ping")

    assert {:ok, [%{device: "cpu", rank: 0}]} =
             AsyncLLMEngine.collective_rpc(engine, "device_info")

    assert {:ok, [%{weights_bytes: w, kv_cache_bytes: kv}]} =
             AsyncLLMEngine.collective_rpc(engine, "memory_usage")

    assert w > 100_000_000 and kv > 0
    total = AsyncLLMEngine.stats!(engine).total_blocks
    assert {:ok, [^total]} = AsyncLLMEngine.collective_rpc(engine, :num_free_blocks, timeout: 5)

    assert {:error, %Error{category: :unsupported}} =
             AsyncLLMEngine.collective_rpc(engine, "load_weights")
  end

  test "start_profile/stop_profile write a Chrome trace of the engine steps",
       %{engine: engine, profiler_dir: dir} do
    assert :ok = AsyncLLMEngine.start_profile(engine)
    assert {:error, %Error{category: :validation}} = AsyncLLMEngine.start_profile(engine)
    {:ok, _} = complete(engine, "Once upon a time", @short)
    assert {:ok, path} = AsyncLLMEngine.stop_profile(engine)
    assert Path.dirname(path) == dir

    %{"traceEvents" => events} = path |> File.read!() |> Vllm.TestJSON.decode!()
    steps = Enum.filter(events, &(&1["ph"] == "X"))
    names = steps |> Enum.map(& &1["name"]) |> Enum.uniq() |> Enum.sort()
    assert names == ["detokenize", "forward", "sample", "schedule"]
    # One forward per generated token (the prompt fits one prefill chunk).
    assert Enum.count(steps, &(&1["name"] == "forward")) == 12

    for e <- steps do
      assert is_number(e["ts"]) and is_number(e["dur"]) and e["dur"] >= 0
      assert e["args"]["num_seqs"] == 1
    end

    assert {:error, %Error{category: :validation}} = AsyncLLMEngine.stop_profile(engine)
  end

  test "do_log_stats logs throughput, requests, KV usage and prefix hit rate", %{engine: engine} do
    capture_log(fn -> :ok = AsyncLLMEngine.do_log_stats(engine) end)
    {:ok, _} = complete(engine, "Once upon a time", @short)
    log = capture_log(fn -> assert :ok = AsyncLLMEngine.do_log_stats(engine) end)

    assert [_, prompt, generation] =
             Regex.run(
               ~r/prompt throughput: ([\d.]+) tokens\/s, Avg generation throughput: ([\d.]+)/,
               log
             )

    assert String.to_float(prompt) > 0 and String.to_float(generation) > 0
    assert log =~ "Running: 0 reqs, Waiting: 0 reqs"
    assert log =~ "KV cache usage: 0.0%"
    assert [_, rate] = Regex.run(~r/Prefix cache hit rate: ([\d.]+)%/, log)
    assert String.to_float(rate) >= 0.0
  end

  test "the tokenizer", %{engine: engine} do
    assert {:ok, tok} = AsyncLLMEngine.get_tokenizer(engine)
    assert {:ok, ^tok} = AsyncLLMEngine.tokenizer(engine)
    assert {:ok, ids} = Vllm.Tokenizer.encode(tok, "Hello world")
    assert {:ok, "Hello world"} = Vllm.Tokenizer.decode(tok, ids)
    assert {:ok, 49152} = Vllm.Tokenizer.vocab_size(tok)
    assert {:ok, eos} = Vllm.Tokenizer.eos_token_id(tok)
    assert Vllm.Tokenizer.decode!(tok, [eos], skip_special_tokens: false) == "<|im_end|>"

    messages = [%{"role" => "user", "content" => "Hi"}]
    assert {:ok, prompt} = Vllm.Tokenizer.apply_chat_template(tok, messages)
    assert prompt =~ "<|im_start|>user\nHi<|im_end|>"
    assert String.ends_with?(prompt, "<|im_start|>assistant\n")
    assert {:ok, prompt_ids} = Vllm.Tokenizer.apply_chat_template(tok, messages, tokenize: true)
    assert Vllm.Tokenizer.decode!(tok, prompt_ids, skip_special_tokens: false) == prompt

    assert {:error, %Error{category: :validation}} = Vllm.Tokenizer.encode(tok, "x", bogus: 1)
  end

  test "reset_prefix_cache forgets cached prefixes; refused while requests hold blocks unless told",
       %{engine: engine} do
    prompt = String.duplicate("The quick brown fox jumps over the lazy dog. ", 8)
    {:ok, _} = complete(engine, prompt, @short)
    {:ok, again} = complete(engine, prompt, @short)
    assert again.num_cached_tokens > 0

    assert {:ok, true} = AsyncLLMEngine.reset_prefix_cache(engine)
    {:ok, fresh} = complete(engine, prompt, @short)
    assert fresh.num_cached_tokens == 0

    id = request_id()
    :ok = AsyncLLMEngine.add_request(engine, id, "Once upon a time", @long)
    assert_receive {:vllm, ^id, %RequestOutput{finished: false}}, 30_000
    assert {:ok, false} = AsyncLLMEngine.reset_prefix_cache(engine)
    assert {:ok, true} = AsyncLLMEngine.reset_prefix_cache(engine, reset_running_requests: true)
    # The preempted request recomputes and goes on.
    assert_receive {:vllm, ^id, %RequestOutput{finished: false}}, 30_000
    :ok = AsyncLLMEngine.abort(engine, id)
    receive_final(id)
  end

  test "tasks, tracing, caches and LoRA/pooling placeholders", %{engine: engine} do
    assert {:ok, ["generate"]} = AsyncLLMEngine.get_supported_tasks(engine)
    assert {:ok, false} = AsyncLLMEngine.is_tracing_enabled(engine)
    assert :ok = AsyncLLMEngine.reset_mm_cache(engine)
    assert {:ok, []} = AsyncLLMEngine.list_loras(engine)

    # Real LoRA tests: test/lora_test.exs. Without enable_lora, adapters are refused.
    assert {:error, %Error{category: :validation}} = AsyncLLMEngine.add_lora(engine, %Vllm.LoRARequest{})

    assert {:error, %Error{category: :validation, message: m}} =
             AsyncLLMEngine.add_lora(engine, VLLM.lora_request!("a", 1, "/tmp/a"))

    assert m =~ "enable_lora"

    assert {:error, %Error{category: :unsupported, message: m}} =
             AsyncLLMEngine.encode(engine, "x", nil, request_id())

    assert m =~ "pooling model"
  end
end
