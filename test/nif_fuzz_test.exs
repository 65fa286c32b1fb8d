defmodule Vllm.NifFuzzTest do
  # Random terms thrown at every NIF entry point (every function of Vllm.Native): each
  # call returns (a value, an error tuple, or an ArgumentError for a term the NIF cannot
  # decode), the VM stays up, and afterwards the engine still serves correctly.
  # 5,000 calls normally; 100,000 with VLLM_LONG_TESTS=1 or `mix test --only long`
  # (VLLM_FUZZ_SEED=n picks other terms).
  use ExUnit.Case

  import Vllm.TestModel
  alias Vllm.{AsyncLLMEngine, Native, TermFuzzer}

  @moduletag :capture_log

  # Calls that would legitimately stop, sleep or tie up the shared live engine (or write
  # files) get it only as a random term; they still get the dead engine.
  @no_live_engine [
    :shutdown,
    :monitor_owner,
    :stop_profile,
    :sleep,
    :inject_fault,
    :start_profile
  ]

  setup_all do
    engine = start_engine!()
    dead = start_engine!()
    AsyncLLMEngine.shutdown(dead)
    {:ok, engine: engine, dead: dead.resource}
  end

  test "5,000 random calls to every NIF", ctx do
    fuzz(ctx, 5_000, 1)
  end

  @tag :long
  @tag timeout: 3_600_000
  test "100,000 random calls to every NIF (long)", ctx do
    fuzz(ctx, 100_000, 2)
  end

  defp fuzz(%{engine: engine, dead: dead}, calls, seed) do
    seed = String.to_integer(System.get_env("VLLM_FUZZ_SEED", "0")) + seed
    :rand.seed(:exsss, {seed, 99, 7})
    reference = greedy(engine)
    functions = Native.__info__(:functions) |> Enum.reject(&(elem(&1, 0) == :load_nif))
    # Every entry point is exercised.
    assert length(functions) >= 30
    started = System.monotonic_time(:millisecond)

    tally =
      Enum.reduce(1..calls, %{}, fn i, tally ->
        {name, arity} = Enum.at(functions, rem(i, length(functions)))
        args = args(name, arity, engine.resource, dead)
        outcome = call(name, args)
        if rem(i, 500) == 0, do: flush()
        Map.update(tally, outcome, 1, &(&1 + 1))
      end)

    seconds = (System.monotonic_time(:millisecond) - started) / 1000
    IO.puts("\nNIF fuzz: #{calls} calls in #{Float.round(seconds, 1)} s: #{inspect(tally)}")
    assert Enum.sum(Map.values(tally)) == calls
    # Nothing but a value, an error tuple or a badarg (e.g. a raise from inside a NIF).
    assert tally |> Map.keys() |> Enum.reject(&(&1 in [:ok, :error, :badarg])) == []

    # Requests the fuzzer happened to start are ended; the engine serves as before.
    flush()
    assert :ok = AsyncLLMEngine.check_health(engine)
    assert greedy(engine) == reference
  end

  defp args(name, arity, live, dead) do
    for position <- 1..arity//1 do
      if position == 1 and name not in [:engine_start, :ack] do
        case :rand.uniform(10) do
          n when n <= 5 and name not in @no_live_engine -> live
          n when n <= 7 -> dead
          _ -> TermFuzzer.term()
        end
      else
        TermFuzzer.term()
      end
    end
  end

  # Classifies a call's result: :ok, :error, :badarg, or a tuple naming what went wrong.
  defp call(name, args) do
    case apply(Native, name, args) do
      :ok -> :ok
      {:ok, _} -> :ok
      {:error, {category, message}} when is_atom(category) and is_binary(message) -> :error
      other when is_map(other) or is_boolean(other) or is_reference(other) -> :ok
      other -> {:other, name, other}
    end
  rescue
    ArgumentError -> :badarg
    e -> {:raised, name, e}
  end

  defp greedy(engine) do
    {:ok, stream} =
      AsyncLLMEngine.generate(
        engine,
        "The capital of France is",
        [temperature: 0.0, max_tokens: 6],
        request_id()
      )

    stream |> Enum.to_list() |> List.last() |> text()
  end

  defp flush do
    receive do
      _ -> flush()
    after
      0 -> :ok
    end
  end
end
