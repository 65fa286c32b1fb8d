defmodule Vllm.ConcurrencyTest do
  # Many processes submitting at once: the engine batches them, and greedy results do not
  # depend on what else is in the batch.
  use ExUnit.Case

  import Vllm.TestModel
  alias Vllm.AsyncLLMEngine

  setup_all do
    {:ok, engine: start_engine!()}
  end

  defp greedy_text(engine, prompt, max_tokens) do
    {:ok, stream} =
      AsyncLLMEngine.generate(
        engine,
        prompt,
        [temperature: 0.0, max_tokens: max_tokens],
        request_id("conc")
      )

    stream |> Enum.to_list() |> List.last() |> text()
  end

  test "24 concurrent streams from 24 processes match their solo results", %{engine: engine} do
    prompts = [
      "Once upon a time",
      "The capital of France is",
      "def fibonacci(n):",
      "My favourite food is"
    ]

    solo = Map.new(prompts, &{&1, greedy_text(engine, &1, 16)})

    results =
      1..24
      |> Enum.map(fn i ->
        prompt = Enum.at(prompts, rem(i, length(prompts)))
        Task.async(fn -> {prompt, greedy_text(engine, prompt, 16)} end)
      end)
      |> Task.await_many(120_000)

    for {prompt, text} <- results,
        do: assert(text == solo[prompt], "batched result differs for #{inspect(prompt)}")

    assert_all_blocks_free(engine)
  end

  test "one process with many requests in flight gets every final output", %{engine: engine} do
    ids = for i <- 1..16, do: "many-#{i}-#{System.unique_integer([:positive])}"

    for id <- ids,
        do:
          :ok =
            AsyncLLMEngine.add_request(engine, id, "Count: 1, 2, 3,",
              temperature: 0.7,
              seed: 1,
              max_tokens: 12
            )

    for id <- ids do
      assert_receive {:vllm, ^id, %Vllm.RequestOutput{finished: true} = out}, 120_000
      assert hd(out.outputs).finish_reason in [:length, :stop]
    end

    assert_all_blocks_free(engine)
  end

  test "the engine process forgets finished requests and their owners' monitors", %{
    engine: engine
  } do
    tasks = for _ <- 1..4, do: Task.async(fn -> greedy_text(engine, "Hello", 4) end)
    Task.await_many(tasks, 60_000)
    assert_all_blocks_free(engine)
    # The done notices may trail the final outputs by a moment.
    Process.sleep(100)
    state = :sys.get_state(engine.pid)
    assert state.requests == %{}
    assert state.owners == %{}
  end

  test "a duplicate live request id is refused", %{engine: engine} do
    id = request_id("dup")

    :ok =
      AsyncLLMEngine.add_request(engine, id, "Once upon a time",
        temperature: 0.0,
        max_tokens: 200,
        ignore_eos: true
      )

    assert {:error, %Vllm.Error{category: :validation, message: message}} =
             AsyncLLMEngine.add_request(engine, id, "Hello", nil)

    assert message =~ id
    :ok = AsyncLLMEngine.abort(engine, id)
    assert_all_blocks_free(engine)
  end
end
