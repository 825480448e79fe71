//! The reward-score primitive and the reward model's pairwise objective.
//!
//! A reward model is a decoder with a scalar `score` head, as transformers'
//! `*ForSequenceClassification` with `num_labels = 1`: the reward of a sequence is
//! `score · h_last`, the final-normed hidden state of its last token. The pairwise loss is
//! InstructGPT's `−log σ(r_chosen − r_rejected − margin)`, averaged over pairs.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::backend::cpu::attention::Slot;
use crate::backend::cpu::simd::dot;
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::tensor::Tensor;

use super::backward::{add, Gradients};
use super::forward::{Scratch, Tape};
use super::weights::Linear;
use super::Model;

/// What a reward-model step saw.
#[derive(Debug, Clone, PartialEq)]
pub struct PairStats {
    pub loss: f64,
    /// Fraction of pairs where the chosen answer scored higher.
    pub accuracy: f64,
}

/// A packed batch after its forward: tokens, their slots, the filled caches, and each
/// sequence's last row.
struct Packed {
    tokens: Vec<u32>,
    slots: Vec<Slot>,
    caches: Vec<KvCache>,
    last: Vec<usize>,
}

impl Model {
    fn score_head(&self) -> Result<&Tensor> {
        self.weights()
            .score
            .as_ref()
            .ok_or_else(|| Error::invalid("this model has no score head (load a *ForSequenceClassification checkpoint or call add_score_head)"))
    }

    /// Makes the model a reward model with a fresh scalar score head, `N(0, 0.02²)` like
    /// transformers' initializer, drawn from `seed`. An untied LM head is dropped, as
    /// transformers does when it loads a causal-LM checkpoint into `*ForSequenceClassification`
    /// (a tied one is the embedding and stays).
    pub fn add_score_head(&mut self, seed: u64) {
        let c = self.config().hidden_size;
        let w = self.weights_mut();
        w.score = Tensor::owned(normal_values(seed, c, 0.02), vec![1, c]);
        w.lm_head = None;
        self.config.score_head = true;
    }

    /// Gives the model a fresh per-token value head for PPO: weight `N(0, 0.02²)` drawn from
    /// `seed`, bias 0. It is saved as TRL's `v_head.summary.*` and loaded back from there.
    pub fn add_value_head(&mut self, seed: u64) {
        let c = self.config().hidden_size;
        // Both shapes match their value counts by construction.
        if let Some(w) = Tensor::owned(normal_values(seed, c, 0.02), vec![1, c]) {
            let b = Tensor::owned(vec![0.0], vec![1]);
            self.weights_mut().value = Some(Linear::new(w, b));
        }
    }

    /// The value head's estimate at every position of each sequence (`value[t]` is the
    /// state after reading tokens `..=t`).
    pub fn values<S: AsRef<[u32]> + Sync>(&self, sequences: &[S]) -> Result<Vec<Vec<f32>>> {
        let head = self.weights().value.as_ref().ok_or_else(|| {
            Error::invalid("this model has no value head (call add_value_head or load one)")
        })?;
        let bias = head
            .b
            .as_ref()
            .and_then(|b| b.as_slice().first().copied())
            .unwrap_or(0.0);
        #[cfg(feature = "cuda")]
        if let Some(gpu) = self.cuda()? {
            // Backbone on the device, the one-row head on the host (as below).
            let c = self.config().hidden_size;
            return Ok(gpu
                .hidden_states(&self.checked_sequences(sequences)?)?
                .iter()
                .map(|h| {
                    h.chunks_exact(c)
                        .map(|x| dot(x, head.w.as_slice()) + bias)
                        .collect()
                })
                .collect());
        }
        self.install(|| {
            let c = self.config().hidden_size;
            let mut s = Scratch::default();
            let packed = self.packed_forward(sequences, &mut s, None)?;
            let mut start = 0;
            Ok(packed
                .last
                .iter()
                .map(|&last| {
                    let v = (start..=last)
                        .map(|r| dot(&s.h[r * c..(r + 1) * c], head.w.as_slice()) + bias)
                        .collect();
                    start = last + 1;
                    v
                })
                .collect())
        })
    }

