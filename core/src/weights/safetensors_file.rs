//! Memory-mapped safetensors checkpoints: one `model.safetensors` or shards listed by
//! `model.safetensors.index.json`.
//!
//! Every file's header is validated by the `safetensors` crate before any tensor is touched
//! (contiguous, non-overlapping ranges; byte count == shape × dtype; no trailing bytes). f32
//! tensors are used in place; f16/bf16 are widened to f32 once, at load.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ::safetensors::tensor::{Dtype, SafeTensors};
use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::tensor::Tensor;

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range inside the mapped file.
    start: usize,
    end: usize,
}

/// The tensors of a checkpoint, by name, with their file mappings.
pub struct SafetensorsCheckpoint {
    paths: Vec<PathBuf>,
    maps: Vec<Arc<Mmap>>,
    entries: HashMap<String, Entry>,
}

impl SafetensorsCheckpoint {
    /// Opens `dir/model.safetensors.index.json` (sharded) or else `dir/model.safetensors`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        if index.is_file() {
            let shards = shard_files(&index)?;
            let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
            Self::open_files(&paths)
        } else {
            let single = dir.join("model.safetensors");
            if !single.is_file() {
                return Err(Error::format(
                    dir,
                    "no model.safetensors or model.safetensors.index.json in this folder",
                ));
            }
            Self::open_files(&[single])
        }
    }

    /// Maps and validates each file; a tensor name found in two files is an error.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut maps = Vec::with_capacity(paths.len());
        let mut entries = HashMap::new();
        for (file, path) in paths.iter().enumerate() {
            let map = Arc::new(map_file(path)?);
            let (header_len, metadata) = SafeTensors::read_metadata(&map)
                .map_err(|e| Error::format(path, format!("invalid safetensors file: {e}")))?;
            // read_metadata checked 8 + header_len + data_len == file length.
            let data_start = 8 + header_len;
            for (name, info) in metadata.tensors() {
                let (s, e) = info.data_offsets;
                let entry = Entry {
                    file,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + s,
                    end: data_start + e,
                };
                if entries.insert(name.clone(), entry).is_some() {
                    return Err(Error::format(
                        path,
                        format!("tensor `{name}` appears in more than one shard"),
                    ));
                }
            }
            maps.push(map);
        }
        Ok(SafetensorsCheckpoint {
            paths: paths.to_vec(),
            maps,
            entries,
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// The tensor `name` as f32 with exactly `shape`.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let entry = self.entry(name, shape)?;
        let map = &self.maps[entry.file];
        if entry.dtype == Dtype::F32 {
            if let Some(t) = Tensor::mapped(map.clone(), entry.start, entry.shape.clone()) {
                return Ok(t);
            }
        }
        let values = self.widen(name, entry)?;
        Tensor::owned(values, entry.shape.clone()).ok_or_else(|| self.corrupt(entry, name))
    }

    /// A tensor stored as `[rows, cols]` returned transposed as `[cols, rows]` (GPT-2's Conv1D
    /// keeps `[in, out]`; the kernels read `[out, in]` like `nn.Linear`).
    pub fn tensor_transposed(&self, name: &str, stored: [usize; 2]) -> Result<Tensor> {
        let entry = self.entry(name, &stored)?;
        let values = self.widen(name, entry)?;
        let [rows, cols] = stored;
        let mut out = vec![0f32; values.len()];
        out.par_chunks_mut(rows.max(1))
            .enumerate()
            .for_each(|(c, dst)| {
                for (r, d) in dst.iter_mut().enumerate() {
                    *d = values[r * cols + c];
                }
            });
        Tensor::owned(out, vec![cols, rows]).ok_or_else(|| self.corrupt(entry, name))
    }

    fn entry(&self, name: &str, shape: &[usize]) -> Result<&Entry> {
        let entry = self.entries.get(name).ok_or_else(|| Error::TensorMissing {
            name: name.to_owned(),
        })?;
        if entry.shape != shape {
            return Err(Error::TensorShape {
                name: name.to_owned(),
                expected: shape.to_vec(),
                got: entry.shape.clone(),
            });
        }
        Ok(entry)
    }

    /// Copies a tensor's values to f32.
    fn widen(&self, name: &str, entry: &Entry) -> Result<Vec<f32>> {
        let bytes = self.maps[entry.file]
            .get(entry.start..entry.end)
            .ok_or_else(|| self.corrupt(entry, name))?;
        let values = match entry.dtype {
            Dtype::F32 => bytes
                .par_chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => bytes
                .par_chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .par_chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::TensorDtype {
                    name: name.to_owned(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        Ok(values)
    }

    fn corrupt(&self, entry: &Entry, name: &str) -> Error {
        Error::format(
            &self.paths[entry.file],
            format!("tensor `{name}`: byte range does not match its shape"),
        )
    }
}

fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the mapping is read-only. If another process truncates or rewrites the file while
    // it is mapped, reads may fault (SIGBUS) or see new bytes; that risk is documented in the
    // README, as for every mmap-based loader.
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

/// The distinct shard file names of an index, in first-seen order. Names must be plain file
/// names in the index's own folder.
fn shard_files(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let value: Value = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: index.to_path_buf(),
        message: e.to_string(),
    })?;
    let map = value
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::format(index, "missing object `weight_map`"))?;
    let mut files: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::format(index, format!("weight_map[`{tensor}`] is not a string"))
        })?;
        let plain = Path::new(file)
            .file_name()
            .is_some_and(|n| n == std::ffi::OsStr::new(file));
        if !plain || file == ".." {
            return Err(Error::format(
                index,
                format!("shard `{file}` must be a file name in the same folder"),
            ));
        }
        if !files.iter().any(|f| f == file) {
            files.push(file.to_owned());
        }
    }
    if files.is_empty() {
        return Err(Error::format(index, "weight_map lists no shards"));
    }
    Ok(files)
}
