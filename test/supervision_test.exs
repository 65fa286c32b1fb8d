defmodule Vllm.SupervisionTest do
  # An engine can sit in a supervision tree and be found by name.
  use ExUnit.Case

  import Vllm.TestModel
  alias Vllm.AsyncLLMEngine

  test "loading a model does not block the BEAM schedulers" do
    ticker = Task.async(fn -> tick(System.monotonic_time(:millisecond), 0) end)
    engine = start_engine!()
    send(ticker.pid, :stop)
    longest_gap = Task.await(ticker, 60_000)
    AsyncLLMEngine.shutdown(engine)
    # A 5 ms timer ticking through the whole load; a blocked scheduler would show seconds.
    assert longest_gap < 500
  end

  defp tick(last, longest) do
    receive do
      :stop -> longest
    after
      5 ->
        now = System.monotonic_time(:millisecond)
        tick(now, max(longest, now - last))
    end
  end

  test "child_spec starts a named engine that serves requests" do
    pid =
      start_supervised!(
        {AsyncLLMEngine, model: path!(), dtype: "float32", name: :supervised_engine}
      )

    assert Process.whereis(:supervised_engine) == pid
    {:ok, engine} = AsyncLLMEngine.whereis(:supervised_engine)
    assert {:ok, true} = AsyncLLMEngine.is_running(engine)

    {:ok, stream} =
      AsyncLLMEngine.generate(engine, "Hello", [temperature: 0.0, max_tokens: 3], request_id())

    assert %Vllm.RequestOutput{finished: true} = stream |> Enum.to_list() |> List.last()
    assert {:error, %Vllm.Error{category: :engine_dead}} = AsyncLLMEngine.whereis(:no_such_engine)
  end
end
