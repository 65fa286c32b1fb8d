defmodule Vllm.Progress do
  @moduledoc false
  # The `use_tqdm: true` progress bar of a batch: prompts done and output tokens/s, redrawn
  # on stderr as each request finishes. `nil` is a progress bar that draws nothing.

  @width 30

  def new(total) do
    state = %{total: total, done: 0, tokens: 0, started: System.monotonic_time(:millisecond)}
    draw(state)
    state
  end

  def advance(nil, _output), do: nil

  def advance(state, %Vllm.RequestOutput{outputs: outputs}) do
    tokens = Enum.reduce(outputs || [], 0, fn o, acc -> acc + length(o.token_ids || []) end)
    state = %{state | done: state.done + 1, tokens: state.tokens + tokens}
    draw(state)
    state
  end

  def finish(nil), do: :ok
  def finish(_state), do: IO.write(:stderr, "\n")

  defp draw(state) do
    seconds = max(System.monotonic_time(:millisecond) - state.started, 1) / 1000
    filled = if state.total > 0, do: div(state.done * @width, state.total), else: @width
    bar = String.duplicate("█", filled) <> String.duplicate(" ", @width - filled)
    percent = if state.total > 0, do: div(state.done * 100, state.total), else: 100

    IO.write(
      :stderr,
      "\rProcessed prompts: #{percent}%|#{bar}| #{state.done}/#{state.total} " <>
        "[#{:erlang.float_to_binary(seconds, decimals: 1)}s, " <>
        "output: #{:erlang.float_to_binary(state.tokens / seconds, decimals: 1)} toks/s]"
    )
  end
end
