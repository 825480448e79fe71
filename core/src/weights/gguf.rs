//! GGUF (v2, v3) — the llama.cpp ecosystem's single-file format — memory-mapped and validated.
//!
//! Everything the file claims is checked before it is used: magic and version; counts against
//! what the remaining bytes could hold (so a hostile count never drives an allocation); string
//! and array lengths; value types; array nesting depth; duplicate keys and tensor names; tensor
//! rank, dims, type, alignment, and that every tensor's bytes lie inside the file without
//! overlapping another. All arithmetic on file numbers is checked.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use super::quant::GgmlType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

const MAGIC: &[u8; 4] = b"GGUF";
const MAX_STRING: usize = 16 << 20;
const MAX_ARRAY: usize = 1 << 24;
const MAX_DEPTH: usize = 4;
const MAX_TENSORS: u64 = 1 << 20;
const MAX_DIMS: usize = 4;
const DEFAULT_ALIGNMENT: usize = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// A non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v as u64),
            MetaValue::U16(v) => Some(v as u64),
            MetaValue::U32(v) => Some(v as u64),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the innermost (contiguous) dimension.
    pub dims: Vec<usize>,
    pub ggml_type: GgmlType,
    /// Absolute byte offset in the file.
    pub start: usize,
    pub n_bytes: usize,
}

impl GgufTensorInfo {
    /// Row-major shape as transformers names it (`dims` reversed).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }

    pub fn n_elements(&self) -> usize {
        self.dims.iter().product()
    }
}

