defmodule Vllm.LoRARequest do
  @moduledoc """
  A LoRA adapter to apply to a request (vLLM's `LoRARequest`): `lora_name`,
  `lora_int_id` (a positive integer unique per adapter) and `lora_path` (the adapter's
  directory: `adapter_config.json` + `adapter_model.safetensors`). The engine needs
  `enable_lora: true`; an adapter a request names is loaded on first use.
  """

  alias Vllm.Error

  @fields [:lora_name, :lora_int_id, :lora_path]
  @enforce_keys []
  defstruct lora_name: nil, lora_int_id: nil, lora_path: nil

  @type t :: %__MODULE__{lora_name: String.t(), lora_int_id: pos_integer(), lora_path: String.t()}

  @doc "Builds a validated request from a keyword list or map (atom or string keys)."
  @spec new(keyword() | map() | t()) :: {:ok, t()} | {:error, Error.t()}
  def new(opts \\ [])
  def new(%__MODULE__{} = request), do: validate(request)

  def new(opts) when is_list(opts) or is_map(opts) do
    with {:ok, pairs} <- Vllm.Fields.to_pairs(opts, @fields, "LoRA request"),
         do: validate(struct(__MODULE__, pairs))
  end

  def new(other),
    do:
      {:error,
       Error.validation("a LoRA request must be a keyword list or map, got #{inspect(other)}")}

  @doc "Like `new/1` but raises `Vllm.Error`."
  def new!(opts \\ []), do: opts |> new() |> Error.unwrap!()

  @doc "A copy with `overrides` applied and validated."
  def clone(%__MODULE__{} = request, overrides \\ []) do
    with {:ok, pairs} <- Vllm.Fields.to_pairs(overrides, @fields, "LoRA request"),
         do: validate(struct(request, pairs))
  end

  @doc "Like `clone/2` but raises `Vllm.Error`."
  def clone!(request, overrides \\ []), do: request |> clone(overrides) |> Error.unwrap!()

  for field <- @fields do
    @doc "The `#{field}` field."
    def unquote(field)(%__MODULE__{unquote(field) => value}), do: value
  end

  defp validate(%__MODULE__{} = r) do
    cond do
      not (is_binary(r.lora_name) and r.lora_name != "") ->
        invalid("lora_name must be a non-empty string, got #{inspect(r.lora_name)}")

      not (is_integer(r.lora_int_id) and r.lora_int_id > 0) ->
        invalid("lora_int_id must be a positive integer, got #{inspect(r.lora_int_id)}")

      not (is_binary(r.lora_path) and r.lora_path != "") ->
        invalid("lora_path must be a non-empty string, got #{inspect(r.lora_path)}")

      true ->
        {:ok, r}
    end
  end

  @doc false
  # nil, a LoRA request (struct, keyword or map) -> the plain map the NIF reads.
  def to_native(nil), do: {:ok, nil}

  def to_native(request) do
    case new(request) do
      {:ok, r} -> {:ok, Map.take(r, @fields)}
      {:error, e} -> {:error, %{e | message: "option :lora_request: " <> e.message}}
    end
  end

  defp invalid(message), do: {:error, Error.validation(message)}
end

defmodule Vllm.BeamSearch.LoRARequest do
  @moduledoc "The old package's name for `Vllm.LoRARequest`: `new/1` builds one."
  @doc "Builds a `%Vllm.LoRARequest{}` (see `Vllm.LoRARequest.new/1`)."
  def new(opts \\ []), do: Vllm.LoRARequest.new(opts)
  @doc "Like `new/1` but raises `Vllm.Error`."
  def new!(opts \\ []), do: Vllm.LoRARequest.new!(opts)
end
