//! Training: AdamW with decoupled weight decay, learning-rate schedules, global grad-norm
//! clipping, and a guard that skips a step whose loss or gradients are not finite.
//!
//! A skipped step changes nothing: weights, moments, step counter and schedule position stay
//! as they were (a skipped step must not advance the scheduler either).

pub mod dpo;
pub mod grpo;
pub mod ppo;

use crate::error::{Error, Result};
use crate::model::{Gradients, LinearGrad, Model, NormGrad};

/// Learning rate as a function of the step number.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    Constant,
    /// Linear warm-up from 0 over `warmup_steps`, then cosine decay to 0 at `total_steps`
    /// (transformers' `get_cosine_schedule_with_warmup`).
    WarmupCosine {
        warmup_steps: u64,
        total_steps: u64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay, applied to linear weights (not norms, biases or embeddings).
    pub weight_decay: f32,
    /// Clip the global L2 norm of all gradients to this value.
    pub max_grad_norm: Option<f32>,
    pub schedule: Schedule,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr: 1e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            schedule: Schedule::Constant,
        }
    }
}

impl TrainConfig {
    fn validate(&self) -> Result<()> {
        let ok = self.lr.is_finite()
            && self.lr >= 0.0
            && (0.0..1.0).contains(&self.beta1)
            && (0.0..1.0).contains(&self.beta2)
            && self.eps > 0.0
            && self.weight_decay >= 0.0
            && self.max_grad_norm.is_none_or(|m| m > 0.0);
        if !ok {
            return Err(Error::invalid(format!(
                "invalid training settings: {self:?}"
            )));
        }
        if let Schedule::WarmupCosine {
            warmup_steps,
            total_steps,
        } = self.schedule
        {
            if total_steps == 0 || warmup_steps > total_steps {
                return Err(Error::invalid(
                    "cosine schedule needs 0 ≤ warmup_steps ≤ total_steps, total_steps > 0",
                ));
            }
        }
        Ok(())
    }

    /// Learning rate of the step that follows `completed` steps.
    pub fn lr_at(&self, completed: u64) -> f32 {
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::WarmupCosine {
                warmup_steps,
                total_steps,
            } => {
                if completed < warmup_steps {
                    return self.lr * completed as f32 / warmup_steps.max(1) as f32;
                }
                let progress =
                    (completed - warmup_steps) as f64 / (total_steps - warmup_steps).max(1) as f64;
                let factor = 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos());
                (self.lr as f64 * factor) as f32
            }
        }
    }
}

/// What one step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStats {
    pub loss: f64,
    /// Global gradient L2 norm before clipping.
    pub grad_norm: f64,
    pub lr: f32,
    /// True when the loss or a gradient was not finite and nothing was updated.
    pub skipped: bool,
    /// Completed (not skipped) steps so far.
    pub step: u64,
}

/// A model under training with its AdamW state (f32 moments, one per parameter value).
pub struct Trainer {
    model: Model,
    config: TrainConfig,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    step: u64,
    skipped: u64,
}

