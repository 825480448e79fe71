//! The InstructGPT stages as library drivers: supervised fine-tuning, reward model, PPO (and
//! DPO, GRPO), each over a dataset read by [`data`], writing checkpoints, metrics and a final
//! model folder that the next stage takes as input.
//!
//! A run's output folder holds `checkpoint-<step>/` (see [`crate::train::checkpoint`]),
//! `metrics.jsonl` (one JSON object per optimizer step or PPO iteration) and, once the run
//! finishes, `model/`: the trained model as an HF folder (LoRA merged). A driver checks
//! [`Observer::stop_requested`] after every step; when set it saves a checkpoint and returns
//! [`Outcome::Interrupted`], and `resume` continues from the newest checkpoint.

pub mod data;
pub mod job;
pub mod rollout;
pub mod supervised;

use std::io::Write;
use std::path::{Path, PathBuf};

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use crate::convert::{save_hf_folder, SaveDtype};
use crate::error::{Error, Result};
use crate::train::Trainer;

/// What a driver tells the outside world while it runs (progress bars, logs, Ctrl-C).
pub trait Observer {
    /// A long phase starts with `total` units of work (0 when unknown).
    fn phase(&mut self, _name: &str, _total: u64) {}
    fn advance(&mut self, _n: u64) {}
    fn end_phase(&mut self) {}
    /// One line of metrics (also appended to `metrics.jsonl`).
    fn record(&mut self, _metrics: &Value) {}
    /// A note for the user (a resumed checkpoint, a skipped dataset line).
    fn message(&mut self, _text: &str) {}
    /// Checked after every step: true stops the run after a checkpoint.
    fn stop_requested(&self) -> bool {
        false
    }
}

/// An observer that shows nothing and never stops a run.
pub struct Silent;
impl Observer for Silent {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    Interrupted,
}

/// How a run went.
#[derive(Debug, Clone)]
pub struct StageReport {
    pub outcome: Outcome,
    /// Optimizer steps taken in total (including before a resume).
    pub steps: u64,
    /// The last metrics line.
    pub last: Value,
    /// The final model folder (`out/model`), once finished.
    pub model_dir: Option<PathBuf>,
}

/// Options shared by the supervised stages (SFT, RM, DPO).
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub out: PathBuf,
    pub epochs: usize,
    /// Examples (SFT) or pairs (RM, DPO) per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Save a checkpoint every this many optimizer steps (0: only at the end or on stop).
    pub save_every: u64,
    pub seed: u64,
    /// Stop after this many optimizer steps in total.
    pub max_steps: Option<u64>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            out: PathBuf::from("out"),
            epochs: 1,
            batch_size: 4,
            grad_accum: 1,
            save_every: 0,
            seed: 0,
            max_steps: None,
        }
    }
}

impl RunOptions {
    fn validate(&self) -> Result<()> {
        if self.epochs == 0 || self.batch_size == 0 || self.grad_accum == 0 {
            return Err(Error::invalid(
                "epochs, batch size and gradient accumulation must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Where a supervised run stands: the epoch and the next micro-batch in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cursor {
    pub epoch: usize,
    pub batch: usize,
}

impl Cursor {
    fn to_json(self) -> Value {
        json!({"epoch": self.epoch, "batch": self.batch})
    }

    fn from_json(v: &Value) -> Result<Cursor> {
        let get = |k: &str| {
            v[k].as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| Error::invalid(format!("checkpoint cursor lacks `{k}`")))
        };
        Ok(Cursor {
            epoch: get("epoch")?,
            batch: get("batch")?,
        })
    }
}

/// The newest `checkpoint-<n>` folder under `out` that holds a finished checkpoint.
pub fn latest_checkpoint(out: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(out).ok()?;
    entries
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().to_string_lossy().into_owned();
            let n: u64 = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path()
                .join("trainer_state.json")
                .is_file()
                .then(|| (n, e.path()))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, p)| p)
}

/// Appends metrics lines to `out/metrics.jsonl` and hands them to the observer.
pub(crate) struct Metrics<'o> {
    file: std::fs::File,
    path: PathBuf,
    observer: &'o mut dyn Observer,
}

impl<'o> Metrics<'o> {
    /// Opens `out/metrics.jsonl` for appending. A run resumed at step `resumed_at` first drops
    /// the lines of later steps (written after that checkpoint by the run that stopped), so
    /// the log reads as if the run had never stopped.
    pub(crate) fn open(
        out: &Path,
        observer: &'o mut dyn Observer,
        resumed_at: Option<u64>,
    ) -> Result<Self> {
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let path = out.join("metrics.jsonl");
        if let Some(step) = resumed_at {
            drop_lines_after(&path, step)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(Metrics {
            file,
            path,
            observer,
        })
    }

    pub(crate) fn record(&mut self, v: &Value) -> Result<()> {
        writeln!(self.file, "{v}").map_err(|e| Error::io(&self.path, e))?;
        self.observer.record(v);
        Ok(())
    }

    pub(crate) fn observer(&mut self) -> &mut dyn Observer {
        &mut *self.observer
    }
}

/// Keeps the metrics lines up to `step` (lines without a step stay).
fn drop_lines_after(path: &Path, step: u64) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_none_or(|s| s <= step)
        })
        .collect();
    if kept.len() == text.lines().count() {
        return Ok(());
    }
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, body).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Saves `trainer` as `out/checkpoint-<step>` with the run's own state.
pub(crate) fn save(trainer: &Trainer, out: &Path, extra: &Value) -> Result<()> {
    let dir = out.join(format!("checkpoint-{}", trainer.step_count()));
    if dir.exists() {
        // Already saved at this step (e.g. a stop right after a periodic save).
        return Ok(());
    }
    trainer.save_checkpoint(&dir, extra)
}

/// Writes the finished model to `out/model` (LoRA merged into a copy). A `model/` from an
/// earlier finish (a resumed run that went further) is replaced once the new one is complete.
pub(crate) fn save_final(trainer: &Trainer, out: &Path) -> Result<PathBuf> {
    let dir = out.join("model");
    let mut model = trainer.model().clone();
    if model.weights().lora.is_some() {
        model.merge_lora()?;
    }
    if !dir.exists() {
        save_hf_folder(&model, &dir, SaveDtype::F32)?;
        return Ok(dir);
    }
    let fresh = out.join(format!("model.new-{}", std::process::id()));
    if fresh.exists() {
        std::fs::remove_dir_all(&fresh).map_err(|e| Error::io(&fresh, e))?;
    }
    save_hf_folder(&model, &fresh, SaveDtype::F32)?;
    let old = out.join(format!("model.old-{}", std::process::id()));
    std::fs::rename(&dir, &old).map_err(|e| Error::io(&dir, e))?;
    std::fs::rename(&fresh, &dir).map_err(|e| Error::io(&dir, e))?;
    std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    Ok(dir)
}

/// `0..n` shuffled by `seed`.
pub(crate) fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}
