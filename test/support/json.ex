defmodule Vllm.TestJSON do
  @moduledoc false
  # A small JSON decoder for tests (no JSON library on Elixir 1.14 / OTP 24): objects become
  # maps with string keys, numbers integers or floats. Raises on malformed input.

  def decode!(text) do
    {value, rest} = value(skip(text))

    case skip(rest) do
      "" -> value
      other -> raise ArgumentError, "trailing JSON: #{String.slice(other, 0, 40)}"
    end
  end

  defp skip(<<c, rest::binary>>) when c in ~c" \t\n\r", do: skip(rest)
  defp skip(rest), do: rest

  defp value("{" <> rest), do: object(skip(rest), %{})
  defp value("[" <> rest), do: array(skip(rest), [])
  defp value("\"" <> rest), do: string(rest, [])
  defp value("true" <> rest), do: {true, rest}
  defp value("false" <> rest), do: {false, rest}
  defp value("null" <> rest), do: {nil, rest}
  defp value(rest), do: number(rest)

  defp object("}" <> rest, acc), do: {acc, rest}

  defp object("\"" <> rest, acc) do
    {key, rest} = string(rest, [])
    ":" <> rest = skip(rest)
    {val, rest} = value(skip(rest))
    acc = Map.put(acc, key, val)

    case skip(rest) do
      "," <> rest -> object(skip(rest), acc)
      "}" <> rest -> {acc, rest}
    end
  end

  defp array("]" <> rest, acc), do: {Enum.reverse(acc), rest}

  defp array(rest, acc) do
    {val, rest} = value(rest)

    case skip(rest) do
      "," <> rest -> array(skip(rest), [val | acc])
      "]" <> rest -> {Enum.reverse([val | acc]), rest}
    end
  end

  defp string("\"" <> rest, acc), do: {acc |> Enum.reverse() |> IO.iodata_to_binary(), rest}

  defp string("\\u" <> <<hex::binary-size(4), rest::binary>>, acc),
    do: string(rest, [<<String.to_integer(hex, 16)::utf8>> | acc])

  defp string("\\" <> <<c, rest::binary>>, acc) do
    char = %{?n => "\n", ?t => "\t", ?r => "\r", ?b => "\b", ?f => "\f"}[c] || <<c>>
    string(rest, [char | acc])
  end

  defp string(<<c::utf8, rest::binary>>, acc), do: string(rest, [<<c::utf8>> | acc])

  defp number(text) do
    [num | _] = Regex.run(~r/^-?\d+(\.\d+)?([eE][-+]?\d+)?/, text)
    rest = binary_part(text, byte_size(num), byte_size(text) - byte_size(num))

    value =
      if String.contains?(num, [".", "e", "E"]) do
        {f, ""} =
          Float.parse(
            if String.contains?(num, "."), do: num, else: String.replace(num, ~r/[eE]/, ".0e")
          )

        f
      else
        String.to_integer(num)
      end

    {value, rest}
  end
end
