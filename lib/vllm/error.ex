defmodule Vllm.Error do
  @moduledoc """
  The error every `Vllm`/`VLLM` function returns as `{:error, %Vllm.Error{}}` and every
  `!` function raises.

  `category` is one of `:validation`, `:not_found`, `:unsupported`, `:engine_dead`,
  `:aborted`, `:timeout`, `:resource_exhausted`, `:internal`; `message` is a sentence a
  user can act on; `details` holds extra data (or `nil`).
  """

  @categories [
    :validation,
    :not_found,
    :unsupported,
    :engine_dead,
    :aborted,
    :timeout,
    :resource_exhausted,
    :internal
  ]

  @type category ::
          :validation
          | :not_found
          | :unsupported
          | :engine_dead
          | :aborted
          | :timeout
          | :resource_exhausted
          | :internal

  @type t :: %__MODULE__{category: category(), message: String.t(), details: term()}

  defexception category: :internal, message: "internal error", details: nil

  @impl true
  def message(%__MODULE__{category: category, message: message}), do: "#{category}: #{message}"

  @doc "The categories an error may have."
  @spec categories() :: [category()]
  def categories, do: @categories

  @doc "Builds an error."
  @spec new(category(), String.t(), term()) :: t()
  def new(category, message, details \\ nil) when category in @categories do
    %__MODULE__{category: category, message: message, details: details}
  end

  @doc "A `:validation` error."
  @spec validation(String.t(), term()) :: t()
  def validation(message, details \\ nil), do: new(:validation, message, details)

  @doc false
  # `{category, message}` from the NIF -> %Vllm.Error{}.
  @spec from_native(term()) :: t()
  def from_native({category, message}) when category in @categories and is_binary(message),
    do: new(category, message)

  def from_native(%__MODULE__{} = error), do: error
  def from_native(other), do: new(:internal, "unexpected native error: #{inspect(other)}")

  @doc false
  # Unwraps `{:ok, v}` or raises the error: the body of every `!` function.
  @spec unwrap!({:ok, value} | {:error, t()}) :: value when value: term()
  def unwrap!({:ok, value}), do: value
  def unwrap!({:error, %__MODULE__{} = error}), do: raise(error)
  def unwrap!(:ok), do: :ok
end
