//! CPU kernels in f32.
//!
//! The engine's promise is that a token's log-prob is the same, bit for bit, whether it was
//! computed during a decode step (one row), inside a long prefill, next to other sequences, or on
//! any number of threads. Every kernel here therefore computes each output value with one fixed
//! sequence of floating-point operations that depends only on the reduction length: threads split
//! the *outputs*, never a reduction, and tiles of different shapes run the same per-output code.
//!
//! Dimension names used across the model code: `T` packed tokens in a call, `C` hidden size,
//! `NH`/`NKV` query/KV heads, `HS` head size, `V` vocabulary, `F` MLP width.

pub mod activation;
pub mod attention;
pub mod bf16_gemm;
pub mod gemm;
pub mod int8_matmul;
pub mod matmul;
pub mod norm;
pub mod quant_matmul;
pub mod rope;
pub mod simd;
pub mod softmax;

use rayon::prelude::*;

/// A raw pointer that may cross threads. Used only where each thread writes a disjoint region,
/// which the user states in a `// SAFETY:` line.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
// SAFETY: the pointer is only dereferenced by code that guarantees disjoint writes.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Going through a method makes closures capture the whole (Send) wrapper, not the field.
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// A zero-filled buffer whose pages are already written: gradient buffers are read before their
/// first write, and a read of never-written memory maps the shared zero page, so the first write
/// then costs a copy-on-write fault plus a TLB flush on every core.
pub(crate) fn zeroed(len: usize) -> Vec<f32> {
    (0..len).into_par_iter().map(|_| 0.0).collect()
}

/// Deterministic test inputs in [-0.5, 0.5), shared by the kernels' tests.
#[cfg(test)]
pub(crate) fn test_values(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 16777216.0)
                - 0.5
        })
        .collect()
}
