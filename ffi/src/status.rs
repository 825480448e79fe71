//! Status codes, the thread-local last-error message, and the panic boundary every export runs
//! inside.
//!
//! Each status-returning export calls [`boundary`] (or [`boundary_value`]): it clears the
//! thread's message, runs the body under `catch_unwind`, and on failure stores a message for
//! `rlx_last_error`. A panic is a bug in rlx; it becomes `RLX_PANIC` instead of unwinding into C
//! (which would abort the host).

use std::any::Any;
use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use rlx_core::Error;

/// Result of every fallible rlx call. Values are stable: new codes are only appended.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum rlx_status {
    /// Success.
    RLX_OK = 0,
    /// An argument has a value the call cannot accept (a negative temperature, an empty
    /// sequence, text that is not UTF-8, a handle that is not a live model, ...).
    RLX_INVALID_ARGUMENT = 1,
    /// A pointer argument that must not be NULL was NULL.
    RLX_NULL_POINTER = 2,
    /// A file could not be read (missing, no permission, ...).
    RLX_IO = 3,
    /// A model file is malformed: bad JSON, bad safetensors or GGUF, a missing or misshapen
    /// tensor, an invalid config.
    RLX_FORMAT = 4,
    /// The model or request uses something rlx does not implement (an architecture, a tensor
    /// dtype, sliding-window attention beyond the window).
    RLX_UNSUPPORTED = 5,
    /// A token id is not below the model's vocabulary size.
    RLX_OUT_OF_RANGE = 6,
    /// A sequence (prompt + new tokens) is longer than the model's context length.
    RLX_CONTEXT_OVERFLOW = 7,
    /// An output buffer is too small; `*n_written` holds the size needed and nothing else was
    /// done.
    RLX_BUFFER_TOO_SMALL = 8,
    /// A bug in rlx (a Rust panic) was caught at the API boundary. The model can still be freed;
    /// please report the message.
    RLX_PANIC = 9,
    /// The tokenizer failed to encode or decode (or a chat template failed to render).
    RLX_TOKENIZER = 10,
    /// The model was loaded without a tokenizer (its folder has no tokenizer.json, or its GGUF
    /// file no tokenizer metadata).
    RLX_NO_TOKENIZER = 11,
    /// The request would need more memory than is available (estimated before allocating;
    /// see `rlx_set_memory_limit`). Nothing was allocated; the model is unchanged.
    RLX_OUT_OF_MEMORY = 12,
}

/// The one mapping from core errors to status codes. Exhaustive on purpose: a new core variant
/// must be given a code here.
pub(crate) fn status_of(e: &Error) -> rlx_status {
    use rlx_status::*;
    match e {
        Error::Io { .. } => RLX_IO,
        Error::Json { .. }
        | Error::Format { .. }
        | Error::Config(_)
        | Error::TensorMissing { .. }
        | Error::TensorShape { .. } => RLX_FORMAT,
        Error::Unsupported(_) | Error::TensorDtype { .. } | Error::Cuda(_) => RLX_UNSUPPORTED,
        Error::Tokenizer(_) | Error::Template(_) => RLX_TOKENIZER,
        Error::NoTokenizer => RLX_NO_TOKENIZER,
        Error::TokenOutOfRange { .. } => RLX_OUT_OF_RANGE,
        Error::ContextOverflow { .. } => RLX_CONTEXT_OVERFLOW,
        // No collector crosses the C ABI; listed so that this match stays exhaustive.
        Error::InvalidArgument(_) | Error::Collector(_) => RLX_INVALID_ARGUMENT,
        Error::OutOfMemory { .. } => RLX_OUT_OF_MEMORY,
    }
}

/// A failed call: its status and the message `rlx_last_error` will return.
#[derive(Debug)]
pub(crate) struct FfiError {
    pub status: rlx_status,
    pub message: String,
}

pub(crate) type FfiResult<T = ()> = Result<T, FfiError>;

impl FfiError {
    pub fn new(status: rlx_status, message: impl Into<String>) -> Self {
        FfiError {
            status,
            message: message.into(),
        }
    }

    pub fn null(name: &str) -> Self {
        Self::new(rlx_status::RLX_NULL_POINTER, format!("`{name}` is NULL"))
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(rlx_status::RLX_INVALID_ARGUMENT, message)
    }

    pub fn too_small(what: &str, need: usize, cap: usize) -> Self {
        Self::new(
            rlx_status::RLX_BUFFER_TOO_SMALL,
            format!("{what} needs room for {need}, capacity is {cap}"),
        )
    }
}

impl From<Error> for FfiError {
    fn from(e: Error) -> Self {
        FfiError::new(status_of(&e), e.to_string())
    }
}

thread_local! {
    // Owned here so the pointer handed out stays valid until this thread's next rlx call.
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    // Interior NULs would cut the C string short; show them instead.
    let c = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    // `try_with`: during thread teardown the slot may be gone; losing the message beats a panic.
    let _ = LAST_ERROR.try_with(|slot| {
        if let Ok(mut s) = slot.try_borrow_mut() {
            *s = c;
        }
    });
}

