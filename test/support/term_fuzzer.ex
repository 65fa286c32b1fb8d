defmodule Vllm.TermFuzzer do
  @moduledoc false
  # Random Erlang terms for fuzzing the NIF: nested lists (proper and improper), maps
  # (random keys, and the keys the NIF looks up with random values), tuples, binaries
  # (random bytes, invalid UTF-8, empty, large), bitstrings, huge and negative integers,
  # floats, atoms, pids (live and dead), references, funs and ports.

  # A fixed pool: random atoms must not fill the atom table.
  @atoms [
    :ok,
    :error,
    nil,
    true,
    false,
    :cumulative,
    :delta,
    :final_only,
    :stop,
    :length,
    :abort,
    :model,
    :prompt,
    :prompt_token_ids,
    :temperature,
    :top_p,
    :top_k,
    :max_tokens,
    :n,
    :seed,
    :stop_token_ids,
    :logprobs,
    :output_kind,
    :structured_outputs,
    :json,
    :regex,
    :choice,
    :grammar,
    :priority,
    :lora_request,
    :lora_int_id,
    :lora_name,
    :lora_path,
    :watcher,
    :credit,
    :max_unread,
    :task,
    :dtype,
    :max_model_len,
    :max_num_seqs,
    :block_size,
    :role,
    :content,
    :__struct__,
    :"Elixir.Vllm.SamplingParams",
    :logit_bias,
    :allowed_token_ids,
    :bad_words,
    :truncate_prompt_tokens,
    :dimensions,
    :normalize,
    :min_tokens,
    :ignore_eos,
    :foo,
    :"",
    :"with space"
  ]

  @doc "A random term no deeper than `depth`."
  def term(depth \\ 3) do
    case :rand.uniform(if depth <= 0, do: 11, else: 16) do
      1 -> :rand.uniform(200) - 100
      2 -> huge_int()
      3 -> float()
      4 -> binary()
      5 -> Enum.random(@atoms)
      6 -> pid()
      7 -> make_ref()
      8 -> Enum.random(["Hello", "Once upon a time", "", "é", <<0>>, String.duplicate("a", 300)])
      9 -> Enum.random([0, 1, 2, -1, 49_151, 49_152, 2_147_483_647, 4_294_967_296])
      10 -> <<:rand.uniform(255)::size(3)>>
      11 -> Enum.random([fn -> :ok end, &:erlang.node/0, hd(Port.list() ++ [self()])])
      12 -> for _ <- 1..:rand.uniform(6), do: term(depth - 1)
      13 -> improper(depth)
      14 -> List.to_tuple(for _ <- 1..(:rand.uniform(5) - 1), do: term(depth - 1))
      15 -> random_map(depth)
      16 -> keyed_map(depth)
    end
  end

  defp huge_int do
    sign = Enum.random([1, -1])
    sign * (Integer.pow(2, Enum.random([31, 32, 63, 64, 65, 128, 1000])) + :rand.uniform(5) - 3)
  end

  defp float,
    do:
      Enum.random([
        0.0,
        -0.0,
        1.0e308,
        -1.0e308,
        5.0e-324,
        0.5,
        -2.5,
        1.0e20,
        :rand.uniform() * 10
      ])

  defp binary do
    case :rand.uniform(5) do
      1 -> :crypto.strong_rand_bytes(:rand.uniform(64))
      2 -> <<0xFF, 0xFE, 0xC3>> <> :crypto.strong_rand_bytes(:rand.uniform(8))
      3 -> ""
      4 -> :crypto.strong_rand_bytes(20_000 + :rand.uniform(20_000))
      5 -> for _ <- 1..:rand.uniform(20), into: "", do: <<Enum.random(?a..?z)>>
    end
  end

  defp pid do
    case :rand.uniform(3) do
      1 -> self()
      2 -> spawn(fn -> :ok end)
      3 -> :c.pid(0, 0, 0)
    end
  end

  defp improper(depth), do: [term(depth - 1) | term(depth - 1)]

  defp random_map(depth),
    do: Map.new(1..:rand.uniform(4), fn _ -> {term(depth - 1), term(depth - 1)} end)

  # The keys the NIF decoders look for, with random values: reaches deeper code.
  defp keyed_map(depth) do
    Map.new(1..:rand.uniform(6), fn _ -> {Enum.random(@atoms), term(depth - 1)} end)
  end
end
