defmodule Vllm.Storm do
  @moduledoc false
  # The abort storm: `procs` processes submit `total` requests between them and end them
  # in random ways (read to the end as a stream or as messages, abort, halt the stream,
  # kill the owner). Every full greedy request must equal the solo reference, every
  # request's final output must be its last message, and afterwards every KV block is free.

  import ExUnit.Assertions
  alias Vllm.AsyncLLMEngine

  @prompts [
    "Once upon a time",
    "The capital of France is",
    "def fibonacci(n):",
    "My favourite food is"
  ]
  @max_tokens 12

  @doc "Greedy token ids (ignore_eos, #{@max_tokens} tokens) of each prompt, run alone."
  def references(engine) do
    Map.new(@prompts, fn prompt ->
      {:ok, stream} =
        AsyncLLMEngine.generate(engine, prompt, greedy(@max_tokens), "ref-#{prompt}")

      {prompt, stream |> Enum.to_list() |> List.last() |> then(&hd(&1.outputs).token_ids)}
    end)
  end

  @doc "Runs the storm; returns the tally of how requests ended."
  def run(engine, total, procs, seed) do
    refs = references(engine)
    parent = self()
    per_proc = div(total, procs)

    workers =
      for p <- 1..procs do
        spawn_link(fn ->
          :rand.seed(:exsss, {seed, p, 17})

          tally =
            Enum.reduce(1..per_proc, %{}, fn i, acc -> one(engine, refs, "s#{p}-#{i}", acc) end)

          # Anything arriving now for a request that already ended is a violation.
          Process.sleep(300)
          send(parent, {:storm_done, self(), tally, drain_mailbox()})
        end)
      end

    Enum.reduce(workers, %{}, fn w, acc ->
      receive do
        {:storm_done, ^w, tally, leftovers} ->
          assert leftovers == [],
                 "messages after a final output: #{inspect(Enum.take(leftovers, 3))}"

          Map.merge(acc, tally, fn _, a, b -> a + b end)
      after
        1_800_000 -> flunk("a storm worker did not finish")
      end
    end)
  end

  defp greedy(k), do: [temperature: 0.0, max_tokens: k, ignore_eos: true]

  defp one(engine, refs, id, tally) do
    prompt = Enum.random(@prompts)
    k = :rand.uniform(@max_tokens)
    greedy? = :rand.uniform() < 0.7
    kind = Enum.random([:cumulative, :delta])

    params =
      if greedy?,
        do: greedy(k) ++ [output_kind: kind],
        else: [
          temperature: 0.8,
          seed: :rand.uniform(1000),
          max_tokens: k,
          ignore_eos: true,
          output_kind: kind
        ]

    outcome =
      case Enum.random([:stream, :stream, :messages, :messages, :abort, :halt, :kill]) do
        :stream -> full_stream(engine, id, prompt, params)
        :messages -> full_messages(engine, id, prompt, params)
        :abort -> abort(engine, id, prompt, params)
        :halt -> halt(engine, id, prompt, params)
        :kill -> kill(engine, id, prompt, params)
      end

    case outcome do
      {:full, token_ids, finish} ->
        assert finish == :length
        assert length(token_ids) == k
        if greedy?, do: assert(token_ids == Enum.take(refs[prompt], k), "greedy #{id} differs")
        Map.update(tally, :full, 1, &(&1 + 1))

      other ->
        Map.update(tally, other, 1, &(&1 + 1))
    end
  end

  defp full_stream(engine, id, prompt, params) do
    {:ok, stream} = AsyncLLMEngine.generate(engine, prompt, params, id)
    outputs = Enum.to_list(stream)
    final = List.last(outputs)
    assert final.finished
    {:full, token_ids(outputs, params[:output_kind]), hd(final.outputs).finish_reason}
  end

  defp full_messages(engine, id, prompt, params) do
    :ok = AsyncLLMEngine.add_request(engine, id, prompt, params)
    outputs = collect(id, [])

    {:full, token_ids(outputs, params[:output_kind]),
     hd(List.last(outputs).outputs).finish_reason}
  end

  defp abort(engine, id, prompt, params) do
    :ok = AsyncLLMEngine.add_request(engine, id, prompt, params)
    Process.sleep(:rand.uniform(30) - 1)
    :ok = AsyncLLMEngine.abort(engine, id)
    final = List.last(collect(id, []))
    # It may have finished before the abort reached it.
    assert hd(final.outputs).finish_reason in [:abort, :length]
    :aborted
  end

  defp halt(engine, id, prompt, params) do
    {:ok, stream} = AsyncLLMEngine.generate(engine, prompt, params, id)
    Enum.take(stream, :rand.uniform(2))
    :halted
  end

  defp kill(engine, id, prompt, params) do
    owner =
      spawn(fn ->
        :ok = AsyncLLMEngine.add_request(engine, id, prompt, params)
        Process.sleep(:infinity)
      end)

    Process.sleep(:rand.uniform(30) - 1)
    Process.exit(owner, :kill)
    :killed
  end

  # Outputs of `id` up to its final one.
  defp collect(id, acc) do
    receive do
      {:vllm, ^id, %{finished: true} = out} -> Enum.reverse([out | acc])
      {:vllm, ^id, out} -> collect(id, [out | acc])
      {:vllm_error, ^id, reason} -> flunk("request #{id} failed: #{inspect(reason)}")
    after
      120_000 -> flunk("no final output for #{id}")
    end
  end

  defp token_ids(outputs, :delta), do: Enum.flat_map(outputs, &hd(&1.outputs).token_ids)
  defp token_ids(outputs, _cumulative), do: hd(List.last(outputs).outputs).token_ids

  defp drain_mailbox(acc \\ []) do
    receive do
      m -> drain_mailbox([m | acc])
    after
      0 -> Enum.reverse(acc)
    end
  end
end
