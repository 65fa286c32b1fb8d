//! Picks the next token of one sequence from its logits, in vLLM V1's order: the logits
//! processors that can change the argmax (allowed_token_ids, bad_words, min_tokens,
//! logit_bias), then penalties, then greedy argmax or temperature, min-p, top-k and top-p.
//! Logprobs are taken from the raw logits (before all of that, as vLLM's default
//! `raw_logprobs`).

use rand::Rng;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::request::{SamplingParams, TokenLogprob};

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub token_id: u32,
    /// Log-probability of the sampled token under the raw logits (the raw logit itself
    /// when `params.logprobs` is None: outputs then carry no logprobs).
    pub logprob: f32,
    /// When requested: the sampled token first, then the top-k tokens other than it.
    pub logprobs: Option<Vec<TokenLogprob>>,
}

/// One row of a batch to sample: its logits and what the processors need. `context` is
/// the prompt then the output so far; `num_prompt_tokens` splits them (repetition penalty
/// looks at both, presence and frequency at the output only). `suppressed` tokens cannot
/// be picked (EOS and stop tokens before min_tokens).
#[derive(Clone, Copy)]
pub struct SampleRow<'a> {
    pub logits: &'a [f32],
    pub params: &'a SamplingParams,
    pub context: &'a [u32],
    pub num_prompt_tokens: usize,
    pub suppressed: &'a [u32],
}

/// A row's sampling work that needs no random draw (so rows can run in parallel).
pub struct Prepared {
    choice: Choice,
    /// logsumexp of the raw logits (0 when no logprobs were asked for).
    log_sum: f32,
    /// The top `logprobs` raw token ids, most likely first.
    top: Vec<u32>,
}

enum Choice {
    Fixed(u32),
    /// Candidates and their unnormalised probabilities.
    Draw(Vec<(u32, f64)>),
}

/// Everything about a row but the draw: processors, penalties, temperature, the
/// candidate set, and the raw top-k for logprobs.
pub fn prepare(row: &SampleRow) -> Prepared {
    let params = row.params;
    // logprob(t) = logit(t) - logsumexp(logits): no need to materialise the vector, and
    // no need for the sum at all when nobody asked for logprobs.
    let (log_sum, top) = match params.logprobs {
        Some(k) => (log_sum_exp(row.logits), top_k_indices(row.logits, k)),
        None => (0.0, Vec::new()),
    };
    let mut work = processed_logits(row.logits, params, row.context, row.num_prompt_tokens, row.suppressed);
    let choice = if params.is_greedy() {
        Choice::Fixed(argmax(&work))
    } else if work.iter().all(|&l| l == f32::NEG_INFINITY) {
        // Everything is banned: no distribution to sample from; keep the raw argmax.
        Choice::Fixed(argmax(row.logits))
    } else {
        for l in work.iter_mut() {
            *l /= params.temperature;
        }
        Choice::Draw(filtered_probs(&work, params))
    };
    Prepared { choice, log_sum, top }
}

/// `prepare` over a whole batch, rows in parallel.
pub fn prepare_batch(rows: &[SampleRow]) -> Vec<Prepared> {
    use rayon::prelude::*;
    if rows.len() > 1 {
        rows.par_iter().map(prepare).collect()
    } else {
        rows.iter().map(prepare).collect()
    }
}

