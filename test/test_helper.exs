Code.require_file("support/test_model.ex", __DIR__)
Code.require_file("support/json.ex", __DIR__)
Code.require_file("support/storm.ex", __DIR__)
Code.require_file("support/term_fuzzer.ex", __DIR__)

# Every engine test needs the real model; fail loudly (never skip) when it is missing.
Vllm.TestModel.path!()

# Long reliability runs (abort storm of 10,000 requests, 100,000 NIF fuzz calls) are
# tagged :long: VLLM_LONG_TESTS=1 or `mix test --only long` runs them.
exclude = if System.get_env("VLLM_LONG_TESTS") in ["1", "true"], do: [], else: [:long]
ExUnit.start(timeout: 300_000, exclude: exclude)
