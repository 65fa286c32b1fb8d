defmodule Vllm.BackPressureTest do
  # A reader that never reads cannot make the engine (or its own mailbox) hold an
  # output per step; max_num_seqs + max_waiting_requests bound the requests in flight.
  use ExUnit.Case

  import Vllm.TestModel
  alias Vllm.{AsyncLLMEngine, Error}

  @tokens 80

  setup_all do
    {:ok, engine: start_engine!()}
  end

  for kind <- [:cumulative, :delta] do
    test "an unread #{kind} stream holds at most 33 outputs and still ends complete", %{
      engine: engine
    } do
      params = [
        temperature: 0.0,
        max_tokens: @tokens,
        ignore_eos: true,
        output_kind: unquote(kind)
      ]

      prompt = "Once upon a time"
      {ref_text, ref_ids} = reference(engine, prompt)

      id = request_id("unread")
      {:ok, stream} = AsyncLLMEngine.generate(engine, prompt, params, id)
      # Never read while the request runs: one output per step would be ~#{@tokens} messages.
      queued = wait_final_in_mailbox(id)
      assert queued in 2..33
      IO.puts("\nunread #{unquote(kind)} stream of #{@tokens} tokens: #{queued} messages queued")
      assert_all_blocks_free(engine)

      outputs = Enum.to_list(stream)
      assert length(outputs) == queued
      final = List.last(outputs)
      assert final.finished

      {text, ids} =
        case unquote(kind) do
          :cumulative ->
            {text(final), hd(final.outputs).token_ids}

          :delta ->
            {Enum.map_join(outputs, &text/1), Enum.flat_map(outputs, &hd(&1.outputs).token_ids)}
        end

      assert ids == ref_ids
      assert text == ref_text
      assert length(ids) == @tokens
    end
  end

  test "a stream that is read keeps one output per step", %{engine: engine} do
    params = [temperature: 0.0, max_tokens: 40, ignore_eos: true, output_kind: :delta]
    {:ok, stream} = AsyncLLMEngine.generate(engine, "Once upon a time", params, request_id())
    outputs = Enum.to_list(stream)
    # Prefill gives the first token; every later step one more.
    assert Enum.all?(outputs, &(length(hd(&1.outputs).token_ids) == 1))
    assert length(outputs) == 40
  end

  test "max_num_seqs + max_waiting_requests: one more request is :resource_exhausted" do
    engine = start_engine!(max_num_seqs: 2, max_waiting_requests: 1)
    long = [temperature: 0.0, max_tokens: 1000, ignore_eos: true]
    ids = for _ <- 1..3, do: request_id("cap")

    for id <- ids,
        do: assert(:ok = AsyncLLMEngine.add_request(engine, id, "Once upon a time", long))

    assert {:error, %Error{category: :resource_exhausted, message: m}} =
             AsyncLLMEngine.add_request(engine, request_id(), "Once upon a time", long)

    assert m =~ "max_waiting_requests"

    assert {:error, %Error{category: :resource_exhausted}} =
             AsyncLLMEngine.generate(engine, "Hello", long, request_id())

    # A slot frees when a request ends.
    :ok = AsyncLLMEngine.abort(engine, hd(ids))
    await_final(hd(ids))
    assert :ok = retry_add(engine, request_id("cap"), long)
    AsyncLLMEngine.shutdown(engine)
  end

  test "the queue of a paused engine is bounded the same way" do
    engine = start_engine!(max_num_seqs: 1, max_waiting_requests: 1)
    :ok = AsyncLLMEngine.pause_generation(engine)
    long = [temperature: 0.0, max_tokens: 1000, ignore_eos: true]
    ids = for _ <- 1..2, do: request_id("held")
    for id <- ids, do: :ok = AsyncLLMEngine.add_request(engine, id, "Hi", long)

    assert {:error, %Error{category: :resource_exhausted, message: m}} =
             AsyncLLMEngine.add_request(engine, request_id(), "Hi", long)

    assert m =~ "max_waiting_requests"
    :ok = AsyncLLMEngine.abort(engine, ids)
    for id <- ids, do: await_final(id)
    :ok = AsyncLLMEngine.resume_generation(engine)
    assert_all_blocks_free(engine)
    AsyncLLMEngine.shutdown(engine)
  end

  test "max_waiting_requests must be a non-negative integer" do
    assert {:error, %Error{category: :validation, message: m}} =
             AsyncLLMEngine.new(path!(), max_waiting_requests: -1)

    assert m =~ ":max_waiting_requests"
  end

  # Waits (without reading) until the request's final output is in the mailbox; returns
  # how many of its outputs are there.
  defp wait_final_in_mailbox(id, waited \\ 0) do
    {:messages, messages} = Process.info(self(), :messages)
    mine = Enum.filter(messages, &match?({:vllm, ^id, _}, &1))

    cond do
      Enum.any?(mine, &match?({:vllm, _, %{finished: true}}, &1)) -> length(mine)
      waited > 120_000 -> flunk("request #{id} did not finish")
      true -> Process.sleep(50) && wait_final_in_mailbox(id, waited + 50)
    end
  end

  defp reference(engine, prompt) do
    params = [temperature: 0.0, max_tokens: @tokens, ignore_eos: true]
    {:ok, stream} = AsyncLLMEngine.generate(engine, prompt, params, request_id("ref"))
    final = stream |> Enum.to_list() |> List.last()
    {text(final), hd(final.outputs).token_ids}
  end

  defp await_final(id) do
    receive do
      {:vllm, ^id, %{finished: true}} -> :ok
      {:vllm, ^id, _} -> await_final(id)
    after
      30_000 -> flunk("no final output for #{id}")
    end
  end

  defp retry_add(engine, id, params, tries \\ 100) do
    case AsyncLLMEngine.add_request(engine, id, "Once upon a time", params) do
      {:error, %Error{category: :resource_exhausted}} when tries > 0 ->
        Process.sleep(20)
        retry_add(engine, id, params, tries - 1)

      other ->
        other
    end
  end
end