/// The engine-wide generator for requests without a seed.
pub struct Sampler {
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(seed: u64) -> Self {
        Sampler {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// Samples one row (see `SampleRow` for the arguments).
    pub fn sample(
        &mut self,
        logits: &[f32],
        params: &SamplingParams,
        context: &[u32],
        num_prompt_tokens: usize,
        suppressed: &[u32],
        seq_rng: Option<&mut ChaCha8Rng>,
    ) -> Sample {
        let row = SampleRow {
            logits,
            params,
            context,
            num_prompt_tokens,
            suppressed,
        };
        let prepared = prepare(&row);
        self.draw(logits, params, prepared, seq_rng)
    }

    /// Finishes a prepared row: the random draw (from the request's own generator when
    /// seeded, else the engine's: call rows in a fixed order) and its logprobs.
    pub fn draw(
        &mut self,
        logits: &[f32],
        params: &SamplingParams,
        prepared: Prepared,
        seq_rng: Option<&mut ChaCha8Rng>,
    ) -> Sample {
        let token_id = match prepared.choice {
            Choice::Fixed(t) => t,
            Choice::Draw(probs) => pick(&probs, seq_rng.unwrap_or(&mut self.rng)),
        };
        let log_sum = prepared.log_sum;
        let logprob = logits[token_id as usize] - log_sum;
        let logprobs = params
            .logprobs
            .map(|_| logprob_entries(logits, token_id, &prepared.top, log_sum));
        Sample {
            token_id,
            logprob,
            logprobs,
        }
    }
}

/// The logits the sampler picks from, before temperature: `logits` with everything that
/// can change the argmax applied, in vLLM V1's order. `context` is the prompt then the
/// output so far; `suppressed` tokens (EOS and stop tokens before min_tokens) are banned.
pub fn processed_logits(
    logits: &[f32],
    params: &SamplingParams,
    context: &[u32],
    num_prompt_tokens: usize,
    suppressed: &[u32],
) -> Vec<f32> {
    let mut work = logits.to_vec();
    let output = &context[num_prompt_tokens.min(context.len())..];
    if let Some(allowed) = &params.allowed_token_ids {
        let mut keep = vec![false; work.len()];
        for &t in allowed {
            if let Some(k) = keep.get_mut(t as usize) {
                *k = true;
            }
        }
        for (l, keep) in work.iter_mut().zip(keep) {
            if !keep {
                *l = f32::NEG_INFINITY;
            }
        }
    }
    for word in &params.bad_words_token_ids {
        if let Some((&last, prefix)) = word.split_last() {
            if output.ends_with(prefix) {
                ban(&mut work, last);
            }
        }
    }
    for &t in suppressed {
        ban(&mut work, t);
    }
    for (&t, &bias) in &params.logit_bias {
        if let Some(l) = work.get_mut(t as usize) {
            *l += bias.clamp(-100.0, 100.0);
        }
    }
    apply_penalties(&mut work, params, context, num_prompt_tokens);
    work
}

fn ban(logits: &mut [f32], token: u32) {
    if let Some(l) = logits.get_mut(token as usize) {
        *l = f32::NEG_INFINITY;
    }
}

/// The tokens sampling at temperature > 0 may pick from `processed` logits, with their
/// probabilities (summing to 1): temperature, then min-p, top-k and top-p.
pub fn candidate_probs(processed: &[f32], params: &SamplingParams) -> Vec<(u32, f64)> {
    let scaled: Vec<f32> = processed.iter().map(|&l| l / params.temperature).collect();
    let mut probs = filtered_probs(&scaled, params);
    let total: f64 = probs.iter().map(|&(_, p)| p).sum();
    for (_, p) in &mut probs {
        *p /= total;
    }
    probs
}

/// `token`'s logprob and rank under `logits`, then the top `k` tokens other than it
/// (vLLM's shape of a logprobs entry).
pub fn token_logprobs(logits: &[f32], token: u32, k: usize) -> Vec<TokenLogprob> {
    token_logprobs_with(logits, token, k, log_sum_exp(logits))
}

fn token_logprobs_with(logits: &[f32], token: u32, k: usize, log_sum: f32) -> Vec<TokenLogprob> {
    logprob_entries(logits, token, &top_k_indices(logits, k), log_sum)
}

/// `token` with its logprob and rank, then the `top` tokens other than it.
fn logprob_entries(logits: &[f32], token: u32, top: &[u32], log_sum: f32) -> Vec<TokenLogprob> {
    let raw = logits.get(token as usize).copied().unwrap_or(f32::NEG_INFINITY);
    let rank = 1 + logits.iter().filter(|&&l| l > raw).count();
    let mut entries = vec![TokenLogprob {
        token_id: token,
        logprob: raw - log_sum,
        rank,
        decoded_token: None,
    }];
    for (i, &id) in top.iter().enumerate() {
        if id != token {
            entries.push(TokenLogprob {
                token_id: id,
                logprob: logits[id as usize] - log_sum,
                rank: i + 1,
                decoded_token: None,
            });
        }
    }
    entries
}

pub fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    max + sum.ln() as f32
}

pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let log_sum = log_sum_exp(logits);
    logits.iter().map(|&l| l - log_sum).collect()
}

