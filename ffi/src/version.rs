//! Compile-time and run-time versions, so a program can check that the header it was built with
//! matches the library it runs with (as sqlite3 does).
//!
//! The constants are literals because cbindgen copies them into the header; a test checks them
//! against the crate version.

use std::ffi::c_char;

/// Major version of the header.
pub const RLX_VERSION_MAJOR: u32 = 0;
/// Minor version of the header.
pub const RLX_VERSION_MINOR: u32 = 2;
/// Patch version of the header.
pub const RLX_VERSION_PATCH: u32 = 0;
/// `MAJOR * 1000000 + MINOR * 1000 + PATCH` of the header; compare with rlx_version_number().
pub const RLX_VERSION_NUMBER: u32 = 2000;

/// The library's version as `MAJOR * 1000000 + MINOR * 1000 + PATCH`. A program can check
/// `rlx_version_number() == RLX_VERSION_NUMBER` to catch a header/library mismatch.
#[no_mangle]
pub extern "C" fn rlx_version_number() -> u32 {
    RLX_VERSION_NUMBER
}

/// The library's version as a static string, e.g. "0.2.0". Never free it.
#[no_mangle]
pub extern "C" fn rlx_version_string() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    #[test]
    fn constants_match_the_crate_version() {
        let part = |s: &str| s.parse::<u32>().unwrap();
        assert_eq!(RLX_VERSION_MAJOR, part(env!("CARGO_PKG_VERSION_MAJOR")));
        assert_eq!(RLX_VERSION_MINOR, part(env!("CARGO_PKG_VERSION_MINOR")));
        assert_eq!(RLX_VERSION_PATCH, part(env!("CARGO_PKG_VERSION_PATCH")));
        assert_eq!(
            RLX_VERSION_NUMBER,
            RLX_VERSION_MAJOR * 1_000_000 + RLX_VERSION_MINOR * 1000 + RLX_VERSION_PATCH
        );
        assert_eq!(rlx_version_number(), RLX_VERSION_NUMBER);
        // SAFETY: a static NUL-terminated string.
        let s = unsafe { CStr::from_ptr(rlx_version_string()) };
        assert_eq!(s.to_str().unwrap(), rlx_core::VERSION);
    }
}
