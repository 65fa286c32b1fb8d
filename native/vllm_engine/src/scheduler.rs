//! Decides each step which requests run and how many tokens each, under one token budget
//! (vLLM V1): a step is `{request: num_tokens}`, which covers prefill chunks and decodes
//! alike. Running requests go first, then waiting ones by (priority, arrival) under the
//! priority policy, by arrival under FCFS. A newly admitted request starts after the
//! longest prefix found in the prefix cache.
//!
//! When the KV cache is full, a running request is preempted by recompute: its blocks
//! are freed (they stay cached) and it goes back to waiting, keeping the tokens it
//! generated. The victim is the lowest-priority (highest value), then latest-arrived
//! running request. Under the priority policy a waiting request may also preempt
//! running requests of strictly lower priority when it cannot otherwise start.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::config::SchedulingPolicy;
use crate::kv_cache::manager::{KvCacheManager, SeqId};
use crate::sequence::Sequence;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// Off: a prompt is only admitted when all of it fits in one step's budget.
    pub enable_chunked_prefill: bool,
    pub policy: SchedulingPolicy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub seq_id: SeqId,
    pub num_new_tokens: usize,
}

#[derive(Debug, Default)]
pub struct SchedulerOutput {
    pub scheduled: Vec<ScheduledSeq>,
    pub preempted: Vec<SeqId>,
}

impl SchedulerOutput {
    pub fn is_empty(&self) -> bool {
        self.scheduled.is_empty()
    }
}