fn clear_last_error() {
    let _ = LAST_ERROR.try_with(|slot| {
        if let Ok(mut s) = slot.try_borrow_mut() {
            if !s.as_bytes().is_empty() {
                *s = CString::default();
            }
        }
    });
}

fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "unknown panic payload"
    }
}

/// Runs an export body: clears the last error, catches panics, records failures.
pub(crate) fn boundary(body: impl FnOnce() -> FfiResult) -> rlx_status {
    boundary_value(rlx_status::RLX_OK, || body().map(|()| rlx_status::RLX_OK)).1
}

/// Like [`boundary`] for exports that return a value: `fallback` on failure. Returns the value
/// and the status it would have had.
pub(crate) fn boundary_value<T>(fallback: T, body: impl FnOnce() -> FfiResult<T>) -> (T, rlx_status)
where
    T: Copy,
{
    clear_last_error();
    // AssertUnwindSafe: a panic leaves no half-updated state behind that a later call could
    // observe — models are immutable after loading and outputs are only written on success.
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(v)) => (v, rlx_status::RLX_OK),
        Ok(Err(e)) => {
            set_last_error(&e.message);
            (fallback, e.status)
        }
        Err(payload) => {
            set_last_error(&format!(
                "internal error (a bug in rlx, please report it): {}",
                panic_message(&*payload)
            ));
            // Dropping a payload can itself panic, which would abort; leak it instead.
            std::mem::forget(payload);
            (fallback, rlx_status::RLX_PANIC)
        }
    }
}

/// The message of the last failed rlx call on this thread; an empty string if the last call
/// succeeded. Never NULL.
///
/// The string is owned by rlx and stays valid until the next rlx call on the same thread (copy
/// it to keep it). `rlx_last_error`, `rlx_status_string` and the version functions do not
/// change it.
#[no_mangle]
pub extern "C" fn rlx_last_error() -> *const c_char {
    LAST_ERROR
        .try_with(|slot| match slot.try_borrow() {
            Ok(s) => s.as_ptr(),
            Err(_) => c"".as_ptr(),
        })
        .unwrap_or(c"".as_ptr())
}

/// The name of a status code, e.g. "RLX_IO"; "RLX_UNKNOWN_STATUS" for a value that is not one.
/// The string is static: never free it.
#[no_mangle]
pub extern "C" fn rlx_status_string(status: i32) -> *const c_char {
    // Takes an int, not the enum: a C caller may pass any value, and an out-of-range enum would
    // be undefined behaviour on the Rust side.
    let name = match status {
        0 => c"RLX_OK",
        1 => c"RLX_INVALID_ARGUMENT",
        2 => c"RLX_NULL_POINTER",
        3 => c"RLX_IO",
        4 => c"RLX_FORMAT",
        5 => c"RLX_UNSUPPORTED",
        6 => c"RLX_OUT_OF_RANGE",
        7 => c"RLX_CONTEXT_OVERFLOW",
        8 => c"RLX_BUFFER_TOO_SMALL",
        9 => c"RLX_PANIC",
        10 => c"RLX_TOKENIZER",
        11 => c"RLX_NO_TOKENIZER",
        12 => c"RLX_OUT_OF_MEMORY",
        _ => c"RLX_UNKNOWN_STATUS",
    };
    name.as_ptr()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    fn last() -> String {
        // SAFETY: rlx_last_error never returns NULL and the string lives until the next call.
        unsafe { CStr::from_ptr(rlx_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn panics_become_a_status_and_a_message() {
        let st = boundary(|| panic!("boom"));
        assert_eq!(st, rlx_status::RLX_PANIC);
        assert!(last().contains("boom"), "{}", last());
        assert_eq!(boundary(|| Ok(())), rlx_status::RLX_OK);
        assert_eq!(last(), "");
    }

    #[test]
    fn messages_with_nul_survive() {
        let st = boundary(|| Err(FfiError::invalid("a\0b")));
        assert_eq!(st, rlx_status::RLX_INVALID_ARGUMENT);
        assert_eq!(last(), "a\\0b");
    }

    #[test]
    fn status_strings_cover_every_code() {
        for code in 0..=12 {
            // SAFETY: static NUL-terminated strings.
            let s = unsafe { CStr::from_ptr(rlx_status_string(code)) };
            assert!(s.to_bytes().starts_with(b"RLX_"));
            assert_ne!(s.to_bytes(), b"RLX_UNKNOWN_STATUS", "code {code}");
        }
        // SAFETY: as above.
        let s = unsafe { CStr::from_ptr(rlx_status_string(-3)) };
        assert_eq!(s.to_bytes(), b"RLX_UNKNOWN_STATUS");
        assert_eq!(rlx_status::RLX_NO_TOKENIZER as i32, 11);
    }
}
