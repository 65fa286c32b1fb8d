defmodule Vllm.PeerNode do
  @moduledoc false
  # Local BEAM nodes for the cluster tests and benchmark: makes this VM a distributed node
  # (starting epmd when none runs), starts peers with this VM's code paths (the NIF comes
  # with the vllm app's priv/ directory) and loads engines on them.

  @host ~c"127.0.0.1"

  @doc "Makes this VM a long-named distributed node, unless it is one already."
  def ensure_distributed! do
    unless Node.alive?() do
      # A second epmd -daemon exits at once when one already runs; a first one returns
      # before it listens, so wait for it (else distribution fails with econnrefused).
      {_, 0} = System.cmd("epmd", ["-daemon"])
      wait_for_epmd(50)
      name = :"vllm_main_#{System.unique_integer([:positive])}@127.0.0.1"

      case :net_kernel.start(name, %{name_domain: :longnames}) do
        {:ok, _} -> :ok
        {:error, reason} -> raise "cannot start distribution: #{inspect(reason)}"
      end
    end

    :ok
  end

  defp wait_for_epmd(0), do: raise("epmd did not start listening")

  defp wait_for_epmd(tries) do
    case :erl_epmd.names(@host) do
      {:ok, _} ->
        :ok

      {:error, _} ->
        Process.sleep(100)
        wait_for_epmd(tries - 1)
    end
  end

  @doc """
  Starts a peer node (not linked: tests halt peers on purpose) running the vllm app.
  Returns `{peer, node}`.
  """
  def start!(prefix) do
    root = :code.root_dir()
    # OTP's own paths are the peer's already; ours (elixir, vllm, ...) are added.
    paths = Enum.reject(:code.get_path(), &List.starts_with?(&1, root))
    name = :"#{prefix}_#{System.unique_integer([:positive])}"
    cookie = Atom.to_charlist(Node.get_cookie())

    {:ok, peer, node} =
      :peer.start(%{
        name: name,
        host: @host,
        longnames: true,
        # Peers talk to this node only: with a full mesh, OTP's global would disconnect
        # the survivors when a test halts one peer (prevent_overlapping_partitions).
        args: [~c"-setcookie", cookie, ~c"-connect_all", ~c"false", ~c"-pa" | paths]
      })

    {:ok, _} = :erpc.call(node, Application, :ensure_all_started, [:vllm])
    {peer, node}
  end

  @doc """
  Loads an engine on `node` under that node's vllm supervisor (an engine linked to the
  short-lived :erpc process would stop with it) and returns the engine's pid.
  """
  def start_engine!(node, opts) do
    spec = %{
      id: {:engine, System.unique_integer()},
      start: {Vllm.AsyncLLMEngine, :start_link, [opts]}
    }

    {:ok, pid} = :erpc.call(node, Supervisor, :start_child, [Vllm.Supervisor, spec], 120_000)
    await_member!(pid, Vllm.Cluster.model_name(opts), 500)
    pid
  end

  # :pg tells other nodes of a join asynchronously: wait until this node sees it.
  defp await_member!(pid, model_name, tries) do
    cond do
      pid in Vllm.Cluster.members(model_name) ->
        :ok

      tries == 0 ->
        raise "engine #{inspect(pid)} never joined #{model_name} as seen from #{node()}"

      true ->
        Process.sleep(20) && await_member!(pid, model_name, tries - 1)
    end
  end

  @doc "Halts `node` at once, as a crash would."
  def halt!(node) do
    true = Node.monitor(node, true)
    :erpc.cast(node, :erlang, :halt, [])

    receive do
      {:nodedown, ^node} -> :ok
    after
      10_000 -> raise "node #{node} did not go down"
    end

    :ok
  end

  @doc "Stops a peer that may already be gone."
  def stop(peer) do
    :peer.stop(peer)
  catch
    _, _ -> :ok
  end
end
