//! Preference and reinforcement-learning steps: DPO, GRPO and PPO, plus what a C program needs
//! to run their loops — a snapshot of the trainer's current policy as a model handle (for
//! rlx_generate and rlx_logprobs), the value head's per-token values, GAE advantages and GRPO's
//! group advantages.
//!
//! Batches are packed as in rlx_trainer_sft_step: `n_seqs` sequences back to back
//! (`lengths[i]` tokens each) with one mask byte per token; a token whose mask byte is non-zero
//! (the first token of a sequence never is) is a *response token*. Per-token arrays (log-probs,
//! values, advantages, returns) hold one float per response token, sequence after sequence, in
//! token order — exactly what rlx_generate's `out_logprobs` gives for the new tokens.

use rlx_core::train::{dpo::DpoLoss, grpo, ppo};

use crate::model::{boxed_model, rlx_model};
use crate::ptr::{input_slice, params_or, OutBuf, OutPtr};
use crate::status::{boundary, rlx_status, FfiError, FfiResult};
use crate::train::{rlx_step_stats, rlx_trainer, step_stats, unpack, unpack_flags, with_trainer};

/// DPO's loss on the log-ratio margin h: −log σ(βh) (the DPO paper).
pub const RLX_DPO_SIGMOID: u32 = 0;
/// (h − 1/(2β))² (IPO).
pub const RLX_DPO_IPO: u32 = 1;
/// max(0, 1 − βh) (SLiC).
pub const RLX_DPO_HINGE: u32 = 2;

/// GRPO's aggregation: mean over each completion's tokens, then over completions.
pub const RLX_GRPO_LOSS_GRPO: u32 = 0;
/// Sum over all tokens ÷ tokens in the batch.
pub const RLX_GRPO_LOSS_BNPO: u32 = 1;
/// Sum over all tokens ÷ (completions × max_completion_length) (Dr. GRPO).
pub const RLX_GRPO_LOSS_DR_GRPO: u32 = 2;
/// Sum over all tokens ÷ tokens in the batch (DAPO; equals BNPO without accumulation).
pub const RLX_GRPO_LOSS_DAPO: u32 = 3;

#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct rlx_dpo_params {
    /// β, the strength of the implicit KL leash (> 0).
    pub beta: f64,
    /// RLX_DPO_SIGMOID, RLX_DPO_IPO or RLX_DPO_HINGE.
    pub loss_type: u32,
}

#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct rlx_grpo_params {
    /// β of the k3 KL term to the reference; 0 drops it (and the need for reference log-probs).
    pub beta: f64,
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    /// One of RLX_GRPO_LOSS_*.
    pub loss_type: u32,
    /// Dr. GRPO's normaliser; 0 = the longest completion in the batch.
    pub max_completion_length: u64,
}

#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct rlx_ppo_params {
    /// ε of the clipped surrogate.
    pub clip_range: f64,
    /// ε of the clipped value loss.
    pub clip_range_value: f64,
    pub vf_coef: f64,
    /// Weight of the entropy bonus (0 turns it off).
    pub entropy_coef: f64,
    pub gamma: f64,
    /// GAE's λ.
    pub lam: f64,
    /// Coefficient of the per-token KL penalty folded into the rewards.
    pub kl_coef: f64,
    pub whiten_advantages: bool,
}

/// DPO's defaults (TRL's): β 0.1, sigmoid loss.
#[no_mangle]
pub extern "C" fn rlx_dpo_default_params() -> rlx_dpo_params {
    rlx_dpo_params {
        beta: 0.1,
        loss_type: RLX_DPO_SIGMOID,
    }
}

/// GRPO's defaults (TRL's): β 0.04, ε 0.2 both sides, DAPO aggregation.
#[no_mangle]
pub extern "C" fn rlx_grpo_default_params() -> rlx_grpo_params {
    let d = grpo::GrpoConfig::default();
    rlx_grpo_params {
        beta: d.beta,
        epsilon_low: d.epsilon_low,
        epsilon_high: d.epsilon_high,
        loss_type: match d.loss_type {
            grpo::GrpoLossType::Grpo => RLX_GRPO_LOSS_GRPO,
            grpo::GrpoLossType::Bnpo => RLX_GRPO_LOSS_BNPO,
            grpo::GrpoLossType::DrGrpo => RLX_GRPO_LOSS_DR_GRPO,
            grpo::GrpoLossType::Dapo => RLX_GRPO_LOSS_DAPO,
        },
        max_completion_length: 0,
    }
}