impl Trainer {
    pub fn new(mut model: Model, config: TrainConfig) -> Result<Self> {
        config.validate()?;
        let sizes: Vec<usize> = model
            .weights_mut()
            .params_mut()
            .iter()
            .map(|(t, _)| t.as_slice().len())
            .collect();
        Ok(Trainer {
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            model,
            config,
            step: 0,
            skipped: 0,
        })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn into_model(self) -> Model {
        self.model
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    pub fn skipped_steps(&self) -> u64 {
        self.skipped
    }

    /// One supervised fine-tuning step on a batch (mean cross-entropy over masked tokens).
    pub fn sft_step<S: AsRef<[u32]> + Sync>(
        &mut self,
        sequences: &[S],
        masks: &[Vec<bool>],
    ) -> Result<StepStats> {
        let (loss, grads) = self.model.sft_gradients(sequences, masks)?;
        self.apply(loss, grads)
    }

    /// One reward-model step on pairs: `mean −log σ(r_chosen − r_rejected − margin)`.
    pub fn rm_step<S: AsRef<[u32]> + Sync>(
        &mut self,
        chosen: &[S],
        rejected: &[S],
        margin: f32,
    ) -> Result<(StepStats, crate::model::PairStats)> {
        let (pair, grads) = self.model.reward_pair_gradients(chosen, rejected, margin)?;
        Ok((self.apply(pair.loss, grads)?, pair))
    }

    /// Applies gradients computed elsewhere (for objectives built on `Model::*_gradients`).
    pub fn apply(&mut self, loss: f64, mut grads: Gradients) -> Result<StepStats> {
        let lr = self.config.lr_at(self.step);
        let flat = grads.flat();
        if flat.len() != self.m.len() {
            return Err(Error::invalid("gradients do not match this model"));
        }
        let norm_sq: f64 = flat
            .iter()
            .flat_map(|g| g.iter())
            .map(|&g| g as f64 * g as f64)
            .sum();
        let grad_norm = norm_sq.sqrt();
        if !(loss.is_finite() && grad_norm.is_finite()) {
            self.skipped += 1;
            return Ok(StepStats {
                loss,
                grad_norm,
                lr,
                skipped: true,
                step: self.step,
            });
        }
        // torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is < 1.
        let clip = match self.config.max_grad_norm {
            Some(max) => ((max as f64) / (grad_norm + 1e-6)).min(1.0) as f32,
            None => 1.0,
        };
        drop(flat);
        let t = (self.step + 1) as i32;
        let c = &self.config;
        let bias1 = 1.0 - (c.beta1 as f64).powi(t);
        let bias2_sqrt = (1.0 - (c.beta2 as f64).powi(t)).sqrt();
        let step_size = (lr as f64 / bias1) as f32;
        let grads_flat: Vec<&mut [f32]> = flat_mut(&mut grads);
        let params = self.model.weights_mut().params_mut();
        for (((param, decay), g), (m, v)) in params
            .into_iter()
            .zip(grads_flat)
            .zip(self.m.iter_mut().zip(self.v.iter_mut()))
        {
            let p = param.as_mut_slice();
            let wd = if decay {
                1.0 - lr * c.weight_decay
            } else {
                1.0
            };
            for i in 0..p.len() {
                let gi = g[i] * clip;
                m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * gi;
                v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * gi * gi;
                let denom = (v[i].sqrt() as f64 / bias2_sqrt) as f32 + c.eps;
                p[i] = p[i] * wd - step_size * m[i] / denom;
            }
        }
        self.step += 1;
        Ok(StepStats {
            loss,
            grad_norm,
            lr,
            skipped: false,
            step: self.step,
        })
    }
}

/// Mutable views of every gradient, in `Gradients::flat` order.
fn flat_mut(g: &mut Gradients) -> Vec<&mut [f32]> {
    fn lin<'a>(l: &'a mut LinearGrad, out: &mut Vec<&'a mut [f32]>) {
        out.push(&mut l.w);
        if let Some(b) = l.b.as_mut() {
            out.push(b);
        }
        if let Some(lg) = l.lora.as_mut() {
            out.push(&mut lg.a);
            out.push(&mut lg.b);
        }
    }
    fn norm<'a>(n: &'a mut NormGrad, out: &mut Vec<&'a mut [f32]>) {
        out.push(&mut n.w);
        if let Some(b) = n.b.as_mut() {
            out.push(b);
        }
    }
    let mut out: Vec<&mut [f32]> = vec![&mut g.tok_emb];
    if let Some(p) = g.pos_emb.as_mut() {
        out.push(p);
    }
    for l in &mut g.layers {
        norm(&mut l.attn_norm, &mut out);
        for g in [&mut l.q, &mut l.k, &mut l.v, &mut l.o] {
            lin(g, &mut out);
        }
        norm(&mut l.mlp_norm, &mut out);
        for g in &mut l.mlp {
            lin(g, &mut out);
        }
    }
    norm(&mut g.final_norm, &mut out);
    if let Some(h) = g.lm_head.as_mut() {
        out.push(h);
    }
    if let Some(h) = g.score.as_mut() {
        out.push(h);
    }
    if let Some(v) = g.value.as_mut() {
        lin(v, &mut out);
    }
    out.retain(|g| !g.is_empty());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_cosine_matches_transformers_formula() {
        let c = TrainConfig {
            lr: 1.0,
            schedule: Schedule::WarmupCosine {
                warmup_steps: 2,
                total_steps: 10,
            },
            ..Default::default()
        };
        assert_eq!(c.lr_at(0), 0.0);
        assert_eq!(c.lr_at(1), 0.5);
        assert_eq!(c.lr_at(2), 1.0);
        assert!((c.lr_at(6) - 0.5).abs() < 1e-6);
        assert!(c.lr_at(10).abs() < 1e-6);
        assert!(TrainConfig {
            beta1: 1.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(TrainConfig {
            schedule: Schedule::WarmupCosine {
                warmup_steps: 5,
                total_steps: 2
            },
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}
