defmodule Vllm.Hub do
  @moduledoc """
  Resolves a Hugging Face hub id (`"owner/name"`) to a model directory in the local
  Hugging Face cache, the way `huggingface_hub` lays it out:
  `$HF_HUB_CACHE` (else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`) /
  `models--owner--name/snapshots/<commit>`, with the commit read from `refs/main`.

  Nothing is downloaded: a model that is not in the cache is a `:not_found` error.
  """

  alias Vllm.Error

  @hub_id ~r{^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+$}

  @doc """
  Returns `{:ok, path}`: `model` itself when it exists on disk, else the cached snapshot of
  the hub id it names.
  """
  @spec resolve(String.t()) :: {:ok, String.t()} | {:error, Error.t()}
  def resolve(model) when is_binary(model) do
    cond do
      File.exists?(model) -> {:ok, model}
      Regex.match?(@hub_id, model) -> cached_snapshot(model)
      true -> not_found(model, "give the path of a .gguf file or a model directory")
    end
  end

  @doc "The hub cache directory this machine uses."
  @spec cache_dir() :: String.t()
  def cache_dir do
    System.get_env("HF_HUB_CACHE") ||
      Path.join(System.get_env("HF_HOME") || Path.expand("~/.cache/huggingface"), "hub")
  end

  defp cached_snapshot(hub_id) do
    repo = Path.join(cache_dir(), "models--" <> String.replace(hub_id, "/", "--"))

    with {:ok, commit} <- File.read(Path.join([repo, "refs", "main"])),
         snapshot = Path.join([repo, "snapshots", String.trim(commit)]),
         true <- File.dir?(snapshot) do
      {:ok, snapshot}
    else
      _ ->
        not_found(
          hub_id,
          "it is neither a local path nor in the Hugging Face cache at #{cache_dir()} (downloads are not supported: fetch it with huggingface-cli first)"
        )
    end
  end

  defp not_found(model, hint),
    do: {:error, Error.new(:not_found, "model #{inspect(model)} not found: #{hint}")}
end
