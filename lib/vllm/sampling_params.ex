defmodule Vllm.SamplingParams do
  @moduledoc """
  Sampling parameters: the fields and defaults of vLLM 0.14's `SamplingParams`, validated
  when built.

      iex> {:ok, params} = Vllm.SamplingParams.new(temperature: 0.0, max_tokens: 32)
      iex> params.max_tokens
      32
      iex> {:error, %Vllm.Error{category: :validation}} = Vllm.SamplingParams.new(top_p: 0)
      iex> Vllm.SamplingParams.new(colour: 1) |> elem(1) |> Map.get(:message)
      "unknown sampling param :colour"

  `output_kind` is `:cumulative` (each output carries everything so far), `:delta` (only
  what is new) or `:final_only`. `stop` may be given as one string.
  `logit_bias` is a map of token id to bias; `n` > 1 gives `n` outputs (`index` 0..n-1),
  child i seeded with `seed + i` when `seed` is set. `structured_outputs` constrains the
  output while decoding (`%{json: schema}`, `%{json_object: true}`, `%{regex: r}`,
  `%{choice: [..]}`, `%{grammar: lark}`; see `Vllm.StructuredOutputs`); it is kept in its
  canonical form (a schema map becomes JSON text).
  """

  @defaults [
    n: 1,
    presence_penalty: 0.0,
    frequency_penalty: 0.0,
    repetition_penalty: 1.0,
    temperature: 1.0,
    top_p: 1.0,
    top_k: 0,
    min_p: 0.0,
    seed: nil,
    stop: [],
    stop_token_ids: [],
    ignore_eos: false,
    max_tokens: 16,
    min_tokens: 0,
    logprobs: nil,
    prompt_logprobs: nil,
    detokenize: true,
    skip_special_tokens: true,
    spaces_between_special_tokens: true,
    include_stop_str_in_output: false,
    logit_bias: nil,
    allowed_token_ids: nil,
    bad_words: nil,
    truncate_prompt_tokens: nil,
    output_kind: :cumulative,
    structured_outputs: nil
  ]

  @fields Keyword.keys(@defaults)
  @field_names Map.new(@fields, &{Atom.to_string(&1), &1})

  defstruct @defaults

  @type output_kind :: :cumulative | :delta | :final_only
  @type t :: %__MODULE__{
          n: pos_integer(),
          presence_penalty: float(),
          frequency_penalty: float(),
          repetition_penalty: float(),
          temperature: float(),
          top_p: float(),
          top_k: integer(),
          min_p: float(),
          seed: non_neg_integer() | nil,
          stop: [String.t()],
          stop_token_ids: [non_neg_integer()],
          ignore_eos: boolean(),
          max_tokens: pos_integer() | nil,
          min_tokens: non_neg_integer(),
          logprobs: non_neg_integer() | nil,
          prompt_logprobs: non_neg_integer() | nil,
          detokenize: boolean(),
          skip_special_tokens: boolean(),
          spaces_between_special_tokens: boolean(),
          include_stop_str_in_output: boolean(),
          logit_bias: %{optional(integer()) => number()} | nil,
          allowed_token_ids: [non_neg_integer()] | nil,
          bad_words: [String.t()] | nil,
          truncate_prompt_tokens: pos_integer() | -1 | nil,
          output_kind: output_kind(),
          structured_outputs: map() | nil
        }

  @doc "The field names, in vLLM's order."
  @spec fields() :: [atom()]
  def fields, do: @fields

  @doc """
  Builds validated parameters from a keyword list or a map (atom or string keys). Unknown
  keys and out-of-range values are `{:error, %Vllm.Error{category: :validation}}` whose
  message names the key.
  """
  @spec new(keyword() | map() | t()) :: {:ok, t()} | {:error, Vllm.Error.t()}
  def new(opts \\ [])
  def new(%__MODULE__{} = params), do: validate(params)

  def new(opts) when is_list(opts) or is_map(opts) do
    with {:ok, pairs} <- to_pairs(opts) do
      validate(struct(__MODULE__, pairs))
    end
  end

  def new(other),
    do:
      {:error,
       Vllm.Error.validation(
         "sampling params must be a keyword list, a map or a %Vllm.SamplingParams{}, got #{inspect(other)}"
       )}

  @doc "Like `new/1` but raises `Vllm.Error`."
  @spec new!(keyword() | map() | t()) :: t()
  def new!(opts \\ []), do: opts |> new() |> Vllm.Error.unwrap!()

  @doc "A copy, with `overrides` applied and validated."
  @spec clone(t(), keyword() | map()) :: {:ok, t()} | {:error, Vllm.Error.t()}
  def clone(%__MODULE__{} = params, overrides \\ []) do
    with {:ok, pairs} <- to_pairs(overrides), do: validate(struct(params, pairs))
  end

  @doc "Like `clone/2` but raises `Vllm.Error`."
  @spec clone!(t(), keyword() | map()) :: t()
  def clone!(params, overrides \\ []), do: params |> clone(overrides) |> Vllm.Error.unwrap!()

  for field <- @fields do
    @doc "The `#{field}` field."
    @spec unquote(field)(t()) :: term()
    def unquote(field)(%__MODULE__{unquote(field) => value}), do: value
  end

  @doc false
  # Every field is implemented by the engine now; kept for callers that check.
  @spec check_supported(t()) :: :ok | {:error, Vllm.Error.t()}
  def check_supported(%__MODULE__{}), do: :ok

  defp to_pairs(opts) do
    Enum.reduce_while(opts, {:ok, []}, fn
      {key, value}, {:ok, acc} ->
        case field_name(key) do
          {:ok, name} ->
            {:cont, {:ok, [{name, value} | acc]}}

          :error ->
            {:halt, {:error, Vllm.Error.validation("unknown sampling param #{inspect(key)}")}}
        end

      other, _ ->
        {:halt,
         {:error,
          Vllm.Error.validation("sampling params must be key-value pairs, got #{inspect(other)}")}}
    end)
  end

  defp field_name(key) when is_atom(key), do: if(key in @fields, do: {:ok, key}, else: :error)
  defp field_name(key) when is_binary(key), do: Map.fetch(@field_names, key)
  defp field_name(_), do: :error

  defp validate(%__MODULE__{} = p) do
    p = %{p | stop: normalize_stop(p.stop)}

    checks = [
      n: {&pos_int?/1, "a positive integer"},
      presence_penalty: {&in_range?(&1, -2, 2), "a number in [-2, 2]"},
      frequency_penalty: {&in_range?(&1, -2, 2), "a number in [-2, 2]"},
      repetition_penalty: {&(is_number(&1) and &1 > 0), "a number > 0"},
      temperature: {&(is_number(&1) and &1 >= 0), "a number >= 0"},
      top_p: {&(is_number(&1) and &1 > 0 and &1 <= 1), "a number in (0, 1]"},
      top_k: {&(is_integer(&1) and &1 >= -1), "an integer: -1 or 0 (off) or positive"},
      min_p: {&in_range?(&1, 0, 1), "a number in [0, 1]"},
      seed: {&(is_nil(&1) or non_neg_int?(&1)), "nil or a non-negative integer"},
      stop:
        {&(is_list(&1) and Enum.all?(&1, fn s -> is_binary(s) and s != "" end)),
         "a non-empty string or a list of them"},
      stop_token_ids: {&token_ids?/1, "a list of token ids"},
      ignore_eos: {&is_boolean/1, "a boolean"},
      max_tokens: {&(is_nil(&1) or pos_int?(&1)), "nil or a positive integer"},
      min_tokens: {&non_neg_int?/1, "a non-negative integer"},
      logprobs: {&(is_nil(&1) or non_neg_int?(&1)), "nil or a non-negative integer"},
      prompt_logprobs: {&(is_nil(&1) or non_neg_int?(&1)), "nil or a non-negative integer"},
      detokenize: {&is_boolean/1, "a boolean"},
      skip_special_tokens: {&is_boolean/1, "a boolean"},
      spaces_between_special_tokens: {&is_boolean/1, "a boolean"},
      include_stop_str_in_output: {&is_boolean/1, "a boolean"},
      logit_bias: {&(is_nil(&1) or is_map(&1)), "nil or a map of token id => bias"},
      allowed_token_ids: {&(is_nil(&1) or token_ids?(&1)), "nil or a list of token ids"},
      bad_words:
        {&(is_nil(&1) or (is_list(&1) and Enum.all?(&1, fn w -> is_binary(w) end))),
         "nil or a list of strings"},
      truncate_prompt_tokens:
        {&(is_nil(&1) or &1 == -1 or pos_int?(&1)),
         "nil, -1 (the context length) or a positive integer"},
      output_kind:
        {&(&1 in [:cumulative, :delta, :final_only]), ":cumulative, :delta or :final_only"},
      structured_outputs:
        {&(is_nil(&1) or is_map(&1) or Keyword.keyword?(&1)),
         "nil or a map (%{json: _} | %{json_object: true} | %{regex: _} | %{choice: _} | %{grammar: _})"}
    ]

    result =
      Enum.find_value(checks, fn {key, {ok?, expected}} ->
        value = Map.fetch!(p, key)

        unless ok?.(value),
          do: "sampling param #{inspect(key)} must be #{expected}, got #{inspect(value)}"
      end)

    cond do
      result != nil ->
        {:error, Vllm.Error.validation(result)}

      is_integer(p.max_tokens) and p.min_tokens > p.max_tokens ->
        {:error,
         Vllm.Error.validation(
           "sampling param :min_tokens (#{p.min_tokens}) must be <= :max_tokens (#{p.max_tokens})"
         )}

      p.structured_outputs != nil ->
        with {:ok, spec} <- Vllm.StructuredOutputs.new(p.structured_outputs),
             do: {:ok, %{p | structured_outputs: spec}}

      true ->
        {:ok, p}
    end
  end

  defp normalize_stop(nil), do: []
  defp normalize_stop(stop) when is_binary(stop), do: [stop]
  defp normalize_stop(stop), do: stop

  defp pos_int?(v), do: is_integer(v) and v > 0
  defp non_neg_int?(v), do: is_integer(v) and v >= 0
  defp in_range?(v, lo, hi), do: is_number(v) and v >= lo and v <= hi
  defp token_ids?(v), do: is_list(v) and Enum.all?(v, &non_neg_int?/1)
end
