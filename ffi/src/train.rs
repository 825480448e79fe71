//! The trainer handle (gradient steps, checkpoints) and the reward-score call.
//!
//! Batches cross the boundary packed: the token ids of every sequence back to back in one
//! array, `lengths[i]` tokens each, and for objectives with response masks one byte per token
//! (non-zero = the token is trained). A trainer is used by one thread at a time; a second
//! thread that calls into a trainer already in use gets RLX_INVALID_ARGUMENT instead of a race.

use std::ffi::c_char;
use std::sync::Mutex;

use rlx_core::{ComputeDtype, LoadOptions, LoraConfig, Model, Schedule, TrainConfig, Trainer};

use crate::handle::{self, Handle};
use crate::model::{model_ref, path_from, rlx_model};
use crate::ptr::{c_str, input_slice, params_or, OutPtr};
use crate::status::{boundary, rlx_status, FfiError, FfiResult};

/// A model under training with its optimizer state.
///
/// Create with rlx_trainer_create or rlx_trainer_resume; free with rlx_trainer_free. Calls on
/// one trainer must not overlap: a call made while another thread is inside a call on the same
/// trainer fails with RLX_INVALID_ARGUMENT. rlx_trainer_free must not run concurrently with any
/// other call on the same trainer.
#[allow(non_camel_case_types)]
pub struct rlx_trainer {
    magic: u64,
    trainer: Mutex<Trainer>,
}

/// `rlx_trainer_params.head`: no new head.
pub const RLX_HEAD_NONE: u32 = 0;
/// `rlx_trainer_params.head`: a scalar reward head (kept if the checkpoint already has one).
pub const RLX_HEAD_SCORE: u32 = 1;
/// `rlx_trainer_params.head`: a per-token PPO value head.
pub const RLX_HEAD_VALUE: u32 = 2;

/// How to train. Start from rlx_trainer_default_params(); fields are only ever appended.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct rlx_trainer_params {
    /// Peak learning rate.
    pub lr: f32,
    /// AdamW's β1, β2, ε.
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay on linear weights.
    pub weight_decay: f32,
    /// Clip the global gradient norm to this; ≤ 0 turns clipping off.
    pub max_grad_norm: f32,
    /// With total_steps > 0: linear warm-up over warmup_steps, then cosine decay to 0.
    pub warmup_steps: u64,
    /// 0 = constant learning rate.
    pub total_steps: u64,
    /// > 0: train LoRA adapters of this rank instead of every weight.
    pub lora_rank: u32,
    pub lora_alpha: f32,
    /// Comma-separated module names for LoRA (NULL = "q_proj,v_proj").
    pub lora_targets: *const c_char,
    /// Recompute activations in the backward pass to save memory.
    pub gradient_checkpointing: bool,
    /// RLX_HEAD_NONE, RLX_HEAD_SCORE or RLX_HEAD_VALUE (a plain integer, so any value read from
    /// C is valid and an unknown one is an error).
    pub head: u32,
    /// Seed of fresh heads and LoRA initialisation.
    pub seed: u64,
    /// Worker threads (0 = one per CPU core).
    pub threads: u32,
    /// Precision of the training matrix products: NULL or "f32" (the default), or "bf16"
    /// (bf16 operands with f32 sums for every linear layer and the LM head; f32 master
    /// weights, gradients and AdamW; about twice the product speed on CPUs with
    /// AVX-512-BF16). CPU only.
    pub compute_dtype: *const c_char,
}

/// What one step did.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct rlx_step_stats {
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub lr: f32,
    /// True when the loss or a gradient was not finite and nothing changed.
    pub skipped: bool,
    /// Optimizer steps taken so far.
    pub step: u64,
    /// Reward-model steps: fraction of pairs ranked correctly; DPO steps: fraction of pairs
    /// whose implicit reward prefers the chosen answer (0 otherwise).
    pub accuracy: f64,
    /// PPO: approximate KL to the rollout policy, ½·mean (log π − log π_old)²; GRPO: mean k3
    /// KL to the reference (0 otherwise).
    pub kl: f64,
    /// PPO and GRPO: fraction of response tokens whose ratio was clipped (0 otherwise).
    pub clip_fraction: f64,
    /// PPO and GRPO: mean entropy of the policy over the response tokens (0 otherwise).
    pub entropy: f64,
    /// PPO: the clipped value loss (0 otherwise).
    pub value_loss: f64,
}

