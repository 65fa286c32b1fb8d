defmodule Vllm.LoRARequest do
  @moduledoc """
  A LoRA adapter for a request (vLLM's `LoRARequest`): `lora_name`, `lora_int_id` (a
  positive integer that identifies the adapter; the same id must always name the same
  path) and `lora_path` (a PEFT directory with `adapter_config.json` and
  `adapter_model.safetensors`). The engine needs `enable_lora: true`; an adapter named by
  a request is loaded on first use.
  """

  alias Vllm.Error

  @enforce_keys [:lora_name, :lora_int_id, :lora_path]
  defstruct [:lora_name, :lora_int_id, :lora_path, base_model_name: nil]

  @type t :: %__MODULE__{
          lora_name: String.t(),
          lora_int_id: pos_integer(),
          lora_path: String.t(),
          base_model_name: String.t() | nil
        }

  @doc "Builds a checked LoRA request. Opts: `base_model_name:` (informational)."
  @spec new(String.t(), pos_integer(), String.t(), keyword()) :: {:ok, t()} | {:error, Error.t()}
  def new(lora_name, lora_int_id, lora_path, opts \\ []) do
    cond do
      not Keyword.keyword?(opts) or Enum.any?(Keyword.keys(opts), &(&1 != :base_model_name)) ->
        {:error, Error.validation("LoRA request options: only :base_model_name is allowed, got #{inspect(opts)}")}

      not is_binary(lora_name) ->
        {:error, Error.validation("lora_name must be a string, got #{inspect(lora_name)}")}

      not (is_integer(lora_int_id) and lora_int_id > 0) ->
        {:error, Error.validation("lora_int_id must be a positive integer, got #{inspect(lora_int_id)}")}

      not is_binary(lora_path) ->
        {:error, Error.validation("lora_path must be a string, got #{inspect(lora_path)}")}

      true ->
        {:ok,
         %__MODULE__{
           lora_name: lora_name,
           lora_int_id: lora_int_id,
           lora_path: lora_path,
           base_model_name: opts[:base_model_name]
         }}
    end
  end

  @doc "Like `new/4` but raises `Vllm.Error`."
  @spec new!(String.t(), pos_integer(), String.t(), keyword()) :: t()
  def new!(lora_name, lora_int_id, lora_path, opts \\ []),
    do: lora_name |> new(lora_int_id, lora_path, opts) |> Error.unwrap!()

  @doc false
  # nil, a %Vllm.LoRARequest{} (or the BeamSearch alias), or a map/keyword with its keys
  # -> the plain map the NIF reads.
  def to_native(nil), do: {:ok, nil}

  def to_native(%{lora_int_id: id, lora_path: path} = lora) do
    with {:ok, r} <- new(Map.get(lora, :lora_name) || "lora-#{inspect(id)}", id, path) do
      {:ok, Map.take(Map.from_struct(r), [:lora_name, :lora_int_id, :lora_path])}
    end
  end

  def to_native(opts) when is_list(opts) and opts != [] do
    if Keyword.keyword?(opts), do: to_native(Map.new(opts)), else: bad(opts)
  end

  def to_native(other), do: bad(other)

  defp bad(other),
    do:
      {:error,
       Error.validation(
         "lora_request must be a %Vllm.LoRARequest{} (VLLM.lora_request/3), got #{inspect(other)}"
       )}
end

defmodule Vllm.BeamSearch.LoRARequest do
  @moduledoc "The same LoRA request as `Vllm.LoRARequest`, under the name old code used."
  defstruct [:lora_name, :lora_int_id, :lora_path, base_model_name: nil]

  defdelegate new(lora_name, lora_int_id, lora_path, opts \\ []), to: Vllm.LoRARequest
  defdelegate new!(lora_name, lora_int_id, lora_path, opts \\ []), to: Vllm.LoRARequest
end
