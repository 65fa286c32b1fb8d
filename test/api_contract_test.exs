defmodule Vllm.ApiContractTest do
  # Every function ../shared/API.md lists exists with its arities, and its `!` twin.
  use ExUnit.Case, async: true

  # {module, [{name, arities}]}; `bang: false` names have no `!` twin (predicates, or the
  # old package's own helpers that return plain keyword lists).
  @contract [
    {VLLM,
     [
       run: [1, 2],
       llm: [1, 2],
       sampling_params: [0, 1],
       pooling_params: [0, 1],
       lora_request: [3, 4],
       generate: [2, 3],
       chat: [2, 3],
       embed: [2, 3],
       encode: [2, 3],
       engine: [1, 2],
       async_engine: [1, 2],
       attr: [2],
       version: [0],
       with_timeout: [2],
       timeout_profile: [1],
       timeout_ms: [1],
       guided_decoding_params: [0, 1],
       call: [2, 3, 4],
       method: [2, 3, 4],
       get: [2],
       set_attr: [3]
     ]},
    {Vllm.LLM,
     [
       new: [1, 2],
       generate: [2, 3, 4],
       chat: [2, 3, 4],
       embed: [2, 3],
       encode: [2, 3, 4],
       classify: [2, 3],
       score: [3, 4],
       get_tokenizer: [1],
       get_default_sampling_params: [1],
       reset_prefix_cache: [1],
       sleep: [1, 2],
       wake_up: [1, 2],
       get_metrics: [1]
     ]},
    {Vllm.SamplingParams, [new: [0, 1], clone: [1, 2]]},
    {Vllm.PoolingParams, [new: [0, 1], clone: [1, 2]]},
    {Vllm.LoRARequest, [new: [0, 1], clone: [1, 2]]},
    {Vllm.BeamSearch.LoRARequest, [new: [0, 1]]},
    {Vllm.AsyncLLMEngine,
     [
       new: [1, 2],
       from_engine_args: [1, 2],
       from_vllm_config: [1, 2],
       generate: [4, 5],
       add_request: [4, 5],
       encode: [4, 5],
       abort: [2, 3],
       add_lora: [2],
       remove_lora: [2],
       pin_lora: [2],
       list_loras: [1],
       check_health: [1],
       errored: [1],
       is_running: [1],
       is_stopped: [1],
       dead_error: [1],
       is_paused: [1],
       pause_generation: [1, 2],
       resume_generation: [1],
       sleep: [1, 2],
       wake_up: [1, 2],
       is_sleeping: [1],
       reset_prefix_cache: [1, 2],
       reset_mm_cache: [1],
       wait_for_requests_to_drain: [1, 2],
       scale_elastic_ep: [2, 3],
       collective_rpc: [2, 3],
       start_profile: [1],
       stop_profile: [1],
       do_log_stats: [1],
       is_tracing_enabled: [1],
       get_supported_tasks: [1],
       get_tokenizer: [1],
       tokenizer: [1]
     ]},
    {Vllm.Tokenizer,
     [
       encode: [2, 3],
       decode: [2, 3],
       apply_chat_template: [2, 3],
       vocab_size: [1],
       eos_token_id: [1]
     ]}
  ]

  @no_bang [
    {VLLM, :ref?, 1},
    {VLLM, :guided_decoding_supported?, 0},
    {Vllm.AsyncLLMEngine, :child_spec, 1}
  ]

  test "every function of API.md exists with its arities and a ! twin" do
    missing =
      for {module, functions} <- @contract,
          Code.ensure_loaded!(module),
          {name, arities} <- functions,
          arity <- arities,
          fun <- [name, :"#{name}!"],
          not function_exported?(module, fun, arity),
          do: "#{inspect(module)}.#{fun}/#{arity}"

    assert missing == []

    for {module, fun, arity} <- @no_bang do
      Code.ensure_loaded!(module)
      assert function_exported?(module, fun, arity), "#{inspect(module)}.#{fun}/#{arity}"
    end
  end

  test "every SamplingParams, PoolingParams and LoRARequest field has a getter" do
    for module <- [Vllm.SamplingParams, Vllm.PoolingParams, Vllm.LoRARequest],
        field <- Map.keys(module.__struct__()) -- [:__struct__] do
      assert function_exported?(module, field, 1), "#{inspect(module)}.#{field}/1"
    end
  end

  test "the output structs and the old output module names exist" do
    assert %Vllm.RequestOutput{} = Vllm.Outputs.RequestOutput.new(request_id: "a")
    assert %Vllm.CompletionOutput{text: "x"} = Vllm.Outputs.CompletionOutput.new(text: "x")

    assert %Vllm.PoolingRequestOutput{outputs: %Vllm.EmbeddingOutput{embedding: [1.0]}} =
             Vllm.Outputs.PoolingRequestOutput.new(
               outputs: %Vllm.EmbeddingOutput{embedding: [1.0]}
             )

    assert %Vllm.EmbeddingOutput{} = Vllm.Outputs.EmbeddingOutput.new()
  end
end
