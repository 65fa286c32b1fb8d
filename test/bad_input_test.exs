defmodule Vllm.BadInputTest do
  # Every public function, fed bad input: wrong types and shapes for each argument and
  # option, out-of-range sampling values, unknown keys, empty / huge / non-UTF-8 prompts,
  # out-of-vocabulary ids, prompts longer than max_model_len, n over the limit, duplicate
  # live ids, unknown LoRA ids, calls on a shut-down engine. Each returns
  # {:error, %Vllm.Error{}} with the right category and a message naming the argument,
  # and afterwards the engine still gives the same greedy text.
  use ExUnit.Case

  import Vllm.TestModel
  alias Vllm.{AsyncLLMEngine, Error, LLM, LoRARequest, PoolingParams, SamplingParams, Tokenizer}

  @greedy [temperature: 0.0, max_tokens: 4]
  @reference_prompt "The capital of France is"

  setup_all do
    engine = start_engine!(enable_lora: true, max_loras: 1, max_model_len: 512)
    dead = start_engine!()
    AsyncLLMEngine.shutdown(dead)
    {:ok, tokenizer} = AsyncLLMEngine.get_tokenizer(engine)
    llm = %LLM{engine: engine, model: path!()}

    {:ok,
     engine: engine,
     dead: dead,
     llm: llm,
     tok: tokenizer,
     reference: greedy(engine),
     output: hd(LLM.generate!(llm, "Hi", @greedy))}
  end

  # {case, category, words any of which the message must contain, call (fn ctx -> _ end)}
  @cases [
    # AsyncLLMEngine.generate/5: the prompt
    {"generate: prompt is an integer", :validation, ["prompt"],
     quote(do: fn c -> AsyncLLMEngine.generate(c.engine, 42, nil, rid()) end)},
    {"generate: prompt is empty", :validation, ["prompt"],
     quote(do: fn c -> AsyncLLMEngine.generate(c.engine, "", nil, rid()) end)},
    {"generate: prompt is not UTF-8", :validation, ["prompt"],
     quote(do: fn c -> AsyncLLMEngine.generate(c.engine, <<0xFF, 0xFE, 0x41>>, nil, rid()) end)},
    {"generate: prompt is huge (200,000 characters)", :validation, ["prompt"],
     quote(
       do: fn c ->
         AsyncLLMEngine.generate(c.engine, String.duplicate("word ", 40_000), nil, rid())
       end
     )},
    {"generate: prompt longer than max_model_len", :validation, ["prompt"],
     quote(
       do: fn c ->
         AsyncLLMEngine.generate(
           c.engine,
           %{prompt_token_ids: List.duplicate(1, 600)},
           nil,
           rid()
         )
       end
     )},
    {"generate: prompt plus max_tokens over max_model_len", :validation, ["max_tokens"],
     quote(do: fn c -> AsyncLLMEngine.generate(c.engine, "Hi", [max_tokens: 100_000], rid()) end)},
    {"generate: empty prompt_token_ids", :validation, ["prompt"],
     quote(do: fn c -> AsyncLLMEngine.generate(c.engine, %{prompt_token_ids: []}, nil, rid()) end)},
    {"generate: token id outside the vocabulary", :validation, ["prompt"],
     quote(
       do: fn c ->
         AsyncLLMEngine.generate(c.engine, %{prompt_token_ids: [1, 49_152]}, nil, rid())
       end
     )},
    {"generate: negative token id", :validation, ["prompt"],
     quote(
       do: fn c -> AsyncLLMEngine.generate(c.engine, %{prompt_token_ids: [1, -2]}, nil, rid()) end
     )},
    {"generate: token ids of the wrong type", :validation, ["prompt"],
     quote(
       do: fn c ->
         AsyncLLMEngine.generate(c.engine, %{prompt_token_ids: ["a", 1.5]}, nil, rid())
       end
     )},
    {"generate: improper token id list", :validation, ["prompt"],
     quote(
       do: fn c -> AsyncLLMEngine.generate(c.engine, %{prompt_token_ids: [1 | 2]}, nil, rid()) end
     )},
    {"generate: prompt map with an unknown key", :validation, ["prompt"],
     quote(do: fn c -> AsyncLLMEngine.generate(c.engine, %{text: "Hi"}, nil, rid()) end)},
    {"generate: conversation without content", :validation, ["content", "message"],
     quote(do: fn c -> AsyncLLMEngine.generate(c.engine, [%{"role" => "user"}], nil, rid()) end)},
    # sampling params
    {"generate: sampling params of the wrong type", :validation, ["sampling"],
     quote(do: fn c -> AsyncLLMEngine.generate(c.engine, "Hi", "greedy", rid()) end)},
    {"generate: unknown sampling key", :validation, ["temprature"],
     quote(do: fn c -> AsyncLLMEngine.generate(c.engine, "Hi", [temprature: 0.5], rid()) end)},
    {"generate: temperature < 0", :validation, ["temperature"],
     quote(do: fn c -> AsyncLLMEngine.generate(c.engine, "Hi", [temperature: -0.5], rid()) end)},
    {"generate: temperature not a number", :validation, ["temperature"],
     quote(do: fn c -> AsyncLLMEngine.generate(c.engine, "Hi", [temperature: "hot"], rid()) end)},
    {"generate: top_p = 0", :validation, ["top_p"],
     quote(do: fn c -> AsyncLLMEngine.generate(c.engine, "Hi", [top_p: 0.0], rid()) end)},
    {"generate: top_p > 1", :validation, ["top_p"],
     quote(do: fn c -> AsyncLLMEngine.generate(c.engine, "Hi", [top_p: 1.5], rid()) end)},
    {"generate: top_k < -1", :validation, ["top_k"],
     quote(do: fn c -> AsyncLLMEngine.generate(c.engine, "Hi", [top_k: -5], rid()) end)},
    {"generate: min_p > 1", :validation, ["min_p"],
     quote(do: fn c -> AsyncLLMEngine.generate(c.engine, "Hi", [min_p: 2.0], rid()) end)},
    {"generate: presence_penalty > 2", :validation, ["presence_penalty"],
     quote(
       do: fn c -> AsyncLLMEngine.generate(c.engine, "Hi", [presence_penalty: 5.0], rid()) end
     )},
    {"generate: frequency_penalty < -2", :validation, ["frequency_penalty"],
     quote(
       do: fn c -> AsyncLLMEngine.generate(c.engine, "Hi", [frequency_penalty: -3], rid()) end
     )},
    {"generate: repetition_penalty = 0", :validation, ["repetition_penalty"],
     quote(
       do: fn c -> AsyncLLMEngine.generate(c.engine, "Hi", [repetition_penalty: 0.0], rid()) end
     )},
    {"generate: max_tokens < 1", :validation, ["max_tokens"],
     quote(do: fn c -> AsyncLLMEngine.generate(c.engine, "Hi", [max_tokens: -1], rid()) end)},
    {"generate: max_tokens of the wrong type", :validation, ["max_tokens"],
     quote(do: fn c -> AsyncLLMEngine.generate(c.engine, "Hi", [max_tokens: "many"], rid()) end)},
    {"generate: min_tokens > max_tokens", :validation, ["min_tokens"],
     quote(
       do: fn c ->
         AsyncLLMEngine.generate(c.engine, "Hi", [min_tokens: 10, max_tokens: 2], rid())
       end
     )},
    {"generate: n = 0", :validation, ["n "],
     quote(do: fn c -> AsyncLLMEngine.generate(c.engine, "Hi", [n: 0], rid()) end)},
    {"generate: n over the limit", :validation, ["n "],
     quote(do: fn c -> AsyncLLMEngine.generate(c.engine, "Hi", [n: 100_000], rid()) end)},
    {"generate: seed < 0", :validation, ["seed"],
     quote(do: fn c -> AsyncLLMEngine.generate(c.engine, "Hi", [seed: -1], rid()) end)},
    {"generate: logprobs over the limit", :validation, ["logprobs"],
     quote(do: fn c -> AsyncLLMEngine.generate(c.engine, "Hi", [logprobs: 1000], rid()) end)},
    {"generate: stop of the wrong type", :validation, ["stop"],
     quote(do: fn c -> AsyncLLMEngine.generate(c.engine, "Hi", [stop: [1, 2]], rid()) end)},
    {"generate: stop_token_ids outside the vocabulary", :validation, ["stop_token_ids"],
     quote(
       do: fn c ->
         AsyncLLMEngine.generate(c.engine, "Hi", [stop_token_ids: [10_000_000]], rid())
       end
     )},
    {"generate: logit_bias for a token outside the vocabulary", :validation, ["logit_bias"],
     quote(
       do: fn c ->
         AsyncLLMEngine.generate(c.engine, "Hi", [logit_bias: %{10_000_000 => 1.0}], rid())
       end
     )},
    {"generate: empty allowed_token_ids", :validation, ["allowed_token_ids"],
     quote(
       do: fn c -> AsyncLLMEngine.generate(c.engine, "Hi", [allowed_token_ids: []], rid()) end
     )},
    {"generate: output_kind unknown", :validation, ["output_kind"],
     quote(
       do: fn c -> AsyncLLMEngine.generate(c.engine, "Hi", [output_kind: :sometimes], rid()) end
     )},
    {"generate: truncate_prompt_tokens = 0", :validation, ["truncate_prompt_tokens"],
     quote(
       do: fn c -> AsyncLLMEngine.generate(c.engine, "Hi", [truncate_prompt_tokens: 0], rid()) end
     )},
    {"generate: structured_outputs with a bad JSON schema", :validation,
     ["json", "schema", "structured"],
     quote(
       do: fn c ->
         AsyncLLMEngine.generate(c.engine, "Hi", [structured_outputs: %{json: 42}], rid())
       end
     )},
    {"generate: structured_outputs with a bad regex", :validation, ["regex"],
     quote(
       do: fn c ->
         AsyncLLMEngine.generate(c.engine, "Hi", [structured_outputs: %{regex: "(("}], rid())
       end
     )},
    # request id and opts
    {"generate: request id not a string", :validation, ["request_id"],
     quote(do: fn c -> AsyncLLMEngine.generate(c.engine, "Hi", nil, 42) end)},
    {"generate: empty request id", :validation, ["request_id"],
     quote(do: fn c -> AsyncLLMEngine.generate(c.engine, "Hi", nil, "") end)},
    {"generate: duplicate live request id", :validation, ["request_id"],
     quote(
       do: fn c ->
         id = rid()
         with_live(c.engine, id, fn -> AsyncLLMEngine.generate(c.engine, "Hi", nil, id) end)
       end
     )},
    {"generate: unknown option", :validation, [":colour"],
     quote(do: fn c -> AsyncLLMEngine.generate(c.engine, "Hi", nil, rid(), colour: :red) end)},
    {"generate: options not a keyword list", :validation, ["options"],
     quote(do: fn c -> AsyncLLMEngine.generate(c.engine, "Hi", nil, rid(), %{priority: 1}) end)},
    {"generate: priority not an integer", :validation, [":priority"],
     quote(do: fn c -> AsyncLLMEngine.generate(c.engine, "Hi", nil, rid(), priority: "high") end)},
    {"generate: data_parallel_rank out of range", :validation, ["data_parallel_rank"],
     quote(
       do: fn c -> AsyncLLMEngine.generate(c.engine, "Hi", nil, rid(), data_parallel_rank: 5) end
     )},
    {"generate: data_parallel_rank negative", :validation, ["data_parallel_rank"],
     quote(
       do: fn c -> AsyncLLMEngine.generate(c.engine, "Hi", nil, rid(), data_parallel_rank: -1) end
     )},
    {"generate: __runtime__ timeout negative", :validation, ["timeout"],
     quote(
       do: fn c ->
         AsyncLLMEngine.generate(c.engine, "Hi", nil, rid(), __runtime__: [timeout: -5])
       end
     )},
    {"generate: lora_request of the wrong type", :validation, ["lora_request"],
     quote(
       do: fn c ->
         AsyncLLMEngine.generate(c.engine, "Hi", nil, rid(), lora_request: "adapter")
       end
     )},
    {"generate: unknown LoRA id (not added, no such path)", :not_found, ["lora", "LoRA"],
     quote(
       do: fn c ->
         AsyncLLMEngine.generate(c.engine, "Hi", nil, rid(),
           lora_request: %LoRARequest{
             lora_name: "x",
             lora_int_id: 77,
             lora_path: "/no/such/adapter"
           }
         )
       end
     )},
    # add_request/5, abort/3
    {"add_request: to is not a pid", :validation, [":to"],
     quote(do: fn c -> AsyncLLMEngine.add_request(c.engine, rid(), "Hi", nil, to: :nobody) end)},
    {"add_request: bad sampling value", :validation, ["top_p"],
     quote(do: fn c -> AsyncLLMEngine.add_request(c.engine, rid(), "Hi", top_p: -1) end)},
    {"add_request: duplicate live request id", :validation, ["request_id"],
     quote(
       do: fn c ->
         id = rid()
         with_live(c.engine, id, fn -> AsyncLLMEngine.add_request(c.engine, id, "Hi", nil) end)
       end
     )},
    {"abort: request id not a string", :validation, ["request id"],
     quote(do: fn c -> AsyncLLMEngine.abort(c.engine, [42]) end)},
    {"abort: unknown option", :validation, [":now"],
     quote(do: fn c -> AsyncLLMEngine.abort(c.engine, "x", now: true) end)},
    # tokenizer helpers of the engine
    {"encode_text: text not a string", :validation, ["text"],
     quote(do: fn c -> AsyncLLMEngine.encode_text(c.engine, 42) end)},
    {"encode_text: text not UTF-8", :validation, ["text", "UTF-8"],
     quote(do: fn c -> AsyncLLMEngine.encode_text(c.engine, <<0xFF>>) end)},
    {"decode_tokens: ids not a list", :validation, ["token ids"],
     quote(do: fn c -> AsyncLLMEngine.decode_tokens(c.engine, "1 2 3") end)},
    {"decode_tokens: id outside the vocabulary", :validation, ["token id", "vocabulary"],
     quote(do: fn c -> AsyncLLMEngine.decode_tokens(c.engine, [10_000_000]) end)},
    {"apply_chat_template: messages not a list of maps", :validation, ["messages"],
     quote(do: fn c -> AsyncLLMEngine.apply_chat_template(c.engine, "Hi") end)},
    {"apply_chat_template: add_generation_prompt not a boolean", :validation,
     ["add_generation_prompt"],
     quote(
       do: fn c ->
         AsyncLLMEngine.apply_chat_template(
           c.engine,
           [%{"role" => "user", "content" => "x"}],
           "yes"
         )
       end
     )},
    {"apply_chat_template: chat_template not a string", :validation, [":chat_template"],
     quote(
       do: fn c ->
         AsyncLLMEngine.apply_chat_template(
           c.engine,
           [%{"role" => "user", "content" => "x"}],
           true,
           chat_template: 5
         )
       end
     )},
    {"encode: pooling on a generation model", :unsupported, ["pooling", "embed", "encode"],
     quote(do: fn c -> AsyncLLMEngine.encode(c.engine, "Hi", nil, rid()) end)},
    # control
    {"collective_rpc: unknown method", :unsupported, ["\"nope\""],
     quote(do: fn c -> AsyncLLMEngine.collective_rpc(c.engine, "nope") end)},
    {"collective_rpc: negative timeout", :validation, ["timeout"],
     quote(do: fn c -> AsyncLLMEngine.collective_rpc(c.engine, "ping", timeout: -1) end)},
    {"collective_rpc: args given", :validation, ["args"],
     quote(do: fn c -> AsyncLLMEngine.collective_rpc(c.engine, "ping", args: [1]) end)},
    {"sleep: level 3", :validation, ["level"],
     quote(do: fn c -> AsyncLLMEngine.sleep(c.engine, level: 3) end)},
    {"wake_up: tags not a list", :validation, ["tags"],
     quote(do: fn c -> AsyncLLMEngine.wake_up(c.engine, tags: 5) end)},
    {"pause_generation: wait_for_inflight_requests not a boolean", :validation,
     ["wait_for_inflight_requests"],
     quote(
       do: fn c -> AsyncLLMEngine.pause_generation(c.engine, wait_for_inflight_requests: "x") end
     )},
    {"reset_prefix_cache: reset_running_requests not a boolean", :validation,
     ["reset_running_requests"],
     quote(do: fn c -> AsyncLLMEngine.reset_prefix_cache(c.engine, reset_running_requests: 1) end)},
    {"wait_for_requests_to_drain: negative drain_timeout", :validation, ["drain_timeout"],
     quote(do: fn c -> AsyncLLMEngine.wait_for_requests_to_drain(c.engine, drain_timeout: -1) end)},
    {"scale_elastic_ep: size 0", :validation, ["new_data_parallel_size", "data_parallel_size"],
     quote(do: fn c -> AsyncLLMEngine.scale_elastic_ep(c.engine, 0) end)},
    {"scale_elastic_ep: size not an integer", :validation,
     ["new_data_parallel_size", "data_parallel_size"],
     quote(do: fn c -> AsyncLLMEngine.scale_elastic_ep(c.engine, "2") end)},
    {"add_lora: not a LoRA request", :validation, ["lora_request", "LoRA"],
     quote(do: fn c -> AsyncLLMEngine.add_lora(c.engine, "adapter") end)},
    {"add_lora: path that does not exist", :not_found, ["/no/such/adapter"],
     quote(
       do: fn c ->
         AsyncLLMEngine.add_lora(c.engine, %LoRARequest{
           lora_name: "x",
           lora_int_id: 5,
           lora_path: "/no/such/adapter"
         })
       end
     )},
    {"remove_lora: id not an integer", :validation, ["lora_int_id", "LoRA"],
     quote(do: fn c -> AsyncLLMEngine.remove_lora(c.engine, "x") end)},
    {"pin_lora: unknown LoRA id", :not_found, ["LoRA 999", "999"],
     quote(do: fn c -> AsyncLLMEngine.pin_lora(c.engine, 999) end)},
    # starting an engine
    {"new: options not a keyword list", :validation, ["options"],
     quote(do: fn _ -> AsyncLLMEngine.new(42) end)},
    {"new: unknown engine option", :validation, [":max_batch"],
     quote(do: fn _ -> AsyncLLMEngine.new(path!(), max_batch: 3) end)},
    {"new: max_num_seqs = 0", :validation, [":max_num_seqs"],
     quote(do: fn _ -> AsyncLLMEngine.new(path!(), max_num_seqs: 0) end)},
    {"new: block_size too large", :validation, [":block_size"],
     quote(do: fn _ -> AsyncLLMEngine.new(path!(), block_size: 512) end)},
    {"new: unknown dtype", :validation, [":dtype"],
     quote(do: fn _ -> AsyncLLMEngine.new(path!(), dtype: "float8") end)},
    {"new: max_model_len above the model's", :validation, ["max_model_len"],
     quote(do: fn _ -> AsyncLLMEngine.new(path!(), max_model_len: 1_000_000) end)},
    {"new: missing model", :not_found, ["/no/such/model.gguf"],
     quote(do: fn _ -> AsyncLLMEngine.new(model: "/no/such/model.gguf") end)},
    {"from_vllm_config: not a map", :validation, ["config"],
     quote(do: fn _ -> AsyncLLMEngine.from_vllm_config("model") end)},
    # a shut-down engine
    {"shut-down engine: generate", :engine_dead, ["engine"],
     quote(do: fn c -> AsyncLLMEngine.generate(c.dead, "Hi", nil, rid()) end)},
    {"shut-down engine: add_request", :engine_dead, ["engine"],
     quote(do: fn c -> AsyncLLMEngine.add_request(c.dead, rid(), "Hi", nil) end)},
    {"shut-down engine: abort", :engine_dead, ["engine"],
     quote(do: fn c -> AsyncLLMEngine.abort(c.dead, "x") end)},
    {"shut-down engine: stats", :engine_dead, ["engine"],
     quote(do: fn c -> AsyncLLMEngine.stats(c.dead) end)},
    {"shut-down engine: check_health", :engine_dead, ["engine"],
     quote(do: fn c -> AsyncLLMEngine.check_health(c.dead) end)},
    {"shut-down engine: collective_rpc", :engine_dead, ["engine"],
     quote(do: fn c -> AsyncLLMEngine.collective_rpc(c.dead, "ping") end)},
    {"shut-down engine: encode_text", :engine_dead, ["engine"],
     quote(do: fn c -> AsyncLLMEngine.encode_text(c.dead, "Hi") end)},
    {"shut-down engine: pause_generation", :engine_dead, ["engine"],
     quote(do: fn c -> AsyncLLMEngine.pause_generation(c.dead) end)},
    {"shut-down engine: get_tokenizer", :engine_dead, ["engine"],
     quote(do: fn c -> AsyncLLMEngine.get_tokenizer(c.dead) end)},
    # Vllm.LLM
    {"LLM.new: model not a string", :validation, ["model", "options"],
     quote(do: fn _ -> LLM.new(42) end)},
    {"LLM.generate: not an LLM", :validation, ["Vllm.LLM"],
     quote(do: fn _ -> LLM.generate(:not_an_llm, "Hi") end)},
    {"LLM.generate: one bad prompt in a batch", :validation, ["prompt"],
     quote(do: fn c -> LLM.generate(c.llm, ["Hi", 42], @greedy) end)},
    {"LLM.generate: sampling_params list of the wrong length", :validation, ["sampling_params"],
     quote(
       do: fn c ->
         LLM.generate(c.llm, ["a", "b", "c"], [SamplingParams.new!(), SamplingParams.new!()])
       end
     )},
    {"LLM.generate: lora_request list of the wrong length", :validation, ["lora_request"],
     quote(do: fn c -> LLM.generate(c.llm, ["a", "b"], nil, lora_request: [nil, nil, nil]) end)},
    {"LLM.generate: out-of-range temperature", :validation, ["temperature"],
     quote(do: fn c -> LLM.generate(c.llm, ["Hi"], temperature: -1) end)},
    {"LLM.chat: conversation not a list of messages", :validation, ["conversation", "messages"],
     quote(do: fn c -> LLM.chat(c.llm, "Hi there") end)},
    {"LLM.embed: generation model", :unsupported, ["embed"],
     quote(do: fn c -> LLM.embed(c.llm, ["Hi"]) end)},
    {"LLM.score: generation model", :unsupported, ["score"],
     quote(do: fn c -> LLM.score(c.llm, "a", "b") end)},
    {"LLM.sleep: level 0", :validation, ["level"],
     quote(do: fn c -> LLM.sleep(c.llm, level: 0) end)},
    # VLLM facade
    {"VLLM.generate: sampling_params of the wrong type", :validation, ["sampling"],
     quote(do: fn c -> VLLM.generate(c.llm, "Hi", sampling_params: 5) end)},
    {"VLLM.generate: unknown option", :validation, [":foo"],
     quote(do: fn c -> VLLM.generate(c.llm, "Hi", foo: 1) end)},
    {"VLLM.chat: options not a keyword list", :validation, ["options"],
     quote(do: fn c -> VLLM.chat(c.llm, [%{"role" => "user", "content" => "x"}], :opts) end)},
    {"VLLM.lora_request: negative id", :validation, ["lora_int_id"],
     quote(do: fn _ -> VLLM.lora_request("n", -1, "/p") end)},
    # timeout_ms/1 and timeout_profile/1 build options inline (the old package's
    # contract: they return the keyword list), so bad input raises Vllm.Error.
    {"VLLM.timeout_ms: negative (raises)", :validation, ["timeout_ms"],
     quote(do: fn _ -> rescued(fn -> VLLM.timeout_ms(-1) end) end)},
    {"VLLM.timeout_profile: unknown profile (raises)", :validation, ["profile"],
     quote(do: fn _ -> rescued(fn -> VLLM.timeout_profile(:nope) end) end)},
    {"VLLM.attr: unknown field", :validation, [":nope"],
     quote(do: fn c -> VLLM.attr(c.output, :nope) end)},
    {"VLLM.run: not a function", :validation, ["function", "fun"],
     quote(do: fn _ -> VLLM.run("not a function") end)},
    {"VLLM.call: Python pass-through", :unsupported, ["Python"],
     quote(do: fn _ -> VLLM.call("vllm", "LLM") end)},
    # parameter structs
    {"SamplingParams.new: not a keyword list", :validation, ["sampling"],
     quote(do: fn _ -> SamplingParams.new(:greedy) end)},
    {"SamplingParams.clone: bad override", :validation, ["top_k"],
     quote(do: fn _ -> SamplingParams.clone(SamplingParams.new!(), top_k: "x") end)},
    {"PoolingParams.new: negative dimensions", :validation, ["dimensions"],
     quote(do: fn _ -> PoolingParams.new(dimensions: -1) end)},
    {"PoolingParams.new: normalize not a boolean", :validation, ["normalize"],
     quote(do: fn _ -> PoolingParams.new(normalize: "yes") end)},
    {"PoolingParams.new: unknown key", :validation, ["pool"],
     quote(do: fn _ -> PoolingParams.new(pool: :mean) end)},
    {"LoRARequest.new: lora_int_id = 0", :validation, ["lora_int_id"],
     quote(do: fn _ -> LoRARequest.new(lora_name: "a", lora_int_id: 0, lora_path: "/p") end)},
    {"LoRARequest.new: lora_path not a string", :validation, ["lora_path"],
     quote(do: fn _ -> LoRARequest.new(lora_name: "a", lora_int_id: 1, lora_path: 5) end)},
    # Vllm.Tokenizer
    {"Tokenizer.encode: text not a string", :validation, ["text"],
     quote(do: fn c -> Tokenizer.encode(c.tok, 42) end)},
    {"Tokenizer.encode: unknown option", :validation, [":bogus"],
     quote(do: fn c -> Tokenizer.encode(c.tok, "Hi", bogus: true) end)},
    {"Tokenizer.decode: ids not a list", :validation, ["ids"],
     quote(do: fn c -> Tokenizer.decode(c.tok, "1 2") end)},
    {"Tokenizer.decode: negative id", :validation, ["token id", "ids"],
     quote(do: fn c -> Tokenizer.decode(c.tok, [-1]) end)},
    {"Tokenizer.apply_chat_template: not messages", :validation, ["messages"],
     quote(do: fn c -> Tokenizer.apply_chat_template(c.tok, 5) end)}
  ]

  test "the matrix covers at least 60 cases" do
    assert length(@cases) >= 60
  end

  for {name, category, words, call} <- @cases do
    test name, ctx do
      result = unquote(call).(ctx)

      assert {:error, %Error{category: unquote(category), message: message}} = result,
             "expected a #{unquote(category)} error, got #{inspect(result, limit: 8)}"

      assert Enum.any?(unquote(words), &String.contains?(message, &1)),
             "the message does not name #{inspect(unquote(words))}: #{message}"

      # The engine is not hurt: the same greedy text as before, every block free.
      assert greedy(ctx.engine) == ctx.reference
      assert_all_blocks_free(ctx.engine)
    end
  end

  ## Loading

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

  defp rid, do: request_id("bad")

  defp rescued(fun) do
    fun.()
  rescue
    e in Error -> {:error, e}
  end

  # Runs `fun` while `id` is a live request of the engine.
  defp with_live(engine, id, fun) do
    :ok =
      AsyncLLMEngine.add_request(engine, id, "Once upon a time",
        temperature: 0.0,
        max_tokens: 400,
        ignore_eos: true
      )

    result = fun.()
    :ok = AsyncLLMEngine.abort(engine, id)
    receive_final(id)
    result
  end

  defp receive_final(id) do
    receive do
      {:vllm, ^id, %{finished: true}} -> :ok
      {:vllm, ^id, _} -> receive_final(id)
    after
      30_000 -> flunk("no final output for #{id}")
    end
  end

  defp greedy(engine) do
    {:ok, stream} = AsyncLLMEngine.generate(engine, @reference_prompt, @greedy, rid())
    stream |> Enum.to_list() |> List.last() |> text()
  end
end
