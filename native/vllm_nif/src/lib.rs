//! vllm_nif: the thin NIF between `Vllm.Native` and the engine crate. It converts terms to
//! engine structs and back, holds the engine in a resource and sends each request's outputs
//! to a pid. Nothing here knows about scheduling.

mod atoms;
mod chat;
mod control;
mod decode;
mod encode;
mod engine_ref;
mod error;
mod flow;
mod lora;
mod malloc_tuning;
mod pooling;
mod requests;
mod sink;
mod tokenize;

fn load(_env: rustler::Env, _info: rustler::Term) -> bool {
    malloc_tuning::keep_large_buffers_on_the_heap();
    true
}

rustler::init!("Elixir.Vllm.Native", load = load);
