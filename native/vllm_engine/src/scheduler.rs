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

use std::collections::{BTreeMap, HashMap};

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
        }
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
        while budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some((&key, &id)) = self.waiting.iter().next() else {
                break;
            };
            let Some(seq) = self.seqs.get_mut(&id) else {
                self.waiting.remove(&key);
                continue;
            };
            let hits = if self.kv.prefix_caching() {
                seq.update_block_hashes(block_size);
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
            let Some(&wid) = self.waiting.values().next() else { return };
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
                    .map(|r| self.kv.blocks_for(r.num_tokens()).saturating_sub(self.kv.block_table(r.seq_id).len()))
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
mod tests {
    use super::*;
    use crate::request::SamplingParams;

    fn seq(id: SeqId, prompt_len: usize, max_tokens: usize) -> Sequence {
        Sequence::new(
            id,
            id.to_string(),
            vec![7; prompt_len],
            SamplingParams::greedy(max_tokens),
            1024,
            0,
            id,
        )
    }

    fn scheduler(num_blocks: usize, budget: usize) -> Scheduler {
        let config = SchedulerConfig {
            max_num_seqs: 8,
            max_num_batched_tokens: budget,
            enable_chunked_prefill: true,
            policy: SchedulingPolicy::Priority,
        };
        Scheduler::new(config, KvCacheManager::new(num_blocks, 4).with_prefix_caching(false))
    }

    /// What the engine core does after the forward pass.
    fn complete(s: &mut Scheduler, out: &SchedulerOutput) {
        for sch in &out.scheduled {
            let seq = s.seq_mut(sch.seq_id).unwrap();
            seq.num_computed_tokens += sch.num_new_tokens;
            if seq.num_computed_tokens == seq.num_tokens() {
                seq.token_ids.push(1);
            }
        }
    }

    #[test]
    fn long_prompts_are_prefilled_in_chunks_beside_decodes() {
        let mut s = scheduler(64, 8);
        s.add(seq(1, 3, 10));
        let out = s.schedule();
        assert_eq!(
            out.scheduled,
            vec![ScheduledSeq {
                seq_id: 1,
                num_new_tokens: 3
            }]
        );
        complete(&mut s, &out);
        s.add(seq(2, 20, 10));
        let out = s.schedule();
        assert_eq!(
            out.scheduled,
            vec![
                ScheduledSeq {
                    seq_id: 1,
                    num_new_tokens: 1
                },
                ScheduledSeq {
                    seq_id: 2,
                    num_new_tokens: 7
                }
            ]
        );
        complete(&mut s, &out);
        let out = s.schedule();
        assert_eq!(
            out.scheduled[1],
            ScheduledSeq {
                seq_id: 2,
                num_new_tokens: 7
            }
        );
        complete(&mut s, &out);
        let out = s.schedule();
        assert_eq!(
            out.scheduled[1],
            ScheduledSeq {
                seq_id: 2,
                num_new_tokens: 6
            }
        );
    }

    #[test]
    fn full_cache_preempts_the_newest_request() {
        // 3 blocks of 4 tokens: two requests of 4 prompt tokens fill 2 blocks, their
        // decodes need a block each.
        let mut s = scheduler(3, 64);
        s.add(seq(1, 4, 10));
        s.add(seq(2, 4, 10));
        let out = s.schedule();
        assert_eq!(out.scheduled.len(), 2);
        complete(&mut s, &out);
        let out = s.schedule();
        assert_eq!(out.preempted, vec![2]);
        assert_eq!(
            out.scheduled,
            vec![ScheduledSeq {
                seq_id: 1,
                num_new_tokens: 1
            }]
        );
        assert_eq!(s.num_waiting(), 1);
        let seq2 = s.seq(2).unwrap();
        assert_eq!((seq2.num_computed_tokens, seq2.num_tokens()), (0, 5));
        s.remove(1);
        let out = s.schedule();
        assert_eq!(
            out.scheduled,
            vec![ScheduledSeq {
                seq_id: 2,
                num_new_tokens: 5
            }]
        );
    }

    #[test]
    fn waiting_requests_go_by_priority_then_arrival() {
        let mut s = scheduler(64, 4);
        let mut low = seq(1, 4, 1);
        low.priority = 5;
        s.add(low);
        s.add(seq(2, 4, 1));
        let out = s.schedule();
        assert_eq!(
            out.scheduled,
            vec![ScheduledSeq {
                seq_id: 2,
                num_new_tokens: 4
            }]
        );
    }

    #[test]
    fn max_num_seqs_caps_the_running_set() {
        let config = SchedulerConfig {
            max_num_seqs: 2,
            max_num_batched_tokens: 100,
            enable_chunked_prefill: true,
            policy: SchedulingPolicy::Priority,
        };
        let mut s = Scheduler::new(config, KvCacheManager::new(64, 4));
        for id in 1..=3 {
            s.add(seq(id, 2, 4));
        }
        assert_eq!(s.schedule().scheduled.len(), 2);
        assert_eq!(s.num_waiting(), 1);
    }

    fn with_policy(num_blocks: usize, budget: usize, max_num_seqs: usize, policy: SchedulingPolicy) -> Scheduler {
        let config = SchedulerConfig {
            max_num_seqs,
            max_num_batched_tokens: budget,
            enable_chunked_prefill: true,
            policy,
        };
        Scheduler::new(config, KvCacheManager::new(num_blocks, 4))
    }

    fn prio(id: SeqId, prompt_len: usize, priority: i32) -> Sequence {
        let mut s = seq(id, prompt_len, 50);
        s.token_ids = (0..prompt_len as u32).map(|t| t + 1000 * id as u32).collect();
        s.priority = priority;
        s
    }

    #[test]
    fn the_victim_is_the_lowest_priority_then_latest_running_request() {
        // 3 blocks: three 4-token prompts fill them; their decodes need three more.
        let mut s = with_policy(3, 64, 8, SchedulingPolicy::Priority);
        s.add(prio(1, 4, 5));
        s.add(prio(2, 4, 0));
        s.add(prio(3, 4, 5));
        let out = s.schedule();
        assert_eq!(out.scheduled.len(), 3);
        complete(&mut s, &out);
        let out = s.schedule();
        // 3 (priority 5, latest) goes first, then 1 (priority 5).
        assert_eq!(out.preempted, vec![3, 1]);
        assert_eq!(out.scheduled, vec![ScheduledSeq { seq_id: 2, num_new_tokens: 1 }]);
        assert_eq!(s.num_preemptions(), 2);
        assert_eq!(s.seq(1).unwrap().num_preemptions, 1);
    }

    #[test]
    fn a_waiting_request_of_higher_priority_takes_a_seat_from_a_lower_one() {
        let mut s = with_policy(64, 64, 2, SchedulingPolicy::Priority);
        s.add(prio(1, 4, 3));
        s.add(prio(2, 4, 3));
        let out = s.schedule();
        complete(&mut s, &out);
        s.add(prio(3, 4, 3));
        // Equal priority: no preemption, 3 waits.
        let out = s.schedule();
        assert!(out.preempted.is_empty());
        complete(&mut s, &out);
        s.add(prio(4, 4, 0));
        let out = s.schedule();
        assert_eq!(out.preempted, vec![2]);
        assert!(out.scheduled.contains(&ScheduledSeq { seq_id: 4, num_new_tokens: 4 }));
        assert_eq!(s.num_waiting(), 2);
    }

    #[test]
    fn fcfs_never_preempts_for_a_waiting_request() {
        let mut s = with_policy(64, 64, 1, SchedulingPolicy::Fcfs);
        s.add(prio(1, 4, 5));
        let out = s.schedule();
        complete(&mut s, &out);
        s.add(prio(2, 4, -10));
        let out = s.schedule();
        assert!(out.preempted.is_empty());
        assert_eq!(out.scheduled, vec![ScheduledSeq { seq_id: 1, num_new_tokens: 1 }]);
    }

    #[test]
    fn admission_starts_after_the_cached_prefix_unless_salt_or_lora_differ() {
        let mut s = with_policy(64, 64, 8, SchedulingPolicy::Fcfs);
        let prompt: Vec<u32> = (0..10).collect();
        let mk = |id: SeqId, lora: Option<u32>, salt: Option<&str>| {
            let mut q = seq(id, 0, 4).with_extra_keys(lora, salt.map(String::from));
            q.token_ids = prompt.clone();
            q.num_prompt_tokens = prompt.len();
            q
        };
        s.add(mk(1, None, None));
        let out = s.schedule();
        complete(&mut s, &out);
        s.add(mk(2, None, None));
        s.add(mk(3, Some(1), None));
        s.add(mk(4, None, Some("tenant")));
        let out = s.schedule();
        // 2 blocks of 4 are cached; 3 and 4 share nothing with 1 (or each other).
        let new_tokens: Vec<(SeqId, usize)> = out.scheduled.iter().map(|x| (x.seq_id, x.num_new_tokens)).collect();
        assert_eq!(new_tokens, vec![(1, 1), (2, 2), (3, 10), (4, 10)]);
        assert_eq!(s.seq(2).unwrap().num_cached_tokens, Some(8));
        assert_eq!(s.seq(3).unwrap().num_cached_tokens, Some(0));
        assert_eq!(s.kv().block_table(2)[..2], s.kv().block_table(1)[..2]);
        let stats = s.kv().prefix_cache_stats();
        assert_eq!((stats.requests, stats.queries, stats.hits), (4, 40, 8));
        for id in 1..=4 {
            s.remove(id);
        }
        s.kv().check_invariants();
        assert_eq!(s.kv().num_free_blocks(), 64);
    }

    proptest::proptest! {
        /// Any mix of prompt lengths, output lengths and aborts under a tight cache: every
        /// step respects the budget and max_num_seqs, every request finishes, and no
        /// block is lost.
        #[test]
        fn every_request_finishes_under_pressure(
            reqs in proptest::collection::vec((1usize..30, 1usize..20, proptest::bool::weighted(0.1), -2i32..3), 1..24),
            budget in 1usize..40,
            by_priority in proptest::bool::ANY,
            caching in proptest::bool::ANY,
        ) {
            let policy = if by_priority { SchedulingPolicy::Priority } else { SchedulingPolicy::Fcfs };
            let config = SchedulerConfig { max_num_seqs: 4, max_num_batched_tokens: budget, enable_chunked_prefill: true, policy };
            // 12 blocks of 4 tokens hold any single request (at most 49 tokens).
            let mut s = Scheduler::new(config, KvCacheManager::new(13, 4).with_prefix_caching(caching));
            for (i, &(prompt, max_tokens, _, priority)) in reqs.iter().enumerate() {
                let mut q = seq(i as SeqId, prompt, max_tokens);
                q.priority = priority;
                s.add(q);
            }
            let mut steps = 0;
            while s.has_work() {
                steps += 1;
                proptest::prop_assert!(steps < 10_000, "no progress");
                let out = s.schedule();
                proptest::prop_assert!(!out.is_empty(), "work left but nothing scheduled");
                let total: usize = out.scheduled.iter().map(|x| x.num_new_tokens).sum();
                proptest::prop_assert!(total <= budget);
                proptest::prop_assert!(out.scheduled.len() <= 4);
                let mut ids: Vec<SeqId> = out.scheduled.iter().map(|x| x.seq_id).collect();
                ids.sort_unstable();
                ids.dedup();
                proptest::prop_assert_eq!(ids.len(), out.scheduled.len(), "a request scheduled twice");
                for x in &out.scheduled {
                    let q = s.seq(x.seq_id).unwrap();
                    let held = s.kv().block_table(x.seq_id).len() * 4;
                    proptest::prop_assert!(held >= q.num_computed_tokens + x.num_new_tokens, "too few blocks");
                }
                complete(&mut s, &out);
                for x in &out.scheduled {
                    let (_, max_tokens, abort, _) = reqs[x.seq_id as usize];
                    let seq = s.seq(x.seq_id).unwrap();
                    if seq.num_output_tokens() >= max_tokens || (abort && seq.num_output_tokens() > 0) {
                        s.remove(x.seq_id);
                    }
                }
            }
            s.kv().check_invariants();
            proptest::prop_assert_eq!(s.kv().num_free_blocks(), s.kv().num_blocks());
        }
    }
}
