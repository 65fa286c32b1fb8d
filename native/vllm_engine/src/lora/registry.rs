//! The engine's host-side adapter registry: every added adapter by `lora_int_id`, at most
//! `max_cpu_loras` of them (least recently used unpinned ones are dropped first; requests
//! already holding one keep its weights alive).

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::lora::{LoRARequest, LoraAdapter};

/// What `list_loras` reports for one adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraInfo {
    pub lora_name: String,
    pub lora_int_id: u32,
    pub lora_path: std::path::PathBuf,
    pub pinned: bool,
}

struct Entry {
    request: LoRARequest,
    adapter: Arc<LoraAdapter>,
    pinned: bool,
    last_used: u64,
}

pub struct LoraRegistry {
    max_rank: usize,
    max_cpu_loras: usize,
    entries: HashMap<u32, Entry>,
    clock: u64,
}

impl LoraRegistry {
    pub fn new(max_rank: usize, max_cpu_loras: usize) -> Self {
        LoraRegistry {
            max_rank,
            max_cpu_loras: max_cpu_loras.max(1),
            entries: HashMap::new(),
            clock: 0,
        }
    }

    /// The adapter `req` names, loading it when new. Returns it and whether it was added.
    /// lora_int_id 0, or an id already used for another path: `:validation`.
    pub fn get_or_load(&mut self, req: &LoRARequest, config: &ModelConfig) -> Result<(Arc<LoraAdapter>, bool)> {
        if req.lora_int_id == 0 {
            return Err(EngineError::validation("lora_int_id must be at least 1"));
        }
        self.clock += 1;
        if let Some(e) = self.entries.get_mut(&req.lora_int_id) {
            if e.request.lora_path != req.lora_path {
                return Err(EngineError::validation(format!(
                    "lora_int_id {} already names adapter {:?} at {}, not {}",
                    req.lora_int_id,
                    e.request.lora_name,
                    e.request.lora_path.display(),
                    req.lora_path.display()
                )));
            }
            e.last_used = self.clock;
            return Ok((e.adapter.clone(), false));
        }
        let adapter = Arc::new(LoraAdapter::load(&req.lora_path, config, self.max_rank)?);
        if self.entries.len() >= self.max_cpu_loras {
            let victim = self
                .entries
                .iter()
                .filter(|(_, e)| !e.pinned)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(&id, _)| id)
                .ok_or_else(|| {
                    EngineError::resource_exhausted(format!(
                        "all {} host LoRA slots (max_cpu_loras) hold pinned adapters",
                        self.max_cpu_loras
                    ))
                })?;
            self.entries.remove(&victim);
        }
        self.entries.insert(
            req.lora_int_id,
            Entry {
                request: req.clone(),
                adapter: adapter.clone(),
                pinned: false,
                last_used: self.clock,
            },
        );
        Ok((adapter, true))
    }

    pub fn remove(&mut self, id: u32) -> bool {
        self.entries.remove(&id).is_some()
    }

    pub fn get(&self, id: u32) -> Option<Arc<LoraAdapter>> {
        self.entries.get(&id).map(|e| e.adapter.clone())
    }

    pub fn set_pinned(&mut self, id: u32, pinned: bool) {
        if let Some(e) = self.entries.get_mut(&id) {
            e.pinned = pinned;
        }
    }

    /// `:resource_exhausted` when every one of `max_loras` slots is pinned by other
    /// adapters, so a request for `id` could never run.
    pub fn check_runnable(&self, id: u32, max_loras: usize) -> Result<()> {
        let pinned = self.entries.values().filter(|e| e.pinned).count();
        let mine = self.entries.get(&id).is_some_and(|e| e.pinned);
        if !mine && pinned >= max_loras {
            return Err(EngineError::resource_exhausted(format!(
                "LoRA {id} cannot run: all {max_loras} adapter slots (max_loras) hold pinned adapters"
            )));
        }
        Ok(())
    }

    /// Added adapters, by id.
    pub fn list(&self) -> Vec<LoraInfo> {
        let mut out: Vec<LoraInfo> = self
            .entries
            .values()
            .map(|e| LoraInfo {
                lora_name: e.request.lora_name.clone(),
                lora_int_id: e.request.lora_int_id,
                lora_path: e.request.lora_path.clone(),
                pinned: e.pinned,
            })
            .collect();
        out.sort_by_key(|i| i.lora_int_id);
        out
    }
}
