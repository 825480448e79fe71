//! Per-sequence key/value cache, sized once for the whole request (prompt + new tokens), so
//! decoding never grows or copies it.
//!
//! Layout per layer: `(capacity, NKV·HS)` for keys, the same for values; layers are contiguous.

use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// Cloning forks a cache: the clone continues from the same prefix without recomputing it.
#[derive(Clone)]
pub struct KvCache {
    /// `(L, capacity, NKV·HS)`.
    k: Vec<f32>,
    /// `(L, capacity, NKV·HS)`.
    v: Vec<f32>,
    capacity: usize,
    kv_dim: usize,
    /// Positions already written.
    len: usize,
}

impl KvCache {
    /// A cache for `capacity` positions; the allocation failing is an error, not an abort.
    pub fn new(cfg: &ModelConfig, capacity: usize) -> Result<Self> {
        let kv_dim = cfg.kv_dim();
        let n = cfg
            .num_layers
            .checked_mul(capacity)
            .and_then(|v| v.checked_mul(kv_dim))
            .ok_or_else(|| Error::invalid("KV cache size overflows"))?;
        Ok(KvCache {
            k: zeroed(n)?,
            v: zeroed(n)?,
            capacity,
            kv_dim,
            len: 0,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn set_len(&mut self, len: usize) {
        debug_assert!(len <= self.capacity);
        self.len = len;
    }

    /// Keys and values of layer `l`, all `capacity` positions.
    pub(crate) fn layer(&self, l: usize) -> (&[f32], &[f32]) {
        let size = self.capacity * self.kv_dim;
        (&self.k[l * size..][..size], &self.v[l * size..][..size])
    }

    /// Stores one position's key and value rows for layer `l`.
    pub(crate) fn write(&mut self, l: usize, pos: usize, k: &[f32], v: &[f32]) {
        let start = (l * self.capacity + pos) * self.kv_dim;
        self.k[start..start + self.kv_dim].copy_from_slice(k);
        self.v[start..start + self.kv_dim].copy_from_slice(v);
    }
}

/// A zeroed f32 buffer whose allocation failure is reported as an error.
pub(crate) fn zeroed(n: usize) -> Result<Vec<f32>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        Error::invalid(format!("cannot allocate {} MiB", n.saturating_mul(4) >> 20))
    })?;
    v.resize(n, 0.0);
    Ok(v)
}