/// The defaults: lr 1e-5, β (0.9, 0.999), ε 1e-8, no weight decay, clipping at 1, constant
/// schedule, full fine-tuning, no new head, seed 0, threads 0, f32 compute.
#[no_mangle]
pub extern "C" fn rlx_trainer_default_params() -> rlx_trainer_params {
    rlx_trainer_params {
        lr: 1e-5,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        warmup_steps: 0,
        total_steps: 0,
        lora_rank: 0,
        lora_alpha: 16.0,
        lora_targets: std::ptr::null(),
        gradient_checkpointing: false,
        head: RLX_HEAD_NONE,
        seed: 0,
        threads: 0,
        compute_dtype: std::ptr::null(),
    }
}

/// Runs `f` on the trainer behind a live handle, unless another thread is using it.
///
/// # Safety
/// `trainer` is NULL or a pointer from rlx_trainer_create / rlx_trainer_resume.
pub(crate) unsafe fn with_trainer<T>(
    trainer: *const rlx_trainer,
    f: impl FnOnce(&mut Trainer) -> FfiResult<T>,
) -> FfiResult<T> {
    // SAFETY: forwarded caller contract; a live trainer stays valid until rlx_trainer_free,
    // which the caller must not run concurrently.
    let cell = &unsafe { handle::live(trainer, "trainer") }?.trainer;
    let mut guard = cell.try_lock().map_err(|_| {
        FfiError::invalid("`trainer` is in use by another thread (calls must not overlap)")
    })?;
    f(&mut guard)
}

impl Handle for rlx_trainer {
    const LIVE: u64 = u64::from_le_bytes(*b"rlxtrain");
    const NAME: &'static str = "rlx_trainer";
    const MADE_BY: &'static str = "rlx_trainer_create";

    unsafe fn magic(this: *mut Self) -> *mut u64 {
        // SAFETY: `this` points to a (possibly freed) rlx_trainer, per the trait's contract.
        unsafe { std::ptr::addr_of_mut!((*this).magic) }
    }
}

fn boxed(trainer: Trainer) -> *mut rlx_trainer {
    handle::boxed(rlx_trainer {
        magic: rlx_trainer::LIVE,
        trainer: Mutex::new(trainer),
    })
}

/// Creates a trainer on the model at `path` (HF folder or GGUF). `params`: NULL for the
/// defaults. On success `*out_trainer` owns a new trainer (free it with rlx_trainer_free); on
/// failure it is set to NULL.
///
/// Returns RLX_OK; RLX_NULL_POINTER; RLX_IO; RLX_FORMAT; RLX_UNSUPPORTED; RLX_TOKENIZER;
/// RLX_INVALID_ARGUMENT (a setting out of range, an unknown LoRA target).
///
/// # Safety
/// `path` is NULL or NUL-terminated; `params` is NULL or points to an rlx_trainer_params whose
/// `lora_targets` is NULL or NUL-terminated; `out_trainer` is NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn rlx_trainer_create(
    path: *const c_char,
    params: *const rlx_trainer_params,
    out_trainer: *mut *mut rlx_trainer,
) -> rlx_status {
    boundary(|| {
        // SAFETY: the caller guarantees `out_trainer` is NULL or writable.
        let out = unsafe { OutPtr::new(out_trainer, "out_trainer") }?;
        out.set(std::ptr::null_mut());
        // SAFETY: the caller guarantees `path` is NULL or NUL-terminated.
        let path = path_from(unsafe { c_str(path, "path") }?)?;
        // SAFETY: the caller guarantees `params` is NULL or points to its struct.
        let p = unsafe { params_or(params, rlx_trainer_default_params()) };
        if p.head > RLX_HEAD_VALUE {
            return Err(FfiError::invalid(format!("unknown head {}", p.head)));
        }
        let targets = if p.lora_targets.is_null() {
            "q_proj,v_proj".to_string()
        } else {
            // SAFETY: the caller guarantees a non-NULL `lora_targets` is NUL-terminated.
            unsafe { c_str(p.lora_targets, "lora_targets") }?
                .to_str()
                .map_err(|_| FfiError::invalid("`lora_targets` is not UTF-8"))?
                .to_string()
        };
        let config = TrainConfig {
            lr: p.lr,
            beta1: p.beta1,
            beta2: p.beta2,
            eps: p.eps,
            weight_decay: p.weight_decay,
            max_grad_norm: (p.max_grad_norm > 0.0).then_some(p.max_grad_norm),
            schedule: Schedule::from_steps(p.warmup_steps, p.total_steps),
            compute: if p.compute_dtype.is_null() {
                ComputeDtype::F32
            } else {
                // SAFETY: the caller guarantees a non-NULL `compute_dtype` is NUL-terminated.
                let name = unsafe { c_str(p.compute_dtype, "compute_dtype") }?
                    .to_str()
                    .map_err(|_| FfiError::invalid("`compute_dtype` is not valid UTF-8"))?;
                ComputeDtype::parse(name)?
            },
        };
        let threads = usize::try_from(p.threads)
            .map_err(|_| FfiError::invalid("`threads` does not fit this platform"))?;
        let mut model = Model::load(
            &path,
            LoadOptions {
                threads,
                ..Default::default()
            },
        )?;
        match p.head {
            RLX_HEAD_NONE => {}
            RLX_HEAD_SCORE if model.weights().score.is_some() => {}
            RLX_HEAD_SCORE => model.add_score_head(p.seed),
            RLX_HEAD_VALUE => model.add_value_head(p.seed),
            other => return Err(FfiError::invalid(format!("unknown head {other}"))),
        }
        if p.lora_rank > 0 {
            model.attach_lora(&LoraConfig {
                rank: p.lora_rank as usize,
                alpha: p.lora_alpha,
                target_modules: targets.split(',').map(|t| t.trim().to_string()).collect(),
                seed: p.seed,
            })?;
        }
        model.set_gradient_checkpointing(p.gradient_checkpointing);
        out.set(boxed(Trainer::new(model, config)?));
        Ok(())
    })
}

