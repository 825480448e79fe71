//! `Tensor`: a read-only, row-major f32 weight. It either points into a memory-mapped checkpoint
//! (zero-copy, when the file stores aligned f32), owns its values (widened from f16/bf16, or
//! re-laid-out at load, like GPT-2's transposed Conv1D weights), or keeps a GGUF matrix in its
//! quantized blocks for the inference kernels (`quant_matmul`), dequantizing only when
//! something asks for f32 values.

use std::sync::{Arc, OnceLock};

use memmap2::Mmap;

use crate::backend::cpu::quant_matmul::QuantMatrix;
use crate::weights::quant::GgmlType;

/// Cloning is cheap and shares the values (a frozen reference model shares its policy's
/// weights); writing through [`Tensor::as_mut_slice`] copies shared values first.
#[derive(Clone)]
pub struct Tensor {
    data: TensorData,
    shape: Vec<usize>,
}

#[derive(Clone)]
enum TensorData {
    /// `len` f32 values at byte `offset` of `map`; bounds and 4-byte alignment checked by
    /// [`Tensor::mapped`].
    Mapped {
        map: Arc<Mmap>,
        offset: usize,
        len: usize,
    },
    Owned(Arc<Vec<f32>>),
    /// A `[rows, cols]` matrix in ggml blocks.
    Quantized(Arc<QuantData>),
}

struct QuantData {
    ty: GgmlType,
    bytes: QuantBytes,
    /// f32 values, made on first request (an embedding-free caller, a conversion, training).
    dense: OnceLock<Vec<f32>>,
}

enum QuantBytes {
    /// Straight from the file; bounds checked by [`Tensor::quantized_mapped`].
    Mapped {
        map: Arc<Mmap>,
        offset: usize,
        len: usize,
    },
    /// Re-ordered rows (llama.cpp's q/k permutation undone) or a split of a fused matrix.
    Owned(Vec<u8>),
}

impl QuantData {
    fn bytes(&self) -> &[u8] {
        match &self.bytes {
            QuantBytes::Mapped { map, offset, len } => &map[*offset..*offset + *len],
            QuantBytes::Owned(v) => v,
        }
    }
}

impl Tensor {
    pub fn owned(values: Vec<f32>, shape: Vec<usize>) -> Option<Self> {
        (shape.iter().product::<usize>() == values.len()).then_some(Tensor {
            data: TensorData::Owned(Arc::new(values)),
            shape,
        })
    }

    /// A zero-copy view of `shape` f32 values at byte `offset` of `map`, or `None` when the bytes
    /// are out of bounds or not 4-byte aligned (the caller then copies).
    pub(crate) fn mapped(map: Arc<Mmap>, offset: usize, shape: Vec<usize>) -> Option<Self> {
        let len = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
        let end = len.checked_mul(4)?.checked_add(offset)?;
        if end > map.len()
            || !(map.as_ptr() as usize + offset).is_multiple_of(std::mem::align_of::<f32>())
        {
            return None;
        }
        Some(Tensor {
            data: TensorData::Mapped { map, offset, len },
            shape,
        })
    }

    /// A `[rows, cols]` matrix of `ty` blocks read in place from `map` at `offset`, or `None`
    /// when the kernels cannot read `ty` with rows of `cols` or the bytes are out of bounds.
    pub(crate) fn quantized_mapped(
        ty: GgmlType,
        map: Arc<Mmap>,
        offset: usize,
        shape: [usize; 2],
    ) -> Option<Self> {
        let len = Self::quantized_len(ty, shape)?;
        (offset.checked_add(len)? <= map.len()).then(|| Tensor {
            data: TensorData::Quantized(Arc::new(QuantData {
                ty,
                bytes: QuantBytes::Mapped { map, offset, len },
                dense: OnceLock::new(),
            })),
            shape: shape.to_vec(),
        })
    }

    /// As [`Tensor::quantized_mapped`], owning `bytes`.
    pub(crate) fn quantized_owned(ty: GgmlType, bytes: Vec<u8>, shape: [usize; 2]) -> Option<Self> {
        (Self::quantized_len(ty, shape)? == bytes.len()).then(|| Tensor {
            data: TensorData::Quantized(Arc::new(QuantData {
                ty,
                bytes: QuantBytes::Owned(bytes),
                dense: OnceLock::new(),
            })),
            shape: shape.to_vec(),
        })
    }

    fn quantized_len(ty: GgmlType, [rows, cols]: [usize; 2]) -> Option<usize> {
        if !QuantMatrix::supports(ty, cols) {
            return None;
        }
        ty.row_bytes(cols)?.checked_mul(rows)
    }

