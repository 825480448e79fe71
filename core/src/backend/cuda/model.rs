//! [`CudaModel`]: a loaded model's weights in device memory and the decoder forward pass on
//! the GPU, mirroring `model/forward.rs` step for step:
//!
//! ```text
//! embed (+ learned positions) → per layer: norm, q/k/v (+ bias), RoPE, K/V into the cache,
//! attention over the cache, o-proj, residual, norm, MLP (GELU or SwiGLU), residual
//! → final norm → LM head (cuBLAS) → log-softmax gather / sampling
//! ```
//!
//! - Weights: f32 on the device (quantized GGUF tensors are dequantized at load, f16/bf16
//!   checkpoints widened to f32, as the CPU path reads them), or with `device_dtype` bf16 the
//!   matrices (linear weights, embeddings, LM head) rounded to bf16; norms, biases and LoRA
//!   adapters stay f32. Score and value heads stay on the host.
//! - Matrix products: cuBLAS SGEMM, f32 in and out (no TF32), `x · Wᵀ` as `gpu::Gpu::gemm`;
//!   with a bias, cuBLASLt's BIAS epilogue (`lt.rs`); bf16 weights through `matmul_bf16w`.
//! - KV cache: paged, blocks of [`KV_BLOCK`] positions from one pool per layer (f32 or bf16),
//!   each sequence owning the blocks its capacity needs. Attention runs
//!   `attention_decode_paged{_f32}` with one query row per token (prefill and decode alike)
//!   through the token's sequence's block table, so a token attends to positions `0..=pos` of
//!   its own sequence exactly as the CPU kernel does.
//! - Generation samples on the device (`sample_rows`: temperature, top-k, top-p) and reports
//!   log-probs through `logsoftmax_gather_fwd`; with a repetition penalty or min-p the logits
//!   rows go to the host and the CPU sampler picks. Random numbers differ from the CPU
//!   sampler's (counter-based on the device), so sampled tokens differ from a CPU run with the
//!   same seed; greedy picks the argmax (lowest id on ties) like the CPU.
//!
//! Results agree with the CPU within floating-point tolerance, not bit for bit (different
//! summation orders; RoPE angles in f32 on the device, f64 on the CPU).
//!
//! Not yet run on a GPU: compiled and type-checked only.

use std::sync::{Mutex, MutexGuard};

use cudarc::driver::CudaSlice;

use super::cuda_error;
use super::gpu::{int, Gpu};
use crate::backend::cpu::attention::Slot;
use crate::backend::cpu::softmax::log_prob_of;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::generate::{FinishReason, Generation, StreamCallback, TokenStep};
use crate::model::{Linear, LoraAdapter, Mlp, ModelWeights, Norm};
use crate::sampling::{Sampler, SamplingParams};
use crate::tensor::Tensor;

// The training backward: a child module, so it reaches the device weights.
#[path = "backward.rs"]
mod backward;
pub(crate) use backward::{AdamStep, DeviceGrads, DeviceMoments};

/// Tokens packed into one forward when scoring many sequences (as the CPU path).
const PACK_TOKENS: usize = 2048;
/// LM-head rows per chunk when scoring: bounds the logits buffer to `LOGIT_ROWS × V`.
const LOGIT_ROWS: usize = 256;

/// A weight matrix on the device: f32, or bf16 (raw 16-bit patterns, `device_dtype` bf16).
pub(super) enum DMat {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

impl DMat {
    pub(super) fn len(&self) -> usize {
        match self {
            DMat::F32(b) => b.len(),
            DMat::Bf16(b) => b.len(),
        }
    }

    /// The f32 values, which training needs (a Trainer's model is always f32 on the device).
    pub(super) fn f32(&self) -> Result<&CudaSlice<f32>> {
        match self {
            DMat::F32(b) => Ok(b),
            DMat::Bf16(_) => Err(bf16_no_gradients()),
        }
    }

