//! `rlx.Trainer`, `rlx.RewardModel` and `rlx.LoraConfig`: the gradient-step and reward-score
//! primitives from Python.
//!
//! Inputs are copied into Rust values before the GIL is released for the core call; a step's
//! statistics come back as a dict of floats. The trainer owns its model: `Trainer.model` is a
//! snapshot (`rlx.Model`) that shares the current weights, for rollouts between steps.

use std::path::PathBuf;

use numpy::PyArray1;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use rlx::model::Gradients;
use rlx::{
    DpoLoss, GrpoBatch, GrpoConfig, GrpoLossType, LoadOptions, LoraConfig, PpoConfig, PpoMinibatch,
    PpoStats, Schedule, StepStats, TrainConfig, Trainer,
};

use crate::convert::{count, token_id_lists};
use crate::errors::{to_py_err, Class};
use crate::handle::Closable;
use crate::model::{load_model, PyModel};

/// LoRA settings: rank `r`, scale `lora_alpha / r`, and the modules adapted (PEFT's names;
/// `["all-linear"]` for every projection).
#[pyclass(module = "rlx", name = "LoraConfig", frozen)]
#[derive(Clone)]
pub struct PyLoraConfig {
    inner: LoraConfig,
}

#[pymethods]
impl PyLoraConfig {
    #[new]
    #[pyo3(signature = (r = 8, lora_alpha = 16.0, target_modules = None, seed = 0))]
    fn new(
        py: Python<'_>,
        r: i64,
        lora_alpha: f64,
        target_modules: Option<Vec<String>>,
        seed: u64,
    ) -> PyResult<Self> {
        Ok(PyLoraConfig {
            inner: LoraConfig {
                rank: count(py, r, "r")?,
                alpha: lora_alpha as f32,
                target_modules: target_modules
                    .unwrap_or_else(|| vec!["q_proj".into(), "v_proj".into()]),
                seed,
            },
        })
    }

    #[getter]
    fn r(&self) -> usize {
        self.inner.rank
    }

    #[getter]
    fn lora_alpha(&self) -> f32 {
        self.inner.alpha
    }

    #[getter]
    fn target_modules(&self) -> Vec<String> {
        self.inner.target_modules.clone()
    }

    fn __repr__(&self) -> String {
        format!(
            "LoraConfig(r={}, lora_alpha={}, target_modules={:?})",
            self.inner.rank, self.inner.alpha, self.inner.target_modules
        )
    }
}

/// A reward model: a decoder with a scalar score head (`*ForSequenceClassification`).
#[pyclass(module = "rlx", name = "RewardModel", frozen)]
pub struct PyRewardModel {
    inner: Closable<rlx::Model>,
}

#[pymethods]
impl PyRewardModel {
    /// Loads a reward-model folder (an HF `*ForSequenceClassification` with num_labels = 1).
    /// `device` / `device_dtype` as for `Model.load` (scores run on the device).
    #[staticmethod]
    #[pyo3(signature = (path, threads = 0, device = "cpu", device_dtype = "f32"))]
    fn load(
        py: Python<'_>,
        path: PathBuf,
        threads: i64,
        device: &str,
        device_dtype: &str,
    ) -> PyResult<Self> {
        let inner = load_model(py, &path, threads, false, false, device, device_dtype)?;
        if inner.weights().score.is_none() {
            return Err(
                Class::InvalidArgument.err(py, format!("{} has no score head", path.display()))
            );
        }
        Ok(PyRewardModel {
            inner: Closable::new(inner),
        })
    }

    /// The reward of each sequence (float32), read at its last token.
    fn score<'py>(
        &self,
        py: Python<'py>,
        sequences: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let model = self.inner.get(py, "RewardModel")?;
        let seqs = token_id_lists(sequences, "sequences")?;
        let r = py
            .detach(|| model.reward_scores(&seqs))
            .map_err(|e| to_py_err(py, e))?;
        Ok(PyArray1::from_vec(py, r))
    }

    fn encode(&self, py: Python<'_>, text: String) -> PyResult<Vec<u32>> {
        let model = self.inner.get(py, "RewardModel")?;
        py.detach(|| {
            model
                .require_tokenizer()
                .and_then(|t| t.encode(&text, true))
        })
        .map_err(|e| to_py_err(py, e))
    }

    /// Releases the model: later calls raise ClosedError.
    fn close(&self) {
        self.inner.close();
    }

    /// True after `close()`.
    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_closed()
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.inner.close();
        false
    }
}