pub struct GgufFile {
    path: PathBuf,
    map: Arc<Mmap>,
    pub version: u32,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<GgufTensorInfo>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only mapping; concurrent modification of the file by another process is a
        // documented risk (README), as for every mmap-based loader.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(path, Arc::new(map))
    }

    /// Maps every page of the file in (from the page cache, reading what is not there), in
    /// parallel slices on the calling pool: the load reads every weight anyway (the finite-value
    /// check, the first forward), and one `madvise(MADV_POPULATE_READ)` per slice costs far less
    /// than a page fault per 64 KB. Only a hint: where the kernel lacks it, pages fault in as
    /// they are read.
    pub fn prefault(&self) {
        // MADV_POPULATE_READ is Linux's; elsewhere pages fault in as they are read.
        #[cfg(target_os = "linux")]
        {
            use rayon::prelude::*;
            const SLICE: usize = 8 << 20;
            let len = self.map.len();
            (0..len.div_ceil(SLICE)).into_par_iter().for_each(|i| {
                let start = i * SLICE;
                let advice = memmap2::Advice::PopulateRead;
                let _ = self.map.advise_range(advice, start, SLICE.min(len - start));
            });
        }
    }

    fn parse(path: &Path, map: Arc<Mmap>) -> Result<Self> {
        let mut r = Reader {
            buf: &map,
            pos: 0,
            path,
        };
        let magic: [u8; 4] = r.array("magic")?;
        if &magic != MAGIC {
            return Err(r.err(format!("not a GGUF file (magic {magic:02x?})")));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::Unsupported(format!(
                "{}: GGUF version {version} (supported: 2, 3)",
                path.display()
            )));
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        // Each tensor info takes at least 8 (name length) + 4 (rank) + 8 (a dim) + 4 + 8 bytes;
        // each key/value at least 8 + 1 + 4 + 1.
        let fits = n_tensors
            .checked_mul(32)
            .and_then(|t| n_kv.checked_mul(14).and_then(|k| k.checked_add(t)))
            .is_some_and(|need| need <= r.remaining() as u64);
        if n_tensors > MAX_TENSORS || !fits {
            return Err(r.err(format!(
                "{n_tensors} tensors and {n_kv} metadata entries cannot fit in {} bytes",
                r.remaining()
            )));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let ty = r.u32("value type")?;
            let value = r.value(ty, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(r.err(format!("duplicate metadata key `{key}`")));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(MetaValue::U32(a)) if a.is_power_of_two() && *a <= (1 << 20) => *a as usize,
            Some(other) => {
                return Err(r.err(format!(
                "general.alignment must be a power of two up to 1 MiB stored as u32, got {other:?}"
            )))
            }
        };
        let mut raw = Vec::with_capacity(n_tensors as usize);
        let mut names = HashSet::new();
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            if !names.insert(name.clone()) {
                return Err(r.err(format!("duplicate tensor `{name}`")));
            }
            let rank = r.u32("tensor rank")? as usize;
            if rank == 0 || rank > MAX_DIMS {
                return Err(r.err(format!("tensor `{name}` has rank {rank} (1 to 4 allowed)")));
            }
            let mut dims = Vec::with_capacity(rank);
            for _ in 0..rank {
                let d = r.u64("tensor dim")?;
                let d = usize::try_from(d)
                    .ok()
                    .filter(|&d| d > 0)
                    .ok_or_else(|| r.err(format!("tensor `{name}` has dim {d}")))?;
                dims.push(d);
            }
            let ty = r.u32("tensor type")?;
            let ggml_type = GgmlType::from_id(ty)
                .ok_or_else(|| r.err(format!("tensor `{name}` has unknown ggml type {ty}")))?;
            let offset = r.u64("tensor offset")?;
            raw.push((name, dims, ggml_type, offset));
        }
        let data_start = r.pos.next_multiple_of(alignment);
        let file_len = map.len();
        let mut tensors = Vec::with_capacity(raw.len());
        for (name, dims, ggml_type, offset) in raw {
            let bad = |msg: String| Error::format(path, format!("tensor `{name}`: {msg}"));
            let n_elements = dims
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| bad("element count overflows".into()))?;
            let (block, block_bytes) = (ggml_type.block_size(), ggml_type.type_size());
            if !dims[0].is_multiple_of(block) {
                return Err(bad(format!(
                    "row of {} values is not a whole number of {ggml_type:?} blocks",
                    dims[0]
                )));
            }
            // Checked: a hostile row length overflows `GgmlType::row_bytes` (found by fuzzing).
            let n_bytes = (n_elements / block)
                .checked_mul(block_bytes)
                .ok_or_else(|| bad("byte size overflows".into()))?;
            let offset = usize::try_from(offset).map_err(|_| bad("offset overflows".into()))?;
            if offset % alignment != 0 {
                return Err(bad(format!(
                    "offset {offset} is not aligned to {alignment}"
                )));
            }
            let start = data_start
                .checked_add(offset)
                .filter(|s| s.checked_add(n_bytes).is_some_and(|end| end <= file_len))
                .ok_or_else(|| {
                    bad(format!(
                        "data ({n_bytes} bytes at offset {offset}) extends past the end of the file ({file_len} bytes)"
                    ))
                })?;
            tensors.push(GgufTensorInfo {
                name,
                dims,
                ggml_type,
                start,
                n_bytes,
            });
        }
        let mut by_start: Vec<&GgufTensorInfo> = tensors.iter().collect();
        by_start.sort_by_key(|t| t.start);
        for pair in by_start.windows(2) {
            if pair[0].start + pair[0].n_bytes > pair[1].start {
                return Err(Error::format(
                    path,
                    format!("tensors `{}` and `{}` overlap", pair[0].name, pair[1].name),
                ));
            }
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            map,
            version,
            metadata,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &BTreeMap<String, MetaValue> {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The tensor's raw bytes (bounds were validated at open).
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> &[u8] {
        &self.map[info.start..info.start + info.n_bytes]
    }

    /// A 2-D tensor kept in its quantized blocks (read in place), when the quantized kernels
    /// read its type; `None` otherwise (the caller then asks for f32).
    pub fn tensor_quantized(&self, name: &str) -> Option<Tensor> {
        let info = self.tensor_info(name)?;
        let shape = info.shape();
        let [rows, cols] = shape[..] else {
            return None;
        };
        Tensor::quantized_mapped(info.ggml_type, self.map.clone(), info.start, [rows, cols])
    }

    /// The tensor as f32 in row-major HF shape: zero-copy for F32, dequantized otherwise.
    pub fn tensor_f32(&self, name: &str) -> Result<Tensor> {
        let info = self.tensor_info(name).ok_or_else(|| Error::TensorMissing {
            name: name.to_owned(),
        })?;
        let shape = info.shape();
        if info.ggml_type == GgmlType::F32 {
            if let Some(t) = Tensor::mapped(self.map.clone(), info.start, shape.clone()) {
                return Ok(t);
            }
        }
        let values = info
            .ggml_type
            .dequantize(self.tensor_bytes(info), info.dims[0])
            .ok_or_else(|| Error::format(&self.path, format!("tensor `{name}`: bad block data")))?;
        Tensor::owned(values, shape)
            .ok_or_else(|| Error::format(&self.path, format!("tensor `{name}`: size mismatch")))
    }
}

/// Bounds-checked little-endian cursor.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl Reader<'_> {
    fn err(&self, msg: String) -> Error {
        Error::format(self.path, msg)
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn bytes(&mut self, n: usize, what: &str) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.err(format!(
                "truncated: {what} needs {n} bytes at offset {} but the file has {}",
                self.pos,
                self.buf.len()
            ))),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let b = self.bytes(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= MAX_STRING)
            .ok_or_else(|| self.err(format!("{what}: string length {len} is too large")))?;
        let bytes = self.bytes(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.err(format!("{what}: not UTF-8")))
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.array::<1>("u8")?[0]),
            1 => MetaValue::I8(self.array::<1>("i8")?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array("u16")?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array("i16")?)),
            4 => MetaValue::U32(self.u32("u32")?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array("i32")?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array("f32")?)),
            7 => match self.array::<1>("bool")?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(self.err(format!("bool value {b}"))),
            },
            8 => MetaValue::Str(self.string("string value")?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(self.err("arrays nested too deeply".into()));
                }
                let item_ty = self.u32("array type")?;
                let n = self.u64("array length")?;
                let min_item = match item_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    other => return Err(self.err(format!("unknown array item type {other}"))),
                };
                let fits = n
                    .checked_mul(min_item)
                    .is_some_and(|need| need <= self.remaining() as u64);
                if n > MAX_ARRAY as u64 || !fits {
                    return Err(self.err(format!("array of {n} items cannot fit in the file")));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(item_ty, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64("u64")?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array("i64")?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array("f64")?)),
            other => return Err(self.err(format!("unknown metadata value type {other}"))),
        })
    }
}
