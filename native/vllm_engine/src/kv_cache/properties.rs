//! Property tests of the block pool and the manager together: random interleavings of
//! admissions (with prefix hits), appends, frees, evictions and resets.

use std::collections::HashMap;

use proptest::prelude::*;

use super::block_hash::{extend_block_hashes, BlockHash, ExtraKeys};
use super::block_pool::BlockId;
use super::manager::{KvCacheManager, SeqId};

const BS: usize = 4;
const NUM_BLOCKS: usize = 24;

#[derive(Debug, Clone)]
enum Op {
    /// A new request: `len` tokens of prefix family `family` (families share tokens, so
    /// prompts hit each other's blocks), then `tail` distinct tokens; `salt` is an extra key.
    Admit {
        seq: SeqId,
        family: u32,
        len: usize,
        tail: usize,
        salt: bool,
    },
    Append {
        seq: SeqId,
        n: usize,
    },
    Free {
        seq: SeqId,
    },
    /// Some other request grabs `n` blocks and drops them, evicting cached ones.
    Evict {
        n: usize,
    },
    Reset,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..6, 0u32..3, 1usize..24, 0usize..6, proptest::bool::weighted(0.2))
            .prop_map(|(seq, family, len, tail, salt)| Op::Admit { seq, family, len, tail, salt }),
        3 => (0u64..6, 1usize..9).prop_map(|(seq, n)| Op::Append { seq, n }),
        3 => (0u64..6).prop_map(|seq| Op::Free { seq }),
        1 => (1usize..NUM_BLOCKS).prop_map(|n| Op::Evict { n }),
        1 => Just(Op::Reset),
    ]
}

struct Live {
    tokens: Vec<u32>,
    hashes: Vec<BlockHash>,
    extra: ExtraKeys,
}

struct Model {
    m: KvCacheManager,
    live: HashMap<SeqId, Live>,
    /// What each block's slots hold (what a real forward would have written there).
    shadow: Vec<Vec<Option<u32>>>,
    next_tail: u32,
}

impl Model {
    /// Writes positions from..to of the request into its blocks, then registers them.
    fn compute(&mut self, seq: SeqId, from: usize, to: usize) {
        let live = &self.live[&seq];
        let table = self.m.block_table(seq).to_vec();
        for p in from..to {
            let b = table[p / BS] as usize;
            assert_eq!(
                self.m.pool().ref_count(b as BlockId),
                1,
                "writing into shared block {b}"
            );
            self.shadow[b][p % BS] = Some(live.tokens[p]);
        }
        self.m.cache_blocks(seq, &live.hashes, to);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
    #[test]
    fn block_accounting_stays_exact_and_hits_see_the_right_tokens(ops in proptest::collection::vec(op(), 1..120)) {
        let mut s = Model {
            m: KvCacheManager::new(NUM_BLOCKS, BS),
            live: HashMap::new(),
            shadow: vec![vec![None; BS]; NUM_BLOCKS],
            next_tail: 10_000,
        };
        for op in ops {
            match op {
                Op::Admit { seq, family, len, tail, salt } => {
                    if s.live.contains_key(&seq) {
                        continue;
                    }
                    let mut tokens: Vec<u32> = (0..len as u32).map(|i| family * 100 + i).collect();
                    for _ in 0..tail {
                        tokens.push(s.next_tail);
                        s.next_tail += 1;
                    }
                    let extra = ExtraKeys { lora_int_id: None, cache_salt: salt.then(|| "tenant".to_string()) };
                    let mut hashes = Vec::new();
                    extend_block_hashes(&mut hashes, &tokens, BS, &extra);
                    let hits = s.m.find_cached_prefix(&hashes, tokens.len());
                    prop_assert!(hits.len() * BS < tokens.len(), "the whole prompt was a hit");
                    for (i, &b) in hits.iter().enumerate() {
                        let want: Vec<Option<u32>> = tokens[i * BS..(i + 1) * BS].iter().map(|&t| Some(t)).collect();
                        prop_assert_eq!(&s.shadow[b as usize], &want, "hit block {} holds other tokens", b);
                    }
                    let n = tokens.len();
                    let hit_tokens = hits.len() * BS;
                    let free_before = s.m.num_free_blocks();
                    if s.m.allocate_with_prefix(seq, &hits, n - hit_tokens) {
                        s.live.insert(seq, Live { tokens, hashes, extra });
                        s.compute(seq, hit_tokens, n);
                    } else {
                        prop_assert_eq!(s.m.num_free_blocks(), free_before);
                        prop_assert!(s.m.block_table(seq).is_empty());
                    }
                }
                Op::Append { seq, n } => {
                    let Some(live) = s.live.get_mut(&seq) else { continue };
                    let old = live.tokens.len();
                    for _ in 0..n {
                        live.tokens.push(s.next_tail);
                        s.next_tail += 1;
                    }
                    extend_block_hashes(&mut live.hashes, &live.tokens, BS, &live.extra);
                    let before = s.m.block_table(seq).to_vec();
                    if s.m.allocate_slots(seq, old, n) {
                        s.compute(seq, old, old + n);
                    } else {
                        prop_assert_eq!(s.m.block_table(seq), before.as_slice());
                        let live = s.live.get_mut(&seq).unwrap();
                        live.tokens.truncate(old);
                        live.hashes.truncate(old / BS);
                    }
                }
                Op::Free { seq } => {
                    s.m.free(seq);
                    s.live.remove(&seq);
                }
                Op::Evict { n } => {
                    const FILLER: SeqId = 99;
                    if s.m.allocate_slots(FILLER, 0, n * BS) {
                        for &b in s.m.block_table(FILLER) {
                            s.shadow[b as usize] = vec![Some(u32::MAX); BS];
                        }
                    }
                    s.m.free(FILLER);
                }
                Op::Reset => {
                    let idle = s.m.num_free_blocks() == s.m.num_blocks();
                    prop_assert_eq!(s.m.reset_prefix_cache(), idle);
                    if idle {
                        prop_assert_eq!(s.m.pool().num_cached_blocks(), 0);
                    }
                }
            }
            s.m.check_invariants();
        }
        let ids: Vec<SeqId> = s.live.keys().copied().collect();
        for id in ids {
            s.m.free(id);
        }
        s.m.check_invariants();
        prop_assert_eq!(s.m.num_free_blocks(), NUM_BLOCKS);
    }
}
