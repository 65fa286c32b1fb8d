defmodule Vllm.ClassificationOutput do
  @moduledoc "Label probabilities of one sequence (vLLM's `ClassificationOutput`), by label index."
  defstruct probs: []
  @type t :: %__MODULE__{probs: [float()]}
end

defmodule Vllm.ScoringOutput do
  @moduledoc "A cross-encoder's relevance score of a text pair (vLLM's `ScoringOutput`)."
  defstruct score: nil
  @type t :: %__MODULE__{score: float()}
end
