//! A reward model as its own handle: a `*ForSequenceClassification` checkpoint (a decoder with a
//! scalar score head), loaded once and scored from any number of threads.

use std::ffi::c_char;

use rlx_core::{LoadOptions, Model};

use crate::handle::{self, Handle};
use crate::model::{path_from, rlx_model_default_params, rlx_model_params};
use crate::ptr::{c_str, input_slice, params_or, OutBuf, OutPtr};
use crate::status::{boundary, rlx_status, FfiError, FfiResult};
use crate::train::unpack;

/// A loaded reward model. Create with rlx_reward_model_load; free with rlx_reward_model_free.
/// Immutable once loaded: any number of threads may score with it at once; rlx_reward_model_free
/// must not run concurrently with another call on it.
#[allow(non_camel_case_types)]
pub struct rlx_reward_model {
    magic: u64,
    model: Model,
}

impl Handle for rlx_reward_model {
    const LIVE: u64 = u64::from_le_bytes(*b"rlxrewrd");
    const NAME: &'static str = "rlx_reward_model";
    const MADE_BY: &'static str = "rlx_reward_model_load";

    unsafe fn magic(this: *mut Self) -> *mut u64 {
        // SAFETY: `this` points to a (possibly freed) rlx_reward_model, per the trait's contract.
        unsafe { std::ptr::addr_of_mut!((*this).magic) }
    }
}

/// Loads a reward model: an HF `*ForSequenceClassification` folder with `num_labels` = 1 (what
/// rlx's reward-model training and transformers write). A checkpoint without a score head is
/// RLX_INVALID_ARGUMENT. `params`: NULL for rlx_model_default_params(). `*out` is set to the
/// new handle, or NULL on failure; the caller owns it and frees it with rlx_reward_model_free.
///
/// # Safety
/// `path` is NULL or NUL-terminated; `params` is NULL or points to an rlx_model_params; `out`
/// is NULL or valid for one pointer write.
#[no_mangle]
pub unsafe extern "C" fn rlx_reward_model_load(
    path: *const c_char,
    params: *const rlx_model_params,
    out: *mut *mut rlx_reward_model,
) -> rlx_status {
    boundary(|| {
        // SAFETY: the caller guarantees `out` is NULL or writable.
        let out = unsafe { OutPtr::new(out, "out") }?;
        out.set(std::ptr::null_mut());
        // SAFETY: the caller guarantees `path` is NULL or NUL-terminated.
        let path = path_from(unsafe { c_str(path, "path") }?)?;
        // SAFETY: the caller guarantees `params` is NULL or points to its struct.
        let params = unsafe { params_or(params, rlx_model_default_params()) };
        let threads = usize::try_from(params.threads)
            .map_err(|_| FfiError::invalid("`threads` does not fit this platform"))?;
        let model = Model::load(
            &path,
            LoadOptions {
                threads,
                ..Default::default()
            },
        )?;
        if model.weights().score.is_none() {
            return Err(FfiError::invalid(format!(
                "{} has no score head (a reward model is a *ForSequenceClassification checkpoint)",
                path.display()
            )));
        }
        out.set(handle::boxed(rlx_reward_model {
            magic: rlx_reward_model::LIVE,
            model,
        }));
        Ok(())
    })
}

/// The reward of each of `n_seqs` packed sequences (`lengths[i]` tokens each, back to back in
/// `tokens`), read at its last token, into `out` (capacity `cap` ≥ n_seqs, else
/// RLX_BUFFER_TOO_SMALL with `*n_written` = n_seqs).
///
/// Thread-safety: any number of threads may score with one reward model at once.
///
/// # Safety
/// `reward_model` is NULL or live; `tokens` holds `n_tokens`; `lengths` holds `n_seqs`; `out`
/// is NULL or valid for `cap` writes; `n_written` is NULL or valid for one write.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn rlx_reward_model_score(
    reward_model: *const rlx_reward_model,
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
        let model = &unsafe { handle::live(reward_model, "reward_model") }?.model;
        // SAFETY: forwarded caller contracts.
        unsafe {
            score_into(
                model, tokens, n_tokens, lengths, n_seqs, out, cap, n_written,
            )
        }
    })
}

/// Scores packed sequences with `model`'s score head into a caller's buffer.
///
/// # Safety
/// As rlx_reward_model_score, for the buffers.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn score_into(
    model: &Model,
    tokens: *const u32,
    n_tokens: usize,
    lengths: *const usize,
    n_seqs: usize,
    out: *mut f32,
    cap: usize,
    n_written: *mut usize,
) -> FfiResult {
    // SAFETY: forwarded caller contracts.
    let n_written = unsafe { OutPtr::new(n_written, "n_written") }?;
    n_written.set(0);
    // SAFETY: forwarded caller contracts.
    let (tokens, lengths, out) = unsafe {
        (
            input_slice(tokens, n_tokens, "tokens")?,
            input_slice(lengths, n_seqs, "lengths")?,
            OutBuf::new(out, cap, "out")?,
        )
    };
    if n_seqs > out.capacity() {
        n_written.set(n_seqs);
        return Err(FfiError::too_small("rewards", n_seqs, cap));
    }
    let seqs = unpack(tokens, lengths)?;
    let rewards = model.reward_scores(&seqs)?;
    out.write(&rewards)?;
    n_written.set(rewards.len());
    Ok(())
}

/// Frees a reward model from rlx_reward_model_load. NULL is a no-op; a handle that is not live
/// (for example one already freed) is usually detected and left alone, with rlx_last_error()
/// saying so — do not rely on that.
///
/// # Safety
/// `reward_model` is NULL or a pointer from rlx_reward_model_load that no other thread is using.
#[no_mangle]
pub unsafe extern "C" fn rlx_reward_model_free(reward_model: *mut rlx_reward_model) {
    // SAFETY: forwarded caller contract.
    boundary(|| unsafe { handle::free(reward_model) });
}
