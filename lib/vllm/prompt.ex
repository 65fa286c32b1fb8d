defmodule Vllm.Prompt do
  @moduledoc """
  The prompt forms every generate function accepts: a string (tokenized by the engine),
  `%{prompt: text}` or `%{prompt_token_ids: [id]}` (string keys too).
  """

  alias Vllm.Error

  @type t :: String.t() | %{prompt: String.t()} | %{prompt_token_ids: [non_neg_integer()]}

  @doc "Normalizes a prompt to what the NIF takes: a non-empty string or a list of token ids."
  @spec normalize(term()) :: {:ok, String.t() | [non_neg_integer()]} | {:error, Error.t()}
  def normalize(prompt) when is_binary(prompt) do
    cond do
      prompt == "" -> {:error, Error.validation("prompt must not be empty")}
      not String.valid?(prompt) -> {:error, Error.validation("prompt must be valid UTF-8")}
      true -> {:ok, prompt}
    end
  end

  def normalize(%{prompt_token_ids: ids}), do: token_ids(ids)
  def normalize(%{"prompt_token_ids" => ids}), do: token_ids(ids)
  def normalize(%{prompt: text}) when is_binary(text), do: normalize(text)
  def normalize(%{"prompt" => text}) when is_binary(text), do: normalize(text)

  def normalize(other),
    do:
      {:error,
       Error.validation(
         "prompt must be a string, %{prompt: string} or %{prompt_token_ids: [integer]}, got #{inspect(other, limit: 10)}"
       )}

  defp token_ids([]), do: {:error, Error.validation("prompt_token_ids must not be empty")}

  defp token_ids(ids) when is_list(ids) do
    if not List.improper?(ids) and Enum.all?(ids, &(is_integer(&1) and &1 >= 0)),
      do: {:ok, ids},
      else: {:error, Error.validation("prompt_token_ids must be a list of non-negative integers")}
  end

  defp token_ids(other),
    do:
      {:error,
       Error.validation(
         "prompt_token_ids must be a list of integers, got #{inspect(other, limit: 10)}"
       )}
end
