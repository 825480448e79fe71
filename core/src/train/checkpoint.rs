//! Training checkpoints: everything needed to take exactly the step an uninterrupted run would
//! have taken next.
//!
//! A checkpoint is a folder:
//! - the model: an HF folder in f32 (`config.json`, `model.safetensors`, tokenizer files) that
//!   transformers loads; with LoRA, a PEFT adapter (`adapter_model.safetensors`,
//!   `adapter_config.json`) over the base model it names, plus `heads.safetensors` when a
//!   score or value head trains beside the adapters;
//! - `optimizer.safetensors`: AdamW's first and second moments of every trainable tensor
//!   (`m.<name>`, `v.<name>`);
//! - `trainer_state.json`: the step and skipped-step counts, the optimizer and schedule
//!   settings (the schedule position is the step count), and a caller's own JSON (`extra`:
//!   data order, RNG state, metrics).
//!
//! The folder is written under a temporary name, every file synced, then renamed into place:
//! a crash mid-save leaves earlier checkpoints intact and no half-written folder under the
//! final name. An existing folder is never overwritten.

use std::path::Path;

use serde_json::{json, Value};

use crate::convert::{write_folder_atomically, write_json, write_model_files, SaveDtype};
use crate::error::{Error, Result};
use crate::model::{LoadOptions, Model, VALUE_HEAD_BIAS, VALUE_HEAD_WEIGHT};
use crate::tensor::Tensor;
use crate::weights::SafetensorsCheckpoint;

use super::{ComputeDtype, Schedule, TrainConfig, Trainer};

const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const HEADS_FILE: &str = "heads.safetensors";
const FORMAT: &str = "rlx-trainer-checkpoint";
const FORMAT_VERSION: u64 = 1;

fn config_json(c: &TrainConfig) -> Value {
    let schedule = match c.schedule {
        Schedule::Constant => json!({"type": "constant"}),
        Schedule::WarmupCosine {
            warmup_steps,
            total_steps,
        } => json!({"type": "warmup_cosine", "warmup_steps": warmup_steps,
                    "total_steps": total_steps}),
    };
    json!({
        "lr": c.lr, "beta1": c.beta1, "beta2": c.beta2, "eps": c.eps,
        "weight_decay": c.weight_decay, "max_grad_norm": c.max_grad_norm,
        "schedule": schedule, "compute": c.compute.name(),
    })
}

fn config_from_json(v: &Value, path: &Path) -> Result<TrainConfig> {
    let bad = |what: &str| Error::Config(format!("{}: {what}", path.display()));
    let f = |key: &str| -> Result<f32> {
        v[key]
            .as_f64()
            .map(|x| x as f32)
            .ok_or_else(|| bad(&format!("`config.{key}` must be a number")))
    };
    let schedule = match v["schedule"]["type"].as_str() {
        Some("constant") => Schedule::Constant,
        Some("warmup_cosine") => Schedule::WarmupCosine {
            warmup_steps: v["schedule"]["warmup_steps"]
                .as_u64()
                .ok_or_else(|| bad("`warmup_steps` must be an integer"))?,
            total_steps: v["schedule"]["total_steps"]
                .as_u64()
                .ok_or_else(|| bad("`total_steps` must be an integer"))?,
        },
        _ => return Err(bad("unknown learning-rate schedule")),
    };
    let config = TrainConfig {
        lr: f("lr")?,
        beta1: f("beta1")?,
        beta2: f("beta2")?,
        eps: f("eps")?,
        weight_decay: f("weight_decay")?,
        max_grad_norm: match &v["max_grad_norm"] {
            Value::Null => None,
            x => Some(
                x.as_f64()
                    .ok_or_else(|| bad("`max_grad_norm` must be a number or null"))?
                    as f32,
            ),
        },
        schedule,
        // Checkpoints written before bf16 compute existed trained in f32.
        compute: match &v["compute"] {
            Value::Null => ComputeDtype::F32,
            x => ComputeDtype::parse(
                x.as_str()
                    .ok_or_else(|| bad("`compute` must be \"f32\" or \"bf16\""))?,
            )
            .map_err(|e| bad(&e.to_string()))?,
        },
    };
    config.validate()?;
    Ok(config)
}

