defmodule Vllm.CompletionOutput do
  @moduledoc """
  One completion of a request (vLLM's `CompletionOutput`).

  `finish_reason` is `:stop` (EOS, a stop token or a stop string), `:length` (max_tokens or
  the context length), `:abort`, or `nil` while running; `stop_reason` is the stop string,
  the stop token id, or `nil` (EOS). `logprobs`, when requested, is one map per generated
  token: `%{token_id => %{logprob: float, rank: integer, decoded_token: String.t() | nil}}`.
  """
  defstruct [
    :index,
    :text,
    :token_ids,
    :cumulative_logprob,
    :logprobs,
    :finish_reason,
    :stop_reason
  ]

  @type t :: %__MODULE__{
          index: non_neg_integer(),
          text: String.t(),
          token_ids: [non_neg_integer()],
          cumulative_logprob: float() | nil,
          logprobs: [map()] | nil,
          finish_reason: :stop | :length | :abort | nil,
          stop_reason: String.t() | non_neg_integer() | nil
        }
end

defmodule Vllm.RequestOutput do
  @moduledoc """
  The state of one request after an engine step (vLLM's `RequestOutput`).

  `metrics` is a map of times in seconds since the Unix epoch (`arrival_time`,
  `first_scheduled_time`, `first_token_time`, `last_token_time`, `finished_time`) and
  `time_in_queue` in seconds; unknown ones are `nil`. `lora_request` is the
  `%Vllm.LoRARequest{}` the request named (`nil`: the base model), in every output.
  """
  defstruct [
    :request_id,
    :prompt,
    :prompt_token_ids,
    :prompt_logprobs,
    :outputs,
    :finished,
    :metrics,
    :lora_request,
    :num_cached_tokens
  ]

  @type t :: %__MODULE__{
          request_id: String.t(),
          prompt: String.t() | nil,
          prompt_token_ids: [non_neg_integer()],
          prompt_logprobs: list() | nil,
          outputs: [Vllm.CompletionOutput.t()],
          finished: boolean(),
          metrics: map() | nil,
          lora_request: Vllm.LoRARequest.t() | nil,
          num_cached_tokens: non_neg_integer()
        }
end

defmodule Vllm.Outputs.RequestOutput do
  @moduledoc "The old package's name for `Vllm.RequestOutput`: `new/1` builds one."
  @doc "Builds a `%Vllm.RequestOutput{}` from a keyword list or map."
  @spec new(Enumerable.t()) :: Vllm.RequestOutput.t()
  def new(fields \\ []), do: struct(Vllm.RequestOutput, fields)
end

defmodule Vllm.Outputs.CompletionOutput do
  @moduledoc "The old package's name for `Vllm.CompletionOutput`: `new/1` builds one."
  @doc "Builds a `%Vllm.CompletionOutput{}` from a keyword list or map."
  @spec new(Enumerable.t()) :: Vllm.CompletionOutput.t()
  def new(fields \\ []), do: struct(Vllm.CompletionOutput, fields)
end

defmodule Vllm.EmbeddingOutput do
  @moduledoc "One pooled vector (vLLM's `EmbeddingOutput`); pooling models are issue 9."
  defstruct embedding: []
  @type t :: %__MODULE__{embedding: [float()]}
end

defmodule Vllm.PoolingRequestOutput do
  @moduledoc """
  The output of a pooling request (vLLM's `PoolingRequestOutput`): `outputs` is a
  `%Vllm.EmbeddingOutput{}`. Pooling models are issue 9.
  """
  defstruct [:request_id, :prompt_token_ids, :outputs, :finished]

  @type t :: %__MODULE__{
          request_id: String.t(),
          prompt_token_ids: [non_neg_integer()],
          outputs: Vllm.EmbeddingOutput.t(),
          finished: boolean()
        }
end

defmodule Vllm.Outputs.PoolingRequestOutput do
  @moduledoc "The old package's name for `Vllm.PoolingRequestOutput`: `new/1` builds one."
  @doc "Builds a `%Vllm.PoolingRequestOutput{}` from a keyword list or map."
  def new(fields \\ []), do: struct(Vllm.PoolingRequestOutput, fields)
end

defmodule Vllm.Outputs.EmbeddingOutput do
  @moduledoc "The old package's name for `Vllm.EmbeddingOutput`: `new/1` builds one."
  @doc "Builds a `%Vllm.EmbeddingOutput{}` from a keyword list or map."
  def new(fields \\ []), do: struct(Vllm.EmbeddingOutput, fields)
end
