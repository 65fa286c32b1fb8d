defmodule Mix.Tasks.Compile.Cargo do
  @shortdoc "Builds the vllm_nif Rust crate and installs it under priv/native"
  @moduledoc """
  Runs `cargo build --release -p vllm_nif` at the repository root and copies the resulting
  shared library to `priv/native/libvllm_nif.so`, where `Vllm.Native` loads it.

  Cargo is incremental, so the task always invokes it; the library is copied only when it
  changed. The target directory is `$CARGO_TARGET_DIR` when set, else `target/` at the root.
  Set `VLLM_SKIP_CARGO=1` to use an already installed library as is.
  """
  use Mix.Task.Compiler

  @crate "vllm_nif"
  @library "lib#{@crate}.so"

  @impl true
  def run(_args) do
    if System.get_env("VLLM_SKIP_CARGO") in ["1", "true"] do
      {:noop, []}
    else
      build()
    end
  end

  defp build do
    root = File.cwd!()

    if System.find_executable("cargo") == nil do
      error("cargo not found on PATH: install Rust (https://rustup.rs) to build the NIF")
    else
      case System.cmd("cargo", ["build", "--release", "-p", @crate],
             cd: root,
             stderr_to_stdout: true,
             into: IO.stream(:stdio, :line)
           ) do
        {_, 0} -> install(root)
        {_, status} -> error("cargo build --release -p #{@crate} failed (exit status #{status})")
      end
    end
  end

  defp install(root) do
    target_dir = System.get_env("CARGO_TARGET_DIR") || Path.join(root, "target")
    source = Path.join([Path.expand(target_dir, root), "release", @library])
    dest_dir = Path.join([root, "priv", "native"])
    dest = Path.join(dest_dir, @library)

    cond do
      not File.exists?(source) ->
        error("cargo succeeded but #{source} does not exist")

      File.exists?(dest) and File.read!(source) == File.read!(dest) ->
        link_priv()
        {:noop, []}

      true ->
        File.mkdir_p!(dest_dir)
        # Copy to a temporary name and rename: a loaded .so must never be overwritten in place.
        tmp = dest <> ".tmp"
        File.cp!(source, tmp)
        File.rename!(tmp, dest)
        link_priv()
        {:ok, []}
    end
  end

  # Mix links priv/ into _build only if it existed when the build structure was made; on a
  # fresh clone priv/native appears during this task, so make the link now.
  defp link_priv, do: Mix.Project.build_structure()

  defp error(message) do
    Mix.shell().error(message)

    {:error,
     [
       %Mix.Task.Compiler.Diagnostic{
         compiler_name: "cargo",
         file: "native/#{@crate}",
         message: message,
         position: nil,
         severity: :error
       }
     ]}
  end
end
