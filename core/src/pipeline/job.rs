//! An on-policy run (PPO or GRPO) described as plain data: every setting of `rlx ppo` /
//! `rlx grpo`, resolved. The CLI builds one from its flags and config file; `rlx.distributed`
//! receives the same JSON. Both then run [`OnPolicyJob::run`], so a run on Ray workers and a
//! run in one process share every line that decides a number: model preparation, prompt
//! order, the update, checkpoints. Workers build their models with
//! [`OnPolicyJob::worker_models`] and take the learner's weights as [`policy_state`] bytes.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::data::{load, BadLine, Formatter, Prompt};
use super::rollout::{
    self, collect_samples, AdaptiveKl, Collector, LocalCollector, OnPolicy, Reward, RolloutOptions,
    RolloutRequest, Sample,
};
use super::{latest_checkpoint, Observer, StageReport};
use crate::error::{Error, Result};
use crate::model::{LoadOptions, LoraConfig, Model};
use crate::train::grpo::{GrpoConfig, GrpoLossType};
use crate::train::ppo::PpoConfig;
use crate::train::{ComputeDtype, Schedule, TrainConfig, Trainer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnPolicyStage {
    Ppo,
    Grpo,
}

/// Every setting of an on-policy run. Field names are the CLI's flag names with `_`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OnPolicyJob {
    pub stage: OnPolicyStage,
    /// The policy to start from (HF folder or GGUF).
    pub model: PathBuf,
    /// Prompts (JSONL).
    pub data: PathBuf,
    /// The reward model (a folder with a score head).
    pub reward_model: PathBuf,
    pub out: PathBuf,
    pub threads: usize,
    pub resume: bool,
    pub skip_bad_lines: bool,
    pub chat_template: bool,
    pub max_len: usize,
    pub gradient_checkpointing: bool,
    /// Precision of the learner's matrix products (`f32` or `bf16`).
    pub compute: ComputeDtype,
    pub seed: u64,
    pub save_every: u64,
    pub lr: f32,
    pub weight_decay: f32,
    pub warmup_steps: u64,
    /// Cosine decay over this many steps (0: constant).
    pub total_steps: u64,
    pub max_grad_norm: f32,
    /// LoRA rank (0: full fine-tuning).
    pub lora_rank: usize,
    /// Default 2 × rank.
    pub lora_alpha: Option<f32>,
    pub lora_targets: Vec<String>,
    pub iterations: usize,
    pub prompts_per_iteration: usize,
    /// Default 1 for PPO, 4 for GRPO.
    pub samples_per_prompt: Option<usize>,
    pub max_new_tokens: usize,
    pub ppo_epochs: usize,
    pub minibatch_size: usize,
    pub kl_coef: f64,
    /// Adapt the KL coefficient towards this KL (0: fixed).
    pub target_kl: f64,
    pub clip_range: f64,
    pub vf_coef: f64,
    pub entropy_coef: f64,
    pub gamma: f64,
    pub lam: f64,
    /// GRPO's KL weight (0: no reference model).
    pub beta: f64,
    /// GRPO: grpo, bnpo, dr_grpo or dapo.
    pub loss_type: String,
}

impl Default for OnPolicyJob {
    fn default() -> Self {
        let ppo = PpoConfig::default();
        OnPolicyJob {
            stage: OnPolicyStage::Ppo,
            model: PathBuf::new(),
            data: PathBuf::new(),
            reward_model: PathBuf::new(),
            out: PathBuf::new(),
            threads: 0,
            resume: false,
            skip_bad_lines: false,
            chat_template: true,
            max_len: 512,
            gradient_checkpointing: false,
            compute: ComputeDtype::F32,
            seed: 0,
            save_every: 0,
            lr: 1e-6,
            weight_decay: 0.0,
            warmup_steps: 0,
            total_steps: 0,
            max_grad_norm: 1.0,
            lora_rank: 0,
            lora_alpha: None,
            lora_targets: vec!["q_proj".into(), "v_proj".into()],
            iterations: 10,
            prompts_per_iteration: 4,
            samples_per_prompt: None,
            max_new_tokens: 32,
            ppo_epochs: 2,
            minibatch_size: 4,
            kl_coef: ppo.kl_coef,
            target_kl: 0.0,
            clip_range: ppo.clip_range,
            vf_coef: ppo.vf_coef,
            entropy_coef: ppo.entropy_coef,
            gamma: ppo.gamma,
            lam: ppo.lam,
            beta: 0.04,
            loss_type: "dapo".into(),
        }
    }
}

