//! Token sampling: greedy, temperature, top-k, top-p, min-p, and repetition / frequency /
//! presence penalties, seeded and reproducible.
//!
//! The order follows llama.cpp's default sampler chain: penalties → top-k → top-p → min-p →
//! temperature → draw. `temperature <= 0` (or `top_k == 1`) is greedy: the arg-max of the
//! penalised logits, with ties going to the lowest id. Sampling parameters travel with the
//! request, so whichever stage samples does exactly what the single-machine engine does.

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// How many recent tokens the penalties look at when the request does not say
/// (llama.cpp's `penalty_last_n` default).
pub const PENALTY_LAST_N_DEFAULT: usize = 64;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: u32,
    /// 1.0 means no nucleus cut.
    pub top_p: f32,
    /// 0.0 means no min-p cut.
    pub min_p: f32,
    /// Multiplicative penalty on logits of recent tokens (1.0: off), as in CTRL / llama.cpp.
    pub repetition_penalty: f32,
    /// Subtracted once per occurrence of a token in the recent window (OpenAI semantics).
    pub frequency_penalty: f32,
    /// Subtracted once if a token occurs in the recent window (OpenAI semantics).
    pub presence_penalty: f32,
    /// Window of recent tokens the penalties consider.
    pub penalty_last_n: usize,
    /// Seed of the random draw; `None` picks one from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            penalty_last_n: PENALTY_LAST_N_DEFAULT,
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self { temperature: 0.0, top_k: 1, ..Self::default() }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }
}

