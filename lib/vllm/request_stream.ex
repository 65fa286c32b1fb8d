defmodule Vllm.RequestStream do
  @moduledoc false
  # The Stream behind `Vllm.AsyncLLMEngine.generate/5`: receives `{:vllm, id, output}`
  # messages in the process that submitted the request, stops after the finished output,
  # and aborts the request when halted early.

  alias Vllm.{AsyncLLMEngine, Error, Native, RequestOutput}

  # How long halting waits for the aborted request's final message, so none is left
  # behind in the caller's mailbox. The engine answers an abort between two steps, and a
  # step of a large batch on a loaded machine can take seconds (the 10,000-request abort
  # storm saw more than 5 s): wait long, the engine guarantees the final message.
  @abort_drain_ms 60_000

  @spec new(AsyncLLMEngine.t(), String.t(), timeout()) :: Enumerable.t()
  def new(engine, request_id, timeout, credit \\ nil) do
    owner = self()

    Stream.resource(
      fn -> start(engine, request_id, owner, timeout, credit) end,
      &next/1,
      &stop/1
    )
  end

  defp start(engine, request_id, owner, timeout, credit) do
    if self() != owner do
      AsyncLLMEngine.abort(engine, request_id)

      raise Error.validation(
              "the stream of request #{inspect(request_id)} must be run by the process that called generate"
            )
    end

    %{
      engine: engine,
      id: request_id,
      timeout: timeout,
      monitor: Process.monitor(engine.pid),
      credit: credit,
      done: false
    }
  end

  defp next(%{done: true} = state), do: {:halt, state}

  defp next(%{id: id, monitor: monitor} = state) do
    receive do
      {:vllm, ^id, %RequestOutput{finished: true} = output} ->
        {[output], %{state | done: true}}

      {:vllm, ^id, %RequestOutput{} = output} ->
        # Tells the engine's back-pressure that one more output was read.
        if state.credit, do: Native.ack(state.credit)
        {[output], state}

      {:vllm_error, ^id, reason} ->
        ended(id)
        raise Error.from_native(reason)

      {:DOWN, ^monitor, :process, _, reason} ->
        ended(id)

        raise Error.new(
                :engine_dead,
                "the engine stopped while request #{inspect(id)} was running: #{inspect(reason)}"
              )
    after
      state.timeout ->
        raise Error.new(
                :timeout,
                "request #{inspect(id)} produced no output within #{state.timeout} ms"
              )
    end
  end

  defp stop(%{done: true, monitor: monitor}), do: Process.demonitor(monitor, [:flush])

  defp stop(%{engine: engine, id: id, monitor: monitor}) do
    # An exception from next/1 leaves the accumulator as it was: the process dictionary
    # says whether the request already ended (engine error, engine down).
    unless Process.delete({__MODULE__, :ended, id}) do
      AsyncLLMEngine.abort(engine, id)
      drain(id, monitor)
    end

    Process.demonitor(monitor, [:flush])
  end

  defp ended(id), do: Process.put({__MODULE__, :ended, id}, true)

  # Consumes the aborted request's remaining messages up to its final one.
  defp drain(id, monitor) do
    receive do
      {:vllm, ^id, %RequestOutput{finished: true}} -> :ok
      {:vllm, ^id, _} -> drain(id, monitor)
      {:vllm_error, ^id, _} -> :ok
      {:DOWN, ^monitor, :process, _, _} -> :ok
    after
      @abort_drain_ms -> :ok
    end
  end
end
