defmodule Vllm.StreamingTest do
  # Streams real SmolLM2 outputs through Vllm.AsyncLLMEngine.generate/5.
  use ExUnit.Case

  import Vllm.TestModel
  alias Vllm.{AsyncLLMEngine, CompletionOutput, RequestOutput}

  # Greedy, float32, 32 tokens (the engine's reference continuation).
  @once_upon_a_time ", the city of Nova Haven was a thriving metropolis, with towering skyscrapers and bustling streets. But as the years went by, the city began to lose its original"

  setup_all do
    {:ok, engine: start_engine!()}
  end

  defp greedy(opts), do: Keyword.merge([temperature: 0.0], opts)

  defp run(engine, prompt, params) do
    {:ok, stream} = AsyncLLMEngine.generate(engine, prompt, params, request_id())
    Enum.to_list(stream)
  end

  test "greedy 'Once upon a time' gives the reference text, cumulatively", %{engine: engine} do
    outputs = run(engine, "Once upon a time", greedy(max_tokens: 32))
    final = List.last(outputs)

    assert %RequestOutput{
             finished: true,
             prompt: "Once upon a time",
             outputs: [%CompletionOutput{} = c]
           } = final

    assert c.text == @once_upon_a_time
    assert length(c.token_ids) == 32
    assert c.finish_reason == :length
    assert Enum.all?(Enum.drop(outputs, -1), &(not &1.finished))
    # Cumulative: every output's text is a prefix of the next one.
    texts = Enum.map(outputs, &text/1)
    assert Enum.zip(texts, tl(texts)) |> Enum.all?(fn {a, b} -> String.starts_with?(b, a) end)
  end

  test "concatenated deltas equal the final cumulative text", %{engine: engine} do
    deltas = run(engine, "Once upon a time", greedy(max_tokens: 32, output_kind: :delta))
    assert length(deltas) > 1
    assert deltas |> Enum.map(&text/1) |> Enum.join() == @once_upon_a_time
    assert deltas |> Enum.flat_map(&hd(&1.outputs).token_ids) |> length() == 32
    assert List.last(deltas).finished
  end

  test "final_only sends one output", %{engine: engine} do
    assert [%RequestOutput{finished: true} = out] =
             run(engine, "Once upon a time", greedy(max_tokens: 32, output_kind: :final_only))

    assert text(out) == @once_upon_a_time
  end

  test "prompt token ids give the same continuation as the text", %{engine: engine} do
    {:ok, ids} = AsyncLLMEngine.encode_text(engine, "Once upon a time")
    final = run(engine, %{prompt_token_ids: ids}, greedy(max_tokens: 32)) |> List.last()
    assert final.prompt_token_ids == ids
    assert text(final) == @once_upon_a_time
  end

  test "emoji and accents survive: every delta is valid UTF-8", %{engine: engine} do
    prompt = "Repeat exactly, three times: café 🦀 crème brûlée 🦀 naïve"
    {:ok, ids} = AsyncLLMEngine.encode_text(engine, "café 🦀", false)
    assert {:ok, "café 🦀"} = AsyncLLMEngine.decode_tokens(engine, ids)

    deltas = run(engine, prompt, max_tokens: 48, temperature: 0.8, seed: 7, output_kind: :delta)
    assert Enum.all?(deltas, &String.valid?(text(&1)))
    assert List.last(deltas).prompt == prompt

    # The same request cumulative: the concatenation matches and is valid UTF-8.
    final = run(engine, prompt, max_tokens: 48, temperature: 0.8, seed: 7) |> List.last()
    assert Enum.map_join(deltas, &text/1) == text(final)
    assert String.valid?(text(final))
  end

  test "finish_reason :length at max_tokens", %{engine: engine} do
    final = run(engine, "The capital of France is", greedy(max_tokens: 5)) |> List.last()
    assert %{finish_reason: :length, stop_reason: nil} = hd(final.outputs)
    assert length(hd(final.outputs).token_ids) == 5
  end

  test "finish_reason :stop on a stop token id, with the id as stop_reason", %{engine: engine} do
    reference = run(engine, "Once upon a time", greedy(max_tokens: 8)) |> List.last()
    stop_id = Enum.at(hd(reference.outputs).token_ids, 3)

    final =
      run(engine, "Once upon a time", greedy(max_tokens: 32, stop_token_ids: [stop_id]))
      |> List.last()

    completion = hd(final.outputs)
    assert completion.finish_reason == :stop
    assert completion.stop_reason == stop_id
    assert length(completion.token_ids) <= 4
  end

  test "finish_reason :stop at EOS on a chat-formatted prompt", %{engine: engine} do
    prompt =
      "<|im_start|>user\nWhat is 2+2? Answer with one number.<|im_end|>\n<|im_start|>assistant\n"

    final = run(engine, prompt, greedy(max_tokens: 128)) |> List.last()
    completion = hd(final.outputs)
    assert completion.finish_reason == :stop
    assert completion.stop_reason == nil
    refute completion.text =~ "<|im_end|>"
  end

  test "a chat conversation is rendered with the model's chat template", %{engine: engine} do
    messages = [%{"role" => "user", "content" => "Say hello."}]
    {:ok, prompt} = AsyncLLMEngine.apply_chat_template(engine, messages)
    assert prompt =~ "<|im_start|>user\nSay hello.<|im_end|>\n"
    assert String.ends_with?(prompt, "<|im_start|>assistant\n")

    {:ok, no_gen} =
      AsyncLLMEngine.apply_chat_template(engine, [%{role: "user", content: "Say hello."}], false)

    refute String.ends_with?(no_gen, "<|im_start|>assistant\n")

    assert {:error, %Vllm.Error{category: :validation}} =
             AsyncLLMEngine.apply_chat_template(engine, [%{"role" => "user"}])

    final = run(engine, messages, greedy(max_tokens: 128)) |> List.last()
    assert final.prompt == prompt
    assert hd(final.outputs).finish_reason == :stop
  end

  test "stop strings end the request and are never emitted", %{engine: engine} do
    params = greedy(max_tokens: 32, stop: ["Haven"], output_kind: :delta)
    deltas = run(engine, "Once upon a time", params)
    text = Enum.map_join(deltas, &text/1)
    assert text == ", the city of Nova "
    refute Enum.any?(deltas, &(text(&1) =~ "Hav"))
    assert %{finish_reason: :stop, stop_reason: "Haven"} = hd(List.last(deltas).outputs)

    included =
      run(
        engine,
        "Once upon a time",
        greedy(max_tokens: 32, stop: "Haven", include_stop_str_in_output: true)
      )
      |> List.last()

    assert text(included) == ", the city of Nova Haven"
  end

  test "add_request delivers messages to the caller or to `to:`", %{engine: engine} do
    id = request_id()

    assert :ok =
             AsyncLLMEngine.add_request(
               engine,
               id,
               "Once upon a time",
               greedy(max_tokens: 4, output_kind: :final_only)
             )

    assert_receive {:vllm, ^id, %RequestOutput{finished: true, request_id: ^id}}, 30_000

    parent = self()
    receiver = spawn(fn -> receive do: (msg -> send(parent, {:forwarded, msg})) end)
    id2 = request_id()

    assert :ok =
             AsyncLLMEngine.add_request(
               engine,
               id2,
               "Hello",
               greedy(max_tokens: 2, output_kind: :final_only),
               to: receiver
             )

    assert_receive {:forwarded, {:vllm, ^id2, %RequestOutput{finished: true}}}, 30_000
    refute_received {:vllm, ^id2, _}
  end

  test "Vllm.LLM and VLLM.generate return outputs in prompt order", %{engine: _} do
    {:ok, llm} = VLLM.llm(path!(), dtype: "float32")
    prompts = ["Once upon a time", %{prompt: "The capital of France is"}, "Once upon a time"]

    {:ok, outputs} =
      VLLM.generate(llm, prompts,
        sampling_params: VLLM.sampling_params!(temperature: 0.0, max_tokens: 32)
      )

    assert [a, b, c] = outputs
    assert text(a) == @once_upon_a_time
    assert text(c) == @once_upon_a_time
    assert b.prompt == "The capital of France is"
    assert Enum.all?(outputs, & &1.finished)

    # Per-prompt sampling params.
    {:ok, [x, y]} =
      Vllm.LLM.generate(llm, ["Once upon a time", "Once upon a time"], [
        [temperature: 0.0, max_tokens: 2],
        [temperature: 0.0, max_tokens: 5]
      ])

    assert length(hd(x.outputs).token_ids) == 2
    assert length(hd(y.outputs).token_ids) == 5
    Vllm.LLM.shutdown(llm)
  end
end