/// Masks as lists of booleans, one per token.
fn masks(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<Vec<bool>>> {
    obj.try_iter()?
        .enumerate()
        .map(|(i, m)| {
            let m = m?;
            m.try_iter()?
                .map(|b| b?.is_truthy())
                .collect::<PyResult<Vec<bool>>>()
                .map_err(|e| pyo3::exceptions::PyTypeError::new_err(format!("{what}[{i}]: {e}")))
        })
        .collect()
}

fn floats(obj: &Bound<'_, PyAny>) -> PyResult<Vec<f64>> {
    obj.try_iter()?.map(|x| x?.extract::<f64>()).collect()
}

fn float_rows(obj: &Bound<'_, PyAny>) -> PyResult<Vec<Vec<f64>>> {
    obj.try_iter()?.map(|r| floats(&r?)).collect()
}

fn stats_dict<'py>(
    py: Python<'py>,
    s: &StepStats,
    extra: &[(&str, f64)],
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("loss", s.loss)?;
    d.set_item("grad_norm", s.grad_norm)?;
    d.set_item("lr", s.lr)?;
    d.set_item("skipped", s.skipped)?;
    d.set_item("step", s.step)?;
    for (k, v) in extra {
        d.set_item(*k, *v)?;
    }
    Ok(d)
}

/// Trains a model: AdamW with optional warm-up + cosine schedule, gradient clipping, LoRA,
/// and one method per objective. A step whose loss or gradients are not finite changes
/// nothing and reports `skipped=True`.
#[pyclass(module = "rlx", name = "Trainer")]
pub struct PyTrainer {
    /// `None` after `close()`.
    inner: Option<Trainer>,
}

impl PyTrainer {
    fn trainer(&mut self, py: Python<'_>) -> PyResult<&mut Trainer> {
        self.inner
            .as_mut()
            .ok_or_else(|| Class::Closed.err(py, "this Trainer was closed"))
    }

    fn apply(
        &mut self,
        py: Python<'_>,
        compute: impl FnOnce(&rlx::Model) -> rlx::Result<(f64, Gradients)> + Send,
    ) -> PyResult<StepStats> {
        let t = self.trainer(py)?;
        py.detach(|| {
            let (loss, grads) = t.gradients_with(compute)?;
            t.apply(loss, grads)
        })
        .map_err(|e| to_py_err(py, e))
    }
}

