//! What every opaque handle shares: a magic word first in the struct, checked on entry and
//! poisoned on free, so that a freed, foreign or doubly freed pointer is usually reported
//! instead of used. (Usually: reading the magic of freed memory is itself the undefined case
//! the header documents; it catches mistakes, it is not a guarantee.)

use crate::status::{FfiError, FfiResult};

/// Written over a handle's magic just before it is freed.
const FREED: u64 = u64::from_le_bytes(*b"rlxfreed");

pub(crate) trait Handle: Sized {
    /// The magic of a live handle of this type.
    const LIVE: u64;
    /// The type's C name and the call that makes one, for messages.
    const NAME: &'static str;
    const MADE_BY: &'static str;

    /// Where the magic word is.
    ///
    /// # Safety
    /// `this` is non-NULL and points to memory laid out as `Self` (live or not).
    unsafe fn magic(this: *mut Self) -> *mut u64;
}

/// Borrows a live handle passed as argument `arg`.
///
/// # Safety
/// `ptr` is NULL or a pointer from `H::MADE_BY`; a live handle stays valid for `'a`.
pub(crate) unsafe fn live<'a, H: Handle>(ptr: *const H, arg: &str) -> FfiResult<&'a H> {
    if ptr.is_null() {
        return Err(FfiError::null(arg));
    }
    // SAFETY: non-NULL and, per the caller, laid out as H; only the magic word is read before
    // it is checked.
    if unsafe { H::magic(ptr.cast_mut()).read() } != H::LIVE {
        return Err(FfiError::invalid(format!(
            "`{arg}` is not a live {} (already freed, or not from {})",
            H::NAME,
            H::MADE_BY
        )));
    }
    // SAFETY: the magic says it is a live H from Box::into_raw, valid for 'a per the caller.
    Ok(unsafe { &*ptr })
}

/// A new handle owning `value` (freed by [`free`]).
pub(crate) fn boxed<H: Handle>(value: H) -> *mut H {
    Box::into_raw(Box::new(value))
}

/// Frees a handle; NULL is a no-op, a handle that is not live is an error (nothing is freed).
///
/// # Safety
/// `ptr` is NULL or a pointer from `H::MADE_BY` that no other thread is using.
pub(crate) unsafe fn free<H: Handle>(ptr: *mut H) -> FfiResult {
    if ptr.is_null() {
        return Ok(());
    }
    // SAFETY: per the caller, laid out as H and unused by others; only the magic is read.
    if unsafe { H::magic(ptr).read() } != H::LIVE {
        return Err(FfiError::invalid(format!(
            "{}_free: not a live {} (double free?)",
            H::NAME,
            H::NAME
        )));
    }
    // SAFETY: live, so produced by `boxed` and not yet freed; poisoning the magic first lets a
    // later double free be noticed.
    let owned = unsafe {
        H::magic(ptr).write(FREED);
        Box::from_raw(ptr)
    };
    drop(owned);
    Ok(())
}