    pub(super) fn f32_mut(&mut self) -> Result<&mut CudaSlice<f32>> {
        match self {
            DMat::F32(b) => Ok(b),
            DMat::Bf16(_) => Err(bf16_no_gradients()),
        }
    }
}

fn bf16_no_gradients() -> Error {
    cuda_error(
        "gradients need the f32 weights on the device: this model was loaded with \
         device_dtype bf16 (a Trainer trains an f32 copy)",
    )
}

/// A LoRA adapter on the device: `A [r, k]`, `B [n, r]` (f32), scale `alpha / r`.
pub(super) struct DLora {
    a: CudaSlice<f32>,
    b: CudaSlice<f32>,
    r: usize,
    scale: f32,
}

struct DLinear {
    /// `[n, k]` row-major (out, in).
    w: DMat,
    lora: Option<DLora>,
    b: Option<CudaSlice<f32>>,
    n: usize,
    k: usize,
}

enum DNorm {
    Rms {
        w: CudaSlice<f32>,
    },
    Layer {
        w: CudaSlice<f32>,
        b: CudaSlice<f32>,
    },
}

// One per layer, never moved after load: boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
enum DMlp {
    Gelu {
        fc: DLinear,
        proj: DLinear,
    },
    SwiGlu {
        gate: DLinear,
        up: DLinear,
        down: DLinear,
    },
}

struct DLayer {
    attn_norm: DNorm,
    q: DLinear,
    k: DLinear,
    v: DLinear,
    o: DLinear,
    mlp_norm: DNorm,
    mlp: DMlp,
}

impl DLayer {
    /// The layer's linear maps: q, k, v, o, then the MLP's.
    fn linears(&self) -> Vec<&DLinear> {
        let mut out = vec![&self.q, &self.k, &self.v, &self.o];
        match &self.mlp {
            DMlp::Gelu { fc, proj } => out.extend([fc, proj]),
            DMlp::SwiGlu { gate, up, down } => out.extend([gate, up, down]),
        }
        out
    }
}

struct DWeights {
    tok_emb: DMat,
    /// The same type as `tok_emb` (the embedding kernel reads both).
    pos_emb: Option<DMat>,
    layers: Vec<DLayer>,
    final_norm: DNorm,
    /// `None`: tied to `tok_emb` (or absent: see `has_lm_head`).
    lm_head: Option<DMat>,
}

/// Positions per block of the paged KV cache.
pub(super) const KV_BLOCK: usize = 16;

/// One layer's K or V cache: `[blocks × KV_BLOCK, kv_dim]`, f32 or bf16 (raw 16-bit patterns;
/// `LoadOptions::device_dtype`).
pub(super) enum KvBuf {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

impl KvBuf {
    pub(super) fn len(&self) -> usize {
        match self {
            KvBuf::F32(b) => b.len(),
            KvBuf::Bf16(b) => b.len(),
        }
    }
}

/// A paged KV cache for a batch of sequences: per layer one pool of blocks of [`KV_BLOCK`]
/// positions, each sequence owning the blocks listed in its table (enough for the capacity
/// it asked for, allocated up front: decode never grows it), and how many positions each
/// sequence has written. Sequences of different lengths take only their own blocks.
struct Cache {
    k: Vec<KvBuf>,
    v: Vec<KvBuf>,
    tables: Vec<Vec<i32>>,
    lens: Vec<usize>,
}

impl Cache {
    /// Block pool rows (`blocks × KV_BLOCK`).
    fn slots(&self) -> usize {
        self.tables.iter().map(Vec::len).sum::<usize>() * KV_BLOCK
    }
}

/// The host-side arrays of one forward call, checked: token `i` (sequence `seqs[i]`, position
/// `positions[i]`) goes to cache row `cache_slots[i]` (its sequence's block `pos / KV_BLOCK`,
/// row `pos % KV_BLOCK`) and attends to the first `context_lens[i] = pos + 1` positions of its
/// sequence, whose blocks are row `seqs[i]` of `tables` (`[sequences, max_blocks]`, padded
/// with block 0, which is never read past `context_lens`). The same checks as the CPU forward
/// (ids in the vocabulary, positions continuing each cache, within its capacity and the
/// model's context), and every table entry inside the pool, which keep every kernel index in
/// bounds.
#[derive(Debug, PartialEq)]
struct Plan {
    ids: Vec<i32>,
    positions: Vec<i32>,
    cache_slots: Vec<i32>,
    context_lens: Vec<i32>,
    seqs: Vec<i32>,
    tables: Vec<i32>,
    max_blocks: usize,
    /// Each sequence's length after the call.
    next_lens: Vec<usize>,
}

impl Plan {
    fn new(
        tokens: &[u32],
        slots: &[Slot],
        lens: &[usize],
        tables: &[Vec<i32>],
        cfg: &ModelConfig,
    ) -> Result<Plan> {
        let t = tokens.len();
        if t == 0 || slots.len() != t {
            return Err(Error::invalid("one slot per token is required"));
        }
        if tables.len() != lens.len() {
            return Err(cuda_error("internal: one block table per sequence"));
        }
        int(t, "tokens")?;
        let blocks: usize = tables.iter().map(Vec::len).sum();
        let pool = blocks
            .checked_mul(KV_BLOCK)
            .ok_or_else(|| Error::invalid("KV cache size overflows"))?;
        int(pool, "KV cache positions")?;
        let max_blocks = tables.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let table_len = tables
            .len()
            .checked_mul(max_blocks)
            .ok_or_else(|| Error::invalid("KV block table size overflows"))?;
        int(table_len, "KV block table entries")?;
        let mut flat = Vec::with_capacity(table_len);
        for table in tables {
            if table.iter().any(|&b| b < 0 || b as usize >= blocks) {
                return Err(cuda_error("internal: KV block out of the pool"));
            }
            flat.extend_from_slice(table);
            flat.extend(std::iter::repeat_n(0, max_blocks - table.len()));
        }
        let mut plan = Plan {
            ids: Vec::with_capacity(t),
            positions: Vec::with_capacity(t),
            cache_slots: Vec::with_capacity(t),
            context_lens: Vec::with_capacity(t),
            seqs: Vec::with_capacity(t),
            tables: flat,
            max_blocks,
            next_lens: lens.to_vec(),
        };
        for (&tok, slot) in tokens.iter().zip(slots) {
            if tok as usize >= cfg.vocab_size {
                return Err(Error::TokenOutOfRange {
                    id: tok,
                    vocab: cfg.vocab_size,
                });
            }
            let next = plan
                .next_lens
                .get_mut(slot.seq)
                .ok_or_else(|| Error::invalid("slot names a missing sequence"))?;
            if slot.pos != *next {
                return Err(Error::invalid("token positions must continue the cache"));
            }
            let table = &tables[slot.seq];
            let cap = table.len() * KV_BLOCK;
            if slot.pos >= cap || slot.pos >= cfg.max_position_embeddings {
                return Err(Error::ContextOverflow {
                    requested: slot.pos + 1,
                    max: cap.min(cfg.max_position_embeddings),
                });
            }
            *next += 1;
            // Inside the pool (checked above), so the row fits an i32 as the pool does.
            let block = table[slot.pos / KV_BLOCK] as usize;
            plan.ids.push(tok as i32);
            plan.positions.push(slot.pos as i32);
            plan.cache_slots
                .push((block * KV_BLOCK + slot.pos % KV_BLOCK) as i32);
            plan.context_lens.push((slot.pos + 1) as i32);
            plan.seqs.push(slot.seq as i32);
        }
        Ok(plan)
    }
}

/// A model on a CUDA device. Calls are serialised (one stream, one cuBLAS handle).
pub struct CudaModel {
    // First field, so dropped first: `Gpu`'s Drop synchronizes its stream, which makes the
    // context current on the dropping thread (any thread: Python may drop a model anywhere);
    // cudarc frees the buffers below without binding it.
    gpu: Gpu,
    cfg: ModelConfig,
    w: DWeights,
    has_lm_head: bool,
    inv_freq: Option<CudaSlice<f32>>,
    lock: Mutex<()>,
    /// The backward's kernels, loaded on the first gradient call.
    bwd: std::sync::OnceLock<backward::Kernels>,
    /// The optimizer's kernels, loaded on the first step on the device.
    optim: std::sync::OnceLock<backward::OptimKernels>,
    /// bf16 storage (`LoadOptions::device_dtype`): the KV cache (and, at load, the matrices).
    bf16: bool,
}

impl std::fmt::Debug for CudaModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaModel")
            .field("device", &self.gpu.ordinal())
            .field("name", &self.gpu.name())
            .field("arch", &self.gpu.arch())
            .finish()
    }
}

