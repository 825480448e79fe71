//! PPO for language models, as InstructGPT and TRL's `PPOTrainer` compute it.
//!
//! Stage one, once per rollout batch ([`ppo_advantages`]): per-token rewards are the KL
//! penalty `−kl_coef · (logπ_old − logπ_ref)`, with the reward model's score added at each
//! response's last token; GAE(γ, λ) over the rollout's values gives advantages, `returns =
//! advantages + values`, and the advantages are whitened over every token of the batch.
//!
//! Stage two, for each minibatch of each PPO epoch ([`Model::ppo_gradients`]), all means over
//! the minibatch's response tokens:
//! - policy: `mean max(−A·r, −A·clip(r, 1 − ε, 1 + ε))`, `r = exp(logπ − logπ_old)`;
//! - value: `½ mean max((V − R)², (V_clip − R)²)`, `V_clip = V_old + clip(V − V_old, ±ε_v)`;
//! - loss = policy + `vf_coef`·value − `entropy_coef`·mean entropy.

use crate::error::{Error, Result};
use crate::model::{Gradients, Model, TokenOutputGrads, TokenOutputs};

#[derive(Debug, Clone, PartialEq)]
pub struct PpoConfig {
    /// ε of the clipped surrogate.
    pub clip_range: f64,
    /// ε_v of the clipped value loss.
    pub clip_range_value: f64,
    pub vf_coef: f64,
    /// Weight of the entropy bonus (0 turns it off).
    pub entropy_coef: f64,
    pub gamma: f64,
    pub lam: f64,
    /// Coefficient of the per-token KL penalty folded into the rewards.
    pub kl_coef: f64,
    pub whiten_advantages: bool,
}

impl Default for PpoConfig {
    /// TRL's defaults.
    fn default() -> Self {
        PpoConfig {
            clip_range: 0.2,
            clip_range_value: 0.2,
            vf_coef: 0.1,
            entropy_coef: 0.0,
            gamma: 1.0,
            lam: 0.95,
            kl_coef: 0.05,
            whiten_advantages: true,
        }
    }
}

impl PpoConfig {
    fn validate(&self) -> Result<()> {
        let fine = |x: f64| x.is_finite() && x >= 0.0;
        let ok = fine(self.clip_range)
            && fine(self.clip_range_value)
            && fine(self.vf_coef)
            && fine(self.entropy_coef)
            && fine(self.kl_coef)
            && (0.0..=1.0).contains(&self.gamma)
            && (0.0..=1.0).contains(&self.lam);
        if ok {
            Ok(())
        } else {
            Err(Error::invalid(format!("invalid PPO settings: {self:?}")))
        }
    }
}

/// Per-token rewards, advantages and returns of a rollout batch (one inner vector per
/// response, one entry per response token).
#[derive(Debug, Clone, PartialEq)]
pub struct Advantages {
    pub rewards: Vec<Vec<f64>>,
    pub advantages: Vec<Vec<f64>>,
    pub returns: Vec<Vec<f64>>,
    /// Mean over responses of `Σ_t (logπ_old − logπ_ref)`: the KL to the reference.
    pub kl: f64,
}

/// Checks that `rows` has one inner vector per response with the lengths of `like`.
fn check_ragged(name: &str, rows: &[Vec<f64>], like: &[Vec<f64>]) -> Result<()> {
    if rows.len() != like.len() || rows.iter().zip(like).any(|(a, b)| a.len() != b.len()) {
        return Err(Error::invalid(format!(
            "{name} must have one value per response token, shaped like the log-probs"
        )));
    }
    if rows.iter().flatten().any(|v| !v.is_finite()) {
        return Err(Error::invalid(format!("{name} must be finite")));
    }
    Ok(())
}

