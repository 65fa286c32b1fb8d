//! Which rows a GPU model may sample itself, and what it needs for them: the parameters,
//! a uniform draw, and the context tokens the penalties look at (each distinct token once,
//! with its count in the output). Plain data; the kernels are backend/cuda/sampling.rs.
//!
//! A row qualifies when nothing but penalties, temperature, min-p, top-k and top-p touch
//! its logits: no logprobs, no logit_bias / allowed_token_ids / bad_words, no structured
//! output, nothing suppressed by min_tokens. A step samples on the device only when every
//! row qualifies; otherwise all its rows go to the host sampler as before.
//!
//! Draws: a seeded request's draw for its n-th output token is a hash of (seed, n), so its
//! ids depend on neither the batch nor the engine's other requests; unseeded requests take
//! the runner's generator.

use std::collections::HashMap;

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::sequence::Sequence;

/// One row to sample on the device.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceSampleRow {
    pub temperature: f32,
    /// 0: off.
    pub top_k: u32,
    pub top_p: f32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// In [0, 1).
    pub uniform: f32,
    /// (token, occurrences in the output), one entry per distinct context token; empty
    /// when no penalty is on.
    pub penalty_tokens: Vec<(u32, u32)>,
}

/// u32 words per row in the kernels' metadata (SAMPLE_META in kernels/sampling.cu).
pub const ROW_WORDS: usize = 10;

/// Whether `seq`'s next token can be sampled on the device (see the module comment).
pub fn qualifies(seq: &Sequence) -> bool {
    let p = &seq.params;
    let nothing_suppressed = seq.num_output_tokens() >= p.min_tokens || (p.ignore_eos && p.stop_token_ids.is_empty());
    p.logprobs.is_none()
        && p.logit_bias.is_empty()
        && p.allowed_token_ids.is_none()
        && p.bad_words_token_ids.is_empty()
        && p.structured_outputs.is_none()
        && nothing_suppressed
}

/// The row for `seq`, drawing from `unseeded` when the request has no seed.
pub fn row_for(seq: &Sequence, unseeded: &mut ChaCha8Rng) -> DeviceSampleRow {
    let p = &seq.params;
    let uniform = if p.is_greedy() {
        0.0
    } else {
        match p.seed {
            Some(seed) => seeded_uniform(seed, seq.num_output_tokens() as u64),
            None => unit_f32(unseeded.random::<u32>()),
        }
    };
    let penalised = p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
    let penalty_tokens = if penalised {
        penalty_tokens(&seq.token_ids, seq.num_prompt_tokens)
    } else {
        Vec::new()
    };
    DeviceSampleRow {
        temperature: p.temperature,
        top_k: p.top_k.max(0) as u32,
        top_p: p.top_p,
        min_p: p.min_p,
        repetition_penalty: p.repetition_penalty,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        uniform,
        penalty_tokens,
    }
}

/// Each distinct token of `context` once, with its count after `num_prompt_tokens`,
/// in order of first appearance (so the upload is the same for the same context).
pub fn penalty_tokens(context: &[u32], num_prompt_tokens: usize) -> Vec<(u32, u32)> {
    let mut index: HashMap<u32, usize> = HashMap::new();
    let mut out: Vec<(u32, u32)> = Vec::new();
    for (i, &t) in context.iter().enumerate() {
        let slot = *index.entry(t).or_insert_with(|| {
            out.push((t, 0));
            out.len() - 1
        });
        if i >= num_prompt_tokens {
            out[slot].1 += 1;
        }
    }
    out
}

/// The kernels' metadata: ROW_WORDS per row, then every row's (token, count) entries.
pub fn pack(rows: &[DeviceSampleRow]) -> Vec<u32> {
    let entries: usize = rows.iter().map(|r| r.penalty_tokens.len()).sum();
    let mut words = Vec::with_capacity(rows.len() * ROW_WORDS + 2 * entries);
    let mut first = 0u32;
    for r in rows {
        let n = r.penalty_tokens.len() as u32;
        words.extend_from_slice(&[
            r.temperature.to_bits(),
            r.top_k,
            r.top_p.to_bits(),
            r.min_p.to_bits(),
            r.repetition_penalty.to_bits(),
            r.presence_penalty.to_bits(),
            r.frequency_penalty.to_bits(),
            r.uniform.to_bits(),
            first,
            n,
        ]);
        first += n;
    }
    for r in rows {
        for &(t, c) in &r.penalty_tokens {
            words.extend_from_slice(&[t, c]);
        }
    }
    words
}

