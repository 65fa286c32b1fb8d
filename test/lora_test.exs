Code.require_file("support/json.ex", __DIR__)

defmodule Vllm.LoRATest do
  # Multi-LoRA through the public API on the real SmolLM2 model with the PEFT demo adapter
  # (shared/fixtures/smollm2-lora-demo), against the transformers reference (`lora_cases`).
  use ExUnit.Case, async: false

  import Vllm.TestModel
  alias Vllm.{AsyncLLMEngine, Error, LLM, LoRARequest}

  setup_all do
    llm = LLM.new!(path!(), dtype: "float32", seed: 0, max_model_len: 256, enable_lora: true, max_loras: 2)
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
    fixtures_dir() |> Path.join("smollm2_reference.json") |> File.read!() |> Vllm.TestJSON.decode!()
  end

  defp demo(id \\ 1), do: VLLM.lora_request!("demo", id, Path.join(fixtures_dir(), "smollm2-lora-demo"))

  @params [temperature: 0.0, max_tokens: 32, ignore_eos: true]

  test "lora_request builds the struct; the BeamSearch name is an alias" do
    assert {:ok, %LoRARequest{lora_name: "a", lora_int_id: 3, lora_path: "/p"}} = VLLM.lora_request("a", 3, "/p")
    assert {:error, %Error{category: :validation}} = VLLM.lora_request("a", 0, "/p")
    assert %LoRARequest{} = Vllm.BeamSearch.LoRARequest.new!(lora_name: "a", lora_int_id: 1, lora_path: "/p")
  end

  test "a batch mixing the adapter and the base model matches both references exactly", %{
    llm: llm,
    reference: ref
  } do
    lora_cases = ref["lora_cases"]
    base_cases = Enum.map(lora_cases, fn c -> Enum.find(ref["cases"], &(&1["name"] == c["name"])) end)
    prompts = Enum.map(lora_cases ++ base_cases, &%{prompt_token_ids: &1["prompt_token_ids"]})
    loras = List.duplicate(demo(), length(lora_cases)) ++ List.duplicate(nil, length(base_cases))

    assert {:ok, outs} = VLLM.generate(llm, prompts, sampling_params: @params, lora_request: loras)

    for {out, c, lora} <- Enum.zip([outs, lora_cases ++ base_cases, loras]) do
      assert hd(out.outputs).token_ids == c["greedy_token_ids"], c["name"]
      # As vLLM: each output names the adapter its request asked for (nil: the base model).
      assert out.lora_request == lora, c["name"]
    end

    # One adapter for every prompt.
    [first | _] = lora_cases
    assert {:ok, [out]} =
             VLLM.generate(llm, %{prompt_token_ids: first["prompt_token_ids"]},
               sampling_params: @params,
               lora_request: demo()
             )

    assert hd(out.outputs).token_ids == first["greedy_token_ids"]
    assert %LoRARequest{lora_name: "demo", lora_int_id: 1} = out.lora_request
    assert out.lora_request.lora_path == Path.join(fixtures_dir(), "smollm2-lora-demo")
  end

  test "every streamed output of a LoRA request carries its lora_request", %{llm: llm, reference: ref} do
    [c | _] = ref["lora_cases"]
    id = request_id()

    assert {:ok, stream} =
             AsyncLLMEngine.generate(llm.engine, %{prompt_token_ids: c["prompt_token_ids"]},
               Keyword.put(@params, :max_tokens, 4), id, lora_request: demo(3))

    outs = Enum.to_list(stream)
    assert %{finished: true, outputs: [%{token_ids: ids}]} = List.last(outs)
    assert ids == Enum.take(c["greedy_token_ids"], 4)
    assert Enum.all?(outs, &(&1.lora_request == demo(3)))
  end

  test "add, pin, list and remove adapters; bad adapters keep the engine serving", %{llm: llm, reference: ref} do
    engine = llm.engine
    assert {:ok, _} = AsyncLLMEngine.add_lora(engine, demo(5))
    assert {:ok, false} = AsyncLLMEngine.add_lora(engine, demo(5))
    assert {:ok, true} = AsyncLLMEngine.pin_lora(engine, 5)
    assert {:ok, list} = AsyncLLMEngine.list_loras(engine)
    assert %{lora_int_id: 5, pinned: true} = Enum.find(list, &(&1.lora_int_id == 5))

    assert {:error, %Error{category: :not_found}} =
             AsyncLLMEngine.add_lora(engine, VLLM.lora_request!("x", 6, "/nonexistent/adapter"))

    assert {:error, %Error{category: :validation}} =
             AsyncLLMEngine.add_lora(engine, VLLM.lora_request!("x", 5, "/tmp"))

    assert {:error, %Error{category: :not_found}} = AsyncLLMEngine.pin_lora(engine, 99)
    assert {:ok, true} = AsyncLLMEngine.remove_lora(engine, 5)
    assert {:ok, false} = AsyncLLMEngine.remove_lora(engine, 5)

    [c | _] = ref["lora_cases"]
    assert {:ok, [out]} =
             VLLM.generate(llm, %{prompt_token_ids: c["prompt_token_ids"]},
               sampling_params: @params,
               lora_request: demo(5)
             )

    assert hd(out.outputs).token_ids == c["greedy_token_ids"]
  end

  test "LoRA requests on an engine without enable_lora are :validation errors" do
    engine = start_engine!(max_model_len: 128)
    assert {:error, %Error{category: :validation}} = AsyncLLMEngine.add_lora(engine, demo())

    assert {:error, %Error{category: :validation}} =
             AsyncLLMEngine.add_request(engine, request_id(), %{prompt_token_ids: [1, 2]}, [max_tokens: 2],
               lora_request: demo()
             )

    AsyncLLMEngine.shutdown(engine)
  end
end