fn upload_tensor(gpu: &Gpu, t: &Tensor) -> Result<CudaSlice<f32>> {
    // Quantized tensors give their dequantized f32 values here.
    gpu.upload(t.as_slice())
}

/// The f32 values as bf16 bit patterns (round to nearest even).
pub(super) fn bf16_bits(values: &[f32]) -> Vec<u16> {
    values
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_bits())
        .collect()
}

/// A matrix (or embedding table) in the model's device storage.
pub(super) fn upload_matrix(gpu: &Gpu, values: &[f32], bf16: bool) -> Result<DMat> {
    Ok(if bf16 {
        DMat::Bf16(gpu.upload(&bf16_bits(values))?)
    } else {
        DMat::F32(gpu.upload(values)?)
    })
}

/// A LoRA adapter's device copy (shapes checked against its linear map's `[n, k]`).
fn upload_lora(gpu: &Gpu, ad: &LoraAdapter, n: usize, k: usize, name: &str) -> Result<DLora> {
    let r = ad.rank();
    if ad.a.shape() != [r, k] || ad.b.shape() != [n, r] {
        return Err(cuda_error(format!(
            "{name}: LoRA shapes {:?} / {:?} do not fit a {n}×{k} map",
            ad.a.shape(),
            ad.b.shape()
        )));
    }
    int(r, name)?;
    Ok(DLora {
        a: gpu.upload(ad.a.as_slice())?,
        b: gpu.upload(ad.b.as_slice())?,
        r,
        scale: ad.scale,
    })
}

fn upload_linear(gpu: &Gpu, lin: &Linear, name: &str, bf16: bool) -> Result<DLinear> {
    let shape = lin.w.shape();
    let (n, k) = match shape {
        [n, k] => (*n, *k),
        _ => {
            return Err(cuda_error(format!(
                "internal: {name} weight has shape {shape:?}"
            )))
        }
    };
    int(n, name)?;
    int(k, name)?;
    Ok(DLinear {
        lora: match &lin.lora {
            Some(ad) => Some(upload_lora(gpu, ad, n, k, name)?),
            None => None,
        },
        w: upload_matrix(gpu, lin.w.as_slice(), bf16)?,
        b: match &lin.b {
            Some(b) => Some(upload_tensor(gpu, b)?),
            None => None,
        },
        n,
        k,
    })
}

fn upload_norm(gpu: &Gpu, norm: &Norm) -> Result<DNorm> {
    Ok(match norm {
        Norm::Rms { w } => DNorm::Rms {
            w: upload_tensor(gpu, w)?,
        },
        Norm::Layer { w, b } => DNorm::Layer {
            w: upload_tensor(gpu, w)?,
            b: upload_tensor(gpu, b)?,
        },
    })
}