/// Continues from a checkpoint folder written by rlx_trainer_save (`threads`: 0 = one per
/// core). On failure `*out_trainer` is set to NULL.
///
/// # Safety
/// `path` is NULL or NUL-terminated; `out_trainer` is NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn rlx_trainer_resume(
    path: *const c_char,
    threads: u32,
    out_trainer: *mut *mut rlx_trainer,
) -> rlx_status {
    boundary(|| {
        // SAFETY: the caller guarantees `out_trainer` is NULL or writable.
        let out = unsafe { OutPtr::new(out_trainer, "out_trainer") }?;
        out.set(std::ptr::null_mut());
        // SAFETY: the caller guarantees `path` is NULL or NUL-terminated.
        let path = path_from(unsafe { c_str(path, "path") }?)?;
        let threads = usize::try_from(threads)
            .map_err(|_| FfiError::invalid("`threads` does not fit this platform"))?;
        let (trainer, _) = Trainer::resume(
            &path,
            LoadOptions {
                threads,
                ..Default::default()
            },
        )?;
        out.set(boxed(trainer));
        Ok(())
    })
}

/// Writes a checkpoint folder at `path` (which must not exist): the model as an HF folder (or
/// a PEFT adapter with LoRA), the optimizer moments and the step. Atomic: a crash leaves no
/// partial folder under `path`.
///
/// # Safety
/// `trainer` is NULL or live; `path` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn rlx_trainer_save(
    trainer: *const rlx_trainer,
    path: *const c_char,
) -> rlx_status {
    boundary(|| {
        // SAFETY: the caller guarantees `path` is NULL or NUL-terminated.
        let path = path_from(unsafe { c_str(path, "path") }?)?;
        // SAFETY: forwarded caller contract.
        unsafe {
            with_trainer(trainer, |t| {
                Ok(t.save_checkpoint(&path, &serde_json::Value::Null)?)
            })
        }
    })
}

/// Frees a trainer. NULL is a no-op; a handle that is not live is usually detected.
///
/// # Safety
/// `trainer` is NULL or a pointer from rlx_trainer_create / rlx_trainer_resume that no other
/// thread is using.
#[no_mangle]
pub unsafe extern "C" fn rlx_trainer_free(trainer: *mut rlx_trainer) {
    // SAFETY: forwarded caller contract.
    boundary(|| unsafe { handle::free(trainer) });
}

/// Splits packed tokens into sequences of `lengths[i]` tokens.
pub(crate) fn unpack<'a>(tokens: &'a [u32], lengths: &[usize]) -> FfiResult<Vec<&'a [u32]>> {
    let total = lengths
        .iter()
        .try_fold(0usize, |a, &n| a.checked_add(n))
        .ok_or_else(|| FfiError::invalid("`lengths` overflow"))?;
    if total != tokens.len() {
        return Err(FfiError::invalid(format!(
            "`lengths` add up to {total} tokens but {} were given",
            tokens.len()
        )));
    }
    let mut at = 0;
    Ok(lengths
        .iter()
        .map(|&n| {
            let s = &tokens[at..at + n];
            at += n;
            s
        })
        .collect())
}

/// The optimizer's side of a step; the objective's own numbers are filled in by the caller.
pub(crate) fn step_stats(s: &rlx_core::StepStats) -> rlx_step_stats {
    rlx_step_stats {
        loss: s.loss,
        grad_norm: s.grad_norm,
        lr: s.lr,
        skipped: s.skipped,
        step: s.step,
        ..rlx_step_stats::default()
    }
}

