defmodule Vllm.EngineFailureTest do
  # A panic inside the engine thread (test-only fault injection) costs the callers an
  # :engine_dead error within a second, never the BEAM; a supervisor restarts the engine.
  use ExUnit.Case

  import Vllm.TestModel
  alias Vllm.{AsyncLLMEngine, Error}

  @moduletag :capture_log
  @long [temperature: 0.0, max_tokens: 2000, ignore_eos: true]
  @greedy [temperature: 0.0, max_tokens: 8]

  setup do
    on_exit(fn -> System.delete_env("VLLM_FAULT_INJECTION") end)
  end

  test "fault injection is refused unless VLLM_FAULT_INJECTION=1 is set" do
    System.delete_env("VLLM_FAULT_INJECTION")
    engine = start_engine!()

    assert {:error, %Error{category: :unsupported, message: m}} =
             AsyncLLMEngine.collective_rpc(engine, "__inject_fault__")

    assert m =~ "VLLM_FAULT_INJECTION"
    assert :ok = AsyncLLMEngine.check_health(engine)
    assert {:ok, stream} = AsyncLLMEngine.generate(engine, "Hello", @greedy, request_id())
    assert %{finished: true} = stream |> Enum.to_list() |> List.last()
    AsyncLLMEngine.shutdown(engine)
  end

  test "a panic in the engine thread: every caller gets :engine_dead within 1 s, the BEAM stays up, the supervisor restarts the engine" do
    name = :engine_failure_test_engine

    pid =
      start_supervised!({AsyncLLMEngine, model: path!(), dtype: "float32", seed: 0, name: name})

    {:ok, engine} = AsyncLLMEngine.whereis(name)
    reference = greedy_text(engine)
    parent = self()

    # Four callers of each form, each with a long request producing tokens.
    callers =
      for i <- 1..8 do
        form = if rem(i, 2) == 0, do: :message, else: :stream
        spawn(fn -> caller(engine, form, parent) end)
      end

    for c <- callers, do: assert_receive({:running, ^c}, 60_000)

    System.put_env("VLLM_FAULT_INJECTION", "1")
    injected_at = System.monotonic_time(:millisecond)
    assert {:ok, [:fault_injected]} = AsyncLLMEngine.collective_rpc(engine, "__inject_fault__")

    latencies =
      for c <- callers do
        assert_receive {:result, ^c, {:error, %Error{category: :engine_dead}}, at}, 1_000
        assert at - injected_at < 1_000
        at - injected_at
      end

    IO.puts(
      "\nengine failure: 8 callers got :engine_dead after at most #{Enum.max(latencies)} ms"
    )

    assert {:error, %Error{category: :engine_dead}} = AsyncLLMEngine.check_health(engine)

    assert {:error, %Error{category: :engine_dead}} =
             AsyncLLMEngine.generate(engine, "Hello", @greedy, request_id())

    # The BEAM is up (this test runs), and the supervisor started a fresh engine.
    new_pid = wait_restart(name, pid)
    assert new_pid != pid
    {:ok, restarted} = AsyncLLMEngine.whereis(name)
    assert :ok = AsyncLLMEngine.check_health(restarted)
    assert greedy_text(restarted) == reference
    assert_all_blocks_free(restarted)
  end

  defp caller(engine, :message, parent) do
    id = request_id("msg")
    :ok = AsyncLLMEngine.add_request(engine, id, "Once upon a time", @long)
    await_first(id)
    send(parent, {:running, self()})

    result =
      receive_until_end(id, fn
        {:vllm_error, reason} -> {:error, Error.from_native(reason)}
        {:finished, out} -> {:ok, out}
      end)

    send(parent, {:result, self(), result, System.monotonic_time(:millisecond)})
  end

  defp caller(engine, :stream, parent) do
    {:ok, stream} = AsyncLLMEngine.generate(engine, "Once upon a time", @long, request_id("st"))

    result =
      try do
        stream
        |> Stream.with_index()
        |> Enum.each(fn {_, i} -> if i == 0, do: send(parent, {:running, self()}) end)

        {:ok, :finished}
      rescue
        e in Error -> {:error, e}
      end

    send(parent, {:result, self(), result, System.monotonic_time(:millisecond)})
  end

  defp await_first(id) do
    receive do
      {:vllm, ^id, _} -> :ok
    after
      60_000 -> raise "no output for #{id}"
    end
  end

  defp receive_until_end(id, fun) do
    receive do
      {:vllm, ^id, %{finished: true} = out} -> fun.({:finished, out})
      {:vllm, ^id, _} -> receive_until_end(id, fun)
      {:vllm_error, ^id, reason} -> fun.({:vllm_error, reason})
    after
      10_000 -> {:timeout, id}
    end
  end

  defp wait_restart(name, old, tries \\ 200) do
    case Process.whereis(name) do
      pid when is_pid(pid) and pid != old ->
        pid

      _ when tries > 0 ->
        Process.sleep(50)
        wait_restart(name, old, tries - 1)

      _ ->
        flunk("the supervisor did not restart the engine")
    end
  end

  defp greedy_text(engine) do
    {:ok, stream} =
      AsyncLLMEngine.generate(engine, "The capital of France is", @greedy, request_id())

    stream |> Enum.to_list() |> List.last() |> text()
  end
end
