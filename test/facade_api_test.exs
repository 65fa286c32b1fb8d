defmodule VLLMFacadeApiTest do
  # The rest of the VLLM facade: params builders, timeout helpers, pass-through stubs, and
  # (on the real model) chat, use_tqdm and the LLM-level control functions.
  use ExUnit.Case

  import ExUnit.CaptureIO
  import Vllm.TestModel
  alias Vllm.Error

  setup_all do
    {:ok, llm} = VLLM.llm(path!(), dtype: "float32", kv_cache_memory_bytes: 32 * 1024 * 1024)
    {:ok, llm: llm}
  end

  test "attr works on every output and params struct, by atom or string key" do
    structs = [
      %Vllm.RequestOutput{request_id: "r"},
      %Vllm.CompletionOutput{text: "t"},
      %Vllm.PoolingRequestOutput{request_id: "p"},
      %Vllm.EmbeddingOutput{embedding: [0.5]},
      VLLM.sampling_params!(max_tokens: 3),
      VLLM.pooling_params!(dimensions: 8),
      VLLM.lora_request!("a", 1, "/tmp/a")
    ]

    for s <- structs, key <- Map.keys(s) -- [:__struct__] do
      assert VLLM.attr!(s, key) == Map.fetch!(s, key)
      assert VLLM.attr!(s, Atom.to_string(key)) == Map.fetch!(s, key)
    end
  end

  test "pooling_params, lora_request and guided_decoding_params are validated" do
    assert {:ok, %Vllm.PoolingParams{normalize: true}} = VLLM.pooling_params()
    assert {:error, %Error{category: :validation}} = VLLM.pooling_params(dimensions: 0)
    assert {:error, %Error{category: :validation}} = VLLM.pooling_params(task: "dance")
    assert {:ok, %Vllm.PoolingParams{task: "embed"}} = VLLM.pooling_params(%{"task" => "embed"})

    assert {:ok, %Vllm.LoRARequest{lora_int_id: 3}} = VLLM.lora_request("x", 3, "/p")
    assert {:error, %Error{category: :validation}} = VLLM.lora_request("x", 0, "/p")

    assert {:ok, %Vllm.LoRARequest{}} =
             Vllm.BeamSearch.LoRARequest.new(lora_name: "x", lora_int_id: 1, lora_path: "/p")

    assert {:ok, %{choice: ["a", "b"]}} = VLLM.guided_decoding_params(choice: ["a", "b"])
    assert {:ok, %{regex: "[0-9]+"}} = VLLM.guided_decoding_params(regex: "[0-9]+")
    assert {:error, %Error{category: :validation}} = VLLM.guided_decoding_params()

    assert {:error, %Error{category: :validation}} =
             VLLM.guided_decoding_params(regex: "a", choice: ["b"])

    assert VLLM.guided_decoding_supported?()
  end

  test "timeout helpers build __runtime__ options; run runs a function" do
    assert VLLM.with_timeout([a: 1], timeout: 5) == [__runtime__: [timeout: 5], a: 1]
    assert VLLM.timeout_profile(:batch_job) == [__runtime__: [timeout_profile: :batch_job]]
    assert VLLM.timeout_ms(300) == [__runtime__: [timeout: 300]]
    assert_raise Error, fn -> VLLM.timeout_ms(0) end
    assert_raise Error, fn -> VLLM.timeout_profile(:forever) end

    assert {:ok, 3} = VLLM.run(fn -> 1 + 2 end)
    assert VLLM.run!(fn -> :x end) == :x

    assert {:error, %Error{category: :validation}} =
             VLLM.run(fn -> raise Error.validation("bad") end)

    assert {:error, %Error{category: :internal}} = VLLM.run(fn -> raise "boom" end)

    assert {:error, %Error{category: :timeout}} =
             VLLM.run(fn -> Process.sleep(1_000) end, timeout: 50)
  end

  test "Python pass-through functions are :unsupported; ref? tells native handles" do
    for result <- [
          VLLM.call("vllm", "LLM"),
          VLLM.call("vllm", "LLM", []),
          VLLM.call("vllm", "LLM", [], []),
          VLLM.method(:ref, "generate"),
          VLLM.get("vllm", "__version__"),
          VLLM.set_attr(:ref, "x", 1)
        ] do
      assert {:error, %Error{category: :unsupported}} = result
    end

    assert_raise Error, fn -> VLLM.call!("vllm", "LLM") end
    refute VLLM.ref?(%Vllm.RequestOutput{})
  end

  test "chat renders each conversation with the chat template", %{llm: llm} do
    params = VLLM.sampling_params!(temperature: 0.0, max_tokens: 8)
    conversation = [%{"role" => "user", "content" => "What is 2+2?"}]
    assert {:ok, [out]} = VLLM.chat(llm, [conversation], sampling_params: params)
    assert out.prompt =~ "<|im_start|>assistant\n"
    assert [direct] = VLLM.generate!(llm, out.prompt, sampling_params: params)
    assert hd(direct.outputs).text == hd(out.outputs).text
    assert VLLM.ref?(llm)
  end

  test "use_tqdm draws a progress bar on stderr", %{llm: llm} do
    params = VLLM.sampling_params!(temperature: 0.0, max_tokens: 4)

    err =
      capture_io(:stderr, fn ->
        assert {:ok, [_, _, _]} =
                 VLLM.generate(llm, ["a", "b", "c"], sampling_params: params, use_tqdm: true)
      end)

    assert err =~ "Processed prompts: 100%"
    assert err =~ "3/3"
    assert err =~ "toks/s"
    assert capture_io(:stderr, fn -> VLLM.generate!(llm, "a", sampling_params: params) end) == ""
  end

  test "a LoRA request is refused, not ignored", %{llm: llm} do
    lora = VLLM.lora_request!("adapter", 1, "/tmp/adapter")

    # This engine has no enable_lora (real LoRA tests: test/lora_test.exs).
    assert {:error, %Error{category: :validation, message: m}} =
             VLLM.generate(llm, "Hi", lora_request: lora)

    assert m =~ "enable_lora"
  end

  test "pooling functions on a generation model are :unsupported, naming the task", %{llm: llm} do
    for result <- [
          VLLM.embed(llm, "x"),
          VLLM.encode(llm, "x"),
          Vllm.LLM.classify(llm, "x"),
          Vllm.LLM.score(llm, "a", "b")
        ] do
      assert {:error, %Error{category: :unsupported, message: m}} = result
      assert m =~ "pooling model"
    end
  end

  test "LLM-level tokenizer, metrics, sleep and wake_up", %{llm: llm} do
    assert {:ok, tok} = Vllm.LLM.get_tokenizer(llm)
    assert Vllm.Tokenizer.vocab_size!(tok) == 49152

    VLLM.generate!(llm, "Hello",
      sampling_params: VLLM.sampling_params!(max_tokens: 3, ignore_eos: true)
    )

    metrics = Map.new(Vllm.LLM.get_metrics!(llm), &{&1.name, &1.value})
    assert metrics["vllm:generation_tokens"] >= 3
    assert metrics["vllm:prompt_tokens"] >= 1
    assert metrics["vllm:num_requests_running"] == 0
    assert :ok = Vllm.LLM.sleep(llm)
    assert :ok = Vllm.LLM.wake_up(llm)
    assert {:ok, true} = Vllm.LLM.reset_prefix_cache(llm)
  end
end
