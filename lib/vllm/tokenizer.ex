defmodule Vllm.Tokenizer do
  @moduledoc """
  A model's tokenizer, from `Vllm.AsyncLLMEngine.get_tokenizer/1` or
  `Vllm.LLM.get_tokenizer/1`. It runs in the engine (native code, off the BEAM
  schedulers) and stays usable while the engine lives.

      {:ok, tok} = Vllm.LLM.get_tokenizer(llm)
      {:ok, ids} = Vllm.Tokenizer.encode(tok, "Hello")
      {:ok, "Hello"} = Vllm.Tokenizer.decode(tok, ids)
  """

  alias Vllm.{AsyncLLMEngine, Error, Native}

  @enforce_keys [:engine, :vocab_size, :eos_token_id]
  defstruct [:engine, :vocab_size, :eos_token_id, :bos_token_id, :max_model_len]

  @type t :: %__MODULE__{
          engine: AsyncLLMEngine.t(),
          vocab_size: pos_integer(),
          eos_token_id: non_neg_integer() | nil,
          bos_token_id: non_neg_integer() | nil,
          max_model_len: pos_integer()
        }

  @doc false
  def from_engine(%AsyncLLMEngine{resource: resource} = engine) do
    with :ok <- AsyncLLMEngine.check_alive(engine), do: info(engine, resource)
  end

  def from_engine(other),
    do: {:error, Error.validation("expected an engine, got #{inspect(other)}")}

  defp info(engine, resource) do
    case Native.engine_info(resource) do
      {:ok, info} ->
        {:ok,
         %__MODULE__{
           engine: engine,
           vocab_size: info.vocab_size,
           eos_token_id: List.first(info.eos_token_ids),
           bos_token_id: info.bos_token_id,
           max_model_len: info.max_model_len
         }}

      {:error, reason} ->
        {:error, Error.from_native(reason)}
    end
  end

  @doc "Token ids of `text`. Opts: `add_special_tokens:` (default true: BOS where the model has one)."
  @spec encode(t(), String.t(), keyword()) :: {:ok, [non_neg_integer()]} | {:error, Error.t()}
  def encode(tokenizer, text, opts \\ [])

  def encode(%__MODULE__{engine: engine}, text, opts) when is_binary(text) do
    with :ok <- AsyncLLMEngine.check_opts(opts, [:add_special_tokens]),
         {:ok, add} <- flag(opts, :add_special_tokens, true),
         do: AsyncLLMEngine.encode_text(engine, text, add)
  end

  def encode(%__MODULE__{}, text, _),
    do: {:error, Error.validation("text must be a string, got #{inspect(text, limit: 5)}")}

  @doc "Like `encode/3` but raises `Vllm.Error`."
  def encode!(tokenizer, text, opts \\ []), do: tokenizer |> encode(text, opts) |> Error.unwrap!()

  @doc "Text of token ids. Opts: `skip_special_tokens:` (default true)."
  @spec decode(t(), [non_neg_integer()], keyword()) :: {:ok, String.t()} | {:error, Error.t()}
  def decode(tokenizer, ids, opts \\ [])

  def decode(%__MODULE__{engine: engine}, ids, opts) when is_list(ids) do
    with :ok <- AsyncLLMEngine.check_opts(opts, [:skip_special_tokens]),
         {:ok, skip} <- flag(opts, :skip_special_tokens, true),
         do: AsyncLLMEngine.decode_tokens(engine, ids, skip)
  end

  def decode(%__MODULE__{}, ids, _),
    do: {:error, Error.validation("token ids must be a list, got #{inspect(ids, limit: 5)}")}

  @doc "Like `decode/3` but raises `Vllm.Error`."
  def decode!(tokenizer, ids, opts \\ []), do: tokenizer |> decode(ids, opts) |> Error.unwrap!()

  @doc """
  Renders a conversation (`[%{"role" => _, "content" => _}]`) with the model's chat
  template. Opts: `add_generation_prompt:` (default true), `chat_template:` (overrides
  the model's), `tokenize:` (default false; true returns token ids).
  """
  @spec apply_chat_template(t(), [map()], keyword()) ::
          {:ok, String.t() | [non_neg_integer()]} | {:error, Error.t()}
  def apply_chat_template(%__MODULE__{engine: engine} = tokenizer, messages, opts \\ []) do
    with :ok <-
           AsyncLLMEngine.check_opts(opts, [:add_generation_prompt, :chat_template, :tokenize]),
         {:ok, add} <- flag(opts, :add_generation_prompt, true),
         {:ok, tokenize} <- flag(opts, :tokenize, false),
         {:ok, text} <-
           AsyncLLMEngine.apply_chat_template(
             engine,
             messages,
             add,
             Keyword.take(opts, [:chat_template])
           ) do
      # The template already holds the special tokens (BOS...).
      if tokenize, do: encode(tokenizer, text, add_special_tokens: false), else: {:ok, text}
    end
  end

  @doc "Like `apply_chat_template/3` but raises `Vllm.Error`."
  def apply_chat_template!(tokenizer, messages, opts \\ []),
    do: tokenizer |> apply_chat_template(messages, opts) |> Error.unwrap!()

  @doc "The vocabulary size (the model's embedding rows)."
  @spec vocab_size(t()) :: {:ok, pos_integer()}
  def vocab_size(%__MODULE__{vocab_size: n}), do: {:ok, n}

  @doc "Like `vocab_size/1`, unwrapped."
  def vocab_size!(tokenizer), do: tokenizer |> vocab_size() |> Error.unwrap!()

  @doc "The end-of-sequence token id (nil when the model has none)."
  @spec eos_token_id(t()) :: {:ok, non_neg_integer() | nil}
  def eos_token_id(%__MODULE__{eos_token_id: id}), do: {:ok, id}

  @doc "Like `eos_token_id/1`, unwrapped."
  def eos_token_id!(tokenizer), do: tokenizer |> eos_token_id() |> Error.unwrap!()

  defp flag(opts, key, default) do
    case Keyword.get(opts, key, default) do
      v when is_boolean(v) ->
        {:ok, v}

      other ->
        {:error,
         Error.validation("option #{inspect(key)} must be a boolean, got #{inspect(other)}")}
    end
  end
end
