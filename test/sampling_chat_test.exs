Code.require_file("support/json.ex", __DIR__)

defmodule Vllm.SamplingChatTest do
  # Chat, logprobs, n > 1 and the newer SamplingParams fields through the public API, on
  # the real SmolLM2 model, checked against the HF transformers reference fixture.
  use ExUnit.Case, async: false

  import Vllm.TestModel
  alias Vllm.{CompletionOutput, Error, LLM, RequestOutput}

  @chat_math [%{"role" => "user", "content" => "What is 2+2?"}]

  setup_all do
    llm = LLM.new!(path!(), dtype: "float32", seed: 0, max_model_len: 512)
    %{llm: llm, reference: reference()}
  end

  defp fixtures_dir do
    System.get_env("VLLM_FIXTURES_DIR") ||
      Enum.find(
        [
          Path.expand("../../shared/fixtures", __DIR__),
          Path.expand("../../../shared/fixtures", __DIR__)
        ],
        &File.dir?/1
      ) || flunk("fixtures not found: set VLLM_FIXTURES_DIR")
  end

  defp reference do
    fixtures_dir()
    |> Path.join("smollm2_reference.json")
    |> File.read!()
    |> Vllm.TestJSON.decode!()
  end

  defp case_named(reference, name), do: Enum.find(reference["cases"], &(&1["name"] == name))

  defp assert_top5(%CompletionOutput{logprobs: logprobs}, reference_steps, label) do
    for {{reference, step}, i} <- Enum.with_index(Enum.zip(reference_steps, logprobs)) do
      for {[id, lp], rank} <- Enum.with_index(reference, 1) do
        got =
          Map.get(step, id) ||
            flunk("#{label} step #{i}: token #{id} missing from #{inspect(Map.keys(step))}")

        assert abs(got.logprob - lp) < 1.0e-3, "#{label} step #{i}: #{got.logprob} vs #{lp}"
        assert got.rank == rank
      end
    end
  end

  test "chat renders the SmolLM2 prompt byte for byte as the chat_math fixture", %{
    llm: llm,
    reference: ref
  } do
    math = case_named(ref, "chat_math")
    params = [temperature: 0.0, max_tokens: 8, logprobs: 5]
    assert {:ok, [%RequestOutput{} = out]} = VLLM.chat(llm, @chat_math, sampling_params: params)
    assert out.prompt == math["text"]
    assert out.prompt_token_ids == math["prompt_token_ids"]
    [completion] = out.outputs
    assert completion.token_ids == Enum.take(math["greedy_token_ids"], 8)
    assert_top5(completion, math["top_logprobs"], "chat_math")

    # Atom keys, and the engine's own rendering.
    atom_keys = [%{role: "user", content: "What is 2+2?"}]
    assert {:ok, text} = Vllm.AsyncLLMEngine.apply_chat_template(llm.engine, atom_keys)
    assert text == math["text"]
  end

  test "chat takes a batch of conversations, add_generation_prompt and a custom template", %{
    llm: llm
  } do
    conversations = [@chat_math, [%{"role" => "user", "content" => "Hi"}]]
    assert {:ok, [a, b]} = LLM.chat(llm, conversations, max_tokens: 2, temperature: 0.0)
    assert a.prompt =~ "What is 2+2?"
    assert b.prompt =~ "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"

    assert {:ok, [c]} = LLM.chat(llm, @chat_math, [max_tokens: 1], add_generation_prompt: false)

    refute String.ends_with?(c.prompt, "<|im_start|>assistant\n")

    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"

    assert {:ok, [d]} =
             VLLM.chat(llm, @chat_math, chat_template: template, sampling_params: [max_tokens: 1])

    assert d.prompt == "[user] What is 2+2?\n"
    assert {:error, %Error{category: :validation}} = VLLM.chat(llm, [], [])
    assert {:error, %Error{category: :validation}} = VLLM.chat(llm, ["not a map"], [])
  end

  test "logprobs through the public API match the reference top-5 for every case", %{
    llm: llm,
    reference: ref
  } do
    cases = ref["cases"]
    prompts = Enum.map(cases, &%{prompt_token_ids: &1["prompt_token_ids"]})
    steps = length(hd(cases)["top_logprobs"])
    params = [temperature: 0.0, max_tokens: steps, logprobs: 5, ignore_eos: true]
    assert {:ok, outs} = VLLM.generate(llm, prompts, sampling_params: params)

    for {out, c} <- Enum.zip(outs, cases) do
      [completion] = out.outputs
      assert completion.token_ids == Enum.take(c["greedy_token_ids"], steps), c["name"]
      assert_top5(completion, c["top_logprobs"], c["name"])

      sum =
        completion.logprobs
        |> Enum.zip(completion.token_ids)
        |> Enum.map(fn {s, t} -> s[t].logprob end)
        |> Enum.sum()

      assert abs(completion.cumulative_logprob - sum) < 1.0e-4
    end
  end

  test "prompt_logprobs: nil for the first token, the actual token and the top-k after", %{
    llm: llm,
    reference: ref
  } do
    c = hd(ref["cases"])
    ids = c["prompt_token_ids"] ++ Enum.take(c["greedy_token_ids"], 2)
    params = [temperature: 0.0, max_tokens: 1, prompt_logprobs: 5]
    assert {:ok, [out]} = VLLM.generate(llm, %{prompt_token_ids: ids}, sampling_params: params)
    assert [nil | rest] = out.prompt_logprobs
    assert length(rest) == length(ids) - 1

    for {position, token} <- Enum.zip(rest, tl(ids)) do
      assert Map.has_key?(position, token)
      assert map_size(position) in 5..6
    end

    # The first reference step is the prompt logprob of the first greedy token.
    [top1 | _] = hd(c["top_logprobs"])
    [id, lp] = top1
    got = Enum.at(out.prompt_logprobs, length(c["prompt_token_ids"]))[id]
    assert abs(got.logprob - lp) < 1.0e-3 and got.rank == 1
  end

  test "n = 2 returns two indexed outputs, each the single run with seed + index", %{llm: llm} do
    params = [n: 2, seed: 5, temperature: 0.9, max_tokens: 10]
    assert {:ok, [out]} = VLLM.generate(llm, "Once upon a time", sampling_params: params)
    assert [%CompletionOutput{index: 0} = a, %CompletionOutput{index: 1} = b] = out.outputs
    assert a.finish_reason in [:length, :stop] and b.finish_reason in [:length, :stop]

    for {completion, seed} <- [{a, 5}, {b, 6}] do
      single = [seed: seed, temperature: 0.9, max_tokens: 10]
      assert {:ok, [one]} = VLLM.generate(llm, "Once upon a time", sampling_params: single)
      assert text(one) == completion.text
    end
  end

  test "logit_bias, allowed_token_ids, bad_words and truncate_prompt_tokens reach the engine", %{
    llm: llm
  } do
    {:ok, [x]} = Vllm.AsyncLLMEngine.encode_text(llm.engine, " banana", false)
    greedy = [temperature: 0.0, max_tokens: 3]

    assert {:ok, [out]} =
             VLLM.generate(llm, "The sky is", sampling_params: greedy ++ [logit_bias: %{x => 100}])

    assert hd(out.outputs).token_ids == [x, x, x]

    assert {:ok, [out]} =
             VLLM.generate(llm, "The sky is",
               sampling_params: greedy ++ [allowed_token_ids: [x, 13]]
             )

    assert Enum.all?(hd(out.outputs).token_ids, &(&1 in [x, 13]))

    assert {:ok, [plain]} = VLLM.generate(llm, "The sky is", sampling_params: greedy)
    [first | _] = hd(plain.outputs).token_ids
    {:ok, word} = Vllm.AsyncLLMEngine.decode_tokens(llm.engine, [first])

    assert {:ok, [banned]} =
             VLLM.generate(llm, "The sky is", sampling_params: greedy ++ [bad_words: [word]])

    refute hd(hd(banned.outputs).token_ids) == first

    assert {:ok, [t]} =
             VLLM.generate(llm, %{prompt_token_ids: [1, 2, 3, 504, 3180, 314]},
               sampling_params: [max_tokens: 1, truncate_prompt_tokens: 2]
             )

    assert t.prompt_token_ids == [3180, 314]

    assert {:error, %Error{category: :validation}} =
             VLLM.generate(llm, "x", sampling_params: [logit_bias: %{10_000_000 => 1.0}])

    assert {:error, %Error{category: :validation}} =
             VLLM.generate(llm, "x", sampling_params: [detokenize: false, stop: ["a"]])
  end
end
