defmodule Vllm.StructuredOutputs do
  @moduledoc """
  Structured outputs (vLLM's `StructuredOutputsParams`, formerly guided decoding): the
  `structured_outputs` sampling param constrains a request's output while it is decoded.
  Exactly one of:

    * `%{json: schema}` — a JSON schema, as a map or as JSON text;
    * `%{json_object: true}` — any JSON object;
    * `%{regex: pattern}` — the whole output matches the regex;
    * `%{choice: ["a", "b"]}` — the output is exactly one of the strings;
    * `%{grammar: lark}` — a Lark grammar (llguidance's dialect).

  An invalid schema, regex or grammar is a `:validation` error when the request is
  submitted. JSON output may be pretty-printed, with each whitespace run bounded.
  """

  alias Vllm.Error

  @kinds [:json, :json_object, :regex, :choice, :grammar]
  @names Map.new(@kinds, &{Atom.to_string(&1), &1})

  @type t :: %{
          optional(:json) => String.t(),
          optional(:json_object) => true,
          optional(:regex) => String.t(),
          optional(:choice) => [String.t()],
          optional(:grammar) => String.t()
        }

  @doc """
  Checks a spec (a map or keyword list, atom or string keys; nil values are absent) and
  returns its canonical map, a JSON schema map encoded as JSON text.

      iex> Vllm.StructuredOutputs.new(choice: ["yes", "no"])
      {:ok, %{choice: ["yes", "no"]}}
      iex> Vllm.StructuredOutputs.new(%{json: %{type: "object"}})
      {:ok, %{json: ~s({"type":"object"})}}
  """
  @spec new(map() | keyword()) :: {:ok, t()} | {:error, Error.t()}
  def new(spec) when is_map(spec) or is_list(spec) do
    with {:ok, pairs} <- pairs(spec) do
      case Enum.reject(pairs, fn {_, v} -> is_nil(v) or v == false end) do
        [{kind, value}] ->
          check(kind, value)

        [] ->
          invalid("give one of #{inspect(@kinds)}")

        many ->
          invalid("give only one of #{inspect(@kinds)}, got #{inspect(Keyword.keys(many))}")
      end
    end
  end

  def new(other), do: invalid("must be a map such as %{json: schema}, got #{inspect(other)}")

  defp pairs(spec) do
    Enum.reduce_while(spec, {:ok, []}, fn
      {key, value}, {:ok, acc} ->
        case name(key) do
          {:ok, kind} -> {:cont, {:ok, [{kind, value} | acc]}}
          :error -> {:halt, invalid("unknown key #{inspect(key)}; expected one of #{inspect(@kinds)}")}
        end

      other, _ ->
        {:halt, invalid("must be key-value pairs, got #{inspect(other)}")}
    end)
  end

  defp name(key) when is_atom(key), do: if(key in @kinds, do: {:ok, key}, else: :error)
  defp name(key) when is_binary(key), do: Map.fetch(@names, key)
  defp name(_), do: :error

  defp check(:json, schema) when is_binary(schema), do: {:ok, %{json: schema}}

  defp check(:json, schema) when is_map(schema) do
    case Vllm.JSON.encode(schema) do
      {:ok, text} -> {:ok, %{json: text}}
      {:error, reason} -> invalid("json schema: #{reason}")
    end
  end

  defp check(:json_object, true), do: {:ok, %{json_object: true}}
  defp check(:regex, pattern) when is_binary(pattern), do: {:ok, %{regex: pattern}}
  defp check(:grammar, grammar) when is_binary(grammar), do: {:ok, %{grammar: grammar}}

  defp check(:choice, [_ | _] = choices) do
    if Enum.all?(choices, &is_binary/1),
      do: {:ok, %{choice: choices}},
      else: invalid("choice must be a list of strings, got #{inspect(choices)}")
  end

  defp check(kind, value) do
    expected = %{
      json: "a schema map or JSON text",
      json_object: "true",
      regex: "a string",
      choice: "a non-empty list of strings",
      grammar: "a string"
    }

    invalid("#{kind} must be #{expected[kind]}, got #{inspect(value)}")
  end

  defp invalid(message), do: {:error, Error.validation("sampling param :structured_outputs " <> message)}
end
