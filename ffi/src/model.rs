//! The model handle: load, free, and what a caller needs to know about it.
//!
//! `rlx_model` is a Box behind an opaque pointer. It starts with a magic word that is checked on
//! every entry and overwritten on free, so a stray or already-freed pointer is usually reported
//! as RLX_INVALID_ARGUMENT instead of being used. That check is best effort (sqlite's "not
//! foolproof"): using a freed model is still undefined behaviour.

use std::ffi::{c_char, CStr};
use std::path::PathBuf;

use rlx_core::{LoadOptions, Model};

use crate::handle::{self, Handle};
use crate::ptr::{c_str, params_or, OutBuf, OutPtr};
use crate::status::{boundary, boundary_value, rlx_status, FfiError, FfiResult};

/// A loaded model: weights, config and, when the checkpoint has one, tokenizer.
///
/// Create with rlx_model_load; free with rlx_model_free. A model is immutable once loaded, so
/// one model may be used by several threads at once; rlx_model_free must not run concurrently
/// with any other call on the same model.
#[allow(non_camel_case_types)]
pub struct rlx_model {
    magic: u64,
    model: Model,
}

// Sharing one handle across threads relies on this.
const _: () = {
    const fn shareable<T: Send + Sync>() {}
    shareable::<Model>()
};

/// How to load a model. Start from rlx_model_default_params() and change the fields you need:
/// fields are only ever appended, and each new one's default keeps the old behaviour.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct rlx_model_params {
    /// Worker threads for this model's calls. 0 = one per CPU core, from a pool shared by all
    /// models loaded with 0.
    pub threads: u32,
    /// Non-zero: accept weights holding NaN or infinite values. 0 (the default): such a file is
    /// refused with RLX_FORMAT naming the first such tensor.
    pub allow_non_finite: u8,
    /// Where the model runs: NULL or "cpu" (the default), "cuda" or "cuda:N". On CUDA, logits,
    /// log-probs, generation, scores and training (gradients and AdamW; not LoRA) run on the
    /// device (not yet verified on a GPU); a missing driver, device, NVRTC or cuBLAS is
    /// RLX_UNSUPPORTED.
    pub device: *const c_char,
    /// On CUDA: NULL or "f32" (the default), or "bf16": the matrices and the KV cache stored
    /// as bf16 (sums stay f32; a trainer trains an f32 copy). Must be f32 on the CPU.
    pub device_dtype: *const c_char,
    /// Non-zero: a GGUF's Q4_0/Q4_1/Q8_0/Q4_K/Q6_K matrices run with 8-bit activations (integer dot
    /// products, as llama.cpp runs them): faster decoding, log-probs within the activations'
    /// rounding of the exact ones (generation and rlx_logprobs still agree exactly; training
    /// log-probs no longer equal the model's). CPU and GGUF only, else RLX_INVALID_ARGUMENT.
    /// 0 (the default): exact.
    pub int8_activations: u8,
}

impl Handle for rlx_model {
    const LIVE: u64 = u64::from_le_bytes(*b"rlxmodel");
    const NAME: &'static str = "rlx_model";
    const MADE_BY: &'static str = "rlx_model_load";

    unsafe fn magic(this: *mut Self) -> *mut u64 {
        // SAFETY: `this` points to a (possibly freed) rlx_model, per the trait's contract.
        unsafe { std::ptr::addr_of_mut!((*this).magic) }
    }
}

/// A new handle owning `model` (released by rlx_model_free).
pub(crate) fn boxed_model(model: Model) -> *mut rlx_model {
    handle::boxed(rlx_model {
        magic: rlx_model::LIVE,
        model,
    })
}

/// Borrows the model behind a handle.
///
/// # Safety
/// `model` is NULL or a pointer from rlx_model_load, not freed while the borrow is used.
pub(crate) unsafe fn model_ref<'a>(model: *const rlx_model) -> FfiResult<&'a Model> {
    // SAFETY: forwarded caller contract.
    Ok(&unsafe { handle::live(model, "model") }?.model)
}

/// The default load parameters (threads = 0).
#[no_mangle]
pub extern "C" fn rlx_model_default_params() -> rlx_model_params {
    rlx_model_params {
        threads: 0,
        allow_non_finite: 0,
        device: std::ptr::null(),
        device_dtype: std::ptr::null(),
        int8_activations: 0,
    }
}

pub(crate) fn path_from(c: &CStr) -> FfiResult<PathBuf> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(PathBuf::from(std::ffi::OsStr::from_bytes(c.to_bytes())))
    }
    #[cfg(not(unix))]
    {
        c.to_str()
            .map(PathBuf::from)
            .map_err(|_| FfiError::invalid("`path` is not valid UTF-8"))
    }
}

