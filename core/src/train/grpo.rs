//! GRPO (group relative policy optimisation), as TRL's `GRPOTrainer` computes it.
//!
//! `k` completions are sampled per prompt and kept together. Each completion's advantage is
//! its reward minus its group's mean, divided by the group's (unbiased) standard deviation plus
//! 1e-4 when `scale_rewards` is on. Per response token, with `r = exp(logπ − logπ_old)`:
//!
//! `ℓ = −min(r·A, clip(r, 1 − ε_low, 1 + ε_high)·A) + β·(exp(ρ − logπ) − (ρ − logπ) − 1)`
//!
//! (the second term is the k3 estimator of the KL to the reference ρ). The per-token losses
//! are aggregated by [`GrpoLossType`].

use crate::error::{Error, Result};
use crate::model::{Gradients, Model, TokenOutputGrads, TokenOutputs};

/// How per-token losses become the batch loss (TRL's `loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpoLossType {
    /// Mean over each completion's tokens, then mean over completions (the GRPO paper).
    Grpo,
    /// Sum over all tokens ÷ number of tokens in the batch.
    Bnpo,
    /// Sum over all tokens ÷ (completions × `max_completion_length`) (Dr. GRPO): no length bias.
    DrGrpo,
    /// Sum over all tokens ÷ tokens in the whole accumulated batch (DAPO). On one process and
    /// one micro-batch this equals `Bnpo`; with gradient accumulation pass the total through
    /// [`GrpoConfig::dapo_tokens`].
    Dapo,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GrpoConfig {
    /// β of the KL term; 0 drops it (and the need for reference log-probs).
    pub beta: f64,
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    pub loss_type: GrpoLossType,
    /// Divide advantages by the group's standard deviation (+1e-4).
    pub scale_rewards: bool,
    /// The `Dr. GRPO` normaliser; `None` = the longest completion in the batch.
    pub max_completion_length: Option<usize>,
    /// The `DAPO` normaliser (response tokens in the whole accumulated batch); `None` = this
    /// batch's.
    pub dapo_tokens: Option<usize>,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        GrpoConfig {
            beta: 0.04,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            loss_type: GrpoLossType::Dapo,
            scale_rewards: true,
            max_completion_length: None,
            dapo_tokens: None,
        }
    }
}

/// Group-normalised advantages of `rewards`, laid out as consecutive groups of `group_size`
/// completions of the same prompt.
pub fn group_advantages(rewards: &[f64], group_size: usize, scale: bool) -> Result<Vec<f64>> {
    if group_size < 2 {
        return Err(Error::invalid(
            "GRPO needs at least 2 completions per prompt (group size k ≥ 2)",
        ));
    }
    if rewards.is_empty() || !rewards.len().is_multiple_of(group_size) {
        return Err(Error::invalid(format!(
            "{} rewards do not form groups of {group_size}",
            rewards.len()
        )));
    }
    if rewards.iter().any(|r| !r.is_finite()) {
        return Err(Error::invalid("rewards must be finite"));
    }
    let mut out = Vec::with_capacity(rewards.len());
    for group in rewards.chunks(group_size) {
        let k = group.len() as f64;
        let mean = group.iter().sum::<f64>() / k;
        let std = (group.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (k - 1.0)).sqrt();
        out.extend(group.iter().map(|r| {
            if scale {
                (r - mean) / (std + 1e-4)
            } else {
                r - mean
            }
        }));
    }
    Ok(out)
}

/// A GRPO batch: completions (prompt + response tokens) with their response masks, one
/// advantage per completion, and optionally what the rollout and the reference recorded per
/// response token.
#[derive(Debug, Clone, Copy)]
pub struct GrpoBatch<'a> {
    pub sequences: &'a [Vec<u32>],
    pub masks: &'a [Vec<bool>],
    pub advantages: &'a [f64],
    /// The sampling policy's log-probs; `None` means "this very policy" (one update per
    /// rollout), making every ratio exactly 1.
    pub old_logprobs: Option<&'a [Vec<f64>]>,
    /// Needed when `beta > 0`.
    pub ref_logprobs: Option<&'a [Vec<f64>]>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct GrpoStats {
    pub loss: f64,
    /// Mean per-token k3 KL to the reference (0 without a reference).
    pub kl: f64,
    /// Fraction of tokens whose ratio was clipped (below 1 − ε_low with A < 0, or above
    /// 1 + ε_high with A > 0).
    pub clip_fraction: f64,
    pub entropy: f64,
}

