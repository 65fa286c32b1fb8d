# The C1 CPU numbers of bench/RESULTS.md measured through the Elixir API, with the same
# workload as the bare-engine `vllm-bench`: load time, TTFT and batch-1 decode speed of one
# streamed request, then aggregate output speed of N concurrent requests, each streamed to
# its own process. Run: mix run bench/elixir_bench.exs MODEL [batch] [input_len] [output_len]

alias Vllm.AsyncLLMEngine

[model | rest] = System.argv()
defaults = [32, 128, 128]
given = Enum.map(rest, &String.to_integer/1)
[batch, input_len, output_len] = given ++ Enum.drop(defaults, length(given))

defmodule Bench do
  def prompt(engine, len, variant) do
    text = String.duplicate("The quick brown fox jumps over the lazy dog while the engine streams tokens. ", div(len, 8) + 4)
    {:ok, base} = AsyncLLMEngine.encode_text(engine, text, false)
    base |> Stream.cycle() |> Stream.drop(rem(variant, length(base))) |> Enum.take(len)
  end

  # Arrival time (µs) and new-token count of every output of one streamed request.
  def stream_times(engine, ids, output_len, request_id) do
    params = Vllm.SamplingParams.new!(temperature: 0.0, max_tokens: output_len, ignore_eos: true, output_kind: :delta)
    {:ok, stream} = AsyncLLMEngine.generate(engine, %{prompt_token_ids: ids}, params, request_id)
    Enum.map(stream, fn out -> {System.monotonic_time(:microsecond), length(hd(out.outputs).token_ids)} end)
  end
end

t0 = System.monotonic_time(:microsecond)
{:ok, engine} = AsyncLLMEngine.new(model, max_num_seqs: max(batch, 1))
IO.puts("load: #{Float.round((System.monotonic_time(:microsecond) - t0) / 1.0e6, 2)} s")

start = System.monotonic_time(:microsecond)
times = Bench.stream_times(engine, Bench.prompt(engine, input_len, 0), output_len, "solo")
{first, _} = hd(times)
{last, _} = List.last(times)
decoded = times |> tl() |> Enum.map(&elem(&1, 1)) |> Enum.sum()
IO.puts("batch 1, #{input_len} in: TTFT #{Float.round((first - start) / 1000, 1)} ms")
IO.puts("batch 1 decode: #{Float.round(decoded / ((last - first) / 1.0e6), 1)} tok/s")

# The same prompts as vllm-bench's batch (variant 7i + 1), so both see the same prefix-cache hits.
prompts = for i <- 0..(batch - 1), do: Bench.prompt(engine, input_len, 7 * i + 1)
start = System.monotonic_time(:microsecond)

tokens =
  prompts
  |> Enum.with_index()
  |> Enum.map(fn {ids, i} -> Task.async(fn -> Bench.stream_times(engine, ids, output_len, "b#{i}") end) end)
  |> Enum.map(&Task.await(&1, :infinity))
  |> List.flatten()
  |> Enum.map(&elem(&1, 1))
  |> Enum.sum()

elapsed = (System.monotonic_time(:microsecond) - start) / 1.0e6
IO.puts("batch #{batch} x #{input_len} in / #{output_len} out: #{Float.round(tokens / elapsed, 1)} output tok/s")
AsyncLLMEngine.shutdown(engine)
