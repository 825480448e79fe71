//! CUDA C sources of rlx's GPU kernels, embedded as strings and compiled at run time with NVRTC
//! by the CUDA backend.
//!
//! Status: no kernels yet. The CUDA backend (cudarc, cuBLAS for products, these kernels for the
//! rest) is its own issue; until it lands rlx runs on the CPU only, and this list is empty.

/// One `.cu` translation unit.
#[derive(Debug, Clone, Copy)]
pub struct Module {
    /// Stable name, used as the cache key of the compiled module.
    pub name: &'static str,
    /// CUDA C source.
    pub source: &'static str,
}

/// Every kernel module the CUDA backend compiles.
pub const ALL: &[Module] = &[];
