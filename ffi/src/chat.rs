//! The model's chat template, rendered for C callers (as llama_chat_apply_template does).

use std::ffi::c_char;

use rlx_core::Message;

use crate::model::{model_ref, rlx_model};
use crate::ptr::{c_str, input_slice, write_c_string, OutBuf, OutPtr};
use crate::status::{boundary, rlx_status, FfiError};

/// One chat message: NUL-terminated UTF-8 role ("system", "user", "assistant", …) and content.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct rlx_chat_message {
    pub role: *const c_char,
    pub content: *const c_char,
}

/// Renders `n_messages` messages with the model's own chat template (from tokenizer_config.json
/// or the GGUF's tokenizer.chat_template). `add_generation_prompt`: end with the header of an
/// assistant turn, ready for generation. Tokenize the result with rlx_tokenize and
/// `add_special` = false: the template already wrote the special tokens it wants.
///
/// Output as rlx_detokenize's: the text and a NUL into `out` (capacity `cap` bytes),
/// `*n_written` = its length without the NUL; when `cap` is too small, RLX_BUFFER_TOO_SMALL
/// with `*n_written` = the capacity needed (length + 1).
///
/// Returns RLX_OK; RLX_NULL_POINTER; RLX_INVALID_ARGUMENT (not a live model, text that is not
/// UTF-8); RLX_TOKENIZER (no chat template, or it failed to render); RLX_BUFFER_TOO_SMALL.
///
/// Thread-safety: as the model's other read-only calls (any number of threads at once).
///
/// # Safety
/// `model` is NULL or live; `messages` is NULL or holds `n_messages` messages whose strings are
/// NULL or NUL-terminated; `out` is NULL or valid for `cap` writes; `n_written` is NULL or valid
/// for one write.
#[no_mangle]
pub unsafe extern "C" fn rlx_apply_chat_template(
    model: *const rlx_model,
    messages: *const rlx_chat_message,
    n_messages: usize,
    add_generation_prompt: bool,
    out: *mut c_char,
    cap: usize,
    n_written: *mut usize,
) -> rlx_status {
    boundary(|| {
        // SAFETY: the caller guarantees `n_written` is NULL or writable.
        let n_written = unsafe { OutPtr::new(n_written, "n_written") }?;
        n_written.set(0);
        // SAFETY: forwarded caller contracts for `model`, `messages` and `out`.
        let (model, messages, out) = unsafe {
            (
                model_ref(model)?,
                input_slice(messages, n_messages, "messages")?,
                OutBuf::new(out.cast::<u8>(), cap, "out")?,
            )
        };
        let text = |p: *const c_char, what: &str, i: usize| -> Result<String, FfiError> {
            // SAFETY: per the caller, NULL or NUL-terminated.
            let s = unsafe { c_str(p, what) }?;
            s.to_str()
                .map(str::to_owned)
                .map_err(|_| FfiError::invalid(format!("message {i}: `{what}` is not valid UTF-8")))
        };
        let msgs = messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                Ok(Message::new(
                    text(m.role, "role", i)?,
                    text(m.content, "content", i)?,
                ))
            })
            .collect::<Result<Vec<_>, FfiError>>()?;
        let template = model.chat_template().ok_or_else(|| {
            FfiError::from(rlx_core::Error::Template(
                "this model has no chat template".into(),
            ))
        })?;
        let text = template.render(&msgs, add_generation_prompt)?;
        write_c_string(&out, &n_written, text, "rendered chat")
    })
}
