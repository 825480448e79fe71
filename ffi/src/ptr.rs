//! Checked conversions from C pointers. Every raw pointer an export receives goes through one of
//! these before use: NULL is an error (or an empty slice when the length is 0), misaligned
//! pointers and lengths whose byte size overflows `isize` are refused, and output buffers are
//! written through raw pointers (never turned into `&mut [T]` over memory C may not have
//! initialised).

use std::ffi::{c_char, CStr};
use std::mem::size_of;
use std::ptr::NonNull;

use crate::status::{FfiError, FfiResult};

fn check_layout<T>(ptr: *const T, len: usize, name: &str) -> FfiResult {
    if !ptr.is_aligned() {
        return Err(FfiError::invalid(format!("`{name}` is not aligned")));
    }
    if len
        .checked_mul(size_of::<T>())
        .is_none_or(|bytes| bytes > isize::MAX as usize)
    {
        return Err(FfiError::invalid(format!(
            "`{name}` length {len} is too large"
        )));
    }
    Ok(())
}

/// Borrows `len` elements at `ptr`; NULL is accepted when `len` is 0.
///
/// # Safety
/// When `len > 0` and `ptr` is not NULL, `ptr` must point to `len` initialised `T` that stay
/// valid and unmodified for `'a`.
pub(crate) unsafe fn input_slice<'a, T>(
    ptr: *const T,
    len: usize,
    name: &str,
) -> FfiResult<&'a [T]> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(FfiError::null(name));
    }
    check_layout(ptr, len, name)?;
    // SAFETY: non-NULL, aligned, `len * size_of::<T>() <= isize::MAX`, and the caller
    // guarantees `len` initialised elements valid for 'a.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// A NUL-terminated string argument.
///
/// # Safety
/// If not NULL, `ptr` must point to a NUL-terminated string valid for `'a`.
pub(crate) unsafe fn c_str<'a>(ptr: *const c_char, name: &str) -> FfiResult<&'a CStr> {
    if ptr.is_null() {
        return Err(FfiError::null(name));
    }
    // SAFETY: non-NULL, and the caller guarantees a NUL-terminated string valid for 'a.
    Ok(unsafe { CStr::from_ptr(ptr) })
}

/// A caller-owned output buffer of `cap` elements (NULL allowed when `cap` is 0).
pub(crate) struct OutBuf<T> {
    ptr: *mut T,
    cap: usize,
}

impl<T: Copy> OutBuf<T> {
    /// # Safety
    /// When `cap > 0` and `ptr` is not NULL, `ptr` must be valid for writes of `cap` elements
    /// for as long as the returned `OutBuf` is used, and must not overlap the call's inputs.
    pub unsafe fn new(ptr: *mut T, cap: usize, name: &str) -> FfiResult<Self> {
        if cap > 0 {
            if ptr.is_null() {
                return Err(FfiError::null(name));
            }
            check_layout(ptr, cap, name)?;
        }
        Ok(OutBuf { ptr, cap })
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Copies `src` to the start of the buffer. The caller checks the size first (to report
    /// BUFFER_TOO_SMALL with the size it needs); this check only keeps the copy in bounds.
    pub fn write(&self, src: &[T]) -> FfiResult {
        if src.len() > self.cap {
            return Err(FfiError::too_small("output", src.len(), self.cap));
        }
        if src.is_empty() {
            return Ok(());
        }
        // SAFETY: `src.len() <= cap`, so `ptr` (non-NULL since cap > 0) is valid for these
        // writes per `new`'s contract; `src` is Rust-owned memory, so the two do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr, src.len()) };
        Ok(())
    }
}

/// A required scalar out-parameter such as `size_t* n_written`.
pub(crate) struct OutPtr<T>(NonNull<T>);

impl<T> OutPtr<T> {
    /// # Safety
    /// If not NULL, `ptr` must be valid for writes of one `T` while the `OutPtr` is used.
    pub unsafe fn new(ptr: *mut T, name: &str) -> FfiResult<Self> {
        let p = NonNull::new(ptr).ok_or_else(|| FfiError::null(name))?;
        check_layout(ptr, 1, name)?;
        Ok(OutPtr(p))
    }

    pub fn set(&self, value: T) {
        // SAFETY: non-NULL, aligned, and valid for writes per `new`'s contract; `write` does not
        // read or drop the (possibly uninitialised) old value.
        unsafe { self.0.as_ptr().write(value) }
    }
}

/// A `*_params` argument: the struct the caller points to, or `default` when NULL.
///
/// # Safety
/// `ptr` is NULL or points to a `T` (plain data: a bitwise copy is a valid value).
pub(crate) unsafe fn params_or<T: Copy>(ptr: *const T, default: T) -> T {
    if ptr.is_null() {
        default
    } else {
        // SAFETY: non-NULL, and the caller guarantees it points to a `T`.
        unsafe { ptr.read_unaligned() }
    }
}

/// Writes `text` and a NUL into a caller's string buffer, with the conventions of every rlx call
/// that returns text: `*n_written` = the length without the NUL; when the buffer is too small,
/// RLX_BUFFER_TOO_SMALL with `*n_written` = the capacity needed (length + 1) and, if it has room
/// for one byte, an empty string in it.
pub(crate) fn write_c_string(
    out: &OutBuf<u8>,
    n_written: &OutPtr<usize>,
    text: String,
    what: &str,
) -> FfiResult {
    let mut bytes = text.into_bytes();
    let len = bytes.len();
    bytes.push(0);
    if bytes.len() > out.capacity() {
        if out.capacity() > 0 {
            out.write(&[0])?;
        }
        n_written.set(bytes.len());
        return Err(FfiError::too_small(what, bytes.len(), out.capacity()));
    }
    out.write(&bytes)?;
    n_written.set(len);
    Ok(())
}
