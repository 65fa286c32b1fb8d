defmodule VLLMFacadeTest do
  use ExUnit.Case, async: true
  doctest VLLM

  alias Vllm.Error

  test "version, sampling_params and their ! twins" do
    assert {:ok, version} = VLLM.version()
    assert version == VLLM.version!()
    assert {:ok, %Vllm.SamplingParams{max_tokens: 4}} = VLLM.sampling_params(max_tokens: 4)
    assert %Vllm.SamplingParams{} = VLLM.sampling_params!()
    assert_raise Error, fn -> VLLM.sampling_params!(temperature: -1) end
  end

  test "attr reads struct fields by atom or string key" do
    out = %Vllm.RequestOutput{
      request_id: "r",
      outputs: [%Vllm.CompletionOutput{text: "hi", finish_reason: :stop}]
    }

    assert VLLM.attr!(out, :request_id) == "r"
    assert VLLM.attr!(hd(out.outputs), "finish_reason") == :stop
    assert {:error, %Error{category: :validation}} = VLLM.attr(out, "no_such_field")
    assert {:error, %Error{category: :validation}} = VLLM.attr(out, :__struct__)
    assert_raise Error, fn -> VLLM.attr!(out, "nope") end
  end

  test "output structs have exactly the fields of API.md, with the old module names" do
    assert (Map.keys(%Vllm.RequestOutput{}) -- [:__struct__]) |> Enum.sort() ==
             Enum.sort([
               :request_id,
               :prompt,
               :prompt_token_ids,
               :prompt_logprobs,
               :outputs,
               :finished,
               :metrics,
               :lora_request,
               :num_cached_tokens
             ])

    assert (Map.keys(%Vllm.CompletionOutput{}) -- [:__struct__]) |> Enum.sort() ==
             Enum.sort([
               :index,
               :text,
               :token_ids,
               :cumulative_logprob,
               :logprobs,
               :finish_reason,
               :stop_reason
             ])

    assert %Vllm.RequestOutput{request_id: "x"} = Vllm.Outputs.RequestOutput.new(request_id: "x")
    assert %Vllm.CompletionOutput{text: "y"} = Vllm.Outputs.CompletionOutput.new(text: "y")
  end

  test "Vllm.Error is an exception with a readable message" do
    error = Error.new(:not_found, "model x not found")
    assert Exception.message(error) == "not_found: model x not found"
    assert error.details == nil
  end
end
