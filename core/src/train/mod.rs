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

/// The precision of the training step's matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    /// f32 products: gradients match the f32 model exactly (the default).
    #[default]
    F32,
    /// bf16 operands with f32 sums for every linear layer and the LM head (PyTorch's bf16
    /// autocast on the linear layers, outputs kept in f32); f32 master weights, gradients and
    /// AdamW moments. About twice the product speed on CPUs with AVX-512-BF16; elsewhere the
    /// same arithmetic is emulated at f32 speed. CPU only.
    Bf16,
}

impl ComputeDtype {
    /// `"f32"` or `"bf16"`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" | "fp32" | "float32" => Ok(ComputeDtype::F32),
            "bf16" | "bfloat16" => Ok(ComputeDtype::Bf16),
            other => Err(Error::invalid(format!(
                "unknown compute dtype `{other}` (expected f32 or bf16)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ComputeDtype::F32 => "f32",
            ComputeDtype::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for ComputeDtype {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        ComputeDtype::parse(s)
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
    /// Precision of the forward/backward matrix products (master weights stay f32).
    pub compute: ComputeDtype,
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
            compute: ComputeDtype::F32,
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
    /// Values per trainable tensor, in `names` order.
    sizes: Vec<usize>,
    /// AdamW's moments on the host; on a CUDA model only the heads' (the backbone's entries
    /// are empty and its moments are in `device`).
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// On a CUDA model: the moments of the tensors the device holds, where their AdamW step
    /// runs.
    #[cfg(feature = "cuda")]
    device: Option<crate::backend::cuda::DeviceMoments>,
    /// How many leading tensors (in `names` order) live on the device (0 on the CPU); their
    /// host `m`/`v` entries are empty.
    on_device: usize,
    step: u64,
    skipped: u64,
    pending: Option<Pending>,
    /// bf16 copies of the weights for `ComputeDtype::Bf16`, made before the first gradient
    /// call and packed again (in the same memory) after the weights changed.
    bf16: Option<std::sync::Arc<crate::model::Bf16Weights>>,
    /// The copies hold the current weights.
    bf16_fresh: bool,
    /// Activation buffers kept between steps (lent to the model for each gradient call).
    buffers: Option<crate::model::TrainingBuffers>,
    /// Gradients of the last step, reused (zeroed) by the next: a CPU model only.
    spare_grads: Option<Gradients>,
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
        // On CUDA: gradients, the gradient norm and AdamW on the device for every tensor the
        // device holds (the backbone, or the LoRA adapters), the new values copied to the host
        // after each step; score and value heads on the host.
        config.validate()?;
        #[cfg(feature = "cuda")]
        if config.compute == ComputeDtype::Bf16 && model.cuda()?.is_some() {
            return Err(Error::invalid(
                "bf16 compute is a CPU training setting; a Trainer on a CUDA device trains in f32",
            ));
        }
        // Gradients and updates are f32; a model loaded with quantized blocks trains on their
        // f32 values.
        model.dequantize_weights();
        // The optimizer writes every trainable tensor: their private copies (of a mapped file,
        // or of values shared with another model) are made here, before any step's buffers
        // exist, instead of in the middle of the first update.
        for (t, _) in model.weights_mut().params_mut() {
            t.as_mut_slice();
        }
        let (names, sizes): (Vec<String>, Vec<usize>) = model
            .weights_mut()
            .named_params_mut()
            .iter()
            .map(|(n, t, _)| (n.clone(), t.as_slice().len()))
            .unzip();
        #[cfg(feature = "cuda")]
        model.use_f32_device_weights()?;
        model.sync_device()?;
        #[cfg(feature = "cuda")]
        let device = match model.cuda()? {
            Some(gpu) => Some(gpu.zero_moments()?),
            None => None,
        };
        #[cfg(feature = "cuda")]
        let on_device = device.as_ref().map_or(0, |d| d.tensor_count());
        #[cfg(not(feature = "cuda"))]
        let on_device = 0;
        let host_moments = || -> Vec<Vec<f32>> {
            sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| {
                    if i < on_device {
                        Vec::new()
                    } else {
                        crate::backend::cpu::zeroed(n)
                    }
                })
                .collect()
        };
        Ok(Trainer {
            names,
            m: host_moments(),
            v: host_moments(),
            sizes,
            #[cfg(feature = "cuda")]
            device,
            on_device,
            model,
            config,
            step: 0,
            skipped: 0,
            pending: None,
            bf16: None,
            bf16_fresh: false,
            buffers: None,
            spare_grads: None,
        })
    }

    /// Runs a gradient computation (`Model::sft_gradients`, `dpo_gradients`, …) on this
    /// trainer's model for [`Trainer::accumulate`] / [`Trainer::apply`]. The same as calling
    /// it on [`Trainer::model`], except that on a CUDA model the gradients stay on the device
    /// (the returned `Gradients` then hold only the score/value heads' values on the host),
    /// which saves copying them to the host and back.
    ///
    /// With `ComputeDtype::Bf16` the call's matrix products run on bf16 copies of the weights
    /// (made here when the weights changed since the last call); calls on [`Trainer::model`]
    /// stay f32.
    pub fn gradients_with<T>(&mut self, f: impl FnOnce(&Model) -> Result<T>) -> Result<T> {
        if self.config.compute == ComputeDtype::Bf16 && !self.bf16_fresh {
            // Only this trainer holds the copies between gradient calls, so they can be
            // refilled in place; a model changed through `model_mut` gets new ones.
            let refilled = match self.bf16.as_mut().and_then(std::sync::Arc::get_mut) {
                Some(w) => self.model.refill_bf16_weights(w),
                None => false,
            };
            if !refilled {
                self.bf16 = None;
                self.bf16 = Some(self.model.bf16_weights()?);
            }
            self.bf16_fresh = true;
        }
        self.model.set_bf16_compute(self.bf16.clone());
        let mut buffers = self.buffers.take().unwrap_or_default();
        buffers.grads = self.spare_grads.take();
        self.model.lend_training_buffers(buffers);
        // A panic in `f` (PyO3 turns it into an exception and the trainer lives on) must not
        // leave the model computing in bf16 or keeping the lent buffers.
        let on_device = {
            #[cfg(feature = "cuda")]
            {
                self.device.is_some()
            }
            #[cfg(not(feature = "cuda"))]
            {
                false
            }
        };
        let model = &mut self.model;
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            #[cfg(feature = "cuda")]
            {
                model.sync_device()?;
                model.set_gradients_on_device(on_device);
                let out = f(model);
                model.set_gradients_on_device(false);
                out
            }
            #[cfg(not(feature = "cuda"))]
            {
                let _ = on_device;
                f(model)
            }
        }));
        self.model.set_bf16_compute(None);
        if let Some(mut buffers) = self.model.reclaim_training_buffers() {
            self.spare_grads = buffers.grads.take();
            self.buffers = Some(buffers);
        }
        match out {
            Ok(out) => out,
            Err(panic) => {
                #[cfg(feature = "cuda")]
                self.model.set_gradients_on_device(false);
                std::panic::resume_unwind(panic)
            }
        }
    }

    /// Keeps `grads` (this trainer's layout) for the next gradient call to refill.
    fn recycle(&mut self, grads: Gradients) {
        // On a CUDA model the backbone's gradients live on the device; nothing to keep.
        if self.on_device == 0 {
            self.spare_grads = Some(grads);
        }
    }

    /// Frees the activation and gradient buffers kept between steps (they are made again by
    /// the next step). A Trainer keeps them so that each step refills the same memory; this
    /// returns it, e.g. before a long generation phase.
    pub fn release_buffers(&mut self) {
        self.buffers = None;
        self.spare_grads = None;
    }

    /// AdamW's moments of every trainable tensor (`(m, v)` in `params_mut` order), copied from
    /// the device where they live there.
    pub(crate) fn moments(&self) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
        // The device's tensors first (`on_device` of them), then the host's.
        #[cfg(feature = "cuda")]
        let mut out = match (&self.device, self.model.cuda()?) {
            (Some(d), Some(gpu)) => gpu.moments_to_host(d)?,
            (Some(_), None) => {
                return Err(Error::Cuda(
                    "internal: device moments without a device".into(),
                ))
            }
            _ => Vec::new(),
        };
        #[cfg(not(feature = "cuda"))]
        let mut out = Vec::new();
        if out.len() != self.on_device {
            return Err(Error::invalid("internal: device moments"));
        }
        for (m, v) in self.m.iter().zip(&self.v).skip(self.on_device) {
            out.push((m.clone(), v.clone()));
        }
        Ok(out)
    }

    /// Replaces the moments (`moments()`'s layout; sizes checked against the model).
    pub(crate) fn set_moments(&mut self, all: Vec<(Vec<f32>, Vec<f32>)>) -> Result<()> {
        if all.len() != self.sizes.len()
            || all
                .iter()
                .zip(&self.sizes)
                .any(|((m, v), &n)| m.len() != n || v.len() != n)
        {
            return Err(Error::invalid("optimizer state does not match the model"));
        }
        let mut all = all;
        let host = all.split_off(self.on_device);
        for (i, (m, v)) in host.into_iter().enumerate() {
            self.m[self.on_device + i] = m;
            self.v[self.on_device + i] = v;
        }
        #[cfg(feature = "cuda")]
        if let (Some(d), Some(gpu)) = (self.device.as_mut(), self.model.cuda()?) {
            gpu.moments_from_host(d, &all)?;
        }
        Ok(())
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The model, for changes outside the optimizer (e.g. a fresh head before training).
    pub fn model_mut(&mut self) -> &mut Model {
        // The weights may change (shapes too: LoRA, heads): the bf16 copies are refilled (or
        // made again, if shapes changed) before the next gradients, and gradients of the old
        // layout are not reused. The activation buffers fit any model.
        self.bf16_fresh = false;
        self.spare_grads = None;
        &mut self.model
    }

    pub fn into_model(self) -> Model {
        self.model
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Changes the precision of the next steps' products (e.g. the run's setting after
    /// [`Trainer::resume`], which restores the checkpoint's). CPU only for bf16.
    pub fn set_compute(&mut self, compute: ComputeDtype) -> Result<()> {
        #[cfg(feature = "cuda")]
        if compute == ComputeDtype::Bf16 && self.model.cuda()?.is_some() {
            return Err(Error::invalid(
                "bf16 compute is a CPU training setting; a Trainer on a CUDA device trains in f32",
            ));
        }
        self.config.compute = compute;
        Ok(())
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
        let (loss, grads) = self.gradients_with(|m| m.sft_gradients(sequences, masks))?;
        self.apply(loss, grads)
    }

    /// One reward-model step on pairs: `mean −log σ(r_chosen − r_rejected − margin)`.
    pub fn rm_step<S: AsRef<[u32]> + Sync>(
        &mut self,
        chosen: &[S],
        rejected: &[S],
        margin: f32,
    ) -> Result<(StepStats, crate::model::PairStats)> {
        let (pair, grads) =
            self.gradients_with(|m| m.reward_pair_gradients(chosen, rejected, margin))?;
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
        let (stats, grads) = self.gradients_with(|m| {
            m.dpo_gradients(
                chosen,
                chosen_masks,
                rejected,
                rejected_masks,
                ref_chosen,
                ref_rejected,
                beta,
                kind,
            )
        })?;
        Ok((self.apply(stats.loss, grads)?, stats))
    }

    /// One PPO step on a minibatch (see [`Model::ppo_gradients`]).
    pub fn ppo_step(
        &mut self,
        batch: &ppo::PpoMinibatch<'_>,
        config: &ppo::PpoConfig,
    ) -> Result<(StepStats, ppo::PpoStats)> {
        let (stats, grads) = self.gradients_with(|m| m.ppo_gradients(batch, config))?;
        Ok((self.apply(stats.loss, grads)?, stats))
    }

    /// One GRPO step (see [`Model::grpo_gradients`]).
    pub fn grpo_step(
        &mut self,
        batch: &grpo::GrpoBatch<'_>,
        config: &grpo::GrpoConfig,
    ) -> Result<(StepStats, grpo::GrpoStats)> {
        let (stats, grads) = self.gradients_with(|m| m.grpo_gradients(batch, config))?;
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
        #[cfg(feature = "cuda")]
        let mut grads = {
            self.model.sync_device()?;
            self.backbone_to_device(grads)?
        };
        #[cfg(not(feature = "cuda"))]
        let mut grads = grads;
        // The host part must match the host moments (all of them; on CUDA the heads').
        let flat = grads.flat();
        let host = &self.m[self.on_device..];
        if flat.len() != host.len() || flat.iter().zip(host).any(|(g, m)| g.len() != m.len()) {
            return Err(Error::invalid("gradients do not match this model"));
        }
        drop(flat);
        match self.pending.as_mut() {
            None => {
                if weight != 1.0 {
                    scale_gradients(&self.model, &mut grads, weight as f32)?;
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
                #[cfg(feature = "cuda")]
                if let (Some(acc), Some(g), Some(gpu)) = (
                    p.grads.device.as_mut(),
                    grads.device.as_ref(),
                    self.model.cuda()?,
                ) {
                    let acc = unshared(gpu, acc)?;
                    gpu.grads_axpy(acc, g, weight as f32)?;
                }
                p.loss += loss * weight;
                p.weight += weight;
                p.micro_batches += 1;
                self.recycle(grads);
            }
        }
        Ok(())
    }

    /// On a CUDA trainer: gradients whose backbone is on the host (computed outside
    /// [`Trainer::gradients_with`]) get it copied to the device, and the host copy dropped.
    #[cfg(feature = "cuda")]
    fn backbone_to_device(&self, grads: Gradients) -> Result<Gradients> {
        let Some(moments) = &self.device else {
            if grads.device.is_some() {
                return Err(Error::invalid(
                    "gradients on a CUDA device given to a trainer of a CPU model",
                ));
            }
            return Ok(grads);
        };
        let gpu = self
            .model
            .cuda()?
            .ok_or_else(|| Error::Cuda("internal: device moments without a device".into()))?;
        match &grads.device {
            Some(d) if d.tensor_count() == moments.tensor_count() => Ok(grads),
            Some(_) => Err(Error::invalid("gradients do not match this model")),
            None => {
                let d = gpu.upload_grads(&grads)?;
                let mut heads = Gradients::heads_only(&self.model);
                let (src, dst) = (grads.flat(), heads.flat_mut());
                // The host list is the device's tensors, then the heads'.
                if src.len() != d.tensor_count() + dst.len() {
                    return Err(Error::invalid("gradients do not match this model"));
                }
                for (to, from) in dst.into_iter().zip(&src[d.tensor_count()..]) {
                    if to.len() != from.len() {
                        return Err(Error::invalid("gradients do not match this model"));
                    }
                    to.copy_from_slice(from);
                }
                heads.device = Some(std::sync::Arc::new(d));
                Ok(heads)
            }
        }
    }

    /// Applies the accumulated micro-batches as one optimizer step (their weighted mean).
    pub fn step(&mut self) -> Result<StepStats> {
        let p = self
            .pending
            .take()
            .ok_or_else(|| Error::invalid("no gradients accumulated since the last step"))?;
        let mut grads = p.grads;
        if p.weight != 1.0 {
            scale_gradients(&self.model, &mut grads, (1.0 / p.weight) as f32)?;
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
        #[allow(unused_mut)]
        let mut norm_sq: f64 = flat
            .iter()
            .flat_map(|g| g.chunks(PARALLEL_CHUNK))
            .collect::<Vec<_>>()
            .par_iter()
            .map(|chunk| chunk.iter().map(|&g| g as f64 * g as f64).sum::<f64>())
            .collect::<Vec<f64>>()
            .iter()
            .sum();
        drop(flat);
        #[cfg(feature = "cuda")]
        if let (Some(d), Some(gpu)) = (grads.device.as_ref(), self.model.cuda()?) {
            norm_sq += gpu.grads_sum_squares(d)?;
        }
        let grad_norm = norm_sq.sqrt();
        if !(loss.is_finite() && grad_norm.is_finite()) {
            self.skipped += 1;
            self.recycle(grads);
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
        let t = (self.step + 1) as i32;
        let c = self.config.clone();
        let bias1 = 1.0 - (c.beta1 as f64).powi(t);
        let bias2 = 1.0 - (c.beta2 as f64).powi(t);
        let bias2_sqrt = bias2.sqrt() as f32;
        let step_size = (lr as f64 / bias1) as f32;
        // The host gradients are the tensors after the device's (all of them on the CPU), as
        // `accumulate` checked; checked again here, before anything moves.
        if grads.flat().len() != self.m.len() - self.on_device {
            return Err(Error::invalid("gradients do not match this model"));
        }
        // The weights change from here on: their bf16 copies (if any) are made again before the
        // next gradients — unless only LoRA adapters and heads train, which have none.
        if !self.model.weights().base_frozen() {
            self.bf16_fresh = false;
        }
        // The device's tensors first (their new values then copied to the host).
        #[cfg(feature = "cuda")]
        if let (Some(moments), Some(d)) = (self.device.as_mut(), grads.device.as_ref()) {
            let step = crate::backend::cuda::AdamStep {
                lr,
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.eps,
                weight_decay: c.weight_decay,
                bias1: bias1 as f32,
                bias2: bias2 as f32,
                grad_scale: clip,
            };
            self.model.device_adamw(moments, d, step)?;
        }
        let mut grads_flat = grads.flat_mut().into_iter();
        // On CUDA only the heads are updated here, and the device holds no copy of them.
        #[cfg(feature = "cuda")]
        let weights = if self.device.is_some() {
            self.model.head_weights_mut()
        } else {
            self.model.weights_mut()
        };
        #[cfg(not(feature = "cuda"))]
        let weights = self.model.weights_mut();
        let params = weights.params_mut();
        for (i, ((param, decay), (m, v))) in params
            .into_iter()
            .zip(self.m.iter_mut().zip(self.v.iter_mut()))
            .enumerate()
        {
            if i < self.on_device {
                continue; // updated on the device
            }
            let g = grads_flat
                .next()
                .ok_or_else(|| Error::invalid("gradients do not match this model"))?;
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
        drop(grads_flat);
        self.recycle(grads);
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

/// The device gradients for writing: a clone of the `Gradients` that hold them shares them, so
/// the first write gets its own device copy (copy on write, as the host vectors behave).
#[cfg(feature = "cuda")]
fn unshared<'a>(
    gpu: &crate::backend::cuda::CudaModel,
    d: &'a mut std::sync::Arc<crate::backend::cuda::DeviceGrads>,
) -> Result<&'a mut crate::backend::cuda::DeviceGrads> {
    if std::sync::Arc::get_mut(d).is_none() {
        *d = std::sync::Arc::new(gpu.grads_copy(d)?);
    }
    std::sync::Arc::get_mut(d)
        .ok_or_else(|| Error::Cuda("internal: shared device gradients".into()))
}

/// `grads *= a`, the host part and (on CUDA) the device part.
fn scale_gradients(model: &Model, grads: &mut Gradients, a: f32) -> Result<()> {
    for g in grads.flat_mut() {
        g.iter_mut().for_each(|x| *x *= a);
    }
    #[cfg(feature = "cuda")]
    if let (Some(d), Some(gpu)) = (grads.device.as_mut(), model.cuda()?) {
        gpu.grads_scale(unshared(gpu, d)?, a)?;
    }
    #[cfg(not(feature = "cuda"))]
    let _ = model;
    Ok(())
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