/// Whether any row needs the penalty kernel.
pub fn any_penalties(rows: &[DeviceSampleRow]) -> bool {
    rows.iter().any(|r| !r.penalty_tokens.is_empty())
}

/// A uniform in [0, 1) from (seed, index) alone: splitmix64 of both, top 24 bits.
pub fn seeded_uniform(seed: u64, index: u64) -> f32 {
    let mixed = splitmix64(seed ^ splitmix64(index.wrapping_add(0x9e37_79b9_7f4a_7c15)));
    unit_f32((mixed >> 32) as u32)
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The top 24 bits of `bits` as a float in [0, 1) (exact: f32 has 24 bits of mantissa).
fn unit_f32(bits: u32) -> f32 {
    (bits >> 8) as f32 / (1u32 << 24) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::SamplingParams;
    use rand_chacha::rand_core::SeedableRng;

    fn seq(params: SamplingParams, output: &[u32]) -> Sequence {
        let mut s = Sequence::new(0, "r".into(), vec![5, 6, 5], params, 64, 0, 0);
        s.token_ids.extend_from_slice(output);
        s
    }

    #[test]
    fn penalty_tokens_list_each_context_token_once_with_its_output_count() {
        assert_eq!(penalty_tokens(&[5, 6, 5, 7, 5, 7], 3), vec![(5, 1), (6, 0), (7, 2)]);
        assert_eq!(penalty_tokens(&[], 0), vec![]);
    }

    #[test]
    fn pack_puts_row_words_first_then_entries_with_offsets() {
        let p = SamplingParams {
            repetition_penalty: 1.5,
            ..Default::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let a = row_for(&seq(p.clone(), &[6]), &mut rng);
        let b = row_for(&seq(SamplingParams::default(), &[]), &mut rng);
        let words = pack(&[a.clone(), b]);
        assert_eq!(words.len(), 2 * ROW_WORDS + 2 * 2);
        assert_eq!(f32::from_bits(words[4]), 1.5);
        assert_eq!((words[8], words[9]), (0, 2));
        assert_eq!((words[ROW_WORDS + 8], words[ROW_WORDS + 9]), (2, 0));
        assert_eq!(&words[2 * ROW_WORDS..], &[5, 0, 6, 1]);
        assert!(a.uniform >= 0.0 && a.uniform < 1.0);
    }

    #[test]
    fn a_seeded_draw_depends_only_on_seed_and_position() {
        let p = SamplingParams {
            seed: Some(7),
            ..Default::default()
        };
        let mut one = ChaCha8Rng::seed_from_u64(1);
        let mut two = ChaCha8Rng::seed_from_u64(2);
        let a = row_for(&seq(p.clone(), &[1]), &mut one).uniform;
        assert_eq!(a, row_for(&seq(p.clone(), &[9]), &mut two).uniform);
        assert_ne!(a, row_for(&seq(p, &[1, 2]), &mut two).uniform);
        // Spread over [0, 1): a coarse histogram of 4,000 draws.
        let mut bins = [0usize; 4];
        for i in 0..4000 {
            let u = seeded_uniform(42, i);
            assert!((0.0..1.0).contains(&u));
            bins[(u * 4.0) as usize] += 1;
        }
        assert!(bins.iter().all(|&b| (850..1150).contains(&b)), "{bins:?}");
    }

    #[test]
    fn rows_needing_host_processing_do_not_qualify() {
        assert!(qualifies(&seq(SamplingParams::default(), &[])));
        let p = SamplingParams {
            logprobs: Some(1),
            ..Default::default()
        };
        assert!(!qualifies(&seq(p, &[])));
        let mut p = SamplingParams::default();
        p.logit_bias.insert(3, 1.0);
        assert!(!qualifies(&seq(p, &[])));
        let p = SamplingParams {
            min_tokens: 4,
            ..Default::default()
        };
        assert!(!qualifies(&seq(p, &[])), "EOS is suppressed before min_tokens");
    }
}