/// One sequence's sampler: its parameters and its random state.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: rand::rngs::StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => rand::rngs::StdRng::seed_from_u64(seed),
            None => rand::rngs::StdRng::from_os_rng(),
        };
        Self { params, rng }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` (modified in place by the penalties), given the
    /// tokens of the sequence so far (`history`, prompt included).
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = &self.params;
        apply_penalties(logits, history, p);
        if p.is_greedy() {
            return argmax(logits);
        }
        // Candidates sorted by logit, best first; top-k bounds the sort.
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l))
            .collect();
        if candidates.is_empty() {
            return argmax(logits);
        }
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let k = if p.top_k > 0 { (p.top_k as usize).min(candidates.len()) } else { candidates.len() };
        if k < candidates.len() {
            candidates.select_nth_unstable_by(k - 1, by_logit);
            candidates.truncate(k);
        }
        candidates.sort_unstable_by(by_logit);

        // Softmax at temperature 1 for the top-p / min-p cuts (llama.cpp applies them before
        // temperature in its default chain).
        let max = candidates[0].1;
        let mut probs: Vec<f32> = candidates.iter().map(|c| (c.1 - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        let mut keep = candidates.len();
        if p.top_p < 1.0 {
            let mut cumulative = 0.0;
            for (i, &prob) in probs.iter().enumerate() {
                cumulative += prob;
                if cumulative >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let threshold = probs[0] * p.min_p;
            keep = keep.min(probs.iter().take_while(|&&x| x >= threshold).count().max(1));
        }
        candidates.truncate(keep.max(1));

        // Temperature, then draw.
        let weights: Vec<f32> = candidates.iter().map(|c| ((c.1 - max) / p.temperature).exp()).collect();
        let total: f32 = weights.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (c, w) in candidates.iter().zip(&weights) {
            if r < *w {
                return c.0;
            }
            r -= w;
        }
        candidates.last().map_or(0, |c| c.0)
    }
}

fn apply_penalties(logits: &mut [f32], history: &[u32], p: &SamplingParams) {
    let active = p.repetition_penalty != 1.0 || p.frequency_penalty != 0.0 || p.presence_penalty != 0.0;
    if !active || p.penalty_last_n == 0 {
        return;
    }
    let window = &history[history.len().saturating_sub(p.penalty_last_n)..];
    let mut counts: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
    for &t in window {
        *counts.entry(t).or_insert(0) += 1;
    }
    for (&token, &count) in &counts {
        let Some(l) = logits.get_mut(token as usize) else { continue };
        if p.repetition_penalty != 1.0 {
            *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
        }
        *l -= count as f32 * p.frequency_penalty + p.presence_penalty;
    }
}

/// Index of the largest logit; ties go to the lowest index (as llama.cpp's greedy sampler).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// log-softmax of raw logits for `ids` (what llama.cpp reports as `n_probs` with
/// `post_sampling_probs = false`).
pub fn log_softmax_at(logits: &[f32], ids: &[u32]) -> Vec<f32> {
    let lse = log_sum_exp(logits);
    ids.iter().map(|&i| logits[i as usize] - lse).collect()
}

/// The `n` most likely tokens with their log-probabilities, best first.
pub fn top_logprobs(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    let n = n.min(logits.len());
    if n == 0 {
        return Vec::new();
    }
    let lse = log_sum_exp(logits);
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    idx.select_nth_unstable_by(n - 1, by_logit);
    idx.truncate(n);
    idx.sort_unstable_by(by_logit);
    idx.into_iter().map(|i| (i, logits[i as usize] - lse)).collect()
}

fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    max + sum.ln() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_argmax_with_lowest_id_on_ties() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&mut [0.0, 3.0, 3.0, 1.0], &[]), 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let params = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, seed: Some(7), ..Default::default() };
        let draw = || {
            let mut s = Sampler::new(params.clone());
            (0..20).map(|_| s.sample(&mut logits.clone(), &[])).collect::<Vec<_>>()
        };
        let a = draw();
        assert_eq!(a, draw());
        assert!(a.iter().any(|&t| t != a[0]), "temperature 1 over flat-ish logits should vary");
    }

    #[test]
    fn top_k_restricts_to_the_best() {
        let logits: Vec<f32> = vec![5.0, 4.9, 0.0, 0.0, 0.0];
        let params = SamplingParams { temperature: 5.0, top_k: 2, top_p: 1.0, min_p: 0.0, seed: Some(1), ..Default::default() };
        let mut s = Sampler::new(params);
        for _ in 0..200 {
            assert!(s.sample(&mut logits.clone(), &[]) < 2);
        }
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        let logits: Vec<f32> = vec![10.0, 0.0, 0.0, 0.0];
        for params in [
            SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.5, min_p: 0.0, seed: Some(3), ..Default::default() },
            SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.1, seed: Some(3), ..Default::default() },
        ] {
            let mut s = Sampler::new(params);
            for _ in 0..100 {
                assert_eq!(s.sample(&mut logits.clone(), &[]), 0);
            }
        }
    }

    #[test]
    fn penalties_change_greedy_choice() {
        let params = SamplingParams { presence_penalty: 2.0, ..SamplingParams::greedy() };
        let mut s = Sampler::new(params);
        assert_eq!(s.sample(&mut [1.0, 2.0], &[1]), 0);
        let params = SamplingParams { repetition_penalty: 3.0, ..SamplingParams::greedy() };
        let mut s = Sampler::new(params);
        assert_eq!(s.sample(&mut [1.0, 2.0], &[1]), 0);
        let params = SamplingParams { frequency_penalty: 0.6, ..SamplingParams::greedy() };
        let mut s = Sampler::new(params);
        assert_eq!(s.sample(&mut [1.0, 2.0], &[1]), 1, "one occurrence costs 0.6");
        assert_eq!(s.sample(&mut [1.0, 2.0], &[1, 1]), 0, "two cost 1.2");
    }

    #[test]
    fn logprobs_are_normalised() {
        let logits = vec![1.0, 2.0, 3.0];
        let top = top_logprobs(&logits, 3);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1, 0]);
        let total: f32 = top.iter().map(|t| t.1.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert!((log_softmax_at(&logits, &[2])[0] - top[0].1).abs() < 1e-6);
    }
}
