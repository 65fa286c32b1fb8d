defmodule Vllm.SamplingParamsTest do
  use ExUnit.Case, async: true
  doctest Vllm.SamplingParams

  alias Vllm.{Error, SamplingParams}

  test "defaults are vLLM 0.14's" do
    {:ok, p} = SamplingParams.new()
    assert p.n == 1
    assert p.temperature == 1.0
    assert p.top_p == 1.0
    assert p.top_k == 0
    assert p.max_tokens == 16
    assert p.stop == []
    assert p.output_kind == :cumulative
    assert p.skip_special_tokens
    refute p.ignore_eos
  end

  test "accepts keyword lists, maps with atom or string keys, and a single stop string" do
    assert {:ok, %{temperature: 0.5, stop: ["\n"]}} =
             SamplingParams.new(temperature: 0.5, stop: "\n")

    assert {:ok, %{max_tokens: 3}} = SamplingParams.new(%{"max_tokens" => 3})
    assert {:ok, %{top_k: 5}} = SamplingParams.new(%{top_k: 5})
  end

  for {opts, key} <- [
        {[max_tokens: -1], ":max_tokens"},
        {[max_tokens: 0], ":max_tokens"},
        {[max_tokens: "10"], ":max_tokens"},
        {[temperature: -0.1], ":temperature"},
        {[temperature: "hot"], ":temperature"},
        {[top_p: 0], ":top_p"},
        {[top_p: 1.5], ":top_p"},
        {[top_k: -2], ":top_k"},
        {[min_p: 2], ":min_p"},
        {[stop: [""]], ":stop"},
        {[stop: 5], ":stop"},
        {[stop_token_ids: [-1]], ":stop_token_ids"},
        {[ignore_eos: "yes"], ":ignore_eos"},
        {[output_kind: :sometimes], ":output_kind"},
        {[min_tokens: 20, max_tokens: 10], ":min_tokens"},
        {[colour: :blue], ":colour"},
        {%{"nope" => 1}, "\"nope\""}
      ] do
    test "rejects #{inspect(opts)} naming #{key}" do
      assert {:error, %Error{category: :validation, message: message}} =
               SamplingParams.new(unquote(Macro.escape(opts)))

      assert message =~ unquote(key)
    end
  end

  test "new! raises Vllm.Error; clone applies validated overrides; getters read fields" do
    assert_raise Error, ~r/top_p/, fn -> SamplingParams.new!(top_p: 2) end
    p = SamplingParams.new!(max_tokens: 8)
    assert {:ok, %{max_tokens: 8, temperature: +0.0}} = SamplingParams.clone(p, temperature: 0.0)
    assert {:error, %Error{category: :validation}} = SamplingParams.clone(p, temperature: -1)
    assert SamplingParams.max_tokens(p) == 8
  end

  test "not a keyword list or map" do
    assert {:error, %Error{category: :validation}} = SamplingParams.new(42)
  end
end
