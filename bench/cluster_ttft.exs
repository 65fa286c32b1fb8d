# Added time to first token of a request routed through Vllm.Cluster (:pg + a relay over
# Erlang distribution) to an engine on another node of this host, against the same
# engine used locally on its own node.
#
#   mix run bench/cluster_ttft.exs [pairs]      (default 40 pairs, interleaved)
#
# The peer node B holds the only engine of model "bench". Each pair times one request
# from B itself (local) and one from this node A by model name (remote), max_tokens 1,
# so a request's time is its TTFT: submit, prefill, the one output back.

Code.require_file("../test/support/peer_node.ex", __DIR__)
Code.require_file("../test/support/test_model.ex", __DIR__)

pairs = String.to_integer(List.first(System.argv()) || "40")

# The probe runs on both nodes: its object code is loaded on B by hand.
{:module, probe, probe_bin, _} =
  defmodule Vllm.ClusterBench.Probe do
    @moduledoc false
    # {TTFT, the part of it outside the engine}, in microseconds: the engine's own
    # arrival and first-token stamps (Unix time, same host clock) split off the compute,
    # which is what the machine's load makes noisy.
    def ttft_us(target, prompt, id) do
      params = [temperature: 0.0, max_tokens: 1]
      t0 = System.os_time(:microsecond)
      {:ok, stream} = Vllm.AsyncLLMEngine.generate(target, prompt, params, id)
      [%{finished: true, metrics: m}] = Enum.to_list(stream)
      t1 = System.os_time(:microsecond)
      arrival = round(m.arrival_time * 1_000_000)
      first = round(m.first_token_time * 1_000_000)
      {t1 - t0, arrival - t0 + (t1 - first)}
    end

    def local_ttft_us(engine_pid, prompt, id) do
      {:ok, engine} = Vllm.AsyncLLMEngine.whereis(engine_pid)
      ttft_us(engine, prompt, id)
    end
  end

Vllm.PeerNode.ensure_distributed!()
{peer, b} = Vllm.PeerNode.start!("vllm_bench_b")
{:module, ^probe} = :erpc.call(b, :code, :load_binary, [probe, ~c"probe.beam", probe_bin])

engine =
  Vllm.PeerNode.start_engine!(b,
    model: Vllm.TestModel.path!(),
    served_model_name: "bench",
    dtype: "float32",
    seed: 0,
    kv_cache_memory_bytes: 32 * 1024 * 1024
  )

prompt = "Write one sentence about the sea and the wind."

run = fn i ->
  local = :erpc.call(b, probe, :local_ttft_us, [engine, prompt, "local-#{i}"])
  remote = probe.ttft_us("bench", prompt, "remote-#{i}")
  {local, remote}
end

# Warm-up: first requests pay for connection set-up and code loading.
Enum.each(1..5, run)
{locals, remotes} = 1..pairs |> Enum.map(run) |> Enum.unzip()

median = fn xs ->
  s = Enum.sort(xs)
  Enum.at(s, div(length(s), 2))
end

p90 = fn xs -> Enum.at(Enum.sort(xs), round(0.9 * (length(xs) - 1))) end
ttft = fn xs -> Enum.map(xs, &elem(&1, 0)) end
outside = fn xs -> Enum.map(xs, &elem(&1, 1)) end
{:ok, load} = File.read("/proc/loadavg")

IO.puts("""
cluster TTFT, #{pairs} interleaved pairs, max_tokens 1, prompt #{inspect(prompt)}
                     TTFT median / p90          outside the engine median / p90
  local on B:        #{median.(ttft.(locals))} / #{p90.(ttft.(locals))} us        #{median.(outside.(locals))} / #{p90.(outside.(locals))} us
  A -> B via :pg:    #{median.(ttft.(remotes))} / #{p90.(ttft.(remotes))} us        #{median.(outside.(remotes))} / #{p90.(outside.(remotes))} us
  added by the cluster path (median outside-engine difference): #{median.(outside.(remotes)) - median.(outside.(locals))} us
  load average: #{String.trim(load)}
""")

Vllm.PeerNode.stop(peer)