/// What a rollout worker holds: the policy (its weights replaced by the learner's before each
/// rollout), the reference and the reward model.
pub struct WorkerModels {
    pub policy: Model,
    pub reference: Option<Model>,
    pub reward: Model,
}

impl WorkerModels {
    /// Takes the learner's trainable tensors ([`policy_state`]).
    pub fn load_policy_state(&mut self, state: &[u8]) -> Result<()> {
        load_policy_state(&mut self.policy, state)
    }

    /// Samples and scores this worker's share of a rollout.
    pub fn collect(&self, request: &RolloutRequest) -> Result<Vec<Sample>> {
        collect_samples(
            &self.policy,
            self.reference.as_ref(),
            &Reward::Model(&self.reward),
            request,
        )
    }
}

impl OnPolicyJob {
    pub fn from_json(text: &str) -> Result<OnPolicyJob> {
        serde_json::from_str(text).map_err(|e| Error::invalid(format!("on-policy job: {e}")))
    }

    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string(self).map_err(|e| Error::invalid(format!("on-policy job: {e}")))
    }

    fn load_options(&self) -> LoadOptions {
        LoadOptions {
            threads: self.threads,
            ..Default::default()
        }
    }

    fn load(&self, path: &std::path::Path) -> Result<Model> {
        Model::load(path, self.load_options())
    }

    pub fn lora(&self) -> Option<LoraConfig> {
        (self.lora_rank > 0).then(|| LoraConfig {
            rank: self.lora_rank,
            alpha: self.lora_alpha.unwrap_or(2.0 * self.lora_rank as f32),
            target_modules: self.lora_targets.clone(),
            seed: self.seed,
        })
    }

    pub fn train_config(&self) -> TrainConfig {
        TrainConfig {
            lr: self.lr,
            weight_decay: self.weight_decay,
            max_grad_norm: Some(self.max_grad_norm),
            schedule: Schedule::from_steps(self.warmup_steps, self.total_steps),
            compute: self.compute,
            ..Default::default()
        }
    }

    pub fn rollout_options(&self) -> RolloutOptions {
        RolloutOptions {
            out: self.out.clone(),
            iterations: self.iterations,
            prompts_per_iteration: self.prompts_per_iteration,
            samples_per_prompt: self.samples_per_prompt.unwrap_or(match self.stage {
                OnPolicyStage::Ppo => 1,
                OnPolicyStage::Grpo => 4,
            }),
            max_new_tokens: self.max_new_tokens,
            epochs: self.ppo_epochs,
            minibatch_size: self.minibatch_size,
            save_every: self.save_every,
            seed: self.seed,
        }
    }

    pub fn ppo_config(&self) -> PpoConfig {
        PpoConfig {
            clip_range: self.clip_range,
            vf_coef: self.vf_coef,
            entropy_coef: self.entropy_coef,
            gamma: self.gamma,
            lam: self.lam,
            kl_coef: self.kl_coef,
            whiten_advantages: true,
            ..PpoConfig::default()
        }
    }

    pub fn grpo_config(&self) -> Result<GrpoConfig> {
        let loss_type = match self.loss_type.as_str() {
            "grpo" => GrpoLossType::Grpo,
            "bnpo" => GrpoLossType::Bnpo,
            "dr_grpo" => GrpoLossType::DrGrpo,
            "dapo" => GrpoLossType::Dapo,
            other => {
                return Err(Error::invalid(format!(
                    "unknown GRPO loss type `{other}` (grpo, bnpo, dr_grpo, dapo)"
                )))
            }
        };
        Ok(GrpoConfig {
            beta: self.beta,
            epsilon_low: self.clip_range,
            epsilon_high: self.clip_range,
            loss_type,
            max_completion_length: Some(self.max_new_tokens),
            ..Default::default()
        })
    }

    /// Whether the rollouts need reference log-probs.
    fn wants_reference(&self) -> bool {
        self.stage == OnPolicyStage::Ppo || self.beta > 0.0
    }

    /// The starting policy as both the learner and the workers build it from the loaded
    /// `model`: a value head for PPO (drawn from the run's seed), LoRA adapters when asked.
    fn initial_policy(&self, mut model: Model) -> Result<Model> {
        if self.stage == OnPolicyStage::Ppo && model.weights().value.is_none() {
            model.add_value_head(self.seed);
        }
        if let Some(l) = self.lora() {
            model.attach_lora(&l)?;
        }
        Ok(model)
    }

    fn reward_model(&self) -> Result<Model> {
        let rm = self.load(&self.reward_model)?;
        if rm.weights().score.is_none() {
            return Err(Error::invalid(format!(
                "{} has no score head: train one with `rlx rm` and pass its OUT/model",
                self.reward_model.display()
            )));
        }
        Ok(rm)
    }

    /// A rollout worker's models. The reference is the loaded model itself, sharing its weights
    /// with the policy (a policy tensor the learner's state overwrites is copied on write).
    pub fn worker_models(&self) -> Result<WorkerModels> {
        let base = self.load(&self.model)?;
        let reference = self.wants_reference().then(|| base.clone());
        Ok(WorkerModels {
            policy: self.initial_policy(base)?,
            reference,
            reward: self.reward_model()?,
        })
    }

    /// The learner: a fresh trainer, or the newest checkpoint with `resume`, and its run state.
    fn trainer(&self, observer: &mut dyn Observer) -> Result<(Trainer, Option<Value>)> {
        if self.resume {
            if let Some(ck) = latest_checkpoint(&self.out) {
                observer.message(&format!("resuming from {}", ck.display()));
                let (mut t, extra) = Trainer::resume(&ck, self.load_options())?;
                t.model_mut()
                    .set_gradient_checkpointing(self.gradient_checkpointing);
                t.set_compute(self.compute)?;
                return Ok((t, Some(extra)));
            }
            observer.message(&format!(
                "no checkpoint in {}; starting fresh",
                self.out.display()
            ));
        } else if latest_checkpoint(&self.out).is_some() || self.out.join("model").exists() {
            return Err(Error::invalid(format!(
                "{} already holds a run: pass --resume to continue it, or choose another --out",
                self.out.display()
            )));
        }
        let mut model = self.initial_policy(self.load(&self.model)?)?;
        model.set_gradient_checkpointing(self.gradient_checkpointing);
        Ok((Trainer::new(model, self.train_config())?, None))
    }

    /// The run's prompts and the dataset lines left out.
    fn prompts(&self, policy: &Model) -> Result<(Vec<Prompt>, Vec<BadLine>)> {
        let chat = self.chat_template && policy.chat_template().is_some();
        let f = Formatter::new(policy, chat, self.max_len)?;
        load(&self.data, self.skip_bad_lines, |v| f.prompt(v))
    }

    /// Runs the stage. With `collector` (e.g. Ray workers) rollouts are made there; without,
    /// in this process with the reference and reward models loaded here.
    pub fn run(
        &self,
        collector: Option<&mut dyn Collector>,
        observer: &mut dyn Observer,
    ) -> Result<StageReport> {
        let grpo = match self.stage {
            OnPolicyStage::Grpo => Some(self.grpo_config()?),
            OnPolicyStage::Ppo => None,
        };
        let (mut trainer, extra) = self.trainer(observer)?;
        let (prompts, bad) = self.prompts(trainer.model())?;
        for b in &bad {
            observer.message(&format!(
                "{}: skipped line {}: {}",
                self.data.display(),
                b.line,
                b.message
            ));
        }
        let job = OnPolicy {
            prompts: &prompts,
            monitor: None,
            options: self.rollout_options(),
        };
        let local_models;
        let mut local;
        let collector: &mut dyn Collector = match collector {
            Some(c) => c,
            None => {
                let reference = if !self.wants_reference() {
                    None
                } else if extra.is_some() {
                    // Resumed: the reference is the model the run started from.
                    Some(self.load(&self.model)?)
                } else {
                    Some(trainer.model().without_lora())
                };
                local_models = (reference, self.reward_model()?);
                local = LocalCollector {
                    reference: local_models.0.as_ref(),
                    reward: Reward::Model(&local_models.1),
                };
                &mut local
            }
        };
        match grpo {
            None => {
                let adaptive = (self.target_kl > 0.0).then_some(AdaptiveKl {
                    target: self.target_kl,
                    horizon: 10_000.0,
                });
                rollout::ppo(
                    &mut trainer,
                    collector,
                    &job,
                    &self.ppo_config(),
                    adaptive,
                    extra.as_ref(),
                    observer,
                )
            }
            Some(config) => rollout::grpo(
                &mut trainer,
                collector,
                &job,
                &config,
                extra.as_ref(),
                observer,
            ),
        }
    }
}

