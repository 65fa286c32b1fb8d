# The compiler task that builds the NIF lives in this project, so Mix must load it before
# compiling the project itself.
Code.require_file("lib/mix/tasks/compile.cargo.ex", __DIR__)

defmodule Vllm.MixProject do
  use Mix.Project

  @version "0.1.0"

  def project do
    [
      app: :vllm,
      version: @version,
      elixir: "~> 1.14",
      # The Rust NIF is built by our own compiler task (lib/mix/tasks/compile.cargo.ex):
      # no hex dependencies at all.
      compilers: [:cargo] ++ Mix.compilers(),
      # mix.exs already loaded the compiler task; compiling lib/ loads it again, on purpose.
      elixirc_options: [ignore_module_conflict: true],
      start_permanent: Mix.env() == :prod,
      deps: [],
      description: "LLM serving engine (vLLM V1 design) in Rust, as an Elixir library",
      docs: [main: "readme", extras: ["README.md"]]
    ]
  end

  def application do
    [mod: {Vllm.Application, []}, extra_applications: [:logger]]
  end
end
