defmodule Vllm.Cluster.Relay do
  @moduledoc false
  # Runs on the engine's node. The native engine sends outputs only to local pids, so a
  # request from another node is owned by a relay process here that forwards each of its
  # messages to the caller as `{:vllm_cluster, ref, message}` (the ref tells one attempt
  # of a retried request from the next). The relay ends after the request's last message;
  # when the caller dies, so does the relay, and the engine aborts the request as it does
  # for any owner that dies; when the engine process dies, the caller hears :engine_dead.

  alias Vllm.{AsyncLLMEngine, Error}

  @doc "Starts the relay and submits the request to the local engine `server`."
  def submit(server, caller, ref, kind, request_id, prompt, params, opts) do
    with {:ok, engine} <- AsyncLLMEngine.whereis(server) do
      relay = spawn(fn -> init(server, caller, ref, request_id) end)

      submitted =
        case kind do
          :generate ->
            AsyncLLMEngine.add_request(engine, request_id, prompt, params, [{:to, relay} | opts])

          :encode ->
            AsyncLLMEngine.add_pooling_request(engine, request_id, prompt, params, [
              {:to, relay} | opts
            ])
        end

      case submitted do
        :ok ->
          {:ok, relay}

        {:error, %Error{}} = error ->
          Process.exit(relay, :kill)
          error
      end
    end
  end

  defp init(server, caller, ref, request_id) do
    state = %{
      server: server,
      caller: caller,
      caller_monitor: Process.monitor(caller),
      server_monitor: Process.monitor(server),
      ref: ref,
      id: request_id
    }

    loop(state)
  end

  defp loop(%{id: id} = state) do
    receive do
      {:vllm, ^id, output} = message ->
        forward(state, engine_died(state, message))
        if output.finished, do: :ok, else: loop(state)

      {:vllm_pooling, ^id, _} = message ->
        forward(state, message)

      {:vllm_error, ^id, _} = message ->
        forward(state, message)

      {:DOWN, monitor, :process, _, _} when monitor == state.caller_monitor ->
        # The engine sees this process end and aborts the request.
        :ok

      {:DOWN, monitor, :process, _, reason} when monitor == state.server_monitor ->
        forward(
          state,
          {:vllm_error, id,
           {:engine_dead, "the engine on #{node()} stopped while running it: #{inspect(reason)}"}}
        )
    end
  end

  # An engine process that dies takes its cores down, and they end its requests with
  # :abort; for the caller that is the engine's death (retry may apply), not an abort.
  defp engine_died(state, {:vllm, id, %{finished: true, outputs: outputs}} = message) do
    if Enum.any?(outputs, &(&1.finish_reason == :abort)) and not Process.alive?(state.server),
      do: {:vllm_error, id, {:engine_dead, "the engine on #{node()} stopped while running it"}},
      else: message
  end

  defp engine_died(_state, message), do: message

  defp forward(state, message), do: send(state.caller, {:vllm_cluster, state.ref, message})
end