/// Stage one of PPO: KL-penalised rewards, GAE advantages (whitened when configured) and
/// returns, from the rollout's log-probs, the reference's log-probs, the rollout's values and
/// one reward-model score per response.
pub fn ppo_advantages(
    old_logprobs: &[Vec<f64>],
    ref_logprobs: &[Vec<f64>],
    old_values: &[Vec<f64>],
    scores: &[f64],
    config: &PpoConfig,
) -> Result<Advantages> {
    config.validate()?;
    if old_logprobs.is_empty() || old_logprobs.iter().any(Vec::is_empty) {
        return Err(Error::invalid("every response needs at least one token"));
    }
    check_ragged("old log-probs", old_logprobs, old_logprobs)?;
    check_ragged("reference log-probs", ref_logprobs, old_logprobs)?;
    check_ragged("old values", old_values, old_logprobs)?;
    if scores.len() != old_logprobs.len() || scores.iter().any(|s| !s.is_finite()) {
        return Err(Error::invalid("one finite score per response is required"));
    }
    let (mut rewards, mut advantages, mut returns) = (Vec::new(), Vec::new(), Vec::new());
    let mut kl = 0.0;
    for (((old, reference), values), &score) in old_logprobs
        .iter()
        .zip(ref_logprobs)
        .zip(old_values)
        .zip(scores)
    {
        let mut r: Vec<f64> = old
            .iter()
            .zip(reference)
            .map(|(o, p)| -config.kl_coef * (o - p))
            .collect();
        kl += old.iter().zip(reference).map(|(o, p)| o - p).sum::<f64>();
        if let Some(last) = r.last_mut() {
            *last += score;
        }
        let n = r.len();
        let mut adv = vec![0.0; n];
        let mut running = 0.0;
        for t in (0..n).rev() {
            let next = if t + 1 < n { values[t + 1] } else { 0.0 };
            let delta = r[t] + config.gamma * next - values[t];
            running = delta + config.gamma * config.lam * running;
            adv[t] = running;
        }
        returns.push(adv.iter().zip(values).map(|(a, v)| a + v).collect());
        advantages.push(adv);
        rewards.push(r);
    }
    if config.whiten_advantages {
        whiten(&mut advantages);
    }
    Ok(Advantages {
        rewards,
        advantages,
        returns,
        kl: kl / old_logprobs.len() as f64,
    })
}

/// `(x − mean) / sqrt(var + 1e-8)` over all entries, with the unbiased variance (TRL's
/// `masked_whiten`). Fewer than two entries are left as they are.
fn whiten(rows: &mut [Vec<f64>]) {
    let n = rows.iter().map(Vec::len).sum::<usize>();
    if n < 2 {
        return;
    }
    let mean = rows.iter().flatten().sum::<f64>() / n as f64;
    let var = rows
        .iter()
        .flatten()
        .map(|x| (x - mean).powi(2))
        .sum::<f64>()
        / (n - 1) as f64;
    let scale = 1.0 / (var + 1e-8).sqrt();
    for x in rows.iter_mut().flatten() {
        *x = (*x - mean) * scale;
    }
}

/// A PPO minibatch: the sampled sequences with their response masks and what the rollout
/// recorded for each response token.
#[derive(Debug, Clone, Copy)]
pub struct PpoMinibatch<'a> {
    pub sequences: &'a [Vec<u32>],
    pub masks: &'a [Vec<bool>],
    pub old_logprobs: &'a [Vec<f64>],
    pub old_values: &'a [Vec<f64>],
    pub advantages: &'a [Vec<f64>],
    pub returns: &'a [Vec<f64>],
}

/// What one PPO minibatch step saw (means over its response tokens).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PpoStats {
    pub loss: f64,
    pub policy_loss: f64,
    pub value_loss: f64,
    pub entropy: f64,
    /// `½ mean (logπ − logπ_old)²`.
    pub approx_kl: f64,
    /// Fraction of tokens whose policy term was clipped.
    pub clip_fraction: f64,
    /// Fraction of tokens whose value term was clipped.
    pub value_clip_fraction: f64,
    pub mean_ratio: f64,
}

