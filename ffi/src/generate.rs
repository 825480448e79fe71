//! Generation and log-probs over token ids.

use std::ffi::c_void;

use rlx_core::SamplingParams;

use crate::model::{model_ref, rlx_model};
use crate::ptr::{input_slice, params_or, OutBuf, OutPtr};
use crate::status::{boundary, rlx_status, FfiError, FfiResult};

/// How to generate. Start from rlx_sampling_default_params() and change the fields you need:
/// fields are only ever appended, and each new one's default keeps the old behaviour.
///
/// Filters apply in transformers' order: repetition penalty, temperature, top-k, top-p, min-p.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct rlx_sampling_params {
    /// Most tokens to generate (default 128). Output buffers need this capacity.
    pub max_new_tokens: u32,
    /// Keep the k most likely tokens; 0 = off (default).
    pub top_k: u32,
    /// 0 = greedy. Default 1.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches top_p, in (0, 1]; 1 = off
    /// (default).
    pub top_p: f32,
    /// Drop tokens less likely than min_p × the most likely one, in [0, 1]; 0 = off (default).
    pub min_p: f32,
    /// transformers' repetition penalty over prompt and generated tokens, > 0; 1 = off
    /// (default).
    pub repetition_penalty: f32,
    /// Seed of the sampler; same seed and inputs give the same tokens. Default 0.
    pub seed: u64,
    /// Tokens that end generation (kept as the last output token), `n_stop_token_ids` of them,
    /// borrowed for the duration of the call. With n_stop_token_ids = 0 (default) the model's
    /// EOS ids (rlx_model_eos_token_ids) are used, unless ignore_eos is set.
    pub stop_token_ids: *const u32,
    pub n_stop_token_ids: usize,
    /// With n_stop_token_ids = 0: true = nothing ends generation early, it runs to
    /// max_new_tokens. Default false.
    pub ignore_eos: bool,
}

/// The default sampling parameters: plain sampling at temperature 1, no filters, 128 tokens,
/// seed 0, stop at the model's EOS ids.
#[no_mangle]
pub extern "C" fn rlx_sampling_default_params() -> rlx_sampling_params {
    let d = SamplingParams::default();
    rlx_sampling_params {
        max_new_tokens: u32::try_from(d.max_new_tokens).unwrap_or(u32::MAX),
        top_k: u32::try_from(d.top_k).unwrap_or(u32::MAX),
        temperature: d.temperature,
        top_p: d.top_p,
        min_p: d.min_p,
        repetition_penalty: d.repetition_penalty,
        seed: d.seed,
        stop_token_ids: std::ptr::null(),
        n_stop_token_ids: 0,
        ignore_eos: false,
    }
}

/// # Safety
/// `p.stop_token_ids` is NULL or points to `p.n_stop_token_ids` ids.
unsafe fn core_params(p: &rlx_sampling_params) -> FfiResult<SamplingParams> {
    // SAFETY: forwarded caller contract.
    let stop = unsafe { input_slice(p.stop_token_ids, p.n_stop_token_ids, "stop_token_ids") }?;
    let stop_token_ids = match (stop.is_empty(), p.ignore_eos) {
        (false, _) => Some(stop.to_vec()),
        (true, true) => Some(Vec::new()),
        (true, false) => None,
    };
    let usize_of = |v: u32, name: &str| {
        usize::try_from(v).map_err(|_| FfiError::invalid(format!("`{name}` is too large")))
    };
    Ok(SamplingParams {
        max_new_tokens: usize_of(p.max_new_tokens, "max_new_tokens")?,
        temperature: p.temperature,
        top_k: usize_of(p.top_k, "top_k")?,
        top_p: p.top_p,
        min_p: p.min_p,
        repetition_penalty: p.repetition_penalty,
        stop_token_ids,
        seed: p.seed,
    })
}