/// PPO's defaults (TRL's): clip 0.2/0.2, vf_coef 0.1, no entropy bonus, γ 1, λ 0.95,
/// KL coefficient 0.05, whitened advantages.
#[no_mangle]
pub extern "C" fn rlx_ppo_default_params() -> rlx_ppo_params {
    let d = ppo::PpoConfig::default();
    rlx_ppo_params {
        clip_range: d.clip_range,
        clip_range_value: d.clip_range_value,
        vf_coef: d.vf_coef,
        entropy_coef: d.entropy_coef,
        gamma: d.gamma,
        lam: d.lam,
        kl_coef: d.kl_coef,
        whiten_advantages: d.whiten_advantages,
    }
}

/// A packed batch: the sequences, their masks and each one's number of response tokens.
struct Batch {
    seqs: Vec<Vec<u32>>,
    masks: Vec<Vec<bool>>,
    responses: Vec<usize>,
}

/// # Safety
/// `tokens` and `mask` are NULL or hold `n_tokens` values; `lengths` is NULL or holds `n_seqs`.
unsafe fn batch(
    tokens: *const u32,
    mask: *const u8,
    n_tokens: usize,
    lengths: *const usize,
    n_seqs: usize,
) -> FfiResult<Batch> {
    // SAFETY: forwarded caller contracts.
    let (tokens, mask, lengths) = unsafe {
        (
            input_slice(tokens, n_tokens, "tokens")?,
            input_slice(mask, n_tokens, "mask")?,
            input_slice(lengths, n_seqs, "lengths")?,
        )
    };
    let seqs: Vec<Vec<u32>> = unpack(tokens, lengths)?
        .into_iter()
        .map(<[u32]>::to_vec)
        .collect();
    let flags: Vec<bool> = mask.iter().map(|&b| b != 0).collect();
    let masks = unpack_flags(&flags, lengths);
    let responses = masks
        .iter()
        .map(|m| m.iter().skip(1).filter(|&&b| b).count())
        .collect();
    Ok(Batch {
        seqs,
        masks,
        responses,
    })
}

/// Splits a packed per-response-token array into one row per sequence.
///
/// # Safety
/// `values` is NULL or holds `n` floats.
unsafe fn per_token(
    values: *const f32,
    n: usize,
    name: &str,
    responses: &[usize],
) -> FfiResult<Vec<Vec<f64>>> {
    // SAFETY: forwarded caller contract.
    let values = unsafe { input_slice(values, n, name)? };
    let total: usize = responses.iter().sum();
    if total != n {
        return Err(FfiError::invalid(format!(
            "`{name}` holds {n} values but the masks select {total} response tokens"
        )));
    }
    let mut at = 0;
    Ok(responses
        .iter()
        .map(|&k| {
            let row = values[at..at + k].iter().map(|&v| v as f64).collect();
            at += k;
            row
        })
        .collect())
}

fn flatten_f32(rows: &[Vec<f64>]) -> Vec<f32> {
    rows.iter().flatten().map(|&v| v as f32).collect()
}

/// A model handle holding the trainer's current weights (heads and LoRA adapters included),
/// for rlx_generate, rlx_logprobs and rlx_reward_score — for example to sample a PPO or GRPO
/// rollout from the policy being trained. The snapshot shares memory with the trainer until
/// the next step changes the weights, and never changes afterwards. Free it with rlx_model_free.
///
/// Thread-safety: calls on one trainer must not overlap (an overlapping call fails with
/// RLX_INVALID_ARGUMENT instead of racing); different trainers are independent.
///
/// # Safety
/// `trainer` is NULL or live; `out_model` is NULL or valid for one pointer write.
#[no_mangle]
pub unsafe extern "C" fn rlx_trainer_model(
    trainer: *const rlx_trainer,
    out_model: *mut *mut rlx_model,
) -> rlx_status {
    boundary(|| {
        // SAFETY: the caller guarantees `out_model` is NULL or writable.
        let out = unsafe { OutPtr::new(out_model, "out_model") }?;
        out.set(std::ptr::null_mut());
        // SAFETY: the caller guarantees `trainer` is NULL or live.
        let model = unsafe { with_trainer(trainer, |t| Ok(t.model().clone())) }?;
        out.set(boxed_model(model));
        Ok(())
    })
}