/// The policy's trainable tensors (LoRA factors with LoRA, every weight otherwise, plus the
/// value head) as a safetensors file in memory: what a learner sends its workers after each
/// update.
pub fn policy_state(policy: &mut Model) -> Result<Vec<u8>> {
    let mut params = policy.weights_mut().named_params_mut();
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = params
        .iter_mut()
        .map(|(name, t, _)| {
            let bytes = t.as_slice().iter().flat_map(|v| v.to_le_bytes()).collect();
            (name.clone(), t.shape().to_vec(), bytes)
        })
        .collect();
    let views = encoded
        .iter()
        .map(|(n, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::invalid(format!("policy state `{n}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, None)
        .map_err(|e| Error::invalid(format!("policy state: {e}")))?;
    drop(params);
    // Nothing changed, but `weights_mut` marked a CUDA copy stale; this clears it (a copy).
    policy.sync_device()?;
    Ok(bytes)
}

/// Replaces the policy's trainable tensors with those of [`policy_state`] bytes. The names and
/// shapes must match exactly (the same model prepared the same way); on error nothing changes.
pub fn load_policy_state(policy: &mut Model, state: &[u8]) -> Result<()> {
    let bad = |m: String| Error::invalid(format!("policy state: {m}"));
    let st = safetensors::SafeTensors::deserialize(state).map_err(|e| bad(e.to_string()))?;
    let mut params = policy.weights_mut().named_params_mut();
    if st.len() != params.len() {
        return Err(bad(format!(
            "{} tensors, this policy trains {}",
            st.len(),
            params.len()
        )));
    }
    let mut staged = Vec::with_capacity(params.len());
    for (name, t, _) in params.iter() {
        let v = st
            .tensor(name)
            .map_err(|_| bad(format!("tensor `{name}` is missing")))?;
        if v.dtype() != safetensors::Dtype::F32 || v.shape() != t.shape() {
            return Err(bad(format!(
                "tensor `{name}`: {:?} {:?}, expected F32 {:?}",
                v.dtype(),
                v.shape(),
                t.shape()
            )));
        }
        let values: Vec<f32> = v
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        staged.push(values);
    }
    for ((_, t, _), values) in params.iter_mut().zip(staged) {
        t.as_mut_slice().copy_from_slice(&values);
    }
    drop(params);
    // A policy on CUDA gets the new weights on the device too.
    policy.sync_device()
}
