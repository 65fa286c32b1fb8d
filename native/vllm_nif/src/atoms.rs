//! Atoms shared by the NIF modules.

rustler::atoms! {
    ok,
    error,
    nil,
    vllm,
    vllm_error,
    vllm_pooling,
    vllm_request_done,
    vllm_engine_started,
    vllm_engine_dead,
    stop,
    length,
    abort,
    cumulative,
    delta,
    final_only,
    request_output_struct = "Elixir.Vllm.RequestOutput",
    completion_output_struct = "Elixir.Vllm.CompletionOutput",
    lora_request_struct = "Elixir.Vllm.LoRARequest",
}