/// The value head's estimate for each response token of a packed batch (the value of the state
/// before the token), packed like the other per-token arrays, into `out` (capacity `cap`, else
/// RLX_BUFFER_TOO_SMALL with `*n_written` = the number of response tokens). The trainer needs a
/// value head (RLX_HEAD_VALUE).
///
/// Thread-safety: calls on one trainer must not overlap (an overlapping call fails with
/// RLX_INVALID_ARGUMENT instead of racing); different trainers are independent.
///
/// # Safety
/// `trainer` is NULL or live; `tokens`/`mask` hold `n_tokens`; `lengths` holds `n_seqs`; `out`
/// is NULL or valid for `cap` writes; `n_written` is NULL or valid for one write.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn rlx_trainer_values(
    trainer: *const rlx_trainer,
    tokens: *const u32,
    mask: *const u8,
    n_tokens: usize,
    lengths: *const usize,
    n_seqs: usize,
    out: *mut f32,
    cap: usize,
    n_written: *mut usize,
) -> rlx_status {
    boundary(|| {
        // SAFETY: forwarded caller contracts.
        let (n_written, out, b) = unsafe {
            (
                OutPtr::new(n_written, "n_written")?,
                OutBuf::new(out, cap, "out")?,
                batch(tokens, mask, n_tokens, lengths, n_seqs)?,
            )
        };
        n_written.set(0);
        let need: usize = b.responses.iter().sum();
        n_written.set(need);
        if need > cap {
            return Err(FfiError::too_small("values", need, cap));
        }
        // SAFETY: the caller guarantees `trainer` is NULL or live.
        let all = unsafe { with_trainer(trainer, |t| Ok(t.model().values(&b.seqs)?)) }?;
        let picked: Vec<f32> = all
            .iter()
            .zip(&b.masks)
            .flat_map(|(v, m)| (1..m.len()).filter(|&t| m[t]).map(move |t| v[t - 1]))
            .collect();
        out.write(&picked)
    })
}

/// One DPO step on `n_pairs` preference pairs, chosen and rejected each packed with masks (the
/// response tokens are the ones scored). `ref_chosen`/`ref_rejected` hold, per pair, the
/// reference model's summed log-prob of the response (`n_pairs` each; compute them once with
/// rlx_logprobs on the frozen reference). `out_stats->accuracy` is the fraction of pairs whose
/// implicit reward prefers the chosen answer.
///
/// Thread-safety: calls on one trainer must not overlap (an overlapping call fails with
/// RLX_INVALID_ARGUMENT instead of racing); different trainers are independent.
///
/// # Safety
/// As rlx_trainer_sft_step for both packed batches; `ref_chosen` and `ref_rejected` are NULL or
/// hold `n_pairs` doubles; `params` is NULL or points to an rlx_dpo_params.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn rlx_trainer_dpo_step(
    trainer: *const rlx_trainer,
    chosen: *const u32,
    chosen_mask: *const u8,
    n_chosen_tokens: usize,
    chosen_lengths: *const usize,
    rejected: *const u32,
    rejected_mask: *const u8,
    n_rejected_tokens: usize,
    rejected_lengths: *const usize,
    n_pairs: usize,
    ref_chosen: *const f64,
    ref_rejected: *const f64,
    params: *const rlx_dpo_params,
    out_stats: *mut rlx_step_stats,
) -> rlx_status {
    boundary(|| {
        // SAFETY: forwarded caller contracts.
        let (out, c, r, ref_c, ref_r) = unsafe {
            (
                OutPtr::new(out_stats, "out_stats")?,
                batch(
                    chosen,
                    chosen_mask,
                    n_chosen_tokens,
                    chosen_lengths,
                    n_pairs,
                )?,
                batch(
                    rejected,
                    rejected_mask,
                    n_rejected_tokens,
                    rejected_lengths,
                    n_pairs,
                )?,
                input_slice(ref_chosen, n_pairs, "ref_chosen")?,
                input_slice(ref_rejected, n_pairs, "ref_rejected")?,
            )
        };
        // SAFETY: the caller guarantees `params` is NULL or points to its struct.
        let p = unsafe { params_or(params, rlx_dpo_default_params()) };
        let kind = match p.loss_type {
            RLX_DPO_SIGMOID => DpoLoss::Sigmoid,
            RLX_DPO_IPO => DpoLoss::Ipo,
            RLX_DPO_HINGE => DpoLoss::Hinge,
            other => return Err(FfiError::invalid(format!("unknown DPO loss type {other}"))),
        };
        // SAFETY: the caller guarantees `trainer` is NULL or live.
        unsafe {
            with_trainer(trainer, |t| {
                let (s, d) = t.dpo_step(
                    &c.seqs, &c.masks, &r.seqs, &r.masks, ref_c, ref_r, p.beta, kind,
                )?;
                out.set(rlx_step_stats {
                    accuracy: d.accuracy,
                    ..step_stats(&s)
                });
                Ok(())
            })
        }
    })
}

