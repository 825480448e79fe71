//! Training: AdamW with decoupled weight decay, learning-rate schedules, global grad-norm
//! clipping, and a guard that skips a step whose loss or gradients are not finite.
//!
//! A skipped step changes nothing: weights, moments, step counter and schedule position stay
//! as they were (a skipped step must not advance the scheduler either).

pub mod checkpoint;
pub mod dpo;
pub mod grpo;
pub mod ppo;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::{Gradients, Model};

/// Elements per task in the optimizer's elementwise loops and the gradient-norm sum.
const PARALLEL_CHUNK: usize = 1 << 16;

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

impl Schedule {
    /// The schedule of the `--warmup-steps` / `--total-steps` settings: warm-up + cosine when
    /// `total_steps > 0`, else constant.
    pub fn from_steps(warmup_steps: u64, total_steps: u64) -> Schedule {
        if total_steps > 0 {
            Schedule::WarmupCosine {
                warmup_steps,
                total_steps,
            }
        } else {
            Schedule::Constant
        }
    }
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
    pub(crate) fn validate(&self) -> Result<()> {
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

/// A model under training with its AdamW state (f32 moments, one per trainable value) and
/// any gradients accumulated towards the next step.
pub struct Trainer {
    model: Model,
    config: TrainConfig,
    /// Names of the trainable tensors, in `params_mut` order (keys of saved moments).
    names: Vec<String>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    step: u64,
    skipped: u64,
    pending: Option<Pending>,
}

/// Gradients accumulated over micro-batches: `Σ wᵢ·gᵢ`, `Σ wᵢ·lossᵢ` and `Σ wᵢ`.
struct Pending {
    grads: Gradients,
    loss: f64,
    weight: f64,
    micro_batches: usize,
}

impl Trainer {
    pub fn new(mut model: Model, config: TrainConfig) -> Result<Self> {
        // On CUDA: gradients on the device (full fine-tuning only), AdamW on the host, the
        // changed weights copied back to the device after each step (`Model::sync_device`).
        #[cfg(feature = "cuda")]
        model.require_cuda_trainable()?;
        config.validate()?;
        // Gradients and updates are f32; a model loaded with quantized blocks trains on their
        // f32 values.
        model.dequantize_weights();
        let (names, sizes): (Vec<String>, Vec<usize>) = model
            .weights_mut()
            .named_params_mut()
            .iter()
            .map(|(n, t, _)| (n.clone(), t.as_slice().len()))
            .unzip();
        model.sync_device()?;
        Ok(Trainer {
            names,
            m: sizes
                .iter()
                .map(|&n| crate::backend::cpu::zeroed(n))
                .collect(),
            v: sizes
                .iter()
                .map(|&n| crate::backend::cpu::zeroed(n))
                .collect(),
            model,
            config,
            step: 0,
            skipped: 0,
            pending: None,
        })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The model, for changes outside the optimizer (e.g. a fresh head before training).
    pub fn model_mut(&mut self) -> &mut Model {
        &mut self.model
    }

    pub fn into_model(self) -> Model {
        self.model
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    pub fn skipped_steps(&self) -> u64 {
        self.skipped
    }

    /// Micro-batches accumulated since the last step.
    pub fn pending_micro_batches(&self) -> usize {
        self.pending.as_ref().map_or(0, |p| p.micro_batches)
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

    /// One DPO step on preference pairs (see [`Model::dpo_gradients`]).
    #[allow(clippy::too_many_arguments)]
    pub fn dpo_step<S: AsRef<[u32]> + Sync>(
        &mut self,
        chosen: &[S],
        chosen_masks: &[Vec<bool>],
        rejected: &[S],
        rejected_masks: &[Vec<bool>],
        ref_chosen: &[f64],
        ref_rejected: &[f64],
        beta: f64,
        kind: dpo::DpoLoss,
    ) -> Result<(StepStats, dpo::DpoStats)> {
        let (stats, grads) = self.model.dpo_gradients(
            chosen,
            chosen_masks,
            rejected,
            rejected_masks,
            ref_chosen,
            ref_rejected,
            beta,
            kind,
        )?;
        Ok((self.apply(stats.loss, grads)?, stats))
    }

    /// One PPO step on a minibatch (see [`Model::ppo_gradients`]).
    pub fn ppo_step(
        &mut self,
        batch: &ppo::PpoMinibatch<'_>,
        config: &ppo::PpoConfig,
    ) -> Result<(StepStats, ppo::PpoStats)> {
        let (stats, grads) = self.model.ppo_gradients(batch, config)?;
        Ok((self.apply(stats.loss, grads)?, stats))
    }

    /// One GRPO step (see [`Model::grpo_gradients`]).
    pub fn grpo_step(
        &mut self,
        batch: &grpo::GrpoBatch<'_>,
        config: &grpo::GrpoConfig,
    ) -> Result<(StepStats, grpo::GrpoStats)> {
        let (stats, grads) = self.model.grpo_gradients(batch, config)?;
        Ok((self.apply(stats.loss, grads)?, stats))
    }

    /// Adds one micro-batch's loss and gradients with weight `weight` towards the next
    /// [`Trainer::step`], which applies their weighted mean. Weighting each micro-batch of a
    /// token-mean loss by its token count makes the step equal to one on the whole batch.
    pub fn accumulate(&mut self, loss: f64, grads: Gradients, weight: f64) -> Result<()> {
        if !(weight.is_finite() && weight > 0.0) {
            return Err(Error::invalid(format!(
                "micro-batch weight must be positive, got {weight}"
            )));
        }
        let flat = grads.flat();
        if flat.len() != self.m.len() || flat.iter().zip(&self.m).any(|(g, m)| g.len() != m.len()) {
            return Err(Error::invalid("gradients do not match this model"));
        }
        drop(flat);
        match self.pending.as_mut() {
            None => {
                let mut grads = grads;
                if weight != 1.0 {
                    for g in grads.flat_mut() {
                        g.iter_mut().for_each(|x| *x *= weight as f32);
                    }
                }
                self.pending = Some(Pending {
                    grads,
                    loss: loss * weight,
                    weight,
                    micro_batches: 1,
                });
            }
            Some(p) => {
                for (acc, g) in p.grads.flat_mut().into_iter().zip(grads.flat()) {
                    for (a, &x) in acc.iter_mut().zip(g) {
                        *a += weight as f32 * x;
                    }
                }
                p.loss += loss * weight;
                p.weight += weight;
                p.micro_batches += 1;
            }
        }
        Ok(())
    }

    /// Applies the accumulated micro-batches as one optimizer step (their weighted mean).
    pub fn step(&mut self) -> Result<StepStats> {
        let p = self
            .pending
            .take()
            .ok_or_else(|| Error::invalid("no gradients accumulated since the last step"))?;
        let mut grads = p.grads;
        if p.weight != 1.0 {
            let inv = (1.0 / p.weight) as f32;
            for g in grads.flat_mut() {
                g.iter_mut().for_each(|x| *x *= inv);
            }
        }
        self.update(p.loss / p.weight, grads)
    }

    /// Applies gradients computed elsewhere (for objectives built on `Model::*_gradients`) as
    /// one step; accumulated micro-batches, if any, are included.
    pub fn apply(&mut self, loss: f64, grads: Gradients) -> Result<StepStats> {
        self.accumulate(loss, grads, 1.0)?;
        self.step()
    }

    fn update(&mut self, loss: f64, mut grads: Gradients) -> Result<StepStats> {
        let lr = self.config.lr_at(self.step);
        // Shapes were checked by `accumulate`, the only way gradients reach here.
        let flat = grads.flat();
        // Fixed-size chunks summed in order: the same value on any number of threads.
        let norm_sq: f64 = flat
            .iter()
            .flat_map(|g| g.chunks(PARALLEL_CHUNK))
            .collect::<Vec<_>>()
            .par_iter()
            .map(|chunk| chunk.iter().map(|&g| g as f64 * g as f64).sum::<f64>())
            .collect::<Vec<f64>>()
            .iter()
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
        let bias2_sqrt = (1.0 - (c.beta2 as f64).powi(t)).sqrt() as f32;
        let step_size = (lr as f64 / bias1) as f32;
        let grads_flat: Vec<&mut [f32]> = grads.flat_mut();
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
            // Elementwise, so splitting it across threads changes no value.
            p.par_chunks_mut(PARALLEL_CHUNK)
                .zip(m.par_chunks_mut(PARALLEL_CHUNK))
                .zip(v.par_chunks_mut(PARALLEL_CHUNK))
                .zip(g.par_chunks(PARALLEL_CHUNK))
                .for_each(|(((p, m), v), g)| {
                    // In f32, as torch.optim.AdamW computes it (the bias corrections are
                    // Python floats applied to f32 tensors).
                    for (((p, m), v), &g) in p.iter_mut().zip(m).zip(v).zip(g) {
                        let gi = g * clip;
                        *m = c.beta1 * *m + (1.0 - c.beta1) * gi;
                        *v = c.beta2 * *v + (1.0 - c.beta2) * gi * gi;
                        let denom = v.sqrt() / bias2_sqrt + c.eps;
                        *p = *p * wd - step_size * *m / denom;
                    }
                });
        }
        self.step += 1;
        // A model on CUDA gets the new weights on the device before its next forward.
        self.model.sync_device()?;
        Ok(StepStats {
            loss,
            grad_norm,
            lr,
            skipped: false,
            step: self.step,
        })
    }
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
