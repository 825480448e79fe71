//! The CUDA side (crate feature `cuda`): finding the driver, NVRTC and cuBLAS at run time,
//! compiling the kernels of `rlx-cuda-kernels` for a device's compute capability (cached per
//! process), and running a model on a device ([`CudaModel`]).
//!
//! Libraries are loaded dynamically (cudarc's `dynamic-loading`): a build needs no CUDA, and a
//! machine without a driver, NVRTC or cuBLAS gets an error, never an abort. cudarc panics when
//! a library is missing, so every entry point here probes for it first.
//!
//! - `mod.rs` (here): probes, device checks, `compile` (PTX per module and architecture).
//! - `gpu.rs`: one device: context, stream, cuBLAS handle, loaded kernels, and a launch method
//!   per kernel whose arguments follow the kernel's C signature; the cuBLAS GEMM wrapper.
//! - `lt.rs`: cuBLASLt for biased products (the bias fused as the GEMM's epilogue).
//! - `model.rs`: [`CudaModel`]: the weights on the device (f32 or bf16), the paged KV cache and
//!   the forward pass, logits, log-probs, hidden states and generation.
//! - `backward.rs` (a child module of `model.rs`): the training forward and backward
//!   (gradients of every objective, LoRA, checkpointing) and the re-upload of changed weights.
//! - `optim.rs` (a child module of `backward.rs`): gradients and AdamW's moments kept on the
//!   device for a Trainer.
//!
//! Status: kernels compile (checked in CI for sm_80 and sm_90). The model code is compiled
//! and type-checked but has NOT yet run on a GPU; `tests/tests/cuda.rs` holds the checks
//! against the CPU that a GPU machine runs (`scripts/gpu-check.sh`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use rlx_cuda_kernels::Module;

use crate::error::{Error, Result};

mod gpu;
mod lt;
mod model;

pub use model::CudaModel;
pub(crate) use model::{AdamStep, DeviceGrads, DeviceMoments};

fn cuda_error(message: impl Into<String>) -> Error {
    Error::Cuda(message.into())
}

/// Whether libnvrtc can be loaded (it is searched by its usual names on the loader's path;
/// the `nvidia-cuda-nvrtc-cu12` wheel provides it without a GPU: add its `lib` folder to
/// `LD_LIBRARY_PATH`).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library by name; no symbol is called.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Whether the CUDA driver library (libcuda) can be loaded.
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen the library by name; no symbol is called.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether cuBLAS (libcublas) can be loaded.
pub fn cublas_available() -> bool {
    // SAFETY: only tries to dlopen the library by name; no symbol is called.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}

/// The number of CUDA devices, or why there are none to use.
pub fn device_count() -> Result<usize> {
    if !driver_available() {
        return Err(cuda_error(
            "no CUDA driver found (libcuda.so is not on the loader's path); run on `cpu`",
        ));
    }
    cudarc::driver::result::init().map_err(|e| cuda_error(format!("cuInit failed: {e:?}")))?;
    let n = cudarc::driver::result::device::get_count()
        .map_err(|e| cuda_error(format!("cannot count devices: {e:?}")))?;
    Ok(n.max(0) as usize)
}

/// Checks that device `index` exists.
pub fn check_device(index: usize) -> Result<()> {
    let n = device_count()?;
    if index >= n {
        return Err(cuda_error(format!(
            "device cuda:{index} does not exist ({n} device{} found)",
            if n == 1 { "" } else { "s" }
        )));
    }
    Ok(())
}

type PtxCache = Mutex<HashMap<(&'static str, String), Arc<str>>>;

fn cache() -> &'static PtxCache {
    static CACHE: OnceLock<PtxCache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// `sm_80` → `compute_80` (PTX for that virtual architecture; the driver JIT-compiles it for
/// the device, and newer devices run it too).
fn virtual_arch(arch: &str) -> Result<&'static str> {
    const KNOWN: &[(&str, &str)] = &[
        ("sm_70", "compute_70"),
        ("sm_75", "compute_75"),
        ("sm_80", "compute_80"),
        ("sm_86", "compute_86"),
        ("sm_89", "compute_89"),
        ("sm_90", "compute_90"),
        ("sm_100", "compute_100"),
        ("sm_120", "compute_120"),
    ];
    KNOWN
        .iter()
        .find(|(sm, _)| *sm == arch)
        .map(|(_, c)| *c)
        .ok_or_else(|| {
            cuda_error(format!(
                "unknown architecture {arch} (known: {})",
                KNOWN.iter().map(|(s, _)| *s).collect::<Vec<_>>().join(", ")
            ))
        })
}

/// The PTX of `module` for `arch` (`sm_80`, `sm_90`, …), compiled by NVRTC on first use and
/// kept for the life of the process. A compile error carries NVRTC's log.
pub fn compile(module: &'static Module, arch: &str) -> Result<Arc<str>> {
    let key = (module.name, arch.to_string());
    if let Some(ptx) = cache().lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(ptx.clone());
    }
    if !nvrtc_available() {
        return Err(cuda_error(
            "NVRTC (libnvrtc.so) not found: install the CUDA toolkit or the \
             nvidia-cuda-nvrtc-cu12 wheel and add its lib folder to LD_LIBRARY_PATH",
        ));
    }
    let options = cudarc::nvrtc::CompileOptions {
        arch: Some(virtual_arch(arch)?),
        name: Some(format!("{}.cu", module.name)),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(module.full_source(), options)
        .map_err(|e| {
            let detail = match e {
                cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                    log.to_string_lossy().into_owned()
                }
                other => format!("{other:?}"),
            };
            cuda_error(format!("{} for {arch}: {detail}", module.name))
        })?
        .to_src();
    for kernel in module.kernels {
        if !ptx.contains(&format!(".entry {kernel}(")) {
            return Err(cuda_error(format!(
                "{} for {arch}: the PTX lacks kernel {kernel}",
                module.name
            )));
        }
    }
    let ptx: Arc<str> = ptx.into();
    cache()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, ptx.clone());
    Ok(ptx)
}

/// Every kernel module compiled for `arch`.
pub fn compile_all(arch: &str) -> Result<Vec<(&'static str, Arc<str>)>> {
    rlx_cuda_kernels::ALL
        .iter()
        .map(|m| Ok((m.name, compile(m, arch)?)))
        .collect()
}