impl Model {
    /// The GRPO loss of a batch and the gradient of every parameter.
    pub fn grpo_gradients(
        &self,
        batch: &GrpoBatch<'_>,
        config: &GrpoConfig,
    ) -> Result<(GrpoStats, Gradients)> {
        let n_seq = batch.sequences.len();
        let ok = |x: f64| x.is_finite() && x >= 0.0;
        if !(ok(config.beta) && ok(config.epsilon_low) && ok(config.epsilon_high)) {
            return Err(Error::invalid(format!("invalid GRPO settings: {config:?}")));
        }
        if batch.advantages.len() != n_seq || batch.masks.len() != n_seq {
            return Err(Error::invalid(
                "one mask and one advantage per completion are required",
            ));
        }
        if batch.advantages.iter().any(|a| !a.is_finite()) {
            return Err(Error::invalid("advantages must be finite"));
        }
        if config.beta > 0.0 && batch.ref_logprobs.is_none() {
            return Err(Error::invalid(
                "beta > 0 needs the reference model's log-probs",
            ));
        }
        let counts: Vec<usize> = batch
            .masks
            .iter()
            .map(|m| m.iter().skip(1).filter(|&&x| x).count())
            .collect();
        for (name, rows) in [
            ("old log-probs", batch.old_logprobs),
            ("reference log-probs", batch.ref_logprobs),
        ] {
            if let Some(rows) = rows {
                if rows.len() != n_seq || rows.iter().zip(&counts).any(|(r, &n)| r.len() != n) {
                    return Err(Error::invalid(format!(
                        "{name} must have one value per response token"
                    )));
                }
                if rows.iter().flatten().any(|v| !v.is_finite()) {
                    return Err(Error::invalid(format!("{name} must be finite")));
                }
            }
        }
        if let Some(i) = counts.iter().position(|&n| n == 0) {
            return Err(Error::invalid(format!(
                "completion {i}'s mask selects no tokens"
            )));
        }
        let total: usize = counts.iter().sum();
        let longest = counts.iter().copied().max().unwrap_or(0);
        let (lo, hi) = (1.0 - config.epsilon_low, 1.0 + config.epsilon_high);
        let mut stats = GrpoStats::default();
        let mut objective = |out: &TokenOutputs| -> Result<(f64, TokenOutputGrads)> {
            let mut s = GrpoStats::default();
            let mut dlogp: Vec<Vec<f64>> = Vec::with_capacity(n_seq);
            for (i, logps) in out.logp.iter().enumerate() {
                let n_i = logps.len();
                // d(batch loss)/d(per-token loss) of this completion's tokens.
                let weight = match config.loss_type {
                    GrpoLossType::Grpo => 1.0 / (n_seq * n_i) as f64,
                    GrpoLossType::Bnpo => 1.0 / total as f64,
                    GrpoLossType::Dapo => 1.0 / config.dapo_tokens.unwrap_or(total).max(1) as f64,
                    GrpoLossType::DrGrpo => {
                        1.0 / (n_seq * config.max_completion_length.unwrap_or(longest).max(1))
                            as f64
                    }
                };
                let a = batch.advantages[i];
                let mut d = Vec::with_capacity(n_i);
                for (t, &logp) in logps.iter().enumerate() {
                    let old = batch.old_logprobs.map_or(logp, |o| o[i][t]);
                    let ratio = (logp - old).exp();
                    let clipped = ratio.clamp(lo, hi);
                    let (l1, l2) = (ratio * a, clipped * a);
                    let mut loss = -l1.min(l2);
                    // The unclipped branch carries the gradient unless the clipped one is
                    // strictly smaller (then the ratio is outside the range: no gradient).
                    let mut dl = if l2 < l1 { 0.0 } else { -a * ratio };
                    if (ratio < lo && a < 0.0) || (ratio > hi && a > 0.0) {
                        s.clip_fraction += 1.0 / total as f64;
                    }
                    if let Some(reference) = batch.ref_logprobs {
                        let delta = reference[i][t] - logp;
                        let kl = delta.exp() - delta - 1.0;
                        s.kl += kl / total as f64;
                        loss += config.beta * kl;
                        dl += config.beta * (1.0 - delta.exp());
                    }
                    s.loss += weight * loss;
                    s.entropy += out.entropy[i][t] / total as f64;
                    d.push(weight * dl);
                }
                dlogp.push(d);
            }
            stats = s;
            Ok((
                stats.loss,
                TokenOutputGrads {
                    logp: dlogp,
                    ..Default::default()
                },
            ))
        };
        let (_, grads) =
            self.token_objective_gradients(batch.sequences, batch.masks, &mut objective)?;
        Ok((stats, grads))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advantages_are_normalised_within_groups() {
        let a = group_advantages(&[1.0, 3.0, 5.0, 5.0], 2, true).unwrap();
        let s = 2f64.sqrt(); // unbiased std of {1, 3}
        assert!((a[0] + 1.0 / (s + 1e-4)).abs() < 1e-12);
        assert!((a[1] - 1.0 / (s + 1e-4)).abs() < 1e-12);
        assert_eq!(&a[2..], &[0.0, 0.0]);
        assert_eq!(
            group_advantages(&[1.0, 3.0], 2, false).unwrap(),
            vec![-1.0, 1.0]
        );
        assert!(group_advantages(&[1.0, 2.0], 1, true).is_err());
        assert!(group_advantages(&[1.0, 2.0, 3.0], 2, true).is_err());
        assert!(group_advantages(&[], 2, true).is_err());
    }
}