/// One supervised fine-tuning step: mean cross-entropy over the tokens whose `mask` byte is
/// non-zero. `tokens` and `mask` hold `n_tokens` entries: `n_seqs` sequences back to back,
/// `lengths[i]` tokens each. `*out_stats` receives what the step did.
///
/// Returns RLX_OK; RLX_NULL_POINTER; RLX_INVALID_ARGUMENT (lengths that do not add up, masks
/// that select nothing, a trainer in use); RLX_OUT_OF_RANGE; RLX_CONTEXT_OVERFLOW.
///
/// # Safety
/// `trainer` is NULL or live; `tokens` and `mask` are NULL or hold `n_tokens` values;
/// `lengths` is NULL or holds `n_seqs`; `out_stats` is NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn rlx_trainer_sft_step(
    trainer: *const rlx_trainer,
    tokens: *const u32,
    mask: *const u8,
    n_tokens: usize,
    lengths: *const usize,
    n_seqs: usize,
    out_stats: *mut rlx_step_stats,
) -> rlx_status {
    boundary(|| {
        // SAFETY: forwarded caller contracts for every pointer.
        let (out, tokens, mask, lengths) = unsafe {
            (
                OutPtr::new(out_stats, "out_stats")?,
                input_slice(tokens, n_tokens, "tokens")?,
                input_slice(mask, n_tokens, "mask")?,
                input_slice(lengths, n_seqs, "lengths")?,
            )
        };
        let seqs = unpack(tokens, lengths)?;
        let flags: Vec<bool> = mask.iter().map(|&b| b != 0).collect();
        let masks: Vec<Vec<bool>> = unpack_flags(&flags, lengths);
        // SAFETY: forwarded caller contract.
        unsafe {
            with_trainer(trainer, |t| {
                let s = t.sft_step(&seqs, &masks)?;
                out.set(step_stats(&s));
                Ok(())
            })
        }
    })
}

pub(crate) fn unpack_flags(flags: &[bool], lengths: &[usize]) -> Vec<Vec<bool>> {
    let mut at = 0;
    lengths
        .iter()
        .map(|&n| {
            let m = flags[at..at + n].to_vec();
            at += n;
            m
        })
        .collect()
}

/// One reward-model step on `n_pairs` pairs: mean −log σ(r_chosen − r_rejected − margin).
/// Chosen and rejected sequences are packed like rlx_trainer_sft_step's; `out_stats->accuracy`
/// is the fraction of pairs ranked correctly. The trainer's model needs a score head
/// (RLX_HEAD_SCORE).
///
/// # Safety
/// As rlx_trainer_sft_step, for both packed batches.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn rlx_trainer_rm_step(
    trainer: *const rlx_trainer,
    chosen: *const u32,
    n_chosen_tokens: usize,
    chosen_lengths: *const usize,
    rejected: *const u32,
    n_rejected_tokens: usize,
    rejected_lengths: *const usize,
    n_pairs: usize,
    margin: f32,
    out_stats: *mut rlx_step_stats,
) -> rlx_status {
    boundary(|| {
        // SAFETY: forwarded caller contracts for every pointer.
        let (out, c, cl, r, rl) = unsafe {
            (
                OutPtr::new(out_stats, "out_stats")?,
                input_slice(chosen, n_chosen_tokens, "chosen")?,
                input_slice(chosen_lengths, n_pairs, "chosen_lengths")?,
                input_slice(rejected, n_rejected_tokens, "rejected")?,
                input_slice(rejected_lengths, n_pairs, "rejected_lengths")?,
            )
        };
        let (c, r) = (unpack(c, cl)?, unpack(r, rl)?);
        // SAFETY: forwarded caller contract.
        unsafe {
            with_trainer(trainer, |t| {
                let (s, pair) = t.rm_step(&c, &r, margin)?;
                out.set(rlx_step_stats {
                    accuracy: pair.accuracy,
                    ..step_stats(&s)
                });
                Ok(())
            })
        }
    })
}

/// The reward of each of `n_seqs` packed sequences (score head at the last token) into `out`
/// (capacity `cap` ≥ n_seqs, else RLX_BUFFER_TOO_SMALL with `*n_written` = n_seqs). The model
/// needs a score head (a `*ForSequenceClassification` checkpoint).
///
/// # Safety
/// `model` is NULL or live; `tokens` holds `n_tokens`; `lengths` holds `n_seqs`; `out` is NULL
/// or valid for `cap` writes; `n_written` is NULL or valid for one write.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn rlx_reward_score(
    model: *const rlx_model,
    tokens: *const u32,
    n_tokens: usize,
    lengths: *const usize,
    n_seqs: usize,
    out: *mut f32,
    cap: usize,
    n_written: *mut usize,
) -> rlx_status {
    boundary(|| {
        // SAFETY: forwarded caller contracts.
        let model = unsafe { model_ref(model) }?;
        // SAFETY: forwarded caller contracts.
        unsafe {
            crate::reward::score_into(
                model, tokens, n_tokens, lengths, n_seqs, out, cap, n_written,
            )
        }
    })
}