/// The index of the largest value; ties go to the lowest index.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// The `k` largest values' indices, largest first (ties: lower index first).
fn top_k_indices(values: &[f32], k: usize) -> Vec<u32> {
    let k = k.min(values.len());
    if k == 0 {
        return Vec::new();
    }
    let order = |a: &u32, b: &u32| values[*b as usize].total_cmp(&values[*a as usize]).then(a.cmp(b));
    let mut idx: Vec<u32> = (0..values.len() as u32).collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, order);
        idx.truncate(k);
    }
    idx.sort_by(order);
    idx
}

fn apply_penalties(logits: &mut [f32], params: &SamplingParams, context: &[u32], num_prompt_tokens: usize) {
    let repetition = params.repetition_penalty != 1.0;
    let additive = params.presence_penalty != 0.0 || params.frequency_penalty != 0.0;
    if !repetition && !additive {
        return;
    }
    let mut output_counts = std::collections::HashMap::<u32, u32>::new();
    for &t in &context[num_prompt_tokens.min(context.len())..] {
        *output_counts.entry(t).or_default() += 1;
    }
    if repetition {
        let seen: std::collections::HashSet<u32> = context.iter().copied().collect();
        for t in seen {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l > 0.0 {
                    *l / params.repetition_penalty
                } else {
                    *l * params.repetition_penalty
                };
            }
        }
    }
    for (&t, &count) in &output_counts {
        if let Some(l) = logits.get_mut(t as usize) {
            *l -= params.frequency_penalty * count as f32 + params.presence_penalty;
        }
    }
}

/// Draws from candidates with unnormalised probabilities.
fn pick(probs: &[(u32, f64)], rng: &mut ChaCha8Rng) -> u32 {
    let total: f64 = probs.iter().map(|&(_, p)| p).sum();
    let mut u = rng.random::<f64>() * total;
    for &(id, p) in probs {
        if u < p {
            return id;
        }
        u -= p;
    }
    // Rounding left u just above the last mass: take the last candidate.
    probs.last().map_or(0, |&(id, _)| id)
}

