defmodule Vllm.Fields do
  @moduledoc false
  # Keyword lists or maps with atom or string keys -> `[{field, value}]` for a struct whose
  # fields are `fields`; an unknown key is a :validation error naming it.

  alias Vllm.Error

  def to_pairs(opts, fields, what) do
    names = Map.new(fields, &{Atom.to_string(&1), &1})

    Enum.reduce_while(opts, {:ok, []}, fn
      {key, value}, {:ok, acc} when is_atom(key) or is_binary(key) ->
        case if(is_atom(key), do: key in fields && key, else: names[key]) do
          field when is_atom(field) and field not in [nil, false] ->
            {:cont, {:ok, [{field, value} | acc]}}

          _ ->
            {:halt,
             {:error,
              Error.validation(
                "unknown #{what} field #{inspect(key)}; fields: #{Enum.map_join(fields, ", ", &inspect/1)}"
              )}}
        end

      other, _ ->
        {:halt,
         {:error, Error.validation("#{what} must be key-value pairs, got #{inspect(other)}")}}
    end)
  end
end
