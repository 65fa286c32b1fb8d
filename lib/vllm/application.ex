defmodule Vllm.Application do
  @moduledoc false
  # The library's own processes: the `:pg` scope through which engines on every connected
  # node find each other (Vllm.Cluster). Engines themselves live in their callers' trees.

  use Application

  @impl true
  def start(_type, _args) do
    Supervisor.start_link([Vllm.Cluster], strategy: :one_for_one, name: Vllm.Supervisor)
  end
end