impl Model {
    /// Stage two of PPO on one minibatch: the loss and the gradient of every parameter,
    /// value head included (the model needs one: [`Model::add_value_head`]).
    pub fn ppo_gradients(
        &self,
        batch: &PpoMinibatch<'_>,
        config: &PpoConfig,
    ) -> Result<(PpoStats, Gradients)> {
        config.validate()?;
        if self.weights().value.is_none() {
            return Err(Error::invalid(
                "PPO needs a value head (call add_value_head or load one)",
            ));
        }
        let n_seq = batch.sequences.len();
        if batch.masks.len() != n_seq || batch.old_logprobs.len() != n_seq {
            return Err(Error::invalid(
                "one mask and one row of old log-probs per sequence are required",
            ));
        }
        for (i, (mask, old)) in batch.masks.iter().zip(batch.old_logprobs).enumerate() {
            let selected = mask.iter().skip(1).filter(|&&m| m).count();
            if selected != old.len() {
                return Err(Error::invalid(format!(
                    "sequence {i}: its mask selects {selected} tokens but {} old log-probs \
                     were given",
                    old.len()
                )));
            }
        }
        check_ragged("old log-probs", batch.old_logprobs, batch.old_logprobs)?;
        check_ragged("old values", batch.old_values, batch.old_logprobs)?;
        check_ragged("advantages", batch.advantages, batch.old_logprobs)?;
        check_ragged("returns", batch.returns, batch.old_logprobs)?;
        let mut stats = PpoStats::default();
        let (eps, eps_v) = (config.clip_range, config.clip_range_value);
        let mut objective = |out: &TokenOutputs| -> Result<(f64, TokenOutputGrads)> {
            let values = out
                .value
                .as_ref()
                .ok_or_else(|| Error::invalid("the model produced no values"))?;
            let n = out.logp.iter().map(Vec::len).sum::<usize>() as f64;
            let zeros =
                || -> Vec<Vec<f64>> { out.logp.iter().map(|l| vec![0.0; l.len()]).collect() };
            let (mut dlogp, mut dvalue) = (zeros(), zeros());
            let mut s = PpoStats::default();
            for i in 0..out.logp.len() {
                for t in 0..out.logp[i].len() {
                    let (a, old) = (batch.advantages[i][t], batch.old_logprobs[i][t]);
                    let diff = out.logp[i][t] - old;
                    let ratio = diff.exp();
                    let clipped = ratio.clamp(1.0 - eps, 1.0 + eps);
                    let (pg1, pg2) = (-a * ratio, -a * clipped);
                    s.policy_loss += pg1.max(pg2) / n;
                    s.approx_kl += 0.5 * diff * diff / n;
                    s.mean_ratio += ratio / n;
                    if pg2 > pg1 {
                        s.clip_fraction += 1.0 / n;
                    } else {
                        dlogp[i][t] = -a * ratio / n;
                    }
                    let (v, v_old, ret) =
                        (values[i][t], batch.old_values[i][t], batch.returns[i][t]);
                    let v_clip = v_old + (v - v_old).clamp(-eps_v, eps_v);
                    let (vf1, vf2) = ((v - ret).powi(2), (v_clip - ret).powi(2));
                    s.value_loss += 0.5 * vf1.max(vf2) / n;
                    if vf2 > vf1 {
                        s.value_clip_fraction += 1.0 / n;
                        // V_clip moves with V only inside the clip range.
                        if (v - v_old).abs() < eps_v {
                            dvalue[i][t] = config.vf_coef * (v_clip - ret) / n;
                        }
                    } else {
                        dvalue[i][t] = config.vf_coef * (v - ret) / n;
                    }
                    s.entropy += out.entropy[i][t] / n;
                }
            }
            s.loss =
                s.policy_loss + config.vf_coef * s.value_loss - config.entropy_coef * s.entropy;
            let dentropy = (config.entropy_coef != 0.0).then(|| {
                out.logp
                    .iter()
                    .map(|l| vec![-config.entropy_coef / n; l.len()])
                    .collect()
            });
            stats = s;
            Ok((
                stats.loss,
                TokenOutputGrads {
                    logp: dlogp,
                    entropy: dentropy,
                    value: Some(dvalue),
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
    fn gae_without_discount_sums_future_rewards() {
        let cfg = PpoConfig {
            kl_coef: 0.0,
            gamma: 1.0,
            lam: 1.0,
            whiten_advantages: false,
            ..Default::default()
        };
        let adv = ppo_advantages(
            &[vec![0.0, 0.0, 0.0]],
            &[vec![0.0, 0.0, 0.0]],
            &[vec![0.5, 0.25, 1.0]],
            &[2.0],
            &cfg,
        )
        .unwrap();
        // With λ = γ = 1, A_t = score − V_t and the return is the score everywhere.
        assert_eq!(adv.advantages[0], vec![1.5, 1.75, 1.0]);
        assert_eq!(adv.returns[0], vec![2.0, 2.0, 2.0]);
        assert!(ppo_advantages(&[vec![0.0]], &[vec![0.0]], &[vec![]], &[1.0], &cfg).is_err());
        assert!(ppo_advantages(&[vec![0.0]], &[vec![0.0]], &[vec![0.0]], &[], &cfg).is_err());
        assert!(ppo_advantages(&[], &[], &[], &[], &cfg).is_err());
    }

    #[test]
    fn whitening_gives_zero_mean_unit_variance() {
        let mut rows = vec![vec![1.0, 2.0], vec![3.0, 4.0, 10.0]];
        whiten(&mut rows);
        let all: Vec<f64> = rows.concat();
        let mean = all.iter().sum::<f64>() / 5.0;
        let var = all.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 4.0;
        assert!(mean.abs() < 1e-12 && (var - 1.0).abs() < 1e-6);
    }
}
