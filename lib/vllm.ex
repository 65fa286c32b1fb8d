defmodule VLLM do
  @moduledoc """
  The facade of the `vllm` package: short names for the common tasks, each returning
  `{:ok, value} | {:error, %Vllm.Error{}}` with a `!` twin that raises.

      {:ok, llm} = VLLM.llm("SmolLM2-135M-Instruct.Q4_1.gguf")
      {:ok, params} = VLLM.sampling_params(temperature: 0.0, max_tokens: 32)
      {:ok, [out]} = VLLM.generate(llm, "Once upon a time", sampling_params: params)
      VLLM.attr!(hd(out.outputs), "text")

  Outputs are plain structs (`Vllm.RequestOutput`, `Vllm.CompletionOutput`); see
  `Vllm.AsyncLLMEngine` for streaming.
  """

  alias Vllm.{Error, LLM, SamplingParams}

  @version Mix.Project.config()[:version]

  @doc "Loads a model for offline inference (`Vllm.LLM.new/2`)."
  @spec llm(String.t() | keyword(), keyword()) :: {:ok, LLM.t()} | {:error, Error.t()}
  def llm(model, opts \\ []), do: LLM.new(model, opts)

  @doc "Like `llm/2` but raises `Vllm.Error`."
  @spec llm!(String.t() | keyword(), keyword()) :: LLM.t()
  def llm!(model, opts \\ []), do: model |> llm(opts) |> Error.unwrap!()

  @doc """
  Generates a completion for each prompt (`prompts` is `List.wrap`ped), in prompt order.
  Opts: `sampling_params:` (one or a list, one per prompt), `priority:`, `use_tqdm:`
  (ignored), `lora_request:` (not supported yet), `__runtime__: [timeout: ms]`.
  """
  @spec generate(LLM.t(), LLM.prompts(), keyword()) ::
          {:ok, [Vllm.RequestOutput.t()]} | {:error, Error.t()}
  def generate(llm, prompts, opts \\ [])

  def generate(llm, prompts, opts) when is_list(opts) do
    {params, opts} = Keyword.pop(opts, :sampling_params)
    LLM.generate(llm, List.wrap(prompts), params, opts)
  end

  def generate(_llm, _prompts, opts),
    do: {:error, Error.validation("options must be a keyword list, got #{inspect(opts)}")}

  @doc "Like `generate/3` but raises `Vllm.Error`."
  @spec generate!(LLM.t(), LLM.prompts(), keyword()) :: [Vllm.RequestOutput.t()]
  def generate!(llm, prompts, opts \\ []), do: llm |> generate(prompts, opts) |> Error.unwrap!()

  @doc """
  Replies to one conversation or a list of them (`Vllm.LLM.chat/4`): each is a list of
  `%{"role" => _, "content" => _}` maps (atom keys too), rendered with the model's chat
  template. Opts: `sampling_params:`, `chat_template:`, `add_generation_prompt:` (default
  true), and those of `generate/3`.
  """
  @spec chat(LLM.t(), [map()] | [[map()]], keyword()) ::
          {:ok, [Vllm.RequestOutput.t()]} | {:error, Error.t()}
  def chat(llm, conversations, opts \\ [])

  def chat(llm, conversations, opts) when is_list(opts) do
    {params, opts} = Keyword.pop(opts, :sampling_params)
    LLM.chat(llm, conversations, params, opts)
  end

  def chat(_llm, _conversations, opts),
    do: {:error, Error.validation("options must be a keyword list, got #{inspect(opts)}")}

  @doc "Like `chat/3` but raises `Vllm.Error`."
  @spec chat!(LLM.t(), [map()] | [[map()]], keyword()) :: [Vllm.RequestOutput.t()]
  def chat!(llm, conversations, opts \\ []),
    do: llm |> chat(conversations, opts) |> Error.unwrap!()

  @doc """
  Embeddings from a pooling model (`Vllm.LLM.embed/3`; `texts` is `List.wrap`ped). Opts:
  `pooling_params:`, `dimensions:`, `normalize:`, `__runtime__: [timeout: ms]`.
  """
  def embed(llm, texts, opts \\ []), do: LLM.embed(llm, List.wrap(texts), opts)
  @doc "Like `embed/3` but raises `Vllm.Error`."
  def embed!(llm, texts, opts \\ []), do: llm |> embed(texts, opts) |> Error.unwrap!()

  @doc "The pooler's outputs (`Vllm.LLM.encode/4`); opts as `embed/3` plus `pooling_task:`."
  def encode(llm, texts, opts \\ []), do: LLM.encode(llm, List.wrap(texts), nil, opts)
  @doc "Like `encode/3` but raises `Vllm.Error`."
  def encode!(llm, texts, opts \\ []), do: llm |> encode(texts, opts) |> Error.unwrap!()

  @doc "The tasks the loaded model serves (`Vllm.LLM.get_supported_tasks/1`)."
  def get_supported_tasks(llm), do: LLM.get_supported_tasks(llm)

  @doc "Builds validated sampling parameters (`Vllm.SamplingParams.new/1`)."
  @spec sampling_params(keyword() | map()) :: {:ok, SamplingParams.t()} | {:error, Error.t()}
  def sampling_params(opts \\ []), do: SamplingParams.new(opts)

  @doc "Like `sampling_params/1` but raises `Vllm.Error`."
  @spec sampling_params!(keyword() | map()) :: SamplingParams.t()
  def sampling_params!(opts \\ []), do: SamplingParams.new!(opts)

  @doc "Starts a streaming engine (`Vllm.AsyncLLMEngine.new/2`)."
  @spec async_engine(String.t() | keyword(), keyword()) ::
          {:ok, Vllm.AsyncLLMEngine.t()} | {:error, Error.t()}
  def async_engine(model_or_opts, opts \\ []), do: Vllm.AsyncLLMEngine.new(model_or_opts, opts)

  @doc "Like `async_engine/2` but raises `Vllm.Error`."
  @spec async_engine!(String.t() | keyword(), keyword()) :: Vllm.AsyncLLMEngine.t()
  def async_engine!(model_or_opts, opts \\ []), do: Vllm.AsyncLLMEngine.new!(model_or_opts, opts)

  @doc "This package's version."
  @spec version() :: {:ok, String.t()}
  def version, do: {:ok, @version}

  @doc "Like `version/0`, unwrapped."
  @spec version!() :: String.t()
  def version!, do: @version

  @doc """
  Reads a field of an output or params struct (or any map) by atom or string key.

      iex> VLLM.attr(%Vllm.CompletionOutput{text: "hi"}, "text")
      {:ok, "hi"}
  """
  @spec attr(map(), atom() | String.t()) :: {:ok, term()} | {:error, Error.t()}
  def attr(%{} = object, key) when is_atom(key) do
    case Map.fetch(object, key) do
      {:ok, value} when key != :__struct__ -> {:ok, value}
      _ -> {:error, Error.validation("#{describe(object)} has no attribute #{inspect(key)}")}
    end
  end

  def attr(%{} = object, key) when is_binary(key) do
    case Enum.find(Map.keys(object), &(is_atom(&1) and Atom.to_string(&1) == key)) do
      nil -> if Map.has_key?(object, key), do: {:ok, object[key]}, else: attr(object, :__struct__)
      atom -> attr(object, atom)
    end
    |> case do
      {:error, _} ->
        {:error, Error.validation("#{describe(object)} has no attribute #{inspect(key)}")}

      ok ->
        ok
    end
  end

  def attr(object, key),
    do:
      {:error,
       Error.validation("cannot read attribute #{inspect(key)} of #{inspect(object, limit: 5)}")}

  @doc "Like `attr/2` but raises `Vllm.Error`."
  @spec attr!(map(), atom() | String.t()) :: term()
  def attr!(object, key), do: object |> attr(key) |> Error.unwrap!()

  defp describe(%{__struct__: module}), do: inspect(module)
  defp describe(_), do: "the map"
end
