defmodule Vllm.Cluster.Stream do
  @moduledoc """
  The caller's side of a cluster request: the `Stream` that `generate/5` and `encode/5`
  return when they route through `Vllm.Cluster`.

  It receives the relay's `{:vllm_cluster, ref, message}` forwards and monitors the
  relay: the relay's node going down (or its engine dying) ends the stream with
  `:engine_dead`. With `retry: true` the request is resubmitted, same id, to the next
  least-loaded member instead, once per member. Outputs already delivered are never
  delivered twice: when some were, the retry is allowed only if the request is
  deterministic (one completion, and `temperature: 0` or a `seed`), and the regenerated
  outputs are checked against the delivered tokens and skipped until they pass them;
  otherwise the stream ends with `:engine_dead`, saying why.
  """

  alias Vllm.{AsyncLLMEngine, Cluster, Error, RequestOutput}

  # How long halting waits for the aborted request's last message.
  @abort_drain_ms 5_000

  @doc false
  # Submits the first attempt and returns `{:ok, stream}`, or the submission's error.
  def start(kind, model, request_id, prompt, params, opts) do
    state = %{
      kind: kind,
      model: model,
      id: request_id,
      prompt: prompt,
      params: params,
      engine_opts: engine_opts(kind, opts),
      retry: Keyword.get(opts, :retry, false) == true,
      timeout: Vllm.EngineOptions.timeout(opts, :infinity),
      owner: self(),
      tried: [],
      delivered: [],
      replay: nil,
      done: false
    }

    cond do
      not (is_binary(request_id) and request_id != "") ->
        {:error,
         Error.validation("request_id must be a non-empty string, got #{inspect(request_id)}")}

      not is_boolean(Keyword.get(opts, :retry, false)) ->
        {:error, Error.validation("option :retry must be a boolean")}

      true ->
        with {:ok, state} <- attempt(state, :not_found) do
          {:ok, Elixir.Stream.resource(fn -> check_owner(state) end, &next/1, &stop/1)}
        end
    end
  end

  defp engine_opts(:generate, opts), do: Keyword.drop(opts, [:cluster, :retry, :__runtime__])
  defp engine_opts(:encode, opts), do: Keyword.take(opts, [:task])

  # Picks a member not tried yet and submits; `none_left` is the error category when no
  # member is left.
  defp attempt(state, none_left) do
    case Cluster.pick(state.model, state.tried) do
      :none ->
        {:error,
         Error.new(
           none_left,
           "no engine serves model #{inspect(state.model)} in the cluster#{tried(state)}"
         )}

      {:ok, server} ->
        ref = make_ref()
        state = %{state | tried: [server | state.tried]}

        case Cluster.submit(
               server,
               ref,
               state.kind,
               state.id,
               state.prompt,
               state.params,
               state.engine_opts
             ) do
          {:ok, relay} ->
            {:ok,
             Map.merge(state, %{
               server: server,
               ref: ref,
               relay: relay,
               monitor: Process.monitor(relay),
               relay_down: nil
             })}

          {:error, %Error{category: :engine_dead}} when state.retry ->
            attempt(state, none_left)

          {:error, %Error{}} = error ->
            error
        end
    end
  end

  defp tried(%{tried: []}), do: ""
  defp tried(%{tried: tried}), do: " (tried #{length(tried)} engine(s))"

  defp check_owner(state) do
    if self() != state.owner do
      abort(state)

      raise Error.validation(
              "the stream of request #{inspect(state.id)} must be run by the process that called generate"
            )
    end

    state
  end

  defp next(%{done: true} = state), do: {:halt, state}

  defp next(%{ref: ref, id: id, monitor: monitor} = state) do
    # Once the relay is down only what it sent before is still to come.
    wait = if state.relay_down, do: 0, else: state.timeout

    receive do
      {:vllm_cluster, ^ref, {:vllm, ^id, %RequestOutput{} = output}} ->
        on_output(state, output)

      {:vllm_cluster, ^ref, {:vllm_pooling, ^id, output}} ->
        {[output], %{state | done: true}}

      {:vllm_cluster, ^ref, {:vllm_error, ^id, {:engine_dead, message}}} ->
        failed(state, message)

      {:vllm_cluster, ^ref, {:vllm_error, ^id, reason}} ->
        ended(state)
        raise Error.from_native(reason)

      {:DOWN, ^monitor, :process, _, reason} ->
        next(%{state | relay_down: reason})
    after
      wait ->
        if state.relay_down do
          failed(
            state,
            "the node #{node(state.server)} went down or its relay ended: #{inspect(state.relay_down)}"
          )
        else
          abort(state)
          ended(state)

          raise Error.new(
                  :timeout,
                  "request #{inspect(id)} produced no output within #{state.timeout} ms"
                )
        end
    end
  end

  defp on_output(%{replay: nil} = state, output) do
    {[output], finish(%{state | delivered: [token_ids(output) | state.delivered]}, output)}
  end

  defp on_output(%{replay: %{target: target, regen: regen}} = state, output) do
    chunk = token_ids(output)
    cumulative? = state.params.output_kind != :delta
    regen_now = if cumulative?, do: chunk, else: regen ++ chunk

    cond do
      length(regen_now) <= length(target) and List.starts_with?(target, regen_now) ->
        if output.finished do
          # It ended exactly where the failed attempt had got to.
          {[if(cumulative?, do: output, else: empty_delta(output))], %{state | done: true}}
        else
          {[], %{state | replay: %{target: target, regen: regen_now}}}
        end

      List.starts_with?(regen_now, target) and (cumulative? or length(regen) == length(target)) ->
        state = %{state | replay: nil, delivered: [regen_now]}
        {[output], finish(state, output)}

      true ->
        ended(state)

        raise Error.new(
                :engine_dead,
                "request #{inspect(state.id)} was retried after its engine went down, but the retry's tokens differ from those already delivered"
              )
    end
  end

  defp finish(state, %RequestOutput{finished: true}), do: %{state | done: true}
  defp finish(state, _output), do: state

  defp token_ids(%RequestOutput{outputs: [completion | _]}), do: completion.token_ids
  defp token_ids(_), do: []

  defp empty_delta(%RequestOutput{outputs: outputs} = output),
    do: %{output | outputs: Enum.map(outputs, &%{&1 | text: "", token_ids: []})}

  # The attempt's engine is gone: retry elsewhere or end with :engine_dead.
  defp failed(state, message) do
    Process.demonitor(state.monitor, [:flush])
    flush(state.ref)

    case retry(state) do
      {:ok, state} ->
        next(state)

      {:error, reason} ->
        ended(state)

        raise Error.new(
                :engine_dead,
                "request #{inspect(state.id)} failed: #{message}#{reason}"
              )
    end
  end

  defp retry(%{retry: false}), do: {:error, ""}

  defp retry(state) do
    delivered = state.delivered |> Enum.reverse() |> delivered_ids(state.params)

    cond do
      delivered != [] and not deterministic?(state.params) ->
        {:error,
         "; not retried: #{length(delivered)} token(s) were already delivered and the sampling is not deterministic (set temperature: 0 or a seed)"}

      true ->
        replay = if delivered == [], do: nil, else: %{target: delivered, regen: []}

        case attempt(%{state | replay: replay, delivered: []}, :engine_dead) do
          {:ok, state} -> {:ok, state}
          {:error, error} -> {:error, "; retry failed: #{error.message}"}
        end
    end
  end

  # The tokens delivered so far (a cumulative output carries them all).
  defp delivered_ids([], _params), do: []
  defp delivered_ids(chunks, %{output_kind: :delta}), do: Enum.concat(chunks)
  defp delivered_ids(chunks, _params), do: List.last(chunks)

  defp deterministic?(%Vllm.SamplingParams{n: 1} = p), do: p.temperature == 0 or p.seed != nil
  defp deterministic?(_), do: false

  defp stop(%{done: true} = state), do: Process.demonitor(state.monitor, [:flush])

  defp stop(state) do
    unless Process.delete({__MODULE__, :ended, state.id}) do
      abort(state)
      drain(state)
    end

    Process.demonitor(state.monitor, [:flush])
    flush(state.ref)
  end

  defp ended(state), do: Process.put({__MODULE__, :ended, state.id}, true)

  defp abort(state) do
    case state.kind do
      :generate ->
        AsyncLLMEngine.abort(%AsyncLLMEngine{pid: state.server, resource: nil}, state.id)

      # A pooling request is one step; it is not aborted.
      :encode ->
        :ok
    end
  end

  defp drain(%{ref: ref, id: id, monitor: monitor}) do
    receive do
      {:vllm_cluster, ^ref, {:vllm, ^id, %RequestOutput{finished: true}}} -> :ok
      {:vllm_cluster, ^ref, {:vllm_error, ^id, _}} -> :ok
      {:vllm_cluster, ^ref, _} -> drain(%{ref: ref, id: id, monitor: monitor})
      {:DOWN, ^monitor, :process, _, _} -> :ok
    after
      @abort_drain_ms -> :ok
    end
  end

  defp flush(ref) do
    receive do
      {:vllm_cluster, ^ref, _} -> flush(ref)
    after
      0 -> :ok
    end
  end
end
