//! The `max_loras` resident adapter slots the model applies (the engine core's side).
//! Adapters a step needs are swapped into free or least recently used slots; pinned
//! adapters keep their slot until removed.

use std::collections::HashSet;
use std::sync::Arc;

use crate::error::{EngineError, Result};
use crate::lora::LoraAdapter;

struct Resident {
    id: u32,
    last_used: u64,
}

/// A change the model must apply: `slot` now holds `adapter` (None: empty).
pub type SlotLoad = (usize, Option<Arc<LoraAdapter>>);

pub struct LoraSlots {
    slots: Vec<Option<Resident>>,
    pinned: HashSet<u32>,
    clock: u64,
    /// Adapters swapped into a slot, and adapters swapped out to make room, since start-up.
    pub loads: u64,
    pub evictions: u64,
}

impl LoraSlots {
    pub fn new(max_loras: usize) -> Self {
        LoraSlots {
            slots: (0..max_loras.max(1)).map(|_| None).collect(),
            pinned: HashSet::new(),
            clock: 0,
            loads: 0,
            evictions: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub fn pinned(&self) -> &HashSet<u32> {
        &self.pinned
    }

    pub fn slot_of(&self, id: u32) -> Option<usize> {
        self.slots.iter().position(|s| s.as_ref().is_some_and(|r| r.id == id))
    }

    /// Makes every adapter in `needed` resident (distinct ids, at most `capacity` of them
    /// together with the pinned ones: the scheduler guarantees it). Returns the slot loads.
    pub fn activate(&mut self, needed: &[(u32, Arc<LoraAdapter>)]) -> Result<Vec<SlotLoad>> {
        self.clock += 1;
        let mut loads = Vec::new();
        let wanted: HashSet<u32> = needed.iter().map(|(id, _)| *id).collect();
        for (id, adapter) in needed {
            if let Some(slot) = self.slot_of(*id) {
                if let Some(r) = self.slots[slot].as_mut() {
                    r.last_used = self.clock;
                }
                continue;
            }
            let slot = self.free_slot(&wanted).ok_or_else(|| {
                EngineError::internal(format!(
                    "no LoRA slot free for adapter {id}: {} slots, pinned {:?}",
                    self.slots.len(),
                    self.pinned
                ))
            })?;
            if self.slots[slot].is_some() {
                self.evictions += 1;
            }
            self.slots[slot] = Some(Resident {
                id: *id,
                last_used: self.clock,
            });
            self.loads += 1;
            loads.push((slot, Some(adapter.clone())));
        }
        Ok(loads)
    }

    /// An empty slot, else the least recently used one holding an adapter that is
    /// neither pinned nor in `keep`.
    fn free_slot(&self, keep: &HashSet<u32>) -> Option<usize> {
        if let Some(i) = self.slots.iter().position(Option::is_none) {
            return Some(i);
        }
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|r| (i, r)))
            .filter(|(_, r)| !self.pinned.contains(&r.id) && !keep.contains(&r.id))
            .min_by_key(|(_, r)| r.last_used)
            .map(|(i, _)| i)
    }

    /// Pins `id` and makes it resident. `running`: adapters of running requests, which
    /// must keep room. More pinned-plus-running adapters than slots: `:validation`.
    pub fn pin(&mut self, id: u32, adapter: Arc<LoraAdapter>, running: &HashSet<u32>) -> Result<Vec<SlotLoad>> {
        let mut claimed: HashSet<u32> = self.pinned.union(running).copied().collect();
        claimed.insert(id);
        if claimed.len() > self.slots.len() {
            return Err(EngineError::validation(format!(
                "cannot pin LoRA {id}: {} pinned or running adapters would exceed max_loras {}",
                claimed.len(),
                self.slots.len()
            )));
        }
        let loads = self.activate(&[(id, adapter)])?;
        self.pinned.insert(id);
        Ok(loads)
    }

    /// Forgets `id` (unpinning it). Returns the slot it freed.
    pub fn remove(&mut self, id: u32) -> Option<SlotLoad> {
        self.pinned.remove(&id);
        let slot = self.slot_of(id)?;
        self.slots[slot] = None;
        Some((slot, None))
    }
}