#[pymethods]
impl PyTrainer {
    /// Loads `path` for training. `head`: None, "score" (a fresh reward head, unless the
    /// checkpoint has one) or "value" (a fresh PPO value head). `total_steps` > 0 selects
    /// linear warm-up over `warmup_steps` then cosine decay. `device`: "cpu", "cuda" or
    /// "cuda:N" (gradients and AdamW on the device; not yet verified on a GPU).
    /// `compute_dtype`: "f32" or "bf16" (bf16 operands, f32 sums and master weights; CPU).
    #[new]
    #[pyo3(signature = (
        path, lr = 1e-5, weight_decay = 0.0, betas = (0.9, 0.999), eps = 1e-8,
        max_grad_norm = Some(1.0), warmup_steps = 0, total_steps = 0, lora = None,
        gradient_checkpointing = false, head = None, seed = 0, threads = 0, device = "cpu",
        compute_dtype = "f32",
    ))]
    #[allow(clippy::too_many_arguments)] // mirrors the Python keyword arguments
    fn new(
        py: Python<'_>,
        path: PathBuf,
        lr: f64,
        weight_decay: f64,
        betas: (f64, f64),
        eps: f64,
        max_grad_norm: Option<f64>,
        warmup_steps: u64,
        total_steps: u64,
        lora: Option<PyRef<'_, PyLoraConfig>>,
        gradient_checkpointing: bool,
        head: Option<String>,
        seed: u64,
        threads: i64,
        device: &str,
        compute_dtype: &str,
    ) -> PyResult<Self> {
        let threads = count(py, threads, "threads")?;
        let device: rlx::Device = device.parse().map_err(|e| to_py_err(py, e))?;
        let compute = rlx::ComputeDtype::parse(compute_dtype).map_err(|e| to_py_err(py, e))?;
        let config = TrainConfig {
            lr: lr as f32,
            beta1: betas.0 as f32,
            beta2: betas.1 as f32,
            eps: eps as f32,
            weight_decay: weight_decay as f32,
            max_grad_norm: max_grad_norm.map(|m| m as f32),
            schedule: Schedule::from_steps(warmup_steps, total_steps),
            compute,
        };
        let lora = lora.map(|l| l.inner.clone());
        let inner = py
            .detach(|| -> rlx::Result<Trainer> {
                let mut model = rlx::Model::load(
                    &path,
                    LoadOptions {
                        threads,
                        device,
                        ..Default::default()
                    },
                )?;
                match head.as_deref() {
                    None => {}
                    Some("score") if model.weights().score.is_some() => {}
                    Some("score") => model.add_score_head(seed),
                    Some("value") => model.add_value_head(seed),
                    Some(other) => {
                        return Err(rlx::Error::invalid(format!(
                            "head must be None, \"score\" or \"value\", got {other:?}"
                        )))
                    }
                }
                if let Some(l) = &lora {
                    model.attach_lora(l)?;
                }
                model.set_gradient_checkpointing(gradient_checkpointing);
                Trainer::new(model, config)
            })
            .map_err(|e| to_py_err(py, e))?;
        Ok(PyTrainer { inner: Some(inner) })
    }

    /// Continues from a checkpoint written by `save`; returns `(trainer, extra)`.
    #[staticmethod]
    #[pyo3(signature = (path, threads = 0, device = "cpu"))]
    fn resume(
        py: Python<'_>,
        path: PathBuf,
        threads: i64,
        device: &str,
    ) -> PyResult<(Self, Py<PyAny>)> {
        let threads = count(py, threads, "threads")?;
        let device: rlx::Device = device.parse().map_err(|e| to_py_err(py, e))?;
        let (inner, extra) = py
            .detach(|| {
                Trainer::resume(
                    &path,
                    LoadOptions {
                        threads,
                        device,
                        ..Default::default()
                    },
                )
            })
            .map_err(|e| to_py_err(py, e))?;
        let json = py.import("json")?;
        let extra = json.call_method1("loads", (extra.to_string(),))?.unbind();
        Ok((PyTrainer { inner: Some(inner) }, extra))
    }

    /// Writes a checkpoint folder (model, optimizer moments, step, `extra` as JSON).
    #[pyo3(signature = (path, extra = None))]
    fn save(
        &mut self,
        py: Python<'_>,
        path: PathBuf,
        extra: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let extra: serde_json::Value = match extra {
            None => serde_json::Value::Null,
            Some(v) => {
                let text: String = py.import("json")?.call_method1("dumps", (v,))?.extract()?;
                serde_json::from_str(&text)
                    .map_err(|e| Class::InvalidArgument.err(py, e.to_string()))?
            }
        };
        let t = self.trainer(py)?;
        py.detach(|| t.save_checkpoint(&path, &extra))
            .map_err(|e| to_py_err(py, e))
    }

    /// The current model for generation and log-probs (shares the weights; later steps do
    /// not change it).
    #[getter]
    fn model(&mut self, py: Python<'_>) -> PyResult<PyModel> {
        Ok(PyModel::from_model(self.trainer(py)?.model().clone()))
    }

    /// Optimizer steps taken.
    #[getter]
    fn step(&mut self, py: Python<'_>) -> PyResult<u64> {
        Ok(self.trainer(py)?.step_count())
    }

    /// Supervised fine-tuning: mean cross-entropy over the tokens whose mask is true.
    fn sft_step<'py>(
        &mut self,
        py: Python<'py>,
        sequences: &Bound<'py, PyAny>,
        masks_: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let seqs = token_id_lists(sequences, "sequences")?;
        let m = masks(masks_, "masks")?;
        let s = self.apply(py, |model| model.sft_gradients(&seqs, &m))?;
        stats_dict(py, &s, &[])
    }

    /// Reward model: mean −log σ(r_chosen − r_rejected − margin); also reports accuracy.
    #[pyo3(signature = (chosen, rejected, margin = 0.0))]
    fn rm_step<'py>(
        &mut self,
        py: Python<'py>,
        chosen: &Bound<'py, PyAny>,
        rejected: &Bound<'py, PyAny>,
        margin: f64,
    ) -> PyResult<Bound<'py, PyDict>> {
        let (c, r) = (
            token_id_lists(chosen, "chosen")?,
            token_id_lists(rejected, "rejected")?,
        );
        let mut acc = 0.0;
        let s = self.apply(py, |model| {
            let (p, g) = model.reward_pair_gradients(&c, &r, margin as f32)?;
            acc = p.accuracy;
            Ok((p.loss, g))
        })?;
        stats_dict(py, &s, &[("accuracy", acc)])
    }

    /// DPO on pairs with the reference's summed response log-probs (`loss_type`: "sigmoid",
    /// "ipo" — per-token averages — or "hinge").
    #[pyo3(signature = (
        chosen, chosen_masks, rejected, rejected_masks, ref_chosen, ref_rejected,
        beta = 0.1, loss_type = "sigmoid",
    ))]
    #[allow(clippy::too_many_arguments)]
    fn dpo_step<'py>(
        &mut self,
        py: Python<'py>,
        chosen: &Bound<'py, PyAny>,
        chosen_masks: &Bound<'py, PyAny>,
        rejected: &Bound<'py, PyAny>,
        rejected_masks: &Bound<'py, PyAny>,
        ref_chosen: &Bound<'py, PyAny>,
        ref_rejected: &Bound<'py, PyAny>,
        beta: f64,
        loss_type: &str,
    ) -> PyResult<Bound<'py, PyDict>> {
        let kind = match loss_type {
            "sigmoid" => DpoLoss::Sigmoid,
            "ipo" => DpoLoss::Ipo,
            "hinge" => DpoLoss::Hinge,
            other => {
                return Err(Class::InvalidArgument.err(
                    py,
                    format!("loss_type must be sigmoid, ipo or hinge, got {other:?}"),
                ))
            }
        };
        let (c, r) = (
            token_id_lists(chosen, "chosen")?,
            token_id_lists(rejected, "rejected")?,
        );
        let (cm, rm) = (
            masks(chosen_masks, "chosen_masks")?,
            masks(rejected_masks, "rejected_masks")?,
        );
        let (rc, rr) = (floats(ref_chosen)?, floats(ref_rejected)?);
        let mut extra = (0.0, 0.0);
        let s = self.apply(py, |model| {
            let (st, g) = model.dpo_gradients(&c, &cm, &r, &rm, &rc, &rr, beta, kind)?;
            extra = (st.accuracy, st.mean_margin);
            Ok((st.loss, g))
        })?;
        stats_dict(py, &s, &[("accuracy", extra.0), ("margin", extra.1)])
    }

    /// GRPO on completions grouped by prompt: one advantage per completion (see
    /// `group_advantages`), old and reference log-probs per response token.
    #[pyo3(signature = (
        sequences, masks, advantages, old_logprobs = None, ref_logprobs = None,
        beta = 0.04, epsilon = 0.2, loss_type = "dapo",
    ))]
    #[allow(clippy::too_many_arguments)]
    fn grpo_step<'py>(
        &mut self,
        py: Python<'py>,
        sequences: &Bound<'py, PyAny>,
        masks: &Bound<'py, PyAny>,
        advantages: &Bound<'py, PyAny>,
        old_logprobs: Option<&Bound<'py, PyAny>>,
        ref_logprobs: Option<&Bound<'py, PyAny>>,
        beta: f64,
        epsilon: f64,
        loss_type: &str,
    ) -> PyResult<Bound<'py, PyDict>> {
        let loss_type = match loss_type {
            "grpo" => GrpoLossType::Grpo,
            "bnpo" => GrpoLossType::Bnpo,
            "dr_grpo" => GrpoLossType::DrGrpo,
            "dapo" => GrpoLossType::Dapo,
            other => {
                return Err(Class::InvalidArgument.err(
                    py,
                    format!("loss_type must be grpo, bnpo, dr_grpo or dapo, got {other:?}"),
                ))
            }
        };
        let seqs = token_id_lists(sequences, "sequences")?;
        let m = self::masks(masks, "masks")?;
        let adv = floats(advantages)?;
        let old = old_logprobs.map(float_rows).transpose()?;
        let reference = ref_logprobs.map(float_rows).transpose()?;
        let config = GrpoConfig {
            beta,
            epsilon_low: epsilon,
            epsilon_high: epsilon,
            loss_type,
            ..Default::default()
        };
        let mut extra = (0.0, 0.0);
        let s = self.apply(py, |model| {
            let batch = GrpoBatch {
                sequences: &seqs,
                masks: &m,
                advantages: &adv,
                old_logprobs: old.as_deref(),
                ref_logprobs: reference.as_deref(),
            };
            let (st, g) = model.grpo_gradients(&batch, &config)?;
            extra = (st.kl, st.clip_fraction);
            Ok((st.loss, g))
        })?;
        stats_dict(py, &s, &[("kl", extra.0), ("clip_fraction", extra.1)])
    }

    /// The value head's estimate for each response token (the value of the state before the
    /// token): one float32 array per sequence, shaped like the masks' selected tokens. The
    /// trainer needs a value head (``head="value"``).
    fn values<'py>(
        &mut self,
        py: Python<'py>,
        sequences: &Bound<'py, PyAny>,
        masks: &Bound<'py, PyAny>,
    ) -> PyResult<Vec<Bound<'py, PyArray1<f32>>>> {
        let seqs = token_id_lists(sequences, "sequences")?;
        let m = self::masks(masks, "masks")?;
        if m.len() != seqs.len() || m.iter().zip(&seqs).any(|(a, b)| a.len() != b.len()) {
            return Err(Class::InvalidArgument.err(py, "one mask per sequence, one flag per token"));
        }
        let model = self.trainer(py)?.model().clone();
        let all = py
            .detach(|| model.values(&seqs))
            .map_err(|e| to_py_err(py, e))?;
        Ok(all
            .iter()
            .zip(&m)
            .map(|(v, m)| {
                let picked: Vec<f32> = (1..m.len()).filter(|&t| m[t]).map(|t| v[t - 1]).collect();
                PyArray1::from_vec(py, picked)
            })
            .collect())
    }

    /// One PPO minibatch step (clipped surrogate, clipped value loss, optional entropy bonus)
    /// from a rollout's per-response-token ``old_logprobs`` and ``old_values`` and the
    /// ``advantages`` and ``returns`` of ``rlx.ppo_advantages``. The first step on a fresh
    /// rollout sees ratios of exactly 1 (``approx_kl`` 0). Needs ``head="value"``.
    #[pyo3(signature = (
        sequences, masks, old_logprobs, old_values, advantages, returns,
        clip_range = 0.2, clip_range_value = 0.2, vf_coef = 0.1, entropy_coef = 0.0,
    ))]
    #[allow(clippy::too_many_arguments)] // mirrors the Python keyword arguments
    fn ppo_step<'py>(
        &mut self,
        py: Python<'py>,
        sequences: &Bound<'py, PyAny>,
        masks: &Bound<'py, PyAny>,
        old_logprobs: &Bound<'py, PyAny>,
        old_values: &Bound<'py, PyAny>,
        advantages: &Bound<'py, PyAny>,
        returns: &Bound<'py, PyAny>,
        clip_range: f64,
        clip_range_value: f64,
        vf_coef: f64,
        entropy_coef: f64,
    ) -> PyResult<Bound<'py, PyDict>> {
        let seqs = token_id_lists(sequences, "sequences")?;
        let m = self::masks(masks, "masks")?;
        let old = float_rows(old_logprobs)?;
        let values = float_rows(old_values)?;
        let adv = float_rows(advantages)?;
        let ret = float_rows(returns)?;
        let config = PpoConfig {
            clip_range,
            clip_range_value,
            vf_coef,
            entropy_coef,
            ..Default::default()
        };
        let mut extra = PpoStats::default();
        let s = self.apply(py, |model| {
            let batch = PpoMinibatch {
                sequences: &seqs,
                masks: &m,
                old_logprobs: &old,
                old_values: &values,
                advantages: &adv,
                returns: &ret,
            };
            let (st, g) = model.ppo_gradients(&batch, &config)?;
            extra = st.clone();
            Ok((st.loss, g))
        })?;
        stats_dict(
            py,
            &s,
            &[
                ("policy_loss", extra.policy_loss),
                ("value_loss", extra.value_loss),
                ("entropy", extra.entropy),
                ("approx_kl", extra.approx_kl),
                ("clip_fraction", extra.clip_fraction),
                ("value_clip_fraction", extra.value_clip_fraction),
            ],
        )
    }

    /// Releases the model and optimizer state; later calls raise ClosedError. A checkpoint
    /// already saved is untouched.
    fn close(&mut self) {
        self.inner = None;
    }

    /// True after `close()`.
    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_none()
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&mut self, _args: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.inner = None;
        false
    }

    fn __repr__(&self) -> String {
        match &self.inner {
            Some(t) => format!("Trainer(step={})", t.step_count()),
            None => "Trainer(closed)".to_string(),
        }
    }
}

