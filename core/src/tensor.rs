//! `Tensor`: a read-only, row-major f32 weight. It either points into a memory-mapped checkpoint
//! (zero-copy, when the file stores aligned f32) or owns its values (widened from f16/bf16, or
//! re-laid-out at load, like GPT-2's transposed Conv1D weights).

use std::sync::Arc;

use memmap2::Mmap;

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

    pub fn as_slice(&self) -> &[f32] {
        match &self.data {
            TensorData::Owned(v) => v,
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
        if let TensorData::Mapped { .. } = self.data {
            self.data = TensorData::Owned(Arc::new(self.as_slice().to_vec()));
        }
        match &mut self.data {
            TensorData::Owned(v) => Arc::make_mut(v).as_mut_slice(),
            // Just replaced by an owned copy above.
            TensorData::Mapped { .. } => &mut [],
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// True when `self` and `other` read the same memory (one is a clone of the other and
    /// neither has been written since).
    pub fn shares_values_with(&self, other: &Tensor) -> bool {
        let (a, b) = (self.as_slice(), other.as_slice());
        a.as_ptr() == b.as_ptr() && a.len() == b.len()
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
            .finish()
    }
}