fn upload_weights(gpu: &Gpu, w: &ModelWeights, bf16: bool) -> Result<DWeights> {
    let mut layers = Vec::with_capacity(w.layers.len());
    for (i, l) in w.layers.iter().enumerate() {
        let name = |n: &str| format!("layers.{i}.{n}");
        layers.push(DLayer {
            attn_norm: upload_norm(gpu, &l.attn_norm)?,
            q: upload_linear(gpu, &l.q, &name("q"), bf16)?,
            k: upload_linear(gpu, &l.k, &name("k"), bf16)?,
            v: upload_linear(gpu, &l.v, &name("v"), bf16)?,
            o: upload_linear(gpu, &l.o, &name("o"), bf16)?,
            mlp_norm: upload_norm(gpu, &l.mlp_norm)?,
            mlp: match &l.mlp {
                Mlp::Gelu { fc, proj } => DMlp::Gelu {
                    fc: upload_linear(gpu, fc, &name("mlp.fc"), bf16)?,
                    proj: upload_linear(gpu, proj, &name("mlp.proj"), bf16)?,
                },
                Mlp::SwiGlu { gate, up, down } => DMlp::SwiGlu {
                    gate: upload_linear(gpu, gate, &name("mlp.gate"), bf16)?,
                    up: upload_linear(gpu, up, &name("mlp.up"), bf16)?,
                    down: upload_linear(gpu, down, &name("mlp.down"), bf16)?,
                },
            },
        });
    }
    Ok(DWeights {
        tok_emb: upload_matrix(gpu, w.tok_emb.as_slice(), bf16)?,
        pos_emb: match &w.pos_emb {
            Some(p) => Some(upload_matrix(gpu, p.as_slice(), bf16)?),
            None => None,
        },
        layers,
        final_norm: upload_norm(gpu, &w.final_norm)?,
        lm_head: match &w.lm_head {
            Some(h) => Some(upload_matrix(gpu, h.as_slice(), bf16)?),
            None => None,
        },
    })
}

impl CudaModel {
    /// Opens device `ordinal` and copies the weights there. `inv_freq` are the RoPE inverse
    /// frequencies the CPU path uses (after any scaling), `None` for learned positions.
    pub(crate) fn new(
        ordinal: usize,
        cfg: &ModelConfig,
        weights: &ModelWeights,
        inv_freq: Option<&[f64]>,
        bf16: bool,
    ) -> Result<CudaModel> {
        if cfg.head_dim > 256
            || cfg.num_kv_heads == 0
            || !cfg.num_heads.is_multiple_of(cfg.num_kv_heads)
        {
            return Err(Error::Unsupported(format!(
                "the CUDA backend supports head_dim ≤ 256 with whole query groups (this model: \
                 head_dim {}, {} query heads over {} KV heads)",
                cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
            )));
        }
        for (v, what) in [
            (cfg.hidden_size, "hidden_size"),
            (cfg.intermediate_size, "intermediate_size"),
            (cfg.vocab_size, "vocab_size"),
            (cfg.max_position_embeddings, "max_position_embeddings"),
            (cfg.q_dim(), "q_dim"),
        ] {
            int(v, what)?;
        }
        let gpu = Gpu::new(ordinal)?;
        gpu.bind()?;
        let w = upload_weights(&gpu, weights, bf16)?;
        let inv_freq = match inv_freq {
            Some(f) => {
                let f32s: Vec<f32> = f.iter().map(|&v| v as f32).collect();
                Some(gpu.upload(&f32s)?)
            }
            None => None,
        };
        gpu.sync()?;
        Ok(CudaModel {
            has_lm_head: weights.lm_head.is_some() || cfg.tie_word_embeddings,
            gpu,
            cfg: cfg.clone(),
            w,
            inv_freq,
            lock: Mutex::new(()),
            bwd: std::sync::OnceLock::new(),
            optim: std::sync::OnceLock::new(),
            bf16,
        })
    }

    /// The device index (`cuda:N`).
    pub fn ordinal(&self) -> usize {
        self.gpu.ordinal()
    }

    /// The device's name as the driver reports it.
    pub fn device_name(&self) -> &str {
        self.gpu.name()
    }

    /// The architecture the kernels were compiled for (`sm_80`, `sm_90`, …).
    pub fn arch(&self) -> &str {
        self.gpu.arch()
    }

    /// Hidden, query, key/value and MLP widths.
    fn widths(&self) -> (usize, usize, usize, usize) {
        let cfg = &self.cfg;
        (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
        )
    }

    /// Query heads, key/value heads, head size.
    fn heads(&self) -> (usize, usize, usize) {
        (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim)
    }