impl Trainer {
    /// Writes a checkpoint folder at `dir` (which must not exist) with `extra`, the caller's
    /// own state, stored verbatim. Fails when micro-batches are still accumulated.
    pub fn save_checkpoint(&self, dir: &Path, extra: &Value) -> Result<()> {
        if self.pending.is_some() {
            return Err(Error::invalid(format!(
                "{} micro-batches are accumulated; call step() before saving a checkpoint",
                self.pending_micro_batches()
            )));
        }
        let lora = self.model.weights().lora.is_some();
        let base_model = if lora {
            let source = self.model.source();
            let absolute = std::fs::canonicalize(source).map_err(|e| Error::io(source, e))?;
            Some(absolute.to_string_lossy().into_owned())
        } else {
            crate::convert::check_savable(&self.model)?;
            None
        };
        write_folder_atomically(dir, |tmp| {
            match &base_model {
                Some(base) => {
                    self.model.save_lora_adapter(tmp, base)?;
                    let heads = head_tensors(&self.model);
                    if !heads.is_empty() {
                        crate::convert::write_safetensors_f32(&tmp.join(HEADS_FILE), heads)?;
                    }
                }
                None => write_model_files(&self.model, tmp, SaveDtype::F32)?,
            }
            let mut moments = Vec::with_capacity(2 * self.names.len());
            for (name, (m, v)) in self.names.iter().zip(self.moments()?) {
                moments.push((format!("m.{name}"), vec![m.len()], m));
                moments.push((format!("v.{name}"), vec![v.len()], v));
            }
            crate::convert::write_safetensors_f32(&tmp.join(OPTIMIZER_FILE), moments)?;
            let state = json!({
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "rlx_version": crate::VERSION,
                "step": self.step,
                "skipped_steps": self.skipped,
                "config": config_json(&self.config),
                "lora": lora,
                "base_model": base_model,
                "extra": extra,
            });
            write_json(&tmp.join(STATE_FILE), &state)
        })
    }

    /// Loads a checkpoint written by [`Trainer::save_checkpoint`]: the model (for LoRA, its
    /// base from the recorded path with the adapter on top), the optimizer moments and
    /// counters. Returns the trainer and the caller's `extra` state.
    pub fn resume(dir: &Path, options: LoadOptions) -> Result<(Trainer, Value)> {
        let state_path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
        let state: Value = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: state_path.clone(),
            message: e.to_string(),
        })?;
        let bad = |what: &str| Error::Config(format!("{}: {what}", state_path.display()));
        if state["format"].as_str() != Some(FORMAT) {
            return Err(bad("not an rlx trainer checkpoint"));
        }
        if state["format_version"].as_u64() != Some(FORMAT_VERSION) {
            return Err(bad("written by an incompatible rlx version"));
        }
        let step = state["step"]
            .as_u64()
            .ok_or_else(|| bad("`step` must be an integer"))?;
        let skipped = state["skipped_steps"]
            .as_u64()
            .ok_or_else(|| bad("`skipped_steps` must be an integer"))?;
        let config = config_from_json(&state["config"], &state_path)?;
        let model = match state["lora"].as_bool() {
            Some(true) => {
                let base = state["base_model"]
                    .as_str()
                    .ok_or_else(|| bad("a LoRA checkpoint needs `base_model`"))?;
                let mut model = Model::load(base, options)?;
                model.load_lora_adapter(dir)?;
                let heads = dir.join(HEADS_FILE);
                if heads.exists() {
                    load_heads(&mut model, &heads)?;
                }
                model
            }
            Some(false) => Model::load(dir, options)?,
            None => return Err(bad("`lora` must be true or false")),
        };
        let mut trainer = Trainer::new(model, config)?;
        let opt_path = dir.join(OPTIMIZER_FILE);
        let ck = SafetensorsCheckpoint::open_files(std::slice::from_ref(&opt_path))?;
        let expected = 2 * trainer.names.len();
        let stored = ck.names().count();
        if stored != expected {
            return Err(Error::format(
                &opt_path,
                format!(
                    "{stored} moment tensors for a model with {expected} (the model and the \
                     optimizer state do not belong together)"
                ),
            ));
        }
        let mut moments = Vec::with_capacity(trainer.names.len());
        for (name, &n) in trainer.names.iter().zip(&trainer.sizes) {
            moments.push((
                ck.tensor(&format!("m.{name}"), &[n])?.as_slice().to_vec(),
                ck.tensor(&format!("v.{name}"), &[n])?.as_slice().to_vec(),
            ));
        }
        trainer.set_moments(moments)?;
        trainer.step = step;
        trainer.skipped = skipped;
        Ok((trainer, state["extra"].clone()))
    }
}

/// Score and value heads (trained beside LoRA adapters) under their checkpoint names.
fn head_tensors(model: &Model) -> crate::convert::Named {
    let w = model.weights();
    let mut out = Vec::new();
    let mut push = |name: &str, t: &Tensor| {
        out.push((name.to_string(), t.shape().to_vec(), t.as_slice().to_vec()));
    };
    if let Some(s) = &w.score {
        push("score.weight", s);
    }
    if let Some(v) = &w.value {
        push(VALUE_HEAD_WEIGHT, &v.w);
        if let Some(b) = &v.b {
            push(VALUE_HEAD_BIAS, b);
        }
    }
    out
}

fn load_heads(model: &mut Model, path: &Path) -> Result<()> {
    let ck = SafetensorsCheckpoint::open_files(&[path.to_path_buf()])?;
    let c = model.config().hidden_size;
    let score = if ck.contains("score.weight") {
        Some(ck.tensor("score.weight", &[1, c])?)
    } else {
        None
    };
    let value = if ck.contains(VALUE_HEAD_WEIGHT) {
        Some(crate::model::Linear::new(
            ck.tensor(VALUE_HEAD_WEIGHT, &[1, c])?,
            Some(ck.tensor(VALUE_HEAD_BIAS, &[1])?),
        ))
    } else {
        None
    };
    let w = model.weights_mut();
    if score.is_some() {
        w.score = score;
    }
    if value.is_some() {
        w.value = value;
    }
    Ok(())
}