    /// The blocks, when this tensor is kept quantized.
    pub fn quant(&self) -> Option<QuantMatrix<'_>> {
        match &self.data {
            TensorData::Quantized(q) => Some(QuantMatrix {
                ty: q.ty,
                data: q.bytes(),
                n: self.shape[0],
                k: self.shape[1],
            }),
            _ => None,
        }
    }

    /// Whether any value is NaN or infinite (for blocks: any scale), without dequantizing.
    pub fn has_non_finite(&self) -> bool {
        match &self.data {
            TensorData::Quantized(q) => q.ty.has_non_finite(q.bytes()),
            _ => {
                use rayon::prelude::*;
                // All-ones exponent = NaN or infinity. A branch-free OR over the chunk (no early
                // exit per value) vectorises; the scan then runs at memory speed at load.
                self.as_slice().par_chunks(1 << 16).any(|c| {
                    c.iter().fold(0u32, |seen, v| {
                        seen | u32::from(v.to_bits() & 0x7f80_0000 == 0x7f80_0000)
                    }) != 0
                })
            }
        }
    }

    pub fn is_quantized(&self) -> bool {
        matches!(self.data, TensorData::Quantized(_))
    }

    /// Row `i` of a 2-D tensor as f32 into `out` (dequantizing only that row when quantized).
    pub fn copy_row(&self, i: usize, out: &mut [f32]) {
        let cols = self.shape.get(1).copied().unwrap_or(1);
        if let TensorData::Quantized(q) = &self.data {
            if q.dense.get().is_none() {
                // One row, on this thread, straight into `out` (an embedding lookup per token).
                let rb = q.ty.row_bytes(cols).unwrap_or(0);
                q.ty.dequantize_into(&q.bytes()[i * rb..(i + 1) * rb], &mut out[..cols]);
                return;
            }
        }
        out[..cols].copy_from_slice(&self.as_slice()[i * cols..(i + 1) * cols]);
    }

    /// Replaces quantized blocks by their f32 values (training and exact f32 inference need them).
    pub fn dequantize_in_place(&mut self) {
        if self.is_quantized() {
            self.data = TensorData::Owned(Arc::new(self.as_slice().to_vec()));
        }
    }

    pub fn as_slice(&self) -> &[f32] {
        match &self.data {
            TensorData::Owned(v) => v,
            TensorData::Quantized(q) => q.dense.get_or_init(|| {
                // The length and block type were checked when the tensor was made.
                q.ty.dequantize(q.bytes(), self.shape[1])
                    .unwrap_or_default()
            }),
            TensorData::Mapped { map, offset, len } => {
                // SAFETY: `mapped` checked that `offset + 4*len <= map.len()` and that the start is
                // 4-byte aligned; any bit pattern is a valid f32; the map is read-only and kept alive
                // by the Arc for as long as `self` lives.
                unsafe { std::slice::from_raw_parts(map.as_ptr().add(*offset).cast::<f32>(), *len) }
            }
        }
    }

    /// Mutable values; a mapped tensor is copied into memory first (the file is never written),
    /// and so are values shared with a clone.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        if !matches!(self.data, TensorData::Owned(_)) {
            self.data = TensorData::Owned(Arc::new(self.as_slice().to_vec()));
        }
        match &mut self.data {
            TensorData::Owned(v) => Arc::make_mut(v).as_mut_slice(),
            // Just replaced by an owned copy above.
            TensorData::Mapped { .. } | TensorData::Quantized(_) => &mut [],
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// True when `self` and `other` read the same memory (one is a clone of the other and
    /// neither has been written since).
    pub fn shares_values_with(&self, other: &Tensor) -> bool {
        match (&self.data, &other.data) {
            (TensorData::Quantized(a), TensorData::Quantized(b)) => Arc::ptr_eq(a, b),
            (TensorData::Quantized(_), _) | (_, TensorData::Quantized(_)) => false,
            _ => {
                let (a, b) = (self.as_slice(), other.as_slice());
                a.as_ptr() == b.as_ptr() && a.len() == b.len()
            }
        }
    }

    /// True when the values are read straight from the mapped file.
    pub fn is_mapped(&self) -> bool {
        matches!(self.data, TensorData::Mapped { .. })
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tensor")
            .field("shape", &self.shape)
            .field("mapped", &self.is_mapped())
            .field("quantized", &self.quant().map(|q| q.ty))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_values_are_found_anywhere_and_only_them() {
        let len = 3 * (1 << 16) + 5;
        let clean: Vec<f32> = (0..len).map(|i| (i as f32 - 1000.0) * 1e30).collect();
        let edge = [f32::MAX, f32::MIN, f32::MIN_POSITIVE, 1e-45, -0.0];
        let mut values = clean.clone();
        values[..edge.len()].copy_from_slice(&edge);
        let tensor = |v: Vec<f32>| Tensor::owned(v, vec![len]).expect("shape matches");
        assert!(!tensor(values).has_non_finite());
        for bad in [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, 1 << 16, len - 1] {
                let mut v = clean.clone();
                v[at] = bad;
                assert!(tensor(v).has_non_finite(), "{bad} at {at}");
            }
        }
    }
}
