defmodule Vllm.SupervisionTest do
  # An engine can sit in a supervision tree and be found by name.
  use ExUnit.Case

  import Vllm.TestModel
  alias Vllm.AsyncLLMEngine

  test "child_spec starts a named engine that serves requests" do
    pid =
      start_supervised!(
        {AsyncLLMEngine, model: path!(), dtype: "float32", name: :supervised_engine}
      )

    assert Process.whereis(:supervised_engine) == pid
    {:ok, engine} = AsyncLLMEngine.whereis(:supervised_engine)
    assert AsyncLLMEngine.is_running(engine)

    {:ok, stream} =
      AsyncLLMEngine.generate(engine, "Hello", [temperature: 0.0, max_tokens: 3], request_id())

    assert %Vllm.RequestOutput{finished: true} = stream |> Enum.to_list() |> List.last()
    assert {:error, %Vllm.Error{category: :engine_dead}} = AsyncLLMEngine.whereis(:no_such_engine)
  end
end