    /// Packs sequences, runs the (taped) forward; returns tokens, slots, caches and each
    /// sequence's last row.
    fn packed_forward<S: AsRef<[u32]>>(
        &self,
        sequences: &[S],
        s: &mut Scratch,
        tape: Option<&mut Tape>,
    ) -> Result<Packed> {
        let mut tokens = Vec::new();
        let mut slots = Vec::new();
        let mut last = Vec::with_capacity(sequences.len());
        let mut caches = Vec::with_capacity(sequences.len());
        for (i, seq) in sequences.iter().enumerate() {
            let seq = seq.as_ref();
            self.check_tokens(seq, 0)?;
            tokens.extend_from_slice(seq);
            slots.extend((0..seq.len()).map(|pos| Slot { seq: i, pos }));
            last.push(tokens.len() - 1);
            caches.push(KvCache::new(self.config(), seq.len())?);
        }
        self.forward_taped(&tokens, &slots, &mut caches, s, tape)?;
        Ok(Packed {
            tokens,
            slots,
            caches,
            last,
        })
    }

    /// The scalar reward of each sequence (score head at its last token).
    pub fn reward_scores<S: AsRef<[u32]> + Sync>(&self, sequences: &[S]) -> Result<Vec<f32>> {
        let score = self.score_head()?;
        #[cfg(feature = "cuda")]
        if let Some(gpu) = self.cuda()? {
            let c = self.config().hidden_size;
            return gpu
                .hidden_states(&self.checked_sequences(sequences)?)?
                .iter()
                .map(|h| {
                    let last = h
                        .len()
                        .checked_sub(c)
                        .ok_or_else(|| Error::invalid("empty sequence"))?;
                    Ok(dot(&h[last..], score.as_slice()))
                })
                .collect();
        }
        self.install(|| {
            let c = self.config().hidden_size;
            let mut s = Scratch::default();
            let last = self.packed_forward(sequences, &mut s, None)?.last;
            Ok(last
                .iter()
                .map(|&r| dot(&s.h[r * c..(r + 1) * c], score.as_slice()))
                .collect())
        })
    }

    /// Pairwise reward-model loss `mean −log σ(r_chosen − r_rejected − margin)`, its pairwise
    /// accuracy, and the gradient of every parameter (score head included).
    pub fn reward_pair_gradients<S: AsRef<[u32]> + Sync>(
        &self,
        chosen: &[S],
        rejected: &[S],
        margin: f32,
    ) -> Result<(PairStats, Gradients)> {
        if chosen.is_empty() || chosen.len() != rejected.len() {
            return Err(Error::invalid(format!(
                "{} chosen and {} rejected sequences: need equal, non-zero counts",
                chosen.len(),
                rejected.len()
            )));
        }
        if !margin.is_finite() {
            return Err(Error::invalid("margin must be finite"));
        }
        let score = self.score_head()?;
        let all: Vec<&[u32]> = chosen
            .iter()
            .map(AsRef::as_ref)
            .chain(rejected.iter().map(AsRef::as_ref))
            .collect();
        #[cfg(feature = "cuda")]
        if let Some(gpu) = self.cuda()? {
            // Backbone forward and backward on the device; the score head and the loss on
            // the host, on the downloaded final hidden states (the same arithmetic as below).
            let all = self.checked_sequences(&all)?;
            let lens: Vec<usize> = all.iter().map(|s| s.len()).collect();
            let last: Vec<usize> = lens
                .iter()
                .scan(0, |end, &n| {
                    *end += n;
                    Some(*end - 1)
                })
                .collect();
            let tokens: Vec<u32> = all.concat();
            let mut stats = None;
            let grads = gpu.hidden_objective_gradients(self, &tokens, &lens, &mut |h| {
                let mut dhf = vec![0f32; h.len()];
                let mut dscore = vec![0f32; score.as_slice().len()];
                stats = Some(pair_objective(
                    h,
                    &last,
                    score.as_slice(),
                    margin,
                    &mut dhf,
                    Some(&mut dscore),
                ));
                Ok((dhf, Some(dscore)))
            })?;
            let stats = stats.ok_or_else(|| Error::Cuda("internal: no pair statistics".into()))?;
            return Ok((stats, grads));
        }
        self.install(|| {
            let c = self.config().hidden_size;
            // Gradients lent by a Trainer are refilled; the buffers go back to it unchanged.
            let mut lent = self.training_buffers.take();
            let mut grads = match lent.as_mut() {
                Some(b) => b.zeroed_gradients(self),
                None => Gradients::zeros(self),
            };
            if let Some(b) = lent {
                self.training_buffers.put(b);
            }
            let mut s = Scratch::default();
            let mut tape = Tape {
                checkpointed: self.gradient_checkpointing(),
                ..Default::default()
            };
            let Packed {
                tokens,
                slots,
                caches,
                last,
            } = self.packed_forward(&all, &mut s, Some(&mut tape))?;
            let mut dhf = vec![0f32; tokens.len() * c];
            let stats = pair_objective(
                &s.h,
                &last,
                score.as_slice(),
                margin,
                &mut dhf,
                grads.score.as_deref_mut(),
            );
            self.backbone_backward(&tokens, &slots, &caches, &tape, &dhf, &mut grads);
            Ok((stats, grads))
        })
    }
}

