defmodule Vllm.AbortTest do
  # Every way a request can end early must free its KV blocks.
  use ExUnit.Case

  import Vllm.TestModel
  alias Vllm.{AsyncLLMEngine, RequestOutput}

  @long [temperature: 0.0, max_tokens: 400, ignore_eos: true]

  setup_all do
    {:ok, engine: start_engine!()}
  end

  setup %{engine: engine} do
    assert_all_blocks_free(engine)
    :ok
  end

  test "explicit abort ends the request with :abort and frees its blocks", %{engine: engine} do
    id = request_id()
    :ok = AsyncLLMEngine.add_request(engine, id, "Once upon a time", @long)
    assert_receive {:vllm, ^id, %RequestOutput{finished: false}}, 30_000
    assert %{free_blocks: free, total_blocks: total} = AsyncLLMEngine.stats!(engine)
    assert free < total

    assert :ok = AsyncLLMEngine.abort(engine, id)
    final = receive_final(id)
    assert hd(final.outputs).finish_reason == :abort
    assert_all_blocks_free(engine)
    # Aborting again, or an unknown id, is harmless.
    assert :ok = AsyncLLMEngine.abort(engine, [id, "no-such-request"])
  end

  test "halting the stream aborts the request", %{engine: engine} do
    {:ok, stream} = AsyncLLMEngine.generate(engine, "Once upon a time", @long, request_id())
    assert [_, _, _] = Enum.take(stream, 3)
    assert_all_blocks_free(engine)
    refute_received {:vllm, _, _}
  end

  test "an exception while consuming the stream aborts the request", %{engine: engine} do
    {:ok, stream} = AsyncLLMEngine.generate(engine, "Once upon a time", @long, request_id())
    assert_raise RuntimeError, fn -> Enum.each(stream, fn _ -> raise "consumer failed" end) end
    assert_all_blocks_free(engine)
  end

  test "a stream that waits past its __runtime__ timeout raises :timeout and aborts", %{
    engine: engine
  } do
    {:ok, stream} =
      AsyncLLMEngine.generate(engine, "Once upon a time", @long, request_id(),
        __runtime__: [timeout: 0]
      )

    assert_raise Vllm.Error, ~r/timeout/, fn -> Enum.to_list(stream) end
    assert_all_blocks_free(engine)
  end

  test "killing the owner process aborts its requests", %{engine: engine} do
    parent = self()

    owner =
      spawn(fn ->
        for i <- 1..3,
            do:
              :ok =
                AsyncLLMEngine.add_request(
                  engine,
                  "owned-#{i}-#{inspect(self())}",
                  "Once upon a time",
                  @long
                )

        receive do: ({:vllm, _, _} -> send(parent, :started))
        Process.sleep(:infinity)
      end)

    assert_receive :started, 30_000

    assert AsyncLLMEngine.stats!(engine).num_running + AsyncLLMEngine.stats!(engine).num_waiting >
             0

    Process.exit(owner, :kill)
    assert_all_blocks_free(engine)
  end

  test "a request owned by `to:` is aborted when that process dies", %{engine: engine} do
    sink = spawn(fn -> Process.sleep(:infinity) end)
    :ok = AsyncLLMEngine.add_request(engine, request_id(), "Once upon a time", @long, to: sink)
    Process.sleep(200)
    Process.exit(sink, :kill)
    assert_all_blocks_free(engine)
  end

  test "shutdown stops an engine with a request in flight, and is idempotent" do
    other = start_engine!()
    {:ok, stream} = AsyncLLMEngine.generate(other, "Once upon a time", @long, request_id())
    [_] = Enum.take(stream, 1)
    assert :ok = AsyncLLMEngine.shutdown(other)
    assert :ok = AsyncLLMEngine.shutdown(other)
    assert {:ok, false} = AsyncLLMEngine.is_running(other)
  end

  defp receive_final(id) do
    receive do
      {:vllm, ^id, %RequestOutput{finished: true} = out} -> out
      {:vllm, ^id, _} -> receive_final(id)
    after
      30_000 -> flunk("no final output for #{id}")
    end
  end
end
