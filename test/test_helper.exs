Code.require_file("support/test_model.ex", __DIR__)
Code.require_file("support/json.ex", __DIR__)

# Every engine test needs the real model; fail loudly (never skip) when it is missing.
Vllm.TestModel.path!()

ExUnit.start(timeout: 300_000)