/// Generates a continuation of one prompt.
///
/// `prompt`: `n_prompt` token ids (at least one). `params`: NULL for
/// rlx_sampling_default_params(). The new tokens (not the prompt) are copied into `out_tokens`
/// and, if `out_logprobs` is not NULL, each one's log-prob into `out_logprobs`: under
/// softmax(logits / temperature) (temperature 1 when greedy), before penalty and filters —
/// bit-for-bit what rlx_logprobs computes for the same tokens. `*n_written` receives the number
/// of new tokens.
///
/// Both buffers hold `cap` elements, and `cap` must be at least max_new_tokens: otherwise the
/// call returns RLX_BUFFER_TOO_SMALL with `*n_written` = max_new_tokens before doing any work.
/// Generation stopped at a stop token exactly when the last new token is one (stop tokens are
/// kept); otherwise it ran to max_new_tokens.
///
/// Returns RLX_OK; RLX_NULL_POINTER; RLX_INVALID_ARGUMENT (not a live model, empty prompt, a
/// parameter out of its range); RLX_OUT_OF_RANGE (a prompt id ≥ the vocabulary size);
/// RLX_CONTEXT_OVERFLOW (n_prompt + max_new_tokens > the context length); RLX_UNSUPPORTED;
/// RLX_BUFFER_TOO_SMALL.
///
/// # Safety
/// `model` is NULL or a live model; `prompt` is NULL or points to `n_prompt` ids; `params` is
/// NULL or points to an rlx_sampling_params whose stop list is valid; `out_tokens` and
/// `out_logprobs` are NULL or valid for `cap` writes and overlap no input; `n_written` is NULL
/// or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn rlx_generate(
    model: *const rlx_model,
    prompt: *const u32,
    n_prompt: usize,
    params: *const rlx_sampling_params,
    out_tokens: *mut u32,
    out_logprobs: *mut f32,
    cap: usize,
    n_written: *mut usize,
) -> rlx_status {
    // SAFETY: forwarded caller contracts; no callback.
    unsafe {
        generate(
            model,
            prompt,
            n_prompt,
            params,
            None,
            std::ptr::null_mut(),
            out_tokens,
            out_logprobs,
            cap,
            n_written,
        )
    }
}

/// Called by rlx_generate_stream with each new token as soon as it is sampled: the token id,
/// its log-prob (as rlx_generate reports it) and the caller's `user_data`. Return true to go on,
/// false to stop generation after this token. The callback runs on the thread that called
/// rlx_generate_stream; it must not unwind (no C++ exception or longjmp may leave it) and must
/// not use the same model handle's generation from inside.
#[allow(non_camel_case_types)]
pub type rlx_token_callback =
    Option<unsafe extern "C" fn(token: u32, logprob: f32, user_data: *mut c_void) -> bool>;

/// rlx_generate with a streaming callback: `on_token` (NULL = none) sees every new token as it
/// is produced and can stop generation early by returning false. The output buffers receive the
/// same tokens and log-probs as with rlx_generate, up to and including the token at which the
/// callback stopped; `*n_written` counts them.
///
/// # Safety
/// As rlx_generate; `on_token` is NULL or a function that honours rlx_token_callback's
/// contract; `user_data` is passed to it untouched.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn rlx_generate_stream(
    model: *const rlx_model,
    prompt: *const u32,
    n_prompt: usize,
    params: *const rlx_sampling_params,
    on_token: rlx_token_callback,
    user_data: *mut c_void,
    out_tokens: *mut u32,
    out_logprobs: *mut f32,
    cap: usize,
    n_written: *mut usize,
) -> rlx_status {
    // SAFETY: forwarded caller contracts.
    unsafe {
        generate(
            model,
            prompt,
            n_prompt,
            params,
            on_token,
            user_data,
            out_tokens,
            out_logprobs,
            cap,
            n_written,
        )
    }
}