pub struct Scheduler {
    config: SchedulerConfig,
    kv: KvCacheManager,
    seqs: HashMap<SeqId, Sequence>,
    /// In admission order.
    running: Vec<SeqId>,
    waiting: BTreeMap<(i32, u64), SeqId>,
    num_preemptions: u64,
    /// At most this many distinct LoRA adapters among running requests and pinned ones
    /// (the resident slots); None: LoRA off.
    max_loras: Option<usize>,
    pinned_loras: HashSet<u32>,
    /// Decoding sequences also get room for this many tokens past the step when a block
    /// is free for it (the CUDA decode lookahead launches the next step before this one's
    /// tokens are known; its KV needs a slot). Never preempts for it.
    lookahead_slots: usize,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig, kv: KvCacheManager) -> Self {
        Scheduler {
            config,
            kv,
            seqs: HashMap::new(),
            running: Vec::new(),
            waiting: BTreeMap::new(),
            num_preemptions: 0,
            max_loras: None,
            pinned_loras: HashSet::new(),
            lookahead_slots: 0,
        }
    }

    /// Limits running requests to `max_loras` distinct adapters, counting pinned ones.
    pub fn set_lora_limit(&mut self, max_loras: Option<usize>) {
        self.max_loras = max_loras;
    }

    pub fn set_lookahead_slots(&mut self, slots: usize) {
        self.lookahead_slots = slots;
    }

    pub fn set_pinned_loras(&mut self, pinned: HashSet<u32>) {
        self.pinned_loras = pinned;
    }

    /// Adapters of running requests.
    pub fn running_loras(&self) -> HashSet<u32> {
        self.running
            .iter()
            .filter_map(|id| self.seqs.get(id).and_then(|s| s.extra_keys.lora_int_id))
            .collect()
    }

    /// The first waiting request (in order) whose adapter can join `claimed` (the running
    /// and pinned adapters) without exceeding max_loras; others wait their turn.
    fn next_admissible(&self, claimed: &HashSet<u32>) -> Option<((i32, u64), SeqId)> {
        self.waiting
            .iter()
            .find(|(_, id)| {
                let lora = self.seqs.get(id).and_then(|s| s.extra_keys.lora_int_id);
                match (self.max_loras, lora) {
                    (Some(max), Some(l)) => claimed.contains(&l) || claimed.len() < max,
                    _ => true,
                }
            })
            .map(|(&k, &id)| (k, id))
    }

    /// Where a request sorts among waiting ones, and how it ranks as a preemption
    /// victim (the greatest key goes first).
    fn key(&self, seq: &Sequence) -> (i32, u64) {
        match self.config.policy {
            SchedulingPolicy::Fcfs => (0, seq.arrival_order),
            SchedulingPolicy::Priority => (seq.priority, seq.arrival_order),
        }
    }

    pub fn add(&mut self, seq: Sequence) {
        self.waiting.insert(self.key(&seq), seq.seq_id);
        self.seqs.insert(seq.seq_id, seq);
    }

    pub fn schedule(&mut self) -> SchedulerOutput {
        let mut out = SchedulerOutput::default();
        let mut budget = self.config.max_num_batched_tokens;
        if self.config.policy == SchedulingPolicy::Priority {
            self.preempt_for_waiting(&mut out, budget);
        }
        let preempted_for_waiting = out.preempted.len();

        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let seq = &self.seqs[&id];
            let num_new = seq.num_uncomputed_tokens().min(budget);
            if num_new == 0 {
                i += 1;
                continue;
            }
            let computed = seq.num_computed_tokens;
            let mut fits = true;
            while !self.kv.allocate_slots(id, computed, num_new) {
                let Some(at) = self.victim_index() else {
                    fits = false;
                    break;
                };
                let victim = self.running.remove(at);
                if at < i {
                    // Already scheduled this step: give its tokens back.
                    if let Some(pos) = out.scheduled.iter().position(|s| s.seq_id == victim) {
                        budget += out.scheduled.remove(pos).num_new_tokens;
                    }
                    i -= 1;
                }
                self.preempt(victim);
                out.preempted.push(victim);
                if victim == id {
                    fits = false;
                    break;
                }
            }
            if !fits {
                break;
            }
            if num_new == 1 && self.lookahead_slots > 0 {
                // Room for the lookahead when a block is free; nothing if not.
                self.kv.allocate_slots(id, computed, num_new + self.lookahead_slots);
            }
            out.scheduled.push(ScheduledSeq {
                seq_id: id,
                num_new_tokens: num_new,
            });
            budget -= num_new;
            i += 1;
        }
        // Registered only now that no running request can be unscheduled any more.
        for s in &out.scheduled {
            self.cache_blocks(s.seq_id, s.num_new_tokens);
        }

        // Like vLLM, admit nobody in a step that had to preempt for room: the cache is full.
        if out.preempted.len() == preempted_for_waiting {
            self.admit_waiting(&mut out, budget);
        }
        out
    }

    fn admit_waiting(&mut self, out: &mut SchedulerOutput, mut budget: usize) {
        let block_size = self.kv.block_size();
        let mut claimed_loras: HashSet<u32> = self.running_loras().union(&self.pinned_loras).copied().collect();
        while budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some((key, id)) = self.next_admissible(&claimed_loras) else {
                break;
            };
            let Some(seq) = self.seqs.get_mut(&id) else {
                self.waiting.remove(&key);
                continue;
            };
            if self.kv.prefix_caching() {
                seq.update_block_hashes(block_size);
            }
            // Prompt logprobs need logits at every prompt position, so such a request
            // computes its whole prompt (as vLLM); its blocks are still cached for others.
            let hits = if self.kv.prefix_caching() && seq.params.prompt_logprobs.is_none() {
                self.kv.find_cached_prefix(&seq.block_hashes, seq.num_tokens())
            } else {
                Vec::new()
            };
            let hit_tokens = hits.len() * block_size;
            let wanted = seq.num_tokens() - hit_tokens;
            if !self.config.enable_chunked_prefill && wanted > budget {
                break;
            }
            let num_new = wanted.min(budget);
            if !self.kv.allocate_with_prefix(id, &hits, num_new) {
                break;
            }
            self.waiting.remove(&key);
            self.running.push(id);
            claimed_loras.extend(seq.extra_keys.lora_int_id);
            seq.num_computed_tokens = hit_tokens;
            if seq.num_cached_tokens.is_none() {
                seq.num_cached_tokens = Some(hit_tokens);
                if self.kv.prefix_caching() {
                    self.kv.record_lookup(seq.num_tokens(), hit_tokens);
                }
            }
            // Later admissions in this step may share these blocks: the forward pass
            // writes every new token's keys and values before any attention reads them.
            self.kv.cache_blocks(id, &seq.block_hashes, hit_tokens + num_new);
            out.scheduled.push(ScheduledSeq {
                seq_id: id,
                num_new_tokens: num_new,
            });
            budget -= num_new;
        }
    }

    /// Priority policy: while the best waiting request could not start (no free seat,
    /// or too few blocks for its first chunk beside the running requests' next tokens),
    /// preempt the worst running request if it has strictly lower priority.
    fn preempt_for_waiting(&mut self, out: &mut SchedulerOutput, budget: usize) {
        loop {
            let Some(&wid) = self.waiting.values().next() else {
                return;
            };
            let Some(at) = self.victim_index() else { return };
            let (Some(w), Some(v)) = (self.seqs.get(&wid), self.seqs.get(&self.running[at])) else {
                return;
            };
            if v.priority <= w.priority {
                return;
            }
            let no_seat = self.running.len() >= self.config.max_num_seqs;
            let no_room = || {
                let pending: usize = self
                    .running
                    .iter()
                    .filter_map(|r| self.seqs.get(r))
                    .map(|r| {
                        self.kv
                            .blocks_for(r.num_tokens())
                            .saturating_sub(self.kv.block_table(r.seq_id).len())
                    })
                    .sum();
                let first_chunk = self.kv.blocks_for(w.num_uncomputed_tokens().min(budget));
                self.kv.num_free_blocks() < pending + first_chunk
            };
            if !no_seat && !no_room() {
                return;
            }
            let victim = self.running.remove(at);
            self.preempt(victim);
            out.preempted.push(victim);
        }
    }

    /// The running request to preempt first: greatest (priority, arrival) key.
    fn victim_index(&self) -> Option<usize> {
        self.running
            .iter()
            .enumerate()
            .max_by_key(|(_, id)| self.seqs.get(id).map(|s| self.key(s)))
            .map(|(at, _)| at)
    }

    /// Registers the request's newly full blocks (as of the end of this step).
    fn cache_blocks(&mut self, id: SeqId, num_new_tokens: usize) {
        if !self.kv.prefix_caching() {
            return;
        }
        let block_size = self.kv.block_size();
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.update_block_hashes(block_size);
            self.kv
                .cache_blocks(id, &seq.block_hashes, seq.num_computed_tokens + num_new_tokens);
        }
    }

    fn preempt(&mut self, id: SeqId) {
        self.kv.free(id);
        let Some(seq) = self.seqs.get_mut(&id) else { return };
        seq.num_computed_tokens = 0;
        seq.num_preemptions += 1;
        self.num_preemptions += 1;
        let key = self.key(&self.seqs[&id]);
        self.waiting.insert(key, id);
    }

    /// Forgets every cached prefix. With `reset_running_requests`, running requests are
    /// preempted first (they recompute later); otherwise false while any holds blocks.
    pub fn reset_prefix_cache(&mut self, reset_running_requests: bool) -> bool {
        if reset_running_requests {
            while let Some(id) = self.running.pop() {
                self.preempt(id);
            }
        }
        self.kv.reset_prefix_cache()
    }

    /// Removes a request wherever it is and frees its blocks.
    pub fn remove(&mut self, id: SeqId) -> Option<Sequence> {
        let seq = self.seqs.remove(&id)?;
        self.kv.free(id);
        self.running.retain(|&r| r != id);
        self.waiting.remove(&self.key(&seq));
        Some(seq)
    }

    pub fn seq(&self, id: SeqId) -> Option<&Sequence> {
        self.seqs.get(&id)
    }
    pub fn seq_mut(&mut self, id: SeqId) -> Option<&mut Sequence> {
        self.seqs.get_mut(&id)
    }
    pub fn seq_ids(&self) -> Vec<SeqId> {
        self.seqs.keys().copied().collect()
    }
    pub fn kv(&self) -> &KvCacheManager {
        &self.kv
    }
    pub fn num_running(&self) -> usize {
        self.running.len()
    }
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }
    /// Requests preempted by recompute since start-up.
    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }
    pub fn has_work(&self) -> bool {
        !self.seqs.is_empty()
    }
}

#[cfg(test)]
mod tests;
