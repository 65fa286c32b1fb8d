defmodule Vllm.AbortStormTest do
  # Requests from many processes ending in every way at random times: afterwards every
  # KV block is free, the engine process forgot every request, every full request has
  # its whole (greedy: exact) output, and nothing arrives after a final output.
  # The long version (10,000 requests from 200 processes) runs with VLLM_LONG_TESTS=1
  # or `mix test --only long`.
  use ExUnit.Case

  import Vllm.TestModel
  alias Vllm.{AsyncLLMEngine, Storm}

  setup_all do
    {:ok, engine: start_engine!()}
  end

  test "abort storm: 300 requests from 20 processes", %{engine: engine} do
    storm(engine, 300, 20)
  end

  @tag :long
  @tag timeout: 3_600_000
  test "abort storm (long): 10,000 requests from 200 processes", %{engine: engine} do
    storm(engine, 10_000, 200)
  end

  defp storm(engine, total, procs) do
    started = System.monotonic_time(:millisecond)
    tally = Storm.run(engine, total, procs, 42)
    seconds = (System.monotonic_time(:millisecond) - started) / 1000
    IO.puts("\nabort storm #{total}/#{procs}: #{inspect(tally)} in #{Float.round(seconds, 1)} s")
    assert Enum.sum(Map.values(tally)) == total
    assert tally[:full] > 0 and tally[:aborted] > 0 and tally[:halted] > 0 and tally[:killed] > 0
    stats = assert_all_blocks_free(engine, 30_000)
    assert stats.free_blocks == stats.total_blocks
    assert %{num_requests: 0, num_queued: 0} = wait_registry_empty(engine)
  end

  defp wait_registry_empty(engine, tries \\ 250) do
    status = AsyncLLMEngine.call(engine, :status)

    if status.num_requests > 0 and tries > 0 do
      Process.sleep(20)
      wait_registry_empty(engine, tries - 1)
    else
      status
    end
  end
end