/// The pairwise loss `mean −log σ(r_chosen − r_rejected − margin)` over `last.len() / 2`
/// pairs (chosen first, then rejected, in `last` order) from the final hidden states `h`
/// (`[T, C]`, `last[i]` = sequence i's last row): adds `∂loss/∂h` into `dhf` and the score
/// head's gradient into `dscore`; returns the loss and the pairwise accuracy.
fn pair_objective(
    h: &[f32],
    last: &[usize],
    score: &[f32],
    margin: f32,
    dhf: &mut [f32],
    mut dscore: Option<&mut [f32]>,
) -> PairStats {
    let c = score.len();
    let pairs = last.len() / 2;
    let rewards: Vec<f32> = last
        .iter()
        .map(|&r| dot(&h[r * c..(r + 1) * c], score))
        .collect();
    let (mut loss, mut correct) = (0f64, 0usize);
    for p in 0..pairs {
        let delta = rewards[p] as f64 - rewards[pairs + p] as f64 - margin as f64;
        // −log σ(Δ) = softplus(−Δ), computed stably.
        loss += if delta > 0.0 {
            (-delta).exp().ln_1p()
        } else {
            -delta + delta.exp().ln_1p()
        };
        correct += usize::from(rewards[p] > rewards[pairs + p]);
        let d_delta = (-1.0 / (1.0 + delta.exp()) / pairs as f64) as f32;
        for (seq, dr) in [(p, d_delta), (pairs + p, -d_delta)] {
            let r = last[seq];
            let hr = &h[r * c..(r + 1) * c];
            let dh = &mut dhf[r * c..(r + 1) * c];
            for (d, w) in dh.iter_mut().zip(score) {
                *d += dr * w;
            }
            if let Some(ds) = dscore.as_deref_mut() {
                let scaled: Vec<f32> = hr.iter().map(|v| dr * v).collect();
                add(ds, &scaled);
            }
        }
    }
    PairStats {
        loss: loss / pairs as f64,
        accuracy: correct as f64 / pairs as f64,
    }
}

/// `n` values from `N(0, std²)`, deterministic in `seed` (Box–Muller over ChaCha8).
fn normal_values(seed: u64, n: usize, std: f64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut uniform = || ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    (0..n)
        .map(|_| {
            let (u1, u2) = (uniform(), uniform());
            (std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect()
}