    /// Serialises calls; the context is made current on the calling thread.
    fn enter(&self) -> Result<MutexGuard<'_, ()>> {
        let guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.gpu.bind()?;
        Ok(guard)
    }

    /// A paged cache with room for `caps[i]` positions of sequence `i` (whole blocks).
    fn cache(&self, caps: &[usize]) -> Result<Cache> {
        let mut tables = Vec::with_capacity(caps.len());
        let mut blocks = 0usize;
        for &cap in caps {
            let n = cap.max(1).div_ceil(KV_BLOCK);
            let end = blocks
                .checked_add(n)
                .ok_or_else(|| Error::invalid("KV cache size overflows"))?;
            int(end, "KV cache blocks")?;
            tables.push((blocks..end).map(|b| b as i32).collect());
            blocks = end;
        }
        let slots = blocks
            .checked_mul(KV_BLOCK)
            .ok_or_else(|| Error::invalid("KV cache size overflows"))?;
        int(slots, "KV cache positions")?;
        let n = slots
            .checked_mul(self.cfg.kv_dim())
            .ok_or_else(|| Error::invalid("KV cache size overflows"))?;
        let mut k = Vec::with_capacity(self.cfg.num_layers);
        let mut v = Vec::with_capacity(self.cfg.num_layers);
        for _ in 0..self.cfg.num_layers {
            if self.bf16 {
                k.push(KvBuf::Bf16(self.gpu.zeros::<u16>(n)?));
                v.push(KvBuf::Bf16(self.gpu.zeros::<u16>(n)?));
            } else {
                k.push(KvBuf::F32(self.gpu.zeros::<f32>(n)?));
                v.push(KvBuf::F32(self.gpu.zeros::<f32>(n)?));
            }
        }
        Ok(Cache {
            k,
            v,
            tables,
            lens: vec![0; caps.len()],
        })
    }

    /// Device bytes of a cache for sequences of capacities `caps` (what `cache` allocates).
    fn cache_bytes(&self, caps: &[usize]) -> u64 {
        let blocks: usize = caps
            .iter()
            .map(|&c| c.max(1).div_ceil(KV_BLOCK))
            .fold(0usize, usize::saturating_add);
        let per_value: u64 = if self.bf16 { 2 } else { 4 };
        crate::memory::f32_bytes(&[blocks, KV_BLOCK, 2 * self.cfg.num_layers, self.cfg.kv_dim()])
            / 4
            * per_value
    }

    fn linear(
        &self,
        out: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        lin: &DLinear,
        t: usize,
    ) -> Result<()> {
        // A bias rides on the product as cuBLASLt's epilogue when it can (f32 weights).
        let fused = match (&lin.w, &lin.b, &self.gpu.lt) {
            (DMat::F32(w), Some(b), Some(lt)) => lt.linear_bias(out, x, w, b, t, lin.n, lin.k)?,
            _ => false,
        };
        if !fused {
            self.gpu.matmul(out, x, &lin.w, t, lin.n, lin.k)?;
            if let Some(b) = &lin.b {
                self.gpu.add_bias(out, b, t, lin.n)?;
            }
        }
        if let Some(ad) = &lin.lora {
            // out += s · (x · Aᵀ) · Bᵀ, the scale folded into the first product.
            let mut u = self.gpu.zeros::<f32>(t * ad.r)?;
            self.gpu
                .gemm_scaled(&mut u, x, &ad.a, (t, ad.r, lin.k), ad.scale, 0.0)?;
            self.gpu
                .gemm_scaled(out, &u, &ad.b, (t, lin.n, ad.r), 1.0, 1.0)?;
        }
        Ok(())
    }

    fn norm(
        &self,
        norm: &DNorm,
        out: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        t: usize,
    ) -> Result<()> {
        let (c, eps) = (self.cfg.hidden_size, self.cfg.norm_eps);
        match norm {
            DNorm::Rms { w } => self.gpu.rmsnorm(out, x, w, t, c, eps),
            DNorm::Layer { w, b } => self.gpu.layernorm(out, x, w, b, t, c, eps),
        }
    }

    /// Runs every layer over `tokens` (packed; `slots[i]` = sequence and position of token i),
    /// appending their K/V to `cache`; returns the final-normed hidden states `[T, C]`.
    fn forward(&self, tokens: &[u32], slots: &[Slot], cache: &mut Cache) -> Result<CudaSlice<f32>> {
        let cfg = &self.cfg;
        let t = tokens.len();
        let plan = Plan::new(tokens, slots, &cache.lens, &cache.tables, cfg)?;
        let g = &self.gpu;
        let ((c, qd, kvd, f), (hq, hkv, hd)) = (self.widths(), self.heads());
        let total_slots = cache.slots();
        let ids_d = g.upload(&plan.ids)?;
        let positions_d = g.upload(&plan.positions)?;
        let slots_d = g.upload(&plan.cache_slots)?;
        let lens_d = g.upload(&plan.context_lens)?;
        let tables_d = g.upload(&plan.tables)?;
        let seqs_d = g.upload(&plan.seqs)?;
        let mut x = g.zeros::<f32>(t * c)?;
        let mut h = g.zeros::<f32>(t * c)?;
        let mut q = g.zeros::<f32>(t * qd)?;
        let mut k = g.zeros::<f32>(t * kvd)?;
        let mut v = g.zeros::<f32>(t * kvd)?;
        let mut att = g.zeros::<f32>(t * qd)?;
        let mut out = g.zeros::<f32>(t * c)?;
        let mut m1 = g.zeros::<f32>(t * f)?;
        let mut m2 = g.zeros::<f32>(t * f)?;
        let mut act = g.zeros::<f32>(t * f)?;

        let w = &self.w;
        g.embed(
            &mut x,
            &w.tok_emb,
            w.pos_emb.as_ref(),
            &ids_d,
            &positions_d,
            t,
            c,
        )?;
        let caches = cache.k.iter_mut().zip(cache.v.iter_mut());
        for (layer, (kc, vc)) in w.layers.iter().zip(caches) {
            self.norm(&layer.attn_norm, &mut h, &x, t)?;
            self.linear(&mut q, &h, &layer.q, t)?;
            self.linear(&mut k, &h, &layer.k, t)?;
            self.linear(&mut v, &h, &layer.v, t)?;
            if let Some(inv) = &self.inv_freq {
                g.rope(&mut q, &positions_d, inv, t, hq, hd)?;
                g.rope(&mut k, &positions_d, inv, t, hkv, hd)?;
            }
            g.kv_append(&k, &v, kc, vc, &slots_d, t, hkv, hd, total_slots)?;
            g.attention(
                &mut att,
                &q,
                (kc, vc),
                (&tables_d, &seqs_d, plan.max_blocks),
                &lens_d,
                t,
                (hq, hkv),
                hd,
            )?;
            self.linear(&mut out, &att, &layer.o, t)?;
            g.add(&mut x, &out, t * c)?;

            self.norm(&layer.mlp_norm, &mut h, &x, t)?;
            match &layer.mlp {
                DMlp::Gelu { fc, proj } => {
                    self.linear(&mut m1, &h, fc, t)?;
                    g.gelu(&mut act, &m1, t * f)?;
                    self.linear(&mut out, &act, proj, t)?;
                }
                DMlp::SwiGlu { gate, up, down } => {
                    self.linear(&mut m1, &h, gate, t)?;
                    self.linear(&mut m2, &h, up, t)?;
                    g.swiglu(&mut act, &m1, &m2, t * f)?;
                    self.linear(&mut out, &act, down, t)?;
                }
            }
            g.add(&mut x, &out, t * c)?;
        }
        self.norm(&w.final_norm, &mut h, &x, t)?;
        cache.lens = plan.next_lens;
        Ok(h)
    }

    /// `logits[rows, V] = h[r0 .. r0 + rows] · headᵀ`.
    fn lm_head(
        &self,
        logits: &mut CudaSlice<f32>,
        h: &CudaSlice<f32>,
        r0: usize,
        rows: usize,
    ) -> Result<()> {
        if !self.has_lm_head {
            return Err(Error::invalid(
                "this reward model has no LM head: it scores sequences but cannot give \
                 token probabilities",
            ));
        }
        let (c, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let head = self.w.lm_head.as_ref().unwrap_or(&self.w.tok_emb);
        let x = h
            .try_slice(r0 * c..(r0 + rows) * c)
            .ok_or_else(|| cuda_error("internal: LM head rows out of range"))?;
        self.gpu.matmul(logits, &x, head, rows, v, c)
    }

    /// Full logits `[T, V]` of one sequence (the caller checked the tokens).
    pub(crate) fn logits(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let _guard = self.enter()?;
        let (n, v) = (tokens.len(), self.cfg.vocab_size);
        let (h, _) = self.forward_packed(&[tokens])?;
        let mut logits = self.gpu.zeros::<f32>(n * v)?;
        self.lm_head(&mut logits, &h, 0, n)?;
        self.gpu.download(&logits, n * v)
    }

    /// Consecutive groups of `sequences` of at most `PACK_TOKENS` tokens (a longer sequence
    /// alone), each run through `f` as one packed forward; the results in order.
    fn packed<T>(
        &self,
        sequences: &[&[u32]],
        mut f: impl FnMut(&[&[u32]]) -> Result<Vec<T>>,
    ) -> Result<Vec<T>> {
        let mut out = Vec::with_capacity(sequences.len());
        let mut start = 0;
        while start < sequences.len() {
            let mut end = start + 1;
            let mut tokens = sequences[start].len();
            while end < sequences.len() && tokens + sequences[end].len() <= PACK_TOKENS {
                tokens += sequences[end].len();
                end += 1;
            }
            out.extend(f(&sequences[start..end])?);
            start = end;
        }
        Ok(out)
    }

    /// One forward over `sequences` packed (each from position 0, in a cache of its own
    /// length): the final hidden states `[T, C]` and the packed tokens. The caller holds
    /// `enter`.
    fn forward_packed(&self, sequences: &[&[u32]]) -> Result<(CudaSlice<f32>, Vec<u32>)> {
        let caps: Vec<usize> = sequences.iter().map(|s| s.len()).collect();
        let mut cache = self.cache(&caps)?;
        let mut tokens = Vec::with_capacity(caps.iter().sum());
        let mut slots = Vec::with_capacity(tokens.capacity());
        for (i, seq) in sequences.iter().enumerate() {
            tokens.extend_from_slice(seq);
            slots.extend((0..seq.len()).map(|pos| Slot { seq: i, pos }));
        }
        let h = self.forward(&tokens, &slots, &mut cache)?;
        Ok((h, tokens))
    }

    /// Per-token log-probs of each sequence at `temperature` (> 0; the caller mapped 0 to 1
    /// and checked the tokens): `len − 1` values per sequence.
    pub(crate) fn logprobs(&self, sequences: &[&[u32]], temperature: f32) -> Result<Vec<Vec<f32>>> {
        self.packed(sequences, |group| self.logprobs_packed(group, temperature))
    }

    fn logprobs_packed(&self, sequences: &[&[u32]], temperature: f32) -> Result<Vec<Vec<f32>>> {
        let _guard = self.enter()?;
        let v = self.cfg.vocab_size;
        let (h, tokens) = self.forward_packed(sequences)?;
        // Row r predicts token r + 1 of its sequence; a sequence's last row predicts nothing.
        let mut targets: Vec<i32> = Vec::with_capacity(tokens.len());
        for seq in sequences {
            targets.extend(seq.iter().skip(1).map(|&t| t as i32));
            targets.push(-1);
        }
        let total = tokens.len();
        let chunk = LOGIT_ROWS.min(total);
        let mut logits = self.gpu.zeros::<f32>(chunk * v)?;
        let mut logp = self.gpu.zeros::<f32>(chunk)?;
        let mut all = Vec::with_capacity(total);
        let mut r0 = 0;
        while r0 < total {
            let rows = chunk.min(total - r0);
            self.lm_head(&mut logits, &h, r0, rows)?;
            let targets_d = self.gpu.upload(&targets[r0..r0 + rows])?;
            self.gpu
                .logsoftmax_gather(&mut logp, &logits, &targets_d, rows, v, temperature)?;
            all.extend(self.gpu.download(&logp, rows)?);
            r0 += rows;
        }
        let mut out = Vec::with_capacity(sequences.len());
        let mut offset = 0;
        for seq in sequences {
            let n = seq.len();
            out.push(all[offset..offset + n - 1].to_vec());
            offset += n;
        }
        Ok(out)
    }

    /// The final-normed hidden states of each sequence (`len × C` values, row-major), on the
    /// host: the input of the score and value heads, which are one row of `C` weights and run
    /// on the host. Sequences are packed up to `PACK_TOKENS` tokens per forward.
    pub(crate) fn hidden_states(&self, sequences: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let c = self.cfg.hidden_size;
        self.packed(sequences, |group| {
            let _guard = self.enter()?;
            let (h, tokens) = self.forward_packed(group)?;
            let all = self.gpu.download(&h, tokens.len() * c)?;
            let mut out = Vec::with_capacity(group.len());
            let mut offset = 0;
            for seq in group {
                out.push(all[offset * c..(offset + seq.len()) * c].to_vec());
                offset += seq.len();
            }
            Ok(out)
        })
    }

    /// Generation on the device: one packed prefill of every prompt, then one decode step per
    /// new token for the sequences still running. The caller validated the parameters, the
    /// prompts (non-empty, in the vocabulary, room for `max_new_tokens`) and `streams`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn generate(
        &self,
        prompts: &[&[u32]],
        params: &SamplingParams,
        streams: &[u64],
        mut on_token: Option<&mut StreamCallback<'_>>,
        stop: &[u32],
        lp_temperature: f32,
    ) -> Result<Vec<Generation>> {
        let n = prompts.len();
        let (c, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let mut outs: Vec<Generation> = (0..n)
            .map(|_| Generation {
                tokens: Vec::with_capacity(params.max_new_tokens),
                logprobs: Vec::with_capacity(params.max_new_tokens),
                finish_reason: FinishReason::Length,
            })
            .collect();
        if params.max_new_tokens == 0 || n == 0 {
            return Ok(outs);
        }
        if streams.len() != n {
            return Err(Error::invalid("one random stream per prompt is required"));
        }
        let device_sampling = params.repetition_penalty == 1.0 && params.min_p <= 0.0;
        let mut samplers: Vec<Sampler> = streams
            .iter()
            .map(|&i| Sampler::new(params.seed, i))
            .collect();
        let mut history: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
        let caps: Vec<usize> = prompts
            .iter()
            .map(|p| p.len().saturating_add(params.max_new_tokens))
            .collect();
        // The caches are the large allocation: refuse before making them when the device
        // cannot hold them (plus one row of logits per sequence).
        let needed = self
            .cache_bytes(&caps)
            .saturating_add(crate::memory::f32_bytes(&[n, v]));
        {
            let _guard = self.enter()?;
            let (free, _) = self.gpu.memory()?;
            if needed > free as u64 {
                return Err(Error::OutOfMemory {
                    what: format!("the generation's KV caches on cuda:{}", self.gpu.ordinal()),
                    needed,
                    available: free as u64,
                });
            }
        }

        // Prefill: every prompt in one packed forward; the last row of each is its first
        // LM-head input.
        let (mut cache, mut hidden) = {
            let _guard = self.enter()?;
            let mut cache = self.cache(&caps)?;
            let mut tokens = Vec::new();
            let mut slots = Vec::new();
            let mut last_rows = Vec::with_capacity(n);
            for (i, p) in prompts.iter().enumerate() {
                tokens.extend_from_slice(p);
                slots.extend((0..p.len()).map(|pos| Slot { seq: i, pos }));
                last_rows.push(tokens.len() - 1);
            }
            let h = self.forward(&tokens, &slots, &mut cache)?;
            let mut hidden = self.gpu.zeros::<f32>(n * c)?;
            for (i, &r) in last_rows.iter().enumerate() {
                self.gpu.copy_within(&h, r * c, &mut hidden, i * c, c)?;
            }
            (cache, hidden)
        };

        let mut active: Vec<usize> = (0..n).collect();
        let mut step: u64 = 0;
        loop {
            let rows = active.len();
            // LM head on the running sequences' newest hidden states → one token each.
            let picked: Vec<(u32, f32)> = {
                let _guard = self.enter()?;
                let mut logits = self.gpu.zeros::<f32>(rows * v)?;
                self.lm_head(&mut logits, &hidden, 0, rows)?;
                if device_sampling {
                    let st: Vec<u64> = active.iter().map(|&s| streams[s]).collect();
                    let st_d = self.gpu.upload(&st)?;
                    let mut tok_d = self.gpu.zeros::<i32>(rows)?;
                    self.gpu.sample(
                        &mut tok_d,
                        &logits,
                        &st_d,
                        rows,
                        v,
                        params.seed,
                        step,
                        params.temperature,
                        params.top_k,
                        params.top_p,
                    )?;
                    let mut lp_d = self.gpu.zeros::<f32>(rows)?;
                    self.gpu.logsoftmax_gather(
                        &mut lp_d,
                        &logits,
                        &tok_d,
                        rows,
                        v,
                        lp_temperature,
                    )?;
                    let toks = self.gpu.download(&tok_d, rows)?;
                    let lps = self.gpu.download(&lp_d, rows)?;
                    let mut picked = Vec::with_capacity(rows);
                    for (tok, lp) in toks.into_iter().zip(lps) {
                        let tok = u32::try_from(tok)
                            .ok()
                            .filter(|&t| (t as usize) < v)
                            .ok_or_else(|| {
                                cuda_error(format!("the sampler returned token {tok}"))
                            })?;
                        picked.push((tok, lp));
                    }
                    picked
                } else {
                    let host = self.gpu.download(&logits, rows * v)?;
                    let mut picked = Vec::with_capacity(rows);
                    for (row, &seq) in active.iter().enumerate() {
                        let l = &host[row * v..(row + 1) * v];
                        let tok = samplers[seq].sample(l, &history[seq], params);
                        picked.push((tok, log_prob_of(l, lp_temperature, tok as usize)));
                    }
                    picked
                }
            };
            let mut still = Vec::with_capacity(rows);
            for (&seq, &(token, logprob)) in active.iter().zip(&picked) {
                let step = TokenStep {
                    seq,
                    token,
                    logprob,
                };
                let out = &mut outs[seq];
                if step.record(
                    out,
                    &mut history[seq],
                    stop,
                    params,
                    on_token.as_deref_mut(),
                ) {
                    still.push(seq);
                }
            }
            active = still;
            if active.is_empty() {
                break;
            }
            // Decode step: the newest token of every running sequence.
            let mut tokens = Vec::with_capacity(active.len());
            let mut slots = Vec::with_capacity(active.len());
            for &seq in &active {
                let hist = &history[seq];
                tokens.push(hist[hist.len() - 1]);
                slots.push(Slot {
                    seq,
                    pos: hist.len() - 1,
                });
            }
            let _guard = self.enter()?;
            hidden = self.forward(&tokens, &slots, &mut cache)?;
            step += 1;
        }
        Ok(outs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ModelConfig {
        let json = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32,
            "max_position_embeddings": 24, "rms_norm_eps": 1e-5, "rope_theta": 10000.0
        });
        ModelConfig::from_json(&json).unwrap()
    }

    #[test]
    fn plan_maps_tokens_to_their_sequences_blocks() {
        let cfg = cfg();
        // A prefill of two sequences (3 and 2 tokens), one block each ...
        let tables = vec![vec![0], vec![1]];
        let slots = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)].map(|(seq, pos)| Slot { seq, pos });
        let p = Plan::new(&[1, 2, 3, 4, 5], &slots, &[0, 0], &tables, &cfg).unwrap();
        assert_eq!(p.ids, [1, 2, 3, 4, 5]);
        assert_eq!(p.positions, [0, 1, 2, 0, 1]);
        assert_eq!(p.cache_slots, [0, 1, 2, 16, 17]);
        assert_eq!(p.context_lens, [1, 2, 3, 1, 2]);
        assert_eq!((p.tables, p.max_blocks), (vec![0, 1], 1));
        assert_eq!(p.seqs, [0, 0, 0, 1, 1]);
        assert_eq!(p.next_lens, [3, 2]);
        // ... then a decode step of sequence 1 only.
        let p = Plan::new(&[9], &[Slot { seq: 1, pos: 2 }], &[3, 2], &tables, &cfg).unwrap();
        assert_eq!(
            (p.cache_slots, p.context_lens, p.next_lens),
            (vec![18], vec![3], vec![3, 3])
        );
        // A sequence over two blocks that are not adjacent in the pool: position 17 is row 1
        // of its second block (block 2); the other sequence's table is padded with block 0.
        let tables = vec![vec![0, 2], vec![1]];
        let slots = [Slot { seq: 0, pos: 17 }, Slot { seq: 1, pos: 0 }];
        let p = Plan::new(&[1, 2], &slots, &[17, 0], &tables, &cfg).unwrap();
        assert_eq!(p.cache_slots, [33, 16]);
        assert_eq!(p.context_lens, [18, 1]);
        assert_eq!((p.tables, p.max_blocks), (vec![0, 2, 1, 0], 2));
        assert_eq!(p.seqs, [0, 1]);
    }

    #[test]
    fn plan_refuses_what_the_cpu_forward_refuses() {
        let cfg = cfg();
        let s = |seq, pos| Slot { seq, pos };
        let one = vec![vec![0]];
        let two = vec![vec![0, 1]];
        let e = |r: Result<Plan>| r.unwrap_err().to_string();
        assert!(e(Plan::new(&[32], &[s(0, 0)], &[0], &one, &cfg)).contains("out of range"));
        assert!(e(Plan::new(&[1], &[s(1, 0)], &[0], &one, &cfg)).contains("missing sequence"));
        assert!(e(Plan::new(&[1], &[s(0, 1)], &[0], &one, &cfg)).contains("continue"));
        // Past the sequence's blocks, and past the model's context.
        assert!(e(Plan::new(&[1], &[s(0, 16)], &[16], &one, &cfg)).contains("positions"));
        assert!(e(Plan::new(&[1], &[s(0, 24)], &[24], &two, &cfg)).contains("context length is 24"));
        assert!(e(Plan::new(&[], &[], &[0], &one, &cfg)).contains("one slot per token"));
        assert!(e(Plan::new(&[1, 2], &[s(0, 0)], &[0], &one, &cfg)).contains("one slot per token"));
        // A table naming a block outside the pool is an internal error, not a wild write.
        let bad = vec![vec![5]];
        assert!(e(Plan::new(&[1], &[s(0, 0)], &[0], &bad, &cfg)).contains("pool"));
    }
}
