//! Malformed model files through the C ABI: a safetensors checkpoint truncated at many offsets,
//! a GGUF file truncated at many offsets, and random bytes named `.gguf` — each a status
//! (RLX_FORMAT; RLX_UNSUPPORTED for an unknown GGUF version) with a message, never RLX_PANIC,
//! and no handle left behind.
#![allow(clippy::undocumented_unsafe_blocks)] // every call below is an FFI call with test data

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::ptr::{null, null_mut};

use rlx::*;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn load(path: &Path) -> (rlx_status, String) {
    let c = CString::new(path.to_str().unwrap()).unwrap();
    let mut model = null_mut();
    let st = unsafe { rlx_model_load(c.as_ptr(), null(), &mut model) };
    let msg = unsafe { CStr::from_ptr(rlx_last_error()) }
        .to_string_lossy()
        .into_owned();
    if st == rlx_status::RLX_OK {
        unsafe { rlx_model_free(model) };
    } else {
        assert!(model.is_null(), "a failed load left a handle");
    }
    (st, msg)
}

#[test]
fn truncated_and_garbage_files_are_statuses() {
    let tmp = tempfile::tempdir().unwrap();
    // safetensors: copy the fixture folder, then cut model.safetensors.
    let dir = tmp.path().join("st");
    std::fs::create_dir(&dir).unwrap();
    for e in std::fs::read_dir(fixtures().join("llama-f32")).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
    }
    let weights = std::fs::read(dir.join("model.safetensors")).unwrap();
    let mut tried = 0;
    for i in 0..40 {
        let cut = weights.len() * i / 40;
        std::fs::write(dir.join("model.safetensors"), &weights[..cut]).unwrap();
        let (st, msg) = load(&dir);
        assert_eq!(st, rlx_status::RLX_FORMAT, "cut at {cut}: {msg}");
        assert!(!msg.is_empty());
        tried += 1;
    }
    // GGUF: the quantization fixture (a valid GGUF without a model) and cuts of it.
    let gguf = std::fs::read(fixtures().join("quant/quants.gguf")).unwrap();
    let file = tmp.path().join("m.gguf");
    for i in 0..40 {
        let cut = gguf.len() * i / 40;
        std::fs::write(&file, &gguf[..cut]).unwrap();
        let (st, msg) = load(&file);
        assert_eq!(st, rlx_status::RLX_FORMAT, "cut at {cut}: {msg}");
        tried += 1;
    }
    // Random bytes, with and without the GGUF magic.
    for seed in 0..20u64 {
        let mut bytes: Vec<u8> = (0..4096u64)
            .map(|i| (i.wrapping_add(seed).wrapping_mul(6364136223846793005) >> 56) as u8)
            .collect();
        if seed % 2 == 0 {
            bytes[..4].copy_from_slice(b"GGUF");
        }
        std::fs::write(&file, &bytes).unwrap();
        let (st, msg) = load(&file);
        // An unknown GGUF version is "unsupported"; anything else is a format error.
        assert!(
            matches!(st, rlx_status::RLX_FORMAT | rlx_status::RLX_UNSUPPORTED),
            "seed {seed}: {st:?} {msg}"
        );
        tried += 1;
    }
    assert_eq!(tried, 100);
}

#[test]
fn devices_are_checked() {
    let path = CString::new(fixtures().join("llama-f32").to_str().unwrap()).unwrap();
    // Loads with the given `device` and `device_dtype` strings (None = NULL, the default).
    let load_with = |device: Option<&str>, dtype: Option<&str>| {
        let d = device.map(|d| CString::new(d).unwrap());
        let t = dtype.map(|t| CString::new(t).unwrap());
        let mut params = rlx_model_default_params();
        if let Some(d) = &d {
            params.device = d.as_ptr();
        }
        if let Some(t) = &t {
            params.device_dtype = t.as_ptr();
        }
        let mut model = null_mut();
        let st = unsafe { rlx_model_load(path.as_ptr(), &params, &mut model) };
        let msg = unsafe { CStr::from_ptr(rlx_last_error()) }
            .to_string_lossy()
            .into_owned();
        if st == rlx_status::RLX_OK {
            unsafe { rlx_model_free(model) };
        }
        (st, msg)
    };
    let load_on = |device: &str| load_with(Some(device), None);
    let load_dtype = |dtype: &str| load_with(None, Some(dtype));
    assert_eq!(load_on("cpu").0, rlx_status::RLX_OK);
    let (st, msg) = load_on("tpu:0");
    assert_eq!(st, rlx_status::RLX_INVALID_ARGUMENT, "{msg}");
    // A device no machine has: without a driver the error names the driver, with one it says
    // the device does not exist; either way a clear RLX_UNSUPPORTED.
    let (st, msg) = load_on("cuda:99");
    assert_eq!(st, rlx_status::RLX_UNSUPPORTED, "{msg}");
    assert!(msg.contains("CUDA"), "{msg}");
    // The device storage type: a typo, and bf16 on the CPU, are argument errors.
    assert_eq!(load_dtype("f32").0, rlx_status::RLX_OK);
    let (st, msg) = load_dtype("fp8");
    assert_eq!(st, rlx_status::RLX_INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("f32 or bf16"), "{msg}");
    let (st, msg) = load_dtype("bf16");
    assert_eq!(st, rlx_status::RLX_INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("CUDA"), "{msg}");
}
