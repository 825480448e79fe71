//! `rlx_set_memory_limit`: a request over the cap fails with RLX_OUT_OF_MEMORY before
//! allocating, and the model still works once the cap is lifted. Own process (the cap is global).
//! Also: a model file with NaN/inf weights is refused with RLX_FORMAT unless allowed.
#![allow(clippy::undocumented_unsafe_blocks)] // every call below is an FFI call with test data

use std::ffi::{CStr, CString};
use std::path::PathBuf;
use std::ptr::{null, null_mut};

use rlx::*;

#[test]
fn memory_cap_gives_a_status_not_a_crash() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama-f32");
    let path = CString::new(path.to_str().unwrap()).unwrap();
    let mut model = null_mut();
    assert_eq!(
        unsafe { rlx_model_load(path.as_ptr(), null(), &mut model) },
        rlx_status::RLX_OK
    );
    let prompt = [3u32, 5, 7];
    let mut sp = rlx_sampling_default_params();
    sp.max_new_tokens = 4;
    sp.ignore_eos = true;
    let (mut out, mut lp, mut n) = ([0u32; 4], [0f32; 4], 0usize);
    let generate = |out: &mut [u32; 4], lp: &mut [f32; 4], n: &mut usize| unsafe {
        rlx_generate(
            model,
            prompt.as_ptr(),
            3,
            &sp,
            out.as_mut_ptr(),
            lp.as_mut_ptr(),
            4,
            n,
        )
    };
    rlx_set_memory_limit(1024);
    assert_eq!(
        generate(&mut out, &mut lp, &mut n),
        rlx_status::RLX_OUT_OF_MEMORY
    );
    let msg = unsafe { CStr::from_ptr(rlx_last_error()) }
        .to_string_lossy()
        .into_owned();
    assert!(msg.contains("not enough memory"), "{msg}");
    let name = unsafe { CStr::from_ptr(rlx_status_string(12)) };
    assert_eq!(name.to_bytes(), b"RLX_OUT_OF_MEMORY");
    rlx_set_memory_limit(0);
    assert_eq!(generate(&mut out, &mut lp, &mut n), rlx_status::RLX_OK);
    assert_eq!(n, 4);
    unsafe { rlx_model_free(model) };
}

#[test]
fn nan_weights_are_refused_with_rlx_format() {
    let dir = tempfile::tempdir().unwrap();
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama-f32");
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        if entry.path().is_file() {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
    }
    let st = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + header..12 + header].copy_from_slice(&f32::INFINITY.to_le_bytes());
    std::fs::write(&st, bytes).unwrap();
    let path = CString::new(dir.path().to_str().unwrap()).unwrap();
    let mut model = null_mut();
    let st = unsafe { rlx_model_load(path.as_ptr(), null(), &mut model) };
    assert_eq!(st, rlx_status::RLX_FORMAT);
    assert!(model.is_null());
    let msg = unsafe { CStr::from_ptr(rlx_last_error()) }
        .to_string_lossy()
        .into_owned();
    assert!(msg.contains("NaN or infinite"), "{msg}");
    let mut params = rlx_model_default_params();
    params.allow_non_finite = 1;
    let st = unsafe { rlx_model_load(path.as_ptr(), &params, &mut model) };
    assert_eq!(st, rlx_status::RLX_OK);
    unsafe { rlx_model_free(model) };
}
