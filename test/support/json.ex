defmodule Vllm.TestJSON do
  @moduledoc false
  # A small JSON decoder for the test fixtures (this Elixir/OTP has no JSON module and the
  # package has no dependencies). Objects become maps with string keys.

  def decode!(text) do
    {value, rest} = value(skip(text))

    case skip(rest) do
      "" -> value
      other -> raise ArgumentError, "trailing JSON: #{String.slice(other, 0, 20)}"
    end
  end

  defp skip(<<c, rest::binary>>) when c in [?\s, ?\n, ?\r, ?\t], do: skip(rest)
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
    {v, rest} = value(skip(rest))
    acc = Map.put(acc, key, v)

    case skip(rest) do
      "," <> rest -> object(skip(rest), acc)
      "}" <> rest -> {acc, rest}
    end
  end

  defp array("]" <> rest, acc), do: {Enum.reverse(acc), rest}

  defp array(text, acc) do
    {v, rest} = value(text)

    case skip(rest) do
      "," <> rest -> array(skip(rest), [v | acc])
      "]" <> rest -> {Enum.reverse([v | acc]), rest}
    end
  end

  defp string("\"" <> rest, acc), do: {acc |> Enum.reverse() |> IO.iodata_to_binary(), rest}

  defp string("\\u" <> <<hex::binary-size(4), rest::binary>>, acc) do
    code = String.to_integer(hex, 16)

    if code in 0xD800..0xDBFF do
      "\\u" <> <<low::binary-size(4), rest::binary>> = rest
      low = String.to_integer(low, 16)
      string(rest, [<<0x10000 + (code - 0xD800) * 0x400 + (low - 0xDC00)::utf8>> | acc])
    else
      string(rest, [<<code::utf8>> | acc])
    end
  end

  defp string("\\" <> <<c, rest::binary>>, acc) do
    char =
      case c do
        ?n -> "\n"
        ?t -> "\t"
        ?r -> "\r"
        ?b -> "\b"
        ?f -> "\f"
        other -> <<other>>
      end

    string(rest, [char | acc])
  end

  defp string(<<c::utf8, rest::binary>>, acc), do: string(rest, [<<c::utf8>> | acc])

  defp number(text) do
    [num | _] = Regex.run(~r/^-?\d+(\.\d+)?([eE][-+]?\d+)?/, text)
    rest = binary_part(text, byte_size(num), byte_size(text) - byte_size(num))

    value =
      if String.contains?(num, [".", "e", "E"]) do
        {f, ""} = Float.parse(num)
        f
      else
        String.to_integer(num)
      end

    {value, rest}
  end
end
