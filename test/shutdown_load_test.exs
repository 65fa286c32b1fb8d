defmodule Vllm.ShutdownLoadTest do
  # shutdown/1 with 100 requests in flight: every caller gets one final output with
  # finish_reason :abort and nothing after it, the engine's threads are joined, and the
  # native engine resource is released once nothing references it.
  use ExUnit.Case

  import Vllm.TestModel
  alias Vllm.{AsyncLLMEngine, Native}

  @callers 100
  @params [temperature: 0.0, max_tokens: 200, ignore_eos: true]

  test "shutdown with 100 requests in flight" do
    # The global compute pool's threads, started lazily from an engine core thread,
    # inherit its name: start them before counting.
    warm_up_compute_pool()
    threads_before = engine_threads()
    counts_before = Native.resource_counts()
    parent = self()

    # Everything that references the engine lives in `runner`, so that once it and the
    # callers exit, the resource is garbage.
    runner =
      spawn(fn ->
        engine = start_engine!()
        send(parent, {:threads_running, engine_threads()})

        me = self()

        callers =
          for i <- 1..@callers do
            spawn(fn -> caller(engine, "load-#{i}", me, parent) end)
          end

        for c <- callers, do: receive(do: ({:submitted, ^c} -> :ok))
        wait_in_flight(engine, @callers)
        send(parent, {:in_flight, AsyncLLMEngine.stats!(engine)})
        started = System.monotonic_time(:millisecond)
        :ok = AsyncLLMEngine.shutdown(engine)

        IO.puts(
          "\nshutdown with #{@callers} requests in flight: #{System.monotonic_time(:millisecond) - started} ms"
        )

        send(parent, {:shut_down, callers})
      end)

    assert_receive {:threads_running, running}, 120_000
    assert running == threads_before + 2
    assert_receive {:in_flight, stats}, 120_000
    assert stats.num_running + stats.num_waiting == @callers
    assert_receive {:shut_down, callers}, 60_000

    for c <- callers do
      assert_receive {:final, ^c, %Vllm.RequestOutput{finished: true} = out, after_final}, 10_000
      assert [%{finish_reason: :abort}] = out.outputs
      assert after_final == []
    end

    # Threads joined by shutdown/1 itself.
    assert engine_threads() == threads_before

    # The resource goes once its last holder is collected.
    refute Process.alive?(runner)
    :erlang.garbage_collect()
    Enum.each(Process.list(), &:erlang.garbage_collect/1)
    assert wait_released(counts_before.released + 1) >= counts_before.released + 1
    assert Native.resource_counts().created == counts_before.created + 1
  end

  defp caller(engine, id, runner, parent) do
    :ok = AsyncLLMEngine.add_request(engine, id, "Once upon a time #{id}", @params)
    send(runner, {:submitted, self()})
    final = await_final(id)
    # Nothing may follow the final output.
    after_final =
      receive do
        {:vllm, ^id, _} = m -> [m]
        {:vllm_error, ^id, _} = m -> [m]
      after
        300 -> []
      end

    send(parent, {:final, self(), final, after_final})
  end

  defp await_final(id) do
    receive do
      {:vllm, ^id, %{finished: true} = out} -> out
      {:vllm, ^id, _} -> await_final(id)
      {:vllm_error, ^id, reason} -> {:error, reason}
    after
      120_000 -> {:error, :no_final_output}
    end
  end

  defp wait_in_flight(engine, n, tries \\ 600) do
    s = AsyncLLMEngine.stats!(engine)

    if s.num_running + s.num_waiting < n and tries > 0 do
      Process.sleep(20)
      wait_in_flight(engine, n, tries - 1)
    end
  end

  defp wait_released(target, tries \\ 200) do
    released = Native.resource_counts().released

    if released < target and tries > 0 do
      Process.sleep(50)
      Enum.each(Process.list(), &:erlang.garbage_collect/1)
      wait_released(target, tries - 1)
    else
      released
    end
  end

  defp warm_up_compute_pool do
    engine = start_engine!()
    {:ok, stream} = AsyncLLMEngine.generate(engine, "Hi", [max_tokens: 2], request_id())
    Enum.to_list(stream)
    AsyncLLMEngine.shutdown(engine)
  end

  # The engine threads of this OS process (core and output thread of every engine).
  defp engine_threads do
    Path.wildcard("/proc/self/task/*/comm")
    |> Enum.count(fn f ->
      case File.read(f) do
        {:ok, name} -> String.trim(name) in ["vllm-engine-cor", "vllm-output"]
        _ -> false
      end
    end)
  end
end