/// GRPO's advantages: each reward minus its group's mean (divided by the group's standard
/// deviation + 1e-4 when `scale_rewards`), for `n` rewards in consecutive groups of
/// `group_size` (≥ 2, dividing `n`), into `out` (capacity `cap` ≥ n).
///
/// Thread-safety: touches no shared state; any thread, any time.
///
/// # Safety
/// `rewards` is NULL or holds `n` floats; `out` is NULL or valid for `cap` writes.
#[no_mangle]
pub unsafe extern "C" fn rlx_group_advantages(
    rewards: *const f32,
    n: usize,
    group_size: usize,
    scale_rewards: bool,
    out: *mut f32,
    cap: usize,
) -> rlx_status {
    boundary(|| {
        // SAFETY: forwarded caller contracts.
        let (rewards, out) = unsafe {
            (
                input_slice(rewards, n, "rewards")?,
                OutBuf::new(out, cap, "out")?,
            )
        };
        if n > cap {
            return Err(FfiError::too_small("advantages", n, cap));
        }
        let r: Vec<f64> = rewards.iter().map(|&v| v as f64).collect();
        let a = grpo::group_advantages(&r, group_size, scale_rewards)?;
        out.write(&a.iter().map(|&v| v as f32).collect::<Vec<_>>())
    })
}

/// One GRPO step on a packed batch of completions (prompt + completion per sequence, the mask
/// selecting the completion). `advantages` holds one value per sequence
/// (rlx_group_advantages). `old_logprobs` (the sampling policy's, from rlx_generate) may be
/// NULL, meaning "this very policy" (every ratio exactly 1); `ref_logprobs` (the frozen
/// reference's, from rlx_logprobs) is needed when β > 0. Both are per response token, `n_resp`
/// values. `out_stats` also receives the KL to the reference, the clip fraction and the entropy.
///
/// Thread-safety: calls on one trainer must not overlap (an overlapping call fails with
/// RLX_INVALID_ARGUMENT instead of racing); different trainers are independent.
///
/// # Safety
/// As rlx_trainer_sft_step; `advantages` holds `n_seqs` floats; `old_logprobs` and
/// `ref_logprobs` are NULL or hold `n_resp` floats; `params` is NULL or an rlx_grpo_params.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn rlx_trainer_grpo_step(
    trainer: *const rlx_trainer,
    tokens: *const u32,
    mask: *const u8,
    n_tokens: usize,
    lengths: *const usize,
    n_seqs: usize,
    advantages: *const f32,
    old_logprobs: *const f32,
    ref_logprobs: *const f32,
    n_resp: usize,
    params: *const rlx_grpo_params,
    out_stats: *mut rlx_step_stats,
) -> rlx_status {
    boundary(|| {
        // SAFETY: forwarded caller contracts.
        let (out, b, adv) = unsafe {
            (
                OutPtr::new(out_stats, "out_stats")?,
                batch(tokens, mask, n_tokens, lengths, n_seqs)?,
                input_slice(advantages, n_seqs, "advantages")?,
            )
        };
        let optional = |ptr: *const f32, name: &str| -> FfiResult<Option<Vec<Vec<f64>>>> {
            if ptr.is_null() {
                return Ok(None);
            }
            // SAFETY: non-NULL, so per the caller it holds `n_resp` floats.
            Ok(Some(unsafe { per_token(ptr, n_resp, name, &b.responses) }?))
        };
        let old = optional(old_logprobs, "old_logprobs")?;
        let reference = optional(ref_logprobs, "ref_logprobs")?;
        // SAFETY: the caller guarantees `params` is NULL or points to its struct.
        let p = unsafe { params_or(params, rlx_grpo_default_params()) };
        let config = grpo::GrpoConfig {
            beta: p.beta,
            epsilon_low: p.epsilon_low,
            epsilon_high: p.epsilon_high,
            loss_type: match p.loss_type {
                RLX_GRPO_LOSS_GRPO => grpo::GrpoLossType::Grpo,
                RLX_GRPO_LOSS_BNPO => grpo::GrpoLossType::Bnpo,
                RLX_GRPO_LOSS_DR_GRPO => grpo::GrpoLossType::DrGrpo,
                RLX_GRPO_LOSS_DAPO => grpo::GrpoLossType::Dapo,
                other => return Err(FfiError::invalid(format!("unknown GRPO loss type {other}"))),
            },
            max_completion_length: usize::try_from(p.max_completion_length)
                .ok()
                .filter(|&n| n > 0),
            ..grpo::GrpoConfig::default()
        };
        let adv: Vec<f64> = adv.iter().map(|&v| v as f64).collect();
        let batch = grpo::GrpoBatch {
            sequences: &b.seqs,
            masks: &b.masks,
            advantages: &adv,
            old_logprobs: old.as_deref(),
            ref_logprobs: reference.as_deref(),
        };
        // SAFETY: the caller guarantees `trainer` is NULL or live.
        unsafe {
            with_trainer(trainer, |t| {
                let (s, g) = t.grpo_step(&batch, &config)?;
                out.set(rlx_step_stats {
                    kl: g.kl,
                    clip_fraction: g.clip_fraction,
                    entropy: g.entropy,
                    ..step_stats(&s)
                });
                Ok(())
            })
        }
    })
}

