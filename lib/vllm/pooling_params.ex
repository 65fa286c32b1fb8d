defmodule Vllm.PoolingParams do
  @moduledoc """
  Parameters of a pooling request (vLLM's `PoolingParams`): `dimensions` (truncate the
  embedding, Matryoshka models; nil = full), `normalize` (true), `task` (nil or one of
  `"embed"`, `"encode"`, `"classify"`, `"score"`, `"token_embed"`, `"token_classify"`),
  `use_activation` (nil = the model's default). Pooling requests themselves arrive with
  pooling models (issue 9).
  """

  alias Vllm.Error

  @defaults [dimensions: nil, normalize: true, task: nil, use_activation: nil]
  @fields Keyword.keys(@defaults)
  @tasks ~w(embed encode classify score token_embed token_classify)

  defstruct @defaults

  @type t :: %__MODULE__{
          dimensions: pos_integer() | nil,
          normalize: boolean(),
          task: String.t() | nil,
          use_activation: boolean() | nil
        }

  @doc "Builds validated parameters from a keyword list or map (atom or string keys)."
  @spec new(keyword() | map() | t()) :: {:ok, t()} | {:error, Error.t()}
  def new(opts \\ [])
  def new(%__MODULE__{} = params), do: validate(params)

  def new(opts) when is_list(opts) or is_map(opts) do
    with {:ok, pairs} <- Vllm.Fields.to_pairs(opts, @fields, "pooling params"),
         do: validate(struct(__MODULE__, pairs))
  end

  def new(other),
    do:
      {:error,
       Error.validation("pooling params must be a keyword list or map, got #{inspect(other)}")}

  @doc "Like `new/1` but raises `Vllm.Error`."
  def new!(opts \\ []), do: opts |> new() |> Error.unwrap!()

  @doc "A copy with `overrides` applied and validated."
  def clone(%__MODULE__{} = params, overrides \\ []) do
    with {:ok, pairs} <- Vllm.Fields.to_pairs(overrides, @fields, "pooling params"),
         do: validate(struct(params, pairs))
  end

  @doc "Like `clone/2` but raises `Vllm.Error`."
  def clone!(params, overrides \\ []), do: params |> clone(overrides) |> Error.unwrap!()

  for field <- @fields do
    @doc "The `#{field}` field."
    def unquote(field)(%__MODULE__{unquote(field) => value}), do: value
  end

  defp validate(%__MODULE__{} = p) do
    cond do
      not (is_nil(p.dimensions) or (is_integer(p.dimensions) and p.dimensions > 0)) ->
        invalid("dimensions must be a positive integer or nil, got #{inspect(p.dimensions)}")

      not is_boolean(p.normalize) ->
        invalid("normalize must be a boolean, got #{inspect(p.normalize)}")

      not (is_nil(p.task) or p.task in @tasks) ->
        invalid("task must be nil or one of #{Enum.join(@tasks, ", ")}, got #{inspect(p.task)}")

      not (is_nil(p.use_activation) or is_boolean(p.use_activation)) ->
        invalid("use_activation must be a boolean or nil, got #{inspect(p.use_activation)}")

      true ->
        {:ok, p}
    end
  end

  defp invalid(message), do: {:error, Error.validation(message)}
end
