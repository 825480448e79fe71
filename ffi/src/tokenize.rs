//! Text ↔ token ids through the model's tokenizer, into caller-owned buffers with the
//! "tell me the size I need" convention.

use std::ffi::c_char;

use crate::model::{model_ref, rlx_model};
use crate::ptr::{c_str, input_slice, write_c_string, OutBuf, OutPtr};
use crate::status::{boundary, rlx_status, FfiError};

/// Token ids of `text` (NUL-terminated UTF-8). `add_special`: apply the tokenizer's
/// post-processor (a BOS token for Llama-style tokenizers), as transformers does by default.
///
/// The ids are copied into `out` (capacity `cap` ids) and `*n_written` receives their count. If
/// `cap` is too small nothing is copied, `*n_written` receives the count needed and the call
/// returns RLX_BUFFER_TOO_SMALL; call again with a larger buffer. `out` may be NULL when `cap`
/// is 0 (to ask for the size).
///
/// Returns RLX_OK; RLX_NULL_POINTER; RLX_INVALID_ARGUMENT (not a live model, `text` not UTF-8);
/// RLX_NO_TOKENIZER; RLX_TOKENIZER; RLX_BUFFER_TOO_SMALL.
///
/// # Safety
/// `model` is NULL or a live model; `text` is NULL or NUL-terminated; `out` is NULL or valid for
/// `cap` writes; `n_written` is NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn rlx_tokenize(
    model: *const rlx_model,
    text: *const c_char,
    add_special: bool,
    out: *mut u32,
    cap: usize,
    n_written: *mut usize,
) -> rlx_status {
    boundary(|| {
        // SAFETY: the caller guarantees `n_written` is NULL or writable.
        let n_written = unsafe { OutPtr::new(n_written, "n_written") }?;
        n_written.set(0);
        // SAFETY: forwarded caller contracts for `model`, `text` and `out`.
        let (model, text, out) = unsafe {
            (
                model_ref(model)?,
                c_str(text, "text")?,
                OutBuf::new(out, cap, "out")?,
            )
        };
        let text = text
            .to_str()
            .map_err(|e| FfiError::invalid(format!("`text` is not valid UTF-8: {e}")))?;
        let ids = model.require_tokenizer()?.encode(text, add_special)?;
        n_written.set(ids.len());
        if ids.len() > out.capacity() {
            return Err(FfiError::too_small("tokenized text", ids.len(), cap));
        }
        out.write(&ids)
    })
}

/// Text of `n_tokens` token ids. `skip_special`: leave out special tokens (BOS, EOS, ...).
///
/// The UTF-8 text and a terminating NUL are copied into `out` (capacity `cap` bytes) and
/// `*n_written` receives the text's length in bytes, without the NUL. If `cap` is too small the
/// call returns RLX_BUFFER_TOO_SMALL, `*n_written` receives the capacity needed (length + 1 for
/// the NUL) and `out`, if `cap > 0`, receives an empty string. `out` may be NULL when `cap` is
/// 0. The text can contain NUL bytes if the tokens encode them: trust `*n_written`.
///
/// Returns RLX_OK; RLX_NULL_POINTER; RLX_INVALID_ARGUMENT (not a live model); RLX_OUT_OF_RANGE
/// (an id ≥ the vocabulary size); RLX_NO_TOKENIZER; RLX_TOKENIZER; RLX_BUFFER_TOO_SMALL.
///
/// # Safety
/// `model` is NULL or a live model; `tokens` is NULL or points to `n_tokens` ids; `out` is NULL
/// or valid for `cap` writes; `n_written` is NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn rlx_detokenize(
    model: *const rlx_model,
    tokens: *const u32,
    n_tokens: usize,
    skip_special: bool,
    out: *mut c_char,
    cap: usize,
    n_written: *mut usize,
) -> rlx_status {
    boundary(|| {
        // SAFETY: the caller guarantees `n_written` is NULL or writable.
        let n_written = unsafe { OutPtr::new(n_written, "n_written") }?;
        n_written.set(0);
        // SAFETY: forwarded caller contracts for `model`, `tokens` and `out`.
        let (model, tokens, out) = unsafe {
            (
                model_ref(model)?,
                input_slice(tokens, n_tokens, "tokens")?,
                OutBuf::new(out.cast::<u8>(), cap, "out")?,
            )
        };
        // Ids the tokenizer does not know would silently vanish from the text; say so instead.
        let vocab = model.config().vocab_size;
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(rlx_core::Error::TokenOutOfRange { id, vocab }.into());
        }
        let text = model.require_tokenizer()?.decode(tokens, skip_special)?;
        write_c_string(&out, &n_written, text, "decoded text")
    })
}