/// PPO's first stage for a rollout: the per-token rewards (−kl_coef × (log π_old − log π_ref),
/// plus each sequence's score at its last response token), GAE advantages (whitened when
/// `params->whiten_advantages`) and returns, written per response token into `out_advantages`
/// and `out_returns` (capacity `cap` each; RLX_BUFFER_TOO_SMALL reports the count in
/// `*n_written`). `scores` holds one reward-model score per sequence.
///
/// Thread-safety: touches no shared state; any thread, any time.
///
/// # Safety
/// `mask` holds `n_tokens` bytes and `lengths` `n_seqs` values (the batch's layout);
/// `old_logprobs`, `ref_logprobs` and `old_values` hold `n_resp` floats; `scores` holds
/// `n_seqs`; the outputs are NULL or valid for `cap` writes; `n_written` is NULL or writable.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn rlx_ppo_advantages(
    mask: *const u8,
    n_tokens: usize,
    lengths: *const usize,
    n_seqs: usize,
    old_logprobs: *const f32,
    ref_logprobs: *const f32,
    old_values: *const f32,
    n_resp: usize,
    scores: *const f32,
    params: *const rlx_ppo_params,
    out_advantages: *mut f32,
    out_returns: *mut f32,
    cap: usize,
    n_written: *mut usize,
) -> rlx_status {
    boundary(|| {
        // SAFETY: forwarded caller contracts.
        let (n_written, out_a, out_r, mask, lengths, scores) = unsafe {
            (
                OutPtr::new(n_written, "n_written")?,
                OutBuf::new(out_advantages, cap, "out_advantages")?,
                OutBuf::new(out_returns, cap, "out_returns")?,
                input_slice(mask, n_tokens, "mask")?,
                input_slice(lengths, n_seqs, "lengths")?,
                input_slice(scores, n_seqs, "scores")?,
            )
        };
        n_written.set(n_resp);
        let total = lengths
            .iter()
            .try_fold(0usize, |a, &n| a.checked_add(n))
            .ok_or_else(|| FfiError::invalid("`lengths` overflow"))?;
        if total != n_tokens {
            return Err(FfiError::invalid(format!(
                "`lengths` add up to {total} tokens but the mask holds {n_tokens}"
            )));
        }
        let flags: Vec<bool> = mask.iter().map(|&b| b != 0).collect();
        let responses: Vec<usize> = unpack_flags(&flags, lengths)
            .iter()
            .map(|m| m.iter().skip(1).filter(|&&b| b).count())
            .collect();
        // SAFETY: per the caller each holds `n_resp` floats.
        let (old, reference, values) = unsafe {
            (
                per_token(old_logprobs, n_resp, "old_logprobs", &responses)?,
                per_token(ref_logprobs, n_resp, "ref_logprobs", &responses)?,
                per_token(old_values, n_resp, "old_values", &responses)?,
            )
        };
        if n_resp > cap {
            return Err(FfiError::too_small("advantages", n_resp, cap));
        }
        let scores: Vec<f64> = scores.iter().map(|&v| v as f64).collect();
        // SAFETY: NULL is handled; otherwise the caller guarantees an rlx_ppo_params.
        let config = unsafe { ppo_config(params) };
        let a = ppo::ppo_advantages(&old, &reference, &values, &scores, &config)?;
        out_a.write(&flatten_f32(&a.advantages))?;
        out_r.write(&flatten_f32(&a.returns))
    })
}