/// Loads a model: a Hugging Face folder (config.json, model.safetensors or shards with
/// model.safetensors.index.json, and when present tokenizer.json, tokenizer_config.json,
/// generation_config.json) or a single GGUF file.
///
/// `path`: the folder or file, NUL-terminated. `params`: NULL for rlx_model_default_params().
/// On success `*out_model` receives a new model owned by the caller: free it with
/// rlx_model_free. On failure `*out_model` is set to NULL.
///
/// Returns RLX_OK; RLX_NULL_POINTER (`path` or `out_model` is NULL); RLX_IO (the path or a file
/// in the folder cannot be read); RLX_FORMAT (malformed config or weights); RLX_UNSUPPORTED (an
/// architecture or dtype rlx does not run); RLX_TOKENIZER (tokenizer.json is malformed);
/// RLX_INVALID_ARGUMENT (the thread pool cannot be created, or an unknown `device`);
/// RLX_UNSUPPORTED also for a CUDA `device` (no driver, device, NVRTC or cuBLAS).
///
/// # Safety
/// `path` is NULL or a NUL-terminated string; `params` is NULL or points to an
/// rlx_model_params whose `device` is NULL or NUL-terminated; `out_model` is NULL or valid for
/// one pointer write.
#[no_mangle]
pub unsafe extern "C" fn rlx_model_load(
    path: *const c_char,
    params: *const rlx_model_params,
    out_model: *mut *mut rlx_model,
) -> rlx_status {
    boundary(|| {
        // SAFETY: the caller guarantees `out_model` is NULL or writable.
        let out = unsafe { OutPtr::new(out_model, "out_model") }?;
        out.set(std::ptr::null_mut());
        // SAFETY: the caller guarantees `path` is NULL or NUL-terminated.
        let path = path_from(unsafe { c_str(path, "path") }?)?;
        // SAFETY: the caller guarantees `params` is NULL or points to its struct.
        let params = unsafe { params_or(params, rlx_model_default_params()) };
        let threads = usize::try_from(params.threads)
            .map_err(|_| FfiError::invalid("`threads` does not fit this platform"))?;
        let device = if params.device.is_null() {
            rlx_core::Device::Cpu
        } else {
            // SAFETY: the caller guarantees a non-NULL `device` is NUL-terminated.
            unsafe { c_str(params.device, "device") }?
                .to_str()
                .map_err(|_| FfiError::invalid("`device` is not valid UTF-8"))?
                .parse()?
        };
        let device_dtype = if params.device_dtype.is_null() {
            rlx_core::DeviceDtype::F32
        } else {
            // SAFETY: the caller guarantees a non-NULL `device_dtype` is NUL-terminated.
            unsafe { c_str(params.device_dtype, "device_dtype") }?
                .to_str()
                .map_err(|_| FfiError::invalid("`device_dtype` is not valid UTF-8"))?
                .parse()?
        };
        let model = Model::load(
            &path,
            LoadOptions {
                threads,
                allow_non_finite: params.allow_non_finite != 0,
                int8_activations: params.int8_activations != 0,
                device,
                device_dtype,
                ..Default::default()
            },
        )?;
        out.set(boxed_model(model));
        Ok(())
    })
}

/// Frees a model from rlx_model_load. NULL is a no-op. A handle that is not live (for example
/// one already freed) is usually detected and left alone, with rlx_last_error() saying so; do not
/// rely on that: the model must not be used after this call.
///
/// # Safety
/// `model` is NULL or a pointer from rlx_model_load that no other thread is using.
#[no_mangle]
pub unsafe extern "C" fn rlx_model_free(model: *mut rlx_model) {
    // SAFETY: forwarded caller contract.
    boundary(|| unsafe { handle::free(model) });
}

/// The model's vocabulary size V: every token id must be < V. 0 if `model` is NULL or not live
/// (rlx_last_error() says which).
///
/// # Safety
/// `model` is NULL or a live pointer from rlx_model_load.
#[no_mangle]
pub unsafe extern "C" fn rlx_model_vocab_size(model: *const rlx_model) -> usize {
    boundary_value(0, || {
        // SAFETY: forwarded caller contract.
        Ok(unsafe { model_ref(model) }?.config().vocab_size)
    })
    .0
}

/// The model's context length: the most positions (prompt + generated tokens) one sequence may
/// use. 0 if `model` is NULL or not live (rlx_last_error() says which).
///
/// # Safety
/// `model` is NULL or a live pointer from rlx_model_load.
#[no_mangle]
pub unsafe extern "C" fn rlx_model_context_length(model: *const rlx_model) -> usize {
    boundary_value(0, || {
        // SAFETY: forwarded caller contract.
        Ok(unsafe { model_ref(model) }?
            .config()
            .max_position_embeddings)
    })
    .0
}

/// Copies the token ids that end generation by default (from generation_config.json, else
/// config.json, else the tokenizer's eos_token) into `out` (capacity `cap`); `*n_written`
/// receives how many. The list may be empty.
///
/// Returns RLX_OK; RLX_NULL_POINTER; RLX_INVALID_ARGUMENT (not a live model);
/// RLX_BUFFER_TOO_SMALL (`*n_written` = the count needed, nothing copied).
///
/// # Safety
/// `model` is NULL or a live model; `out` is NULL or valid for `cap` writes; `n_written` is NULL
/// or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn rlx_model_eos_token_ids(
    model: *const rlx_model,
    out: *mut u32,
    cap: usize,
    n_written: *mut usize,
) -> rlx_status {
    boundary(|| {
        // SAFETY: forwarded caller contracts.
        let (n_written, model) =
            unsafe { (OutPtr::new(n_written, "n_written")?, model_ref(model)?) };
        n_written.set(0);
        // SAFETY: forwarded caller contract.
        let out = unsafe { OutBuf::new(out, cap, "out") }?;
        let ids = model.eos_token_ids();
        if ids.len() > out.capacity() {
            n_written.set(ids.len());
            return Err(FfiError::too_small("eos token ids", ids.len(), cap));
        }
        out.write(ids)?;
        n_written.set(ids.len());
        Ok(())
    })
}