/// # Safety
/// As rlx_generate_stream.
#[allow(clippy::too_many_arguments)]
unsafe fn generate(
    model: *const rlx_model,
    prompt: *const u32,
    n_prompt: usize,
    params: *const rlx_sampling_params,
    on_token: rlx_token_callback,
    user_data: *mut c_void,
    out_tokens: *mut u32,
    out_logprobs: *mut f32,
    cap: usize,
    n_written: *mut usize,
) -> rlx_status {
    boundary(|| {
        // SAFETY: the caller guarantees `n_written` is NULL or writable.
        let n_written = unsafe { OutPtr::new(n_written, "n_written") }?;
        n_written.set(0);
        // SAFETY: forwarded caller contracts for `model` and `prompt`.
        let (model, prompt) =
            unsafe { (model_ref(model)?, input_slice(prompt, n_prompt, "prompt")?) };
        // SAFETY: the caller guarantees `params` is NULL or points to its struct.
        let params = unsafe { params_or(params, rlx_sampling_default_params()) };
        // SAFETY: the caller guarantees the stop list is valid.
        let params = unsafe { core_params(&params) }?;
        if cap < params.max_new_tokens {
            n_written.set(params.max_new_tokens);
            return Err(FfiError::too_small("generate", params.max_new_tokens, cap));
        }
        // SAFETY: forwarded caller contract for the output buffers.
        let out_tokens = unsafe { OutBuf::new(out_tokens, cap, "out_tokens") }?;
        let out_logprobs = if out_logprobs.is_null() {
            None
        } else {
            // SAFETY: forwarded caller contract.
            Some(unsafe { OutBuf::new(out_logprobs, cap, "out_logprobs") }?)
        };
        let mut callback = on_token.map(|f| {
            move |_seq: usize, token: u32, logprob: f32| -> bool {
                // SAFETY: the caller guarantees `f` honours rlx_token_callback's contract.
                unsafe { f(token, logprob, user_data) }
            }
        });
        let stream = callback
            .as_mut()
            .map(|c| c as &mut rlx_core::generate::StreamCallback<'_>);
        let mut outs = model.generate(&[prompt], &params, stream)?;
        let g = outs
            .pop()
            .ok_or_else(|| FfiError::invalid("generate returned no sequence"))?;
        out_tokens.write(&g.tokens)?;
        if let Some(lp) = &out_logprobs {
            lp.write(&g.logprobs)?;
        }
        n_written.set(g.tokens.len());
        Ok(())
    })
}

/// Per-token log-probs of one sequence: for t = 1..n, log p(tokens[t] | tokens[<t]) under
/// softmax(logits / temperature) (temperature 0 means 1), written to `out[t - 1]`;
/// `*n_written` receives n - 1.
///
/// `cap` must be at least n - 1: otherwise the call returns RLX_BUFFER_TOO_SMALL with
/// `*n_written` = n - 1 before doing any work.
///
/// Returns RLX_OK; RLX_NULL_POINTER; RLX_INVALID_ARGUMENT (not a live model, n = 0, a bad
/// temperature); RLX_OUT_OF_RANGE; RLX_CONTEXT_OVERFLOW; RLX_UNSUPPORTED; RLX_BUFFER_TOO_SMALL.
///
/// # Safety
/// `model` is NULL or a live model; `tokens` is NULL or points to `n` ids; `out` is NULL or
/// valid for `cap` writes and does not overlap `tokens`; `n_written` is NULL or valid for one
/// write.
#[no_mangle]
pub unsafe extern "C" fn rlx_logprobs(
    model: *const rlx_model,
    tokens: *const u32,
    n: usize,
    temperature: f32,
    out: *mut f32,
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
                input_slice(tokens, n, "tokens")?,
                OutBuf::new(out, cap, "out")?,
            )
        };
        let need = n.saturating_sub(1);
        if cap < need {
            n_written.set(need);
            return Err(FfiError::too_small("logprobs", need, cap));
        }
        let lps = model
            .logprobs(&[tokens], temperature)?
            .pop()
            .ok_or_else(|| FfiError::invalid("logprobs returned no sequence"))?;
        out.write(&lps)?;
        n_written.set(lps.len());
        Ok(())
    })
}
