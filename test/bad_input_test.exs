defmodule Vllm.BadInputTest do
  # Bad input is an error tuple with a clear category, and the engine keeps serving.
  use ExUnit.Case

  import Vllm.TestModel
  alias Vllm.{AsyncLLMEngine, Error}

  setup_all do
    {:ok, engine: start_engine!()}
  end

  @bad_requests [
    {"prompt of the wrong type", 42, []},
    {"an empty prompt", "", []},
    {"empty prompt token ids", %{prompt_token_ids: []}, []},
    {"negative token ids", %{prompt_token_ids: [1, -2]}, []},
    {"token ids outside the vocabulary", %{prompt_token_ids: [1, 10_000_000]}, []},
    {"negative max_tokens", "Hello", [max_tokens: -1]},
    {"max_tokens of the wrong type", "Hello", [max_tokens: "many"]},
    {"temperature < 0", "Hello", [temperature: -0.5]},
    {"top_p = 0", "Hello", [top_p: 0.0]},
    {"top_p > 1", "Hello", [top_p: 1.01]},
    {"an unknown sampling key", "Hello", [temprature: 0.5]},
    {"sampling params of the wrong type", "Hello", "greedy"}
  ]

  for {what, prompt, params} <- @bad_requests do
    test "generate refuses #{what}", %{engine: engine} do
      assert {:error, %Error{category: :validation, message: message}} =
               AsyncLLMEngine.generate(
                 engine,
                 unquote(Macro.escape(prompt)),
                 unquote(Macro.escape(params)),
                 request_id()
               )

      assert is_binary(message) and message != ""
    end
  end

  test "unknown request options and bad request ids are refused", %{engine: engine} do
    assert {:error, %Error{category: :validation, message: m}} =
             AsyncLLMEngine.generate(engine, "Hi", nil, request_id(), colour: :red)

    assert m =~ ":colour"

    assert {:error, %Error{category: :validation}} =
             AsyncLLMEngine.generate(engine, "Hi", nil, 42)

    assert {:error, %Error{category: :validation}} =
             AsyncLLMEngine.add_request(engine, "x-#{request_id()}", "Hi", nil, to: :not_a_pid)

    assert_raise Error, fn -> AsyncLLMEngine.generate!(engine, "", nil, request_id()) end
  end

  test "missing model path is :not_found" do
    assert {:error, %Error{category: :not_found, message: m}} =
             AsyncLLMEngine.new(model: "/no/such/model.gguf")

    assert m =~ "/no/such/model.gguf"
    assert {:error, %Error{category: :not_found}} = Vllm.LLM.new("/no/such/dir")
    assert_raise Error, fn -> VLLM.llm!("/no/such/model.gguf") end
  end

  @tag :tmp_dir
  test "a corrupt model file is :validation", %{tmp_dir: dir} do
    corrupt = Path.join(dir, "corrupt.gguf")
    File.write!(corrupt, "GGUF" <> :binary.copy(<<0xFF>>, 4096))
    assert {:error, %Error{category: :validation}} = AsyncLLMEngine.new(model: corrupt)

    not_gguf = Path.join(dir, "random.gguf")
    File.write!(not_gguf, :rand.bytes(1000))
    assert {:error, %Error{category: :validation}} = AsyncLLMEngine.new(model: not_gguf)
  end

  test "unknown or mistyped engine options are :validation naming the key" do
    assert {:error, %Error{category: :validation, message: m}} =
             AsyncLLMEngine.new(path!(), max_batch: 3)

    assert m =~ ":max_batch"

    assert {:error, %Error{category: :validation, message: m}} =
             AsyncLLMEngine.new(path!(), block_size: "16")

    assert m =~ ":block_size"

    assert {:error, %Error{category: :validation, message: m}} =
             AsyncLLMEngine.new(path!(), dtype: "float8")

    assert m =~ ":dtype"
    assert {:error, %Error{category: :validation}} = AsyncLLMEngine.new(path!(), max_num_seqs: 0)
    assert {:error, %Error{category: :validation}} = AsyncLLMEngine.new(42)
    assert {:error, %Error{category: :unsupported}} = AsyncLLMEngine.new(path!(), device: "cuda")
  end

  # The ExUnit suite runs the CPU-only NIF: CUDA devices reach it and are refused there.
  test "a CUDA device in a CPU-only build is :unsupported, naming the cargo feature" do
    for device <- ["cuda", "cuda:1", "gpu"] do
      assert {:error, %Error{category: :unsupported, message: m}} =
               AsyncLLMEngine.new(path!(), device: device, enforce_eager: true)

      assert m =~ "CPU-only", "#{device}: #{m}"
      assert m =~ "feature `cuda`", "#{device}: #{m}"
    end

    for device <- ["tpu", "cuda:x", "cuda:"] do
      assert {:error, %Error{category: :validation, message: m}} =
               AsyncLLMEngine.new(path!(), device: device)

      assert m =~ ":device", "#{device}: #{m}"
    end

    assert {:error, %Error{category: :validation, message: m}} =
             AsyncLLMEngine.new(path!(), load_format: "pt")

    assert m =~ ":load_format"
  end

  test "trust_remote_code and __runtime__ are accepted" do
    engine =
      start_engine!(trust_remote_code: true, __runtime__: [timeout: 120_000, session_id: "s"])

    AsyncLLMEngine.shutdown(engine)
  end

  test "the engine keeps serving after bad input", %{engine: engine} do
    for _ <- 1..3,
        do: {:error, _} = AsyncLLMEngine.generate(engine, "", [max_tokens: -1], request_id())

    {:ok, stream} =
      AsyncLLMEngine.generate(
        engine,
        "Once upon a time",
        [temperature: 0.0, max_tokens: 8],
        request_id()
      )

    final = stream |> Enum.to_list() |> List.last()
    assert final.finished
    assert length(hd(final.outputs).token_ids) == 8
    assert_all_blocks_free(engine)
  end
end
