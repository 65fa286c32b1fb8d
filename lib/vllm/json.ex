defmodule Vllm.JSON do
  @moduledoc false
  # A small JSON encoder (this Elixir/OTP has no JSON module and the package has no
  # dependencies): JSON schemas given as maps reach the engine as JSON text.

  @doc "Encodes maps (atom or string keys), lists, strings, numbers, booleans and nil."
  @spec encode(term()) :: {:ok, String.t()} | {:error, String.t()}
  def encode(value) do
    {:ok, value |> encode_value() |> IO.iodata_to_binary()}
  catch
    {:unencodable, term} -> {:error, "cannot encode #{inspect(term)} as JSON"}
  end

  defp encode_value(nil), do: "null"
  defp encode_value(true), do: "true"
  defp encode_value(false), do: "false"
  defp encode_value(v) when is_integer(v), do: Integer.to_string(v)
  defp encode_value(v) when is_float(v), do: Float.to_string(v)
  defp encode_value(v) when is_atom(v), do: encode_string(Atom.to_string(v))
  defp encode_value(v) when is_binary(v), do: encode_string(v)
  defp encode_value(v) when is_list(v), do: ["[", v |> Enum.map(&encode_value/1) |> Enum.intersperse(","), "]"]

  defp encode_value(v) when is_map(v) and not is_struct(v) do
    pairs = Enum.map(v, fn {k, val} -> [encode_key(k), ":", encode_value(val)] end)
    ["{", Enum.intersperse(pairs, ","), "}"]
  end

  defp encode_value(other), do: throw({:unencodable, other})

  defp encode_key(k) when is_binary(k), do: encode_string(k)
  defp encode_key(k) when is_atom(k) and not is_nil(k) and not is_boolean(k), do: encode_string(Atom.to_string(k))
  defp encode_key(k), do: throw({:unencodable, k})

  defp encode_string(s) do
    if String.valid?(s), do: [?", escape(s, []), ?"], else: throw({:unencodable, s})
  end

  defp escape(<<>>, acc), do: Enum.reverse(acc)
  defp escape(<<?", rest::binary>>, acc), do: escape(rest, ["\\\"" | acc])
  defp escape(<<?\\, rest::binary>>, acc), do: escape(rest, ["\\\\" | acc])
  defp escape(<<?\n, rest::binary>>, acc), do: escape(rest, ["\\n" | acc])
  defp escape(<<?\r, rest::binary>>, acc), do: escape(rest, ["\\r" | acc])
  defp escape(<<?\t, rest::binary>>, acc), do: escape(rest, ["\\t" | acc])

  defp escape(<<c, rest::binary>>, acc) when c < 0x20,
    do: escape(rest, [:io_lib.format("\\u~4.16.0B", [c]) | acc])

  defp escape(<<c::utf8, rest::binary>>, acc), do: escape(rest, [<<c::utf8>> | acc])
end
