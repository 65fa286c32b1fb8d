Code.require_file("support/json.ex", __DIR__)

defmodule Vllm.StructuredOutputsTest do
  # Structured outputs through the public API on the real SmolLM2 model: a JSON schema
  # given as a map, a regex and a choice list constrain sampled outputs; invalid
  # constraints are validation errors at request time.
  use ExUnit.Case, async: false

  import Vllm.TestModel
  alias Vllm.{Error, LLM}

  @schema %{
    "type" => "object",
    "properties" => %{
      "name" => %{"type" => "string", "maxLength" => 10},
      "age" => %{"type" => "integer", "minimum" => 0, "maximum" => 120},
      "pet" => %{"enum" => ["cat", "dog"]}
    },
    "required" => ["name", "age", "pet"],
    "additionalProperties" => false
  }

  setup_all do
    %{llm: LLM.new!(path!(), dtype: "float32", seed: 0, max_model_len: 512)}
  end

  defp sampled(so, seeds, max_tokens) do
    for seed <- seeds do
      VLLM.sampling_params!(temperature: 1.0, seed: seed, max_tokens: max_tokens, structured_outputs: so)
    end
  end

  defp texts(llm, prompt, params) do
    {:ok, outs} = VLLM.generate(llm, List.duplicate(prompt, length(params)), sampling_params: params)
    Enum.map(outs, fn out -> hd(out.outputs) end)
  end

  test "guided decoding is supported and builds the structured_outputs map" do
    assert VLLM.guided_decoding_supported?()
    assert {:ok, %{choice: ["a", "b"]}} = VLLM.guided_decoding_params(choice: ["a", "b"])
    assert %{json: json} = VLLM.guided_decoding_params!(json: %{"type" => "string", "maxLength" => 3})
    assert Vllm.TestJSON.decode!(json) == %{"type" => "string", "maxLength" => 3}
    assert {:error, %Error{category: :validation}} = VLLM.guided_decoding_params(regex: "a", choice: ["b"])
    assert {:error, %Error{category: :validation}} = VLLM.guided_decoding_params([])
    assert {:error, %Error{category: :validation}} = VLLM.guided_decoding_params(choice: [])
  end

  test "JSON schema, regex and choice outputs obey their constraint at temperature 1", %{llm: llm} do
    json = VLLM.guided_decoding_params!(json: @schema)

    for out <- texts(llm, "Describe a person as JSON.", sampled(json, 1..8, 120)) do
      assert out.finish_reason == :stop, inspect(out.text)
      value = Vllm.TestJSON.decode!(out.text)
      assert Map.keys(value) |> Enum.sort() == ["age", "name", "pet"]
      assert is_binary(value["name"]) and String.length(value["name"]) <= 10
      assert is_integer(value["age"]) and value["age"] in 0..120
      assert value["pet"] in ["cat", "dog"]
    end

    pattern = "[A-Z][a-z]{2,6} [0-9]{2}"

    for out <- texts(llm, "A name and a number:", sampled(%{regex: pattern}, 1..8, 20)) do
      assert out.text =~ Regex.compile!("^(?:#{pattern})$"), inspect(out.text)
    end

    for out <- texts(llm, "Yes or no?", sampled(%{"choice" => ["yes", "no"]}, 1..8, 8)) do
      assert out.text in ["yes", "no"]
    end
  end

  test "an invalid schema, regex or grammar is a validation error and the engine keeps serving",
       %{llm: llm} do
    for so <- [%{json: "{not json"}, %{regex: "([a-z]"}, %{grammar: "start: missing_rule"}] do
      params = VLLM.sampling_params!(max_tokens: 4, structured_outputs: so)

      assert {:error, %Error{category: :validation}} =
               VLLM.generate(llm, "Hi", sampling_params: params)
    end

    assert {:error, %Error{category: :validation}} =
             VLLM.sampling_params(structured_outputs: %{colour: "red"})

    params = VLLM.sampling_params!(temperature: 0.0, max_tokens: 4, structured_outputs: %{choice: ["ok"]})
    assert {:ok, [out]} = VLLM.generate(llm, "Hi", sampling_params: params)
    assert hd(out.outputs).text == "ok"
  end
end
