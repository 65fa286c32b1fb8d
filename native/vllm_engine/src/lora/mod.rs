//! Multi-LoRA: PEFT adapters loaded from a directory (`adapter`), the requests that name
//! them (`LoRARequest`), the host-side registry the engine keeps (`registry`) and the
//! resident slots the model applies per batch segment (`slots`). Deltas are always
//! applied as shrink (x·Aᵀ) then expand (·Bᵀ·scale) on top of the base projection,
//! never merged into the weights (the Punica / S-LoRA design).

pub mod adapter;
pub mod apply;
pub mod registry;
pub mod slots;

pub use adapter::{LoraAdapter, LoraPair, LoraTarget};
pub use apply::add_batch_deltas;
pub use registry::{LoraInfo, LoraRegistry};
pub use slots::LoraSlots;

/// A request's adapter (vLLM's LoRARequest): `lora_int_id` (≥ 1) identifies it;
/// the same id must always name the same path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LoRARequest {
    pub lora_name: String,
    pub lora_int_id: u32,
    pub lora_path: std::path::PathBuf,
}

impl LoRARequest {
    pub fn new(lora_name: impl Into<String>, lora_int_id: u32, lora_path: impl Into<std::path::PathBuf>) -> Self {
        LoRARequest {
            lora_name: lora_name.into(),
            lora_int_id,
            lora_path: lora_path.into(),
        }
    }
}
