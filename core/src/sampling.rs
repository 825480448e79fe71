//! Choosing the next token from a row of logits.
//!
//! Order, as in transformers: repetition penalty on the raw logits, then temperature, top-k,
//! top-p, min-p. Temperature 0 is greedy (first index of the maximum). Each sequence draws from
//! its own ChaCha8 stream, selected by the call's seed and the sequence's index in the call, so
//! the tokens a sequence gets do not depend on which other sequences share its batch.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};

/// How to generate. `Default` gives plain sampling at temperature 1 with no filters.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    /// 0 = greedy. The reported log-probs are under `softmax(logits / temperature)` (temperature
    /// 1 when greedy).
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely one (0 = off).
    pub min_p: f32,
    /// transformers' repetition penalty over prompt and generated tokens (1 = off).
    pub repetition_penalty: f32,
    /// Tokens that end a sequence (included in the output). `None` = the model's EOS ids.
    pub stop_token_ids: Option<Vec<u32>>,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_new_tokens: 128,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            stop_token_ids: None,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy(max_new_tokens: usize) -> Self {
        SamplingParams {
            max_new_tokens,
            temperature: 0.0,
            ..Default::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::invalid(what));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(format!("temperature must be ≥ 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }

    /// The temperature the reported log-probs use.
    pub fn logprob_temperature(&self) -> f32 {
        if self.temperature > 0.0 {
            self.temperature
        } else {
            1.0
        }
    }
}

/// Per-sequence sampler state.
pub(crate) struct Sampler {
    rng: ChaCha8Rng,
    /// Scratch (index, probability) pairs, reused across steps.
    candidates: Vec<(u32, f32)>,
    work: Vec<f32>,
    seen: Vec<u32>,
}

impl Sampler {
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        Sampler {
            rng,
            candidates: Vec::new(),
            work: Vec::new(),
            seen: Vec::new(),
        }
    }

    /// Picks a token from `logits`; `history` is every token so far (for the repetition penalty).
    pub fn sample(&mut self, logits: &[f32], history: &[u32], p: &SamplingParams) -> u32 {
        self.work.clear();
        self.work.extend_from_slice(logits);
        if p.repetition_penalty != 1.0 {
            // Each distinct token is penalised once, however often it occurred.
            self.seen.clear();
            self.seen.extend_from_slice(history);
            self.seen.sort_unstable();
            self.seen.dedup();
            for &t in &self.seen {
                if let Some(l) = self.work.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.temperature == 0.0 {
            return argmax(&self.work);
        }
        let inv_t = p.temperature;
        let max = self
            .work
            .iter()
            .fold(f32::NEG_INFINITY, |m, &l| m.max(l / inv_t));
        self.candidates.clear();
        self.candidates.extend(
            self.work
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, (l / inv_t - max).exp())),
        );
        let by_prob_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < self.candidates.len() {
            self.candidates
                .select_nth_unstable_by(p.top_k - 1, by_prob_desc);
            self.candidates.truncate(p.top_k);
        }
        if p.top_p < 1.0 || p.min_p > 0.0 {
            self.candidates.sort_unstable_by(by_prob_desc);
        }
        if p.top_p < 1.0 {
            let total: f64 = self.candidates.iter().map(|c| c.1 as f64).sum();
            let mut cum = 0f64;
            let mut keep = self.candidates.len();
            for (i, c) in self.candidates.iter().enumerate() {
                // Keep a token while the mass before it is below top_p (always keeps one).
                if cum >= p.top_p as f64 * total {
                    keep = i;
                    break;
                }
                cum += c.1 as f64;
            }
            self.candidates.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            if let Some(&(_, top)) = self.candidates.first() {
                let floor = p.min_p * top;
                self.candidates.retain(|c| c.1 >= floor);
            }
        }
        let total: f64 = self.candidates.iter().map(|c| c.1 as f64).sum();
        let u = (self.rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64) * total;
        let mut cum = 0f64;
        for &(i, prob) in &self.candidates {
            cum += prob as f64;
            if u < cum {
                return i;
            }
        }
        self.candidates.last().map_or(0, |c| c.0)
    }
}

/// Index of the first maximum.
pub(crate) fn argmax(v: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_filters() {
        let logits = [0.0f32, 3.0, 1.0, 3.0, -2.0];
        let mut s = Sampler::new(1, 0);
        assert_eq!(s.sample(&logits, &[], &SamplingParams::greedy(1)), 1);
        let top1 = SamplingParams {
            top_k: 1,
            ..Default::default()
        };
        for _ in 0..20 {
            assert_eq!(s.sample(&logits, &[], &top1), 1);
        }
        let nucleus = SamplingParams {
            top_p: 0.5,
            ..Default::default()
        };
        for _ in 0..20 {
            assert!(matches!(s.sample(&logits, &[], &nucleus), 1 | 3));
        }
        let minp = SamplingParams {
            min_p: 0.5,
            ..Default::default()
        };
        for _ in 0..20 {
            assert!(matches!(s.sample(&logits, &[], &minp), 1 | 3));
        }
        // A penalty on token 1 leaves token 3 as the greedy choice.
        let pen = SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy(1)
        };
        assert_eq!(s.sample(&logits, &[1], &pen), 3);
    }

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let logits = vec![0.0f32; 1000];
        let p = SamplingParams::default();
        let draw = |seed, idx| {
            let mut s = Sampler::new(seed, idx);
            (0..16)
                .map(|_| s.sample(&logits, &[], &p))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7, 0), draw(7, 0));
        assert_ne!(draw(7, 0), draw(7, 1));
        assert_ne!(draw(7, 0), draw(8, 0));
    }

    #[test]
    fn invalid_params_are_rejected() {
        assert!(SamplingParams {
            temperature: -1.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            min_p: 2.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            repetition_penalty: f32::NAN,
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}
