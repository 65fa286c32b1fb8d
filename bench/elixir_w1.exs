# Issue 7's "Through Elixir": W1 driven from Vllm.AsyncLLMEngine, every request streamed
# to its own process, to compare with the bare engine (`vllm-bench --workload w1`) on the
# same machine. The requests are the bare run's own: `VLLM_BENCH_DUMP_REQUESTS=FILE
# vllm-bench --workload w1 ...` writes them, one line each ("output_len id id ...").
#
#   elixir_w1.exs CONFIG.json TOKENIZER REQUESTS_FILE [runs] [device]
#
# Runs with `mix run` or plain `elixir` once :vllm's ebin is on the code path
# (bench/gpu/elixir_w1.sh on the GPU machine). Same engine options as
# bench/gpu/check_and_bench.sh's W1: dummy weights, bfloat16, max_model_len 2048,
# max_num_batched_tokens 8192, max_num_seqs 256, greedy, ignore_eos, no detokenizing.

alias Vllm.AsyncLLMEngine

[config, tokenizer, requests_file | rest] = System.argv()
runs = rest |> Enum.at(0, "1") |> String.to_integer()
device = Enum.at(rest, 1, "cuda")
{:ok, _} = Application.ensure_all_started(:vllm)

requests =
  requests_file
  |> File.read!()
  |> String.split("\n", trim: true)
  |> Enum.map(fn line ->
    [n | ids] = String.split(line, " ", trim: true)
    {String.to_integer(n), Enum.map(ids, &String.to_integer/1)}
  end)

defmodule ElixirW1 do
  def params(n),
    do: [temperature: 0.0, max_tokens: n, min_tokens: n, ignore_eos: true, detokenize: false, output_kind: :delta]

  # Output tokens of one request, streamed to the calling process.
  def stream(engine, ids, n, request_id) do
    {:ok, stream} = AsyncLLMEngine.generate(engine, %{prompt_token_ids: ids}, params(n), request_id)
    Enum.reduce(stream, 0, fn out, acc -> acc + length(hd(out.outputs).token_ids) end)
  end
end

t0 = System.monotonic_time(:microsecond)

{:ok, engine} =
  AsyncLLMEngine.new(config,
    load_format: "dummy",
    device: device,
    # Overridable for a CPU smoke test on a tiny model.
    dtype: System.get_env("ELIXIR_W1_DTYPE", "bfloat16"),
    tokenizer: tokenizer,
    max_model_len: String.to_integer(System.get_env("ELIXIR_W1_MAX_MODEL_LEN", "2048")),
    max_num_seqs: 256,
    max_num_batched_tokens: 8192
  )

IO.puts("elixir load: #{Float.round((System.monotonic_time(:microsecond) - t0) / 1.0e6, 2)} s")
{_, first_ids} = hd(requests)
4 = ElixirW1.stream(engine, Enum.take(first_ids, 16), 4, "warmup")
expected = requests |> Enum.map(&elem(&1, 0)) |> Enum.sum()

throughputs =
  for run <- 1..runs do
    # Every run starts cold, as the bare engine's.
    {:ok, true} = AsyncLLMEngine.reset_prefix_cache(engine)
    start = System.monotonic_time(:microsecond)

    tokens =
      requests
      |> Enum.with_index()
      |> Enum.map(fn {{n, ids}, i} -> Task.async(fn -> ElixirW1.stream(engine, ids, n, "w1-#{run}-#{i}") end) end)
      |> Task.await_many(:infinity)
      |> Enum.sum()

    wall = (System.monotonic_time(:microsecond) - start) / 1.0e6
    ^expected = tokens
    tput = tokens / wall

    IO.puts(
      "elixir w1 run #{run}: #{length(requests)} requests, #{tokens} out tokens in #{Float.round(wall, 2)} s: #{round(tput)} output tok/s"
    )

    tput
  end

sorted = Enum.sort(throughputs)
mid = div(length(sorted), 2)

median =
  if rem(length(sorted), 2) == 1, do: Enum.at(sorted, mid), else: (Enum.at(sorted, mid - 1) + Enum.at(sorted, mid)) / 2

IO.puts("elixir w1 median: #{round(median)} output tok/s")
AsyncLLMEngine.shutdown(engine)