/// Group-normalised GRPO advantages of rewards laid out in consecutive groups of
/// `group_size` completions.
#[pyfunction]
#[pyo3(signature = (rewards, group_size, scale_rewards = true))]
pub fn group_advantages(
    py: Python<'_>,
    rewards: &Bound<'_, PyAny>,
    group_size: i64,
    scale_rewards: bool,
) -> PyResult<Vec<f64>> {
    let r = floats(rewards)?;
    let k = count(py, group_size, "group_size")?;
    rlx::group_advantages(&r, k, scale_rewards).map_err(|e| to_py_err(py, e))
}

/// One row of values per sequence, one value per response token.
type PerToken = Vec<Vec<f64>>;

/// PPO's first stage for a rollout (per response token, one row per sequence): rewards
/// ``-kl_coef * (old_logprobs - ref_logprobs)`` plus each sequence's ``scores`` entry at its
/// last token, GAE advantages (whitened when ``whiten_advantages``) and returns. Returns
/// ``(advantages, returns, kl)``, ``kl`` being the mean summed KL to the reference.
#[pyfunction]
#[pyo3(signature = (
    old_logprobs, ref_logprobs, old_values, scores,
    kl_coef = 0.05, gamma = 1.0, lam = 0.95, whiten_advantages = true,
))]
#[allow(clippy::too_many_arguments)] // mirrors the Python keyword arguments
pub fn ppo_advantages(
    py: Python<'_>,
    old_logprobs: &Bound<'_, PyAny>,
    ref_logprobs: &Bound<'_, PyAny>,
    old_values: &Bound<'_, PyAny>,
    scores: &Bound<'_, PyAny>,
    kl_coef: f64,
    gamma: f64,
    lam: f64,
    whiten_advantages: bool,
) -> PyResult<(PerToken, PerToken, f64)> {
    let config = PpoConfig {
        kl_coef,
        gamma,
        lam,
        whiten_advantages,
        ..Default::default()
    };
    let a = rlx::ppo_advantages(
        &float_rows(old_logprobs)?,
        &float_rows(ref_logprobs)?,
        &float_rows(old_values)?,
        &floats(scores)?,
        &config,
    )
    .map_err(|e| to_py_err(py, e))?;
    Ok((a.advantages, a.returns, a.kl))
}
