//! Scheduler unit tests: budgets, chunking, preemption victims, policies, prefix hits.
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
    assert_eq!(
        out.scheduled,
        vec![ScheduledSeq {
            seq_id: 2,
            num_new_tokens: 1
        }]
    );
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
    assert!(out.scheduled.contains(&ScheduledSeq {
        seq_id: 4,
        num_new_tokens: 4
    }));
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
    assert_eq!(
        out.scheduled,
        vec![ScheduledSeq {
            seq_id: 1,
            num_new_tokens: 1
        }]
    );
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

#[test]
fn lookahead_slots_give_decodes_their_next_block_early_but_never_preempt_for_it() {
    // Block size 4: a prompt of 3 fills block 0 up to slot 2.
    let mut s = scheduler(4, 64);
    s.set_lookahead_slots(1);
    s.add(seq(1, 3, 20));
    let out = s.schedule();
    complete(&mut s, &out);
    assert_eq!(s.kv().block_table(1).len(), 1, "a prefill takes no lookahead");
    // Decode of position 3 (the block's last slot): position 4's block comes with it.
    let out = s.schedule();
    assert_eq!(out.scheduled[0].num_new_tokens, 1);
    assert_eq!(s.kv().block_table(1).len(), 2);
    complete(&mut s, &out);
    // Position 4 sits in that block; position 5 needs nothing new.
    let out = s.schedule();
    assert_eq!(s.kv().block_table(1).len(), 2);
    complete(&mut s, &out);
    // A second request (prompt of 2, one block) decodes beside it; at the first's position
    // 7 its lookahead takes the last free block, so the second's (at its position 3) finds
    // none: it goes without, and nobody is preempted.
    s.add(seq(2, 2, 20));
    for _ in 0..3 {
        let out = s.schedule();
        assert!(out.preempted.is_empty(), "{:?}", out.preempted);
        complete(&mut s, &out);
    }
    assert_eq!(s.kv().num_free_blocks(), 0);
    assert_eq!((s.kv().block_table(1).len(), s.kv().block_table(2).len()), (3, 1));
    assert_eq!(s.num_preemptions(), 0);
    s.remove(1);
    s.remove(2);
    assert_eq!(s.kv().num_free_blocks(), 4);
}
