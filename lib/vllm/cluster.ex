defmodule Vllm.Cluster do
  @moduledoc """
  Engines across BEAM nodes, over Erlang distribution and nothing else.

  Every engine process joins the `:pg` group `{:vllm_model, name}` of the scope
  `#{inspect(:vllm_cluster)}`, where `name` is the engine's `served_model_name` option or,
  by default, the model file's or directory's base name (a hub snapshot gives its
  `"org/name"` id). Connect the nodes (`Node.connect/1`, or `libcluster`-style tooling)
  and every node sees every engine of a model; a node going down leaves the group by
  itself.

      # node a: no engine here, one on node b
      {:ok, stream} =
        Vllm.AsyncLLMEngine.generate("SmolLM2-135M-Instruct.Q4_1.gguf", "Hello", [max_tokens: 8], "r1")

      # node a with its own engine: let the cluster pick the least loaded one
      Vllm.AsyncLLMEngine.generate(engine, "Hello", [max_tokens: 8], "r2", cluster: true)

  Routing picks the member with the least pending tokens per engine core (the prompt and
  `max_tokens` of each request it runs or queues; `load/1`), local first on ties. The
  engine's node runs a small relay process that owns the request and forwards its
  outputs to the caller; the caller monitors it, so a node (or engine) that goes down
  ends the stream with `:engine_dead`, or, with `retry: true`, resubmits the request to
  another member (see `Vllm.Cluster.Stream`).
  """

  alias Vllm.{AsyncLLMEngine, Error}
  alias Vllm.Cluster.Relay
  alias Vllm.Cluster.Stream, as: ClusterStream

  @scope :vllm_cluster
  # How long a load query waits for the members' answers; slower members are skipped.
  @load_timeout_ms 200
  # How long submitting to a member may take before it counts as dead.
  @submit_timeout_ms 30_000

  @type group :: {:vllm_model, String.t()}

  @doc "The `:pg` scope the engines join."
  def scope, do: @scope

  @doc false
  # The scope's child spec (Vllm.Application supervises it).
  def child_spec(_arg), do: %{id: @scope, start: {:pg, :start_link, [@scope]}}

  @doc "The group of a model name."
  @spec group(String.t()) :: group()
  def group(model_name) when is_binary(model_name), do: {:vllm_model, model_name}

  @doc """
  The model name an engine started with `opts` serves under: `served_model_name`, else
  the model path's base name (`"org/name"` for a Hugging Face cache snapshot).
  """
  @spec model_name(keyword()) :: String.t()
  def model_name(opts) do
    model = to_string(opts[:model] || "")

    opts[:served_model_name] ||
      case Regex.run(~r{models--([^/]+)--([^/]+)/snapshots/}, model) do
        [_, org, name] -> "#{org}/#{name}"
        nil -> Path.basename(model)
      end
  end

  @doc false
  # Called by each engine process when it starts: membership ends with the process.
  def join(model_name, pid) do
    ensure_scope()
    :pg.join(@scope, group(model_name), pid)
  end

  @doc "The engine processes serving `model_name`, on every connected node."
  @spec members(String.t()) :: [pid()]
  def members(model_name) do
    ensure_scope()
    :pg.get_members(@scope, group(model_name))
  end

  @doc "The model names served somewhere in the cluster."
  @spec models() :: [String.t()]
  def models do
    ensure_scope()
    for {:vllm_model, name} <- :pg.which_groups(@scope), do: name
  end

  @doc """
  Pending tokens per engine core of each member of `model_name`: `%{pid => load}`
  (members that do not answer within #{@load_timeout_ms} ms are left out).
  """
  @spec load(String.t()) :: %{pid() => number()}
  def load(model_name), do: query_load(members(model_name))

  @doc false
  # The model name of a local engine process (the group it joined).
  def model_name_of(pid) do
    ensure_scope()

    Enum.find_value(:pg.which_groups(@scope), fn
      {:vllm_model, name} = g -> if pid in :pg.get_local_members(@scope, g), do: name
      _ -> nil
    end)
  end

  @doc false
  # The least-loaded member not in `exclude`; a lone candidate is taken without asking.
  def pick(model_name, exclude \\ []) do
    case members(model_name) -- exclude do
      [] ->
        :none

      [only] ->
        {:ok, only}

      candidates ->
        loads = query_load(candidates)
        # Members that did not answer stay eligible, behind every member that did.
        ranked =
          Enum.sort_by(candidates, fn pid ->
            {Map.get(loads, pid, :infinity), node(pid) != node(), :erlang.phash2(pid)}
          end)

        {:ok, hd(ranked)}
    end
  end

  defp query_load(pids) do
    ref = make_ref()
    Enum.each(pids, &send(&1, {:vllm_cluster_load, ref, self()}))
    deadline = System.monotonic_time(:millisecond) + @load_timeout_ms
    collect_load(ref, length(pids), deadline, %{})
  end

  defp collect_load(_ref, 0, _deadline, acc), do: acc

  defp collect_load(ref, left, deadline, acc) do
    wait = max(deadline - System.monotonic_time(:millisecond), 0)

    receive do
      {:vllm_cluster_load, ^ref, pid, load} ->
        collect_load(ref, left - 1, deadline, Map.put(acc, pid, load))
    after
      wait -> acc
    end
  end

  ## Requests

  @doc false
  # Options a cluster request takes besides the engine's request options.
  def request_opts, do: [:cluster, :retry]

  @doc false
  # `generate/5` through the cluster: `target` is a model name or a local engine handle.
  def generate(target, prompt, sampling_params, request_id, opts) do
    with {:ok, model} <- target_model(target),
         {:ok, params} <- AsyncLLMEngine.sampling_params(sampling_params),
         {:ok, prompt} <- cluster_prompt(prompt) do
      ClusterStream.start(:generate, model, request_id, prompt, params, opts)
    end
  end

  @doc false
  # `encode/5` through the cluster.
  def encode(target, prompt, pooling_params, request_id, opts) do
    with {:ok, model} <- target_model(target) do
      ClusterStream.start(:encode, model, request_id, prompt, pooling_params, opts)
    end
  end

  @doc false
  # Submits to `server` (any node); `{:ok, relay}` or `{:error, %Error{}}`, where a
  # member that cannot be reached is :engine_dead.
  def submit(server, ref, kind, request_id, prompt, params, opts) do
    args = [server, self(), ref, kind, request_id, prompt, params, opts]

    if node(server) == node() do
      apply(Relay, :submit, args)
    else
      try do
        :erpc.call(node(server), Relay, :submit, args, @submit_timeout_ms)
      catch
        kind, reason when kind in [:error, :exit] ->
          {:error,
           Error.new(
             :engine_dead,
             "the engine on #{node(server)} could not be reached: #{inspect(reason)}"
           )}
      end
    end
  end

  defp target_model(model) when is_binary(model) and model != "", do: {:ok, model}

  defp target_model(%AsyncLLMEngine{pid: pid}) do
    case node(pid) == node() and model_name_of(pid) do
      name when is_binary(name) ->
        {:ok, name}

      _ ->
        {:error, Error.new(:engine_dead, "the engine process is not running")}
    end
  end

  defp target_model(other),
    do:
      {:error,
       Error.validation(
         "a cluster request needs a model name or an engine, got #{inspect(other)}"
       )}

  # Chat conversations are rendered by the engine that runs them (its chat template).
  defp cluster_prompt([%{} | _] = conversation), do: {:ok, conversation}
  defp cluster_prompt(prompt), do: Vllm.Prompt.normalize(prompt)

  defp ensure_scope do
    unless Process.whereis(@scope) do
      # Outside the application (a bare code path): an unsupervised scope.
      case :pg.start(@scope) do
        {:ok, _} -> :ok
        {:error, {:already_started, _}} -> :ok
      end
    end

    :ok
  end
end