/// The candidates that survive min-p, top-k and top-p, with their unnormalised
/// probabilities (most likely first when top-k or top-p is on).
fn filtered_probs(logits: &[f32], params: &SamplingParams) -> Vec<(u32, f64)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l - max) as f64).exp()))
        .collect();
    if params.min_p > 0.0 {
        // The largest probability relative to itself is 1, so the threshold is min_p.
        let threshold = params.min_p as f64;
        probs.retain(|&(_, p)| p >= threshold);
    }
    // Banned tokens (-inf logits) have probability 0: never candidates.
    probs.retain(|&(_, p)| p > 0.0);
    if probs.is_empty() {
        return probs;
    }
    let by_prob = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let k = params.top_k.max(0) as usize;
    if k > 0 && k < probs.len() {
        probs.select_nth_unstable_by(k - 1, by_prob);
        probs.truncate(k);
    }
    if params.top_p < 1.0 {
        let total: f64 = probs.iter().map(|&(_, p)| p).sum();
        // A little slack so that float rounding cannot add a token to a set that is exactly p.
        let target = params.top_p as f64 * total * (1.0 - 1e-6);
        // Sorting the whole vocabulary costs more than the sampling itself: sort only the
        // head that reaches the target (usually a few dozen tokens), growing it as needed.
        let mut head = 64.min(probs.len());
        loop {
            if head < probs.len() {
                probs.select_nth_unstable_by(head - 1, by_prob);
            }
            probs[..head].sort_by(by_prob);
            let mut mass = 0.0;
            let keep = probs[..head].iter().position(|&(_, p)| {
                mass += p;
                mass >= target
            });
            match keep {
                Some(i) => {
                    probs.truncate(i + 1);
                    break;
                }
                // Rounding kept the mass just under the target: keep everything.
                None if head == probs.len() => break,
                None => head = (head * 4).min(probs.len()),
            }
        }
    } else if k > 0 {
        probs.sort_by(by_prob);
    }
    probs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::default();
        f(&mut p);
        p
    }

    #[test]
    fn greedy_takes_the_argmax_and_the_lowest_id_on_ties() {
        let mut s = Sampler::new(0);
        let p = SamplingParams::greedy(1);
        assert_eq!(s.sample(&[0.0, 3.0, 1.0, 3.0], &p, &[], 0, &[], None).token_id, 1);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // probs 0.5, 0.3, 0.2 (as logits ln p)
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let ids = |p: f32| {
            filtered_probs(&logits, &params(|s| s.top_p = p))
                .iter()
                .map(|&(id, _)| id)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(0.5), vec![0]);
        assert_eq!(ids(0.51), vec![0, 1]);
        assert_eq!(ids(0.8), vec![0, 1]);
        assert_eq!(ids(0.81), vec![0, 1, 2]);
    }

    #[test]
    fn top_k_and_min_p_drop_unlikely_tokens() {
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let ids = |p: SamplingParams| {
            filtered_probs(&logits, &p)
                .iter()
                .map(|&(id, _)| id)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(params(|s| s.top_k = 2)), vec![0, 1]);
        // min_p 0.5: keep tokens with p >= 0.25.
        assert_eq!(ids(params(|s| s.min_p = 0.5)), vec![0, 1]);
    }

    #[test]
    fn a_seed_gives_the_same_tokens_whatever_else_was_sampled() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let p = params(|s| s.seed = Some(42));
        let run = |noise: bool| {
            let mut sampler = Sampler::new(7);
            let mut rng = ChaCha8Rng::seed_from_u64(42);
            (0..20)
                .map(|_| {
                    if noise {
                        sampler.sample(&logits, &SamplingParams::default(), &[], 0, &[], None);
                    }
                    sampler.sample(&logits, &p, &[], 0, &[], Some(&mut rng)).token_id
                })
                .collect::<Vec<_>>()
        };
        let a = run(false);
        assert_eq!(a, run(true));
        assert!(a.iter().any(|&t| t != a[0]), "sampling at temperature 1 should vary");
    }

    #[test]
    fn logprobs_come_from_raw_logits_with_ranks() {
        let logits = [1.0f32, 3.0, 2.0, 0.0];
        let p = params(|s| {
            s.temperature = 0.0;
            s.logprobs = Some(2);
        });
        let out = Sampler::new(0).sample(&logits, &p, &[], 0, &[], None);
        let lp = log_softmax(&logits);
        let got = out.logprobs.unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].token_id, got[0].rank), (1, 1));
        assert!((got[0].logprob - lp[1]).abs() < 1e-6);
        assert_eq!((got[1].token_id, got[1].rank), (2, 2));
        let total: f32 = lp.iter().map(|l| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
    }

    #[test]
    fn sampled_token_outside_the_top_k_is_listed_first_with_its_rank() {
        let logits = [1.0f32, 3.0, 2.0, 0.0];
        let p = params(|s| {
            s.logprobs = Some(1);
            s.repetition_penalty = 100.0;
            s.temperature = 0.0;
        });
        // The penalty pushes tokens 1 and 2 down, so greedy picks 0; logprobs stay raw.
        let out = Sampler::new(0).sample(&logits, &p, &[1, 2], 2, &[], None);
        let got = out.logprobs.unwrap();
        assert_eq!(out.token_id, 0);
        assert_eq!((got[0].token_id, got[0].rank), (0, 3));
        assert_eq!((got[1].token_id, got[1].rank), (1, 1));
    }
}