/// # Safety
/// `params` is NULL or points to an rlx_ppo_params.
unsafe fn ppo_config(params: *const rlx_ppo_params) -> ppo::PpoConfig {
    // SAFETY: the caller guarantees `params` is NULL or points to its struct.
    let p = unsafe { params_or(params, rlx_ppo_default_params()) };
    ppo::PpoConfig {
        clip_range: p.clip_range,
        clip_range_value: p.clip_range_value,
        vf_coef: p.vf_coef,
        entropy_coef: p.entropy_coef,
        gamma: p.gamma,
        lam: p.lam,
        kl_coef: p.kl_coef,
        whiten_advantages: p.whiten_advantages,
    }
}

/// One PPO minibatch step: clipped surrogate + clipped value loss (+ entropy bonus) on a packed
/// batch, from the rollout's per-response-token `old_logprobs` and `old_values` and the
/// `advantages` and `returns` of rlx_ppo_advantages (`n_resp` floats each). The trainer needs a
/// value head (RLX_HEAD_VALUE). `out_stats` also receives the approximate KL to the rollout
/// policy, the clip fraction, the entropy and the value loss.
///
/// Thread-safety: calls on one trainer must not overlap (an overlapping call fails with
/// RLX_INVALID_ARGUMENT instead of racing); different trainers are independent.
///
/// # Safety
/// As rlx_trainer_sft_step; the four per-token arrays are NULL or hold `n_resp` floats;
/// `params` is NULL or points to an rlx_ppo_params.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn rlx_trainer_ppo_step(
    trainer: *const rlx_trainer,
    tokens: *const u32,
    mask: *const u8,
    n_tokens: usize,
    lengths: *const usize,
    n_seqs: usize,
    old_logprobs: *const f32,
    old_values: *const f32,
    advantages: *const f32,
    returns: *const f32,
    n_resp: usize,
    params: *const rlx_ppo_params,
    out_stats: *mut rlx_step_stats,
) -> rlx_status {
    boundary(|| {
        // SAFETY: forwarded caller contracts.
        let (out, b) = unsafe {
            (
                OutPtr::new(out_stats, "out_stats")?,
                batch(tokens, mask, n_tokens, lengths, n_seqs)?,
            )
        };
        // SAFETY: per the caller each holds `n_resp` floats.
        let (old, values, adv, ret) = unsafe {
            (
                per_token(old_logprobs, n_resp, "old_logprobs", &b.responses)?,
                per_token(old_values, n_resp, "old_values", &b.responses)?,
                per_token(advantages, n_resp, "advantages", &b.responses)?,
                per_token(returns, n_resp, "returns", &b.responses)?,
            )
        };
        // SAFETY: NULL is handled; otherwise the caller guarantees an rlx_ppo_params.
        let config = unsafe { ppo_config(params) };
        let minibatch = ppo::PpoMinibatch {
            sequences: &b.seqs,
            masks: &b.masks,
            old_logprobs: &old,
            old_values: &values,
            advantages: &adv,
            returns: &ret,
        };
        // SAFETY: the caller guarantees `trainer` is NULL or live.
        unsafe {
            with_trainer(trainer, |t| {
                let (s, p) = t.ppo_step(&minibatch, &config)?;
                out.set(rlx_step_stats {
                    kl: p.approx_kl,
                    clip_fraction: p.clip_fraction,
                    entropy: p.entropy,
                    value_loss: p.value_loss,
                    ..step_stats(&s)
                });
                Ok(())
            })
        }
    })
}
