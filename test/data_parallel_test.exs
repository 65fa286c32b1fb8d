defmodule Vllm.DataParallelTest do
  # Several engine cores (data-parallel replicas) behind one engine process.
  use ExUnit.Case

  import Vllm.TestModel
  alias Vllm.{AsyncLLMEngine, Error, RequestOutput}

  @params [temperature: 0.0, max_tokens: 40, ignore_eos: true]

  setup_all do
    engine =
      start_engine!(
        data_parallel_size: 2,
        kv_cache_memory_bytes: 32 * 1024 * 1024,
        max_num_seqs: 8
      )

    {:ok, engine: engine}
  end

  defp free_blocks(engine), do: AsyncLLMEngine.collective_rpc!(engine, "num_free_blocks")

  defp receive_final(id) do
    receive do
      {:vllm, ^id, %RequestOutput{finished: true} = out} -> out
      {:vllm, ^id, _} -> receive_final(id)
    after
      60_000 -> flunk("request #{id} did not finish")
    end
  end

  defp start_two(engine, opts \\ [[], []]) do
    for o <- opts do
      id = request_id()
      :ok = AsyncLLMEngine.add_request(engine, id, "Once upon a time", @params, o)
      assert_receive {:vllm, ^id, %RequestOutput{finished: false}}, 30_000
      id
    end
  end

  test "data_parallel_size starts that many cores; shrinking drains without dropping; growing again spreads requests",
       %{engine: engine} do
    assert {:ok, ["pong", "pong"]} = AsyncLLMEngine.collective_rpc(engine, "ping")
    [total, total] = free_blocks(engine)

    # Two requests land on the two cores (least loaded first).
    ids = start_two(engine)
    assert [a, b] = free_blocks(engine)
    assert a < total and b < total

    # Shrink while both run: the call returns once core 1 is idle; nothing is aborted.
    assert :ok = AsyncLLMEngine.scale_elastic_ep(engine, 1, drain_timeout: 60)
    for id <- ids, do: assert(hd(receive_final(id).outputs).finish_reason == :length)
    assert {:ok, ["pong"]} = AsyncLLMEngine.collective_rpc(engine, "ping")

    # Grow back: the new core serves, requests land on both.
    assert :ok = AsyncLLMEngine.scale_elastic_ep(engine, 2)
    assert [^total, ^total] = free_blocks(engine)
    ids = start_two(engine)
    assert [a, b] = free_blocks(engine)
    assert a < total and b < total
    for id <- ids, do: receive_final(id)
  end

  test "data_parallel_rank pins a request; a shrink past its drain_timeout keeps the core",
       %{engine: engine} do
    [total | _] = free_blocks(engine)
    [id] = start_two(engine, [[data_parallel_rank: 1]])
    assert [^total, busy] = free_blocks(engine)
    assert busy < total

    assert {:error, %Error{category: :timeout}} =
             AsyncLLMEngine.scale_elastic_ep(engine, 1, drain_timeout: 0.05)

    # The request kept running and both cores still serve.
    assert hd(receive_final(id).outputs).finish_reason == :length
    assert {:ok, ["pong", "pong"]} = AsyncLLMEngine.collective_rpc(engine, "ping")

    assert {:error, %Error{category: :validation}} =
             AsyncLLMEngine.add_request(engine, request_id(), "Hi", nil, data_parallel_rank: 5)

    assert {:error, %Error{category: :validation}} = AsyncLLMEngine.scale_elastic_ep(engine, 0)
  end

  test "requests go to the core with the fewest pending tokens, not the fewest requests", %{
    engine: engine
  } do
    long = request_id("long")
    [a, b] = [request_id("a"), request_id("b")]

    :ok =
      AsyncLLMEngine.add_request(engine, long, "Once upon a time",
        max_tokens: 300,
        ignore_eos: true
      )

    :ok =
      AsyncLLMEngine.add_request(engine, a, "Once upon a time", max_tokens: 40, ignore_eos: true)

    :ok =
      AsyncLLMEngine.add_request(engine, b, "Once upon a time", max_tokens: 40, ignore_eos: true)

    # Counting requests would put b beside the long one (1 each, lowest rank wins).
    ranks =
      Map.new(:sys.get_state(engine.pid).requests, fn {id, {_owner, rank}} -> {id, rank} end)

    assert %{^long => 0, ^a => 1, ^b => 1} = ranks
    :ok = AsyncLLMEngine.abort(engine, long)
    for id <- [long, a, b], do: receive_final(id)
  end

  test "with device cuda each core gets its own GPU, counting from the one named" do
    alias Vllm.AsyncLLMEngine.Server
    assert Server.core_native(%{device: "cuda"}, 1).device == "cuda:1"
    assert Server.core_native(%{device: "cuda:2"}, 0).device == "cuda:2"
    assert Server.core_native(%{device: "cuda:2"}, 1).device == "cuda:3"
    assert Server.core_native(%{device: "cpu"}, 3).device == "cpu"
    # Not a device name the engine knows: left for it to refuse.
    assert Server.core_native(%{device: "gpu:1"}, 1).device == "gpu:1"
    assert Server.core_native(%{model: "m.gguf"}, 3) == %{model: "m.gguf"}
  end

  test "with tensor_parallel_size N core i gets the N GPUs from i * N" do
    alias Vllm.AsyncLLMEngine.Server
    assert Server.core_native(%{device: "cuda", tensor_parallel_size: 2}, 0).device == "cuda:0"
    assert Server.core_native(%{device: "cuda", tensor_parallel_size: 2}, 1).device == "cuda:2"
    assert Server.core_native(%{device: "cuda:1", tensor_parallel_size: 4}, 2).device == "cuda:9"
    assert Server.core_native(%{device: "cpu", tensor_parallel_size: 2}, 1).device == "cpu"
  end

  test "a core added while the engine sleeps sleeps too; wake_up wakes every core", %{
    engine: engine
  } do
    :ok = AsyncLLMEngine.sleep(engine, level: 1)
    :ok = AsyncLLMEngine.scale_elastic_ep(engine, 3)
    usage = AsyncLLMEngine.collective_rpc!(engine, "memory_usage")
    assert Enum.map(usage, & &1.kv_cache_bytes) == [0, 0, 0]
    :ok = AsyncLLMEngine.wake_up(engine)

    assert Enum.all?(
             AsyncLLMEngine.collective_rpc!(engine, "memory_usage"),
             &(&1.kv_cache_bytes > 0)
           )

    assert :ok = AsyncLLMEngine.scale_elastic_ep(engine, 2)
    assert {:ok, ["pong", "pong"]} = AsyncLLMEngine.collective_rpc(engine, "ping")
  end
end
