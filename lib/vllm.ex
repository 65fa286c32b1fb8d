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
  (a progress bar on stderr), `lora_request:` (one or a list, one per prompt), `__runtime__: [timeout: ms]`.
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

  @doc """
  Runs `fun` (no arguments) and returns `{:ok, result}`; a raised `Vllm.Error` (or any
  exception) comes back as `{:error, %Vllm.Error{}}`. Kept for old scripts, which wrapped
  their code in `VLLM.run/2` to start Python: nothing needs starting here. Opts:
  `timeout:` ms (the function runs in a task, killed past it), `halt: true` (stop the VM
  afterwards, as the old `run` allowed for scripts).
  """
  @spec run((() -> term()), keyword()) :: {:ok, term()} | {:error, Error.t()}
  def run(fun, opts \\ [])

  def run(fun, opts) when is_function(fun, 0) and is_list(opts) do
    with :ok <- Vllm.AsyncLLMEngine.check_opts(opts, [:timeout, :halt, :__runtime__]) do
      result =
        case Keyword.get(opts, :timeout) || Vllm.EngineOptions.timeout(opts, nil) do
          nil -> protect(fun)
          ms -> run_with_timeout(fun, ms)
        end

      if Keyword.get(opts, :halt, false),
        do: System.halt(if(match?({:ok, _}, result), do: 0, else: 1))

      result
    end
  end

  def run(fun, _opts),
    do: {:error, Error.validation("run/2 takes a function of no arguments, got #{inspect(fun)}")}

  @doc "Like `run/2` but returns the function's result or raises `Vllm.Error`."
  @spec run!((() -> term()), keyword()) :: term()
  def run!(fun, opts \\ []), do: fun |> run(opts) |> Error.unwrap!()

  defp protect(fun) do
    {:ok, fun.()}
  rescue
    e in Error -> {:error, e}
    e -> {:error, Error.new(:internal, Exception.message(e), e)}
  end

  defp run_with_timeout(fun, ms) do
    task = Task.async(fn -> protect(fun) end)

    case Task.yield(task, ms) || Task.shutdown(task, :brutal_kill) do
      {:ok, result} -> result
      _ -> {:error, Error.new(:timeout, "the function did not return within #{ms} ms")}
    end
  end

  @doc "Builds validated pooling parameters (`Vllm.PoolingParams.new/1`)."
  @spec pooling_params(keyword() | map()) :: {:ok, Vllm.PoolingParams.t()} | {:error, Error.t()}
  def pooling_params(opts \\ []), do: Vllm.PoolingParams.new(opts)

  @doc "Like `pooling_params/1` but raises `Vllm.Error`."
  def pooling_params!(opts \\ []), do: Vllm.PoolingParams.new!(opts)

  @doc """
  Builds a validated `%Vllm.LoRARequest{}` (name, integer id, adapter path; `opts` may
  hold more of its fields). Requests carrying one are `:unsupported` until multi-LoRA
  (issue 8).
  """
  @spec lora_request(String.t(), pos_integer(), String.t(), keyword()) ::
          {:ok, Vllm.LoRARequest.t()} | {:error, Error.t()}
  def lora_request(name, lora_int_id, lora_path, opts \\ []) when is_list(opts) do
    Vllm.LoRARequest.new(
      Keyword.merge(opts, lora_name: name, lora_int_id: lora_int_id, lora_path: lora_path)
    )
  end

  @doc "Like `lora_request/4` but raises `Vllm.Error`."
  def lora_request!(name, lora_int_id, lora_path, opts \\ []),
    do: name |> lora_request(lora_int_id, lora_path, opts) |> Error.unwrap!()

  @doc "Starts an engine (`Vllm.AsyncLLMEngine.new/2`); the old package's `LLMEngine`."
  @spec engine(String.t() | keyword(), keyword()) ::
          {:ok, Vllm.AsyncLLMEngine.t()} | {:error, Error.t()}
  def engine(model_or_opts, opts \\ []), do: Vllm.AsyncLLMEngine.new(model_or_opts, opts)

  @doc "Like `engine/2` but raises `Vllm.Error`."
  def engine!(model_or_opts, opts \\ []), do: Vllm.AsyncLLMEngine.new!(model_or_opts, opts)

  @doc """
  True for values that stand for a live native object (an engine, an `LLM`, a tokenizer);
  outputs and params are plain structs (in the old package they were Python references).
  """
  @spec ref?(term()) :: boolean()
  def ref?(%Vllm.AsyncLLMEngine{}), do: true
  def ref?(%LLM{}), do: true
  def ref?(%Vllm.Tokenizer{}), do: true
  def ref?(_), do: false

  @doc """
  Structured-output parameters for the `structured_outputs` sampling param (the old
  package's guided decoding): one of `json:` (schema map or JSON text), `json_object: true`,
  `regex:`, `choice:` (list of strings), `grammar:` (Lark). See `Vllm.StructuredOutputs`.

      {:ok, so} = VLLM.guided_decoding_params(choice: ["yes", "no"])
      VLLM.sampling_params(structured_outputs: so)
  """
  @spec guided_decoding_params(keyword() | map()) ::
          {:ok, Vllm.StructuredOutputs.t()} | {:error, Error.t()}
  def guided_decoding_params(opts \\ []), do: Vllm.StructuredOutputs.new(opts)

  @doc "Like `guided_decoding_params/1` but raises `Vllm.Error`."
  @spec guided_decoding_params!(keyword() | map()) :: Vllm.StructuredOutputs.t()
  def guided_decoding_params!(opts \\ []), do: opts |> guided_decoding_params() |> Error.unwrap!()

  @doc "Structured outputs are enforced while decoding: always true."
  @spec guided_decoding_supported?() :: boolean()
  def guided_decoding_supported?, do: true

  @timeout_profiles %{
    default: 120_000,
    streaming: 1_800_000,
    ml_inference: 600_000,
    batch_job: 3_600_000
  }

  @doc """
  Adds `__runtime__` timeout options to `opts` (old package helper; returns the keyword
  list itself so old code keeps working): `VLLM.with_timeout([], timeout: 60_000)`.
  """
  @spec with_timeout(keyword(), keyword()) :: keyword()
  def with_timeout(opts, timeout_opts) when is_list(opts) and is_list(timeout_opts) do
    runtime = Keyword.get(opts, :__runtime__, [])
    Keyword.put(opts, :__runtime__, Keyword.merge(runtime, timeout_opts))
  end

  def with_timeout(opts, timeout_opts),
    do:
      raise(
        Error.validation(
          "with_timeout/2 takes two keyword lists, got #{inspect(opts)} and #{inspect(timeout_opts)}"
        )
      )

  @doc "Same as `with_timeout/2` (it already returns the options)."
  def with_timeout!(opts, timeout_opts), do: with_timeout(opts, timeout_opts)

  @doc """
  `[__runtime__: [timeout_profile: profile]]`: `:default` (2 min), `:streaming` (30 min),
  `:ml_inference` (10 min), `:batch_job` (1 h); honoured as that timeout.
  """
  @spec timeout_profile(atom()) :: keyword()
  def timeout_profile(profile) when is_map_key(@timeout_profiles, profile),
    do: [__runtime__: [timeout_profile: profile]]

  def timeout_profile(profile),
    do:
      raise(
        Error.validation(
          "unknown timeout profile #{inspect(profile)}; use one of #{inspect(Map.keys(@timeout_profiles))}"
        )
      )

  @doc "Same as `timeout_profile/1`."
  def timeout_profile!(profile), do: timeout_profile(profile)

  @doc false
  def timeout_profile_ms(profile), do: Map.get(@timeout_profiles, profile)

  @doc "`[__runtime__: [timeout: ms]]`."
  @spec timeout_ms(pos_integer()) :: keyword()
  def timeout_ms(ms) when is_integer(ms) and ms > 0, do: [__runtime__: [timeout: ms]]

  def timeout_ms(ms),
    do: raise(Error.validation("timeout_ms/1 takes a positive integer, got #{inspect(ms)}"))

  @doc "Same as `timeout_ms/1`."
  def timeout_ms!(ms), do: timeout_ms(ms)

  @python "there is no Python here: this package runs vLLM's engine natively; use the VLLM and Vllm.* functions"

  @doc "Python pass-through of the old package: `:unsupported`."
  def call(_module, _function, _args \\ [], _opts \\ []),
    do: {:error, Error.new(:unsupported, @python)}

  @doc "Like `call/4` but raises `Vllm.Error`."
  def call!(module, function, args \\ [], opts \\ []),
    do: module |> call(function, args, opts) |> Error.unwrap!()

  @doc "Python pass-through of the old package: `:unsupported`."
  def method(_ref, _method, _args \\ [], _opts \\ []),
    do: {:error, Error.new(:unsupported, @python)}

  @doc "Like `method/4` but raises `Vllm.Error`."
  def method!(ref, method, args \\ [], opts \\ []),
    do: ref |> method(method, args, opts) |> Error.unwrap!()

  @doc "Python pass-through of the old package: `:unsupported`."
  def get(_module, _attr), do: {:error, Error.new(:unsupported, @python)}
  @doc "Like `get/2` but raises `Vllm.Error`."
  def get!(module, attr), do: module |> get(attr) |> Error.unwrap!()

  @doc "Python pass-through of the old package: `:unsupported` (outputs are immutable structs)."
  def set_attr(_ref, _attr, _value), do: {:error, Error.new(:unsupported, @python)}
  @doc "Like `set_attr/3` but raises `Vllm.Error`."
  def set_attr!(ref, attr, value), do: ref |> set_attr(attr, value) |> Error.unwrap!()

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
