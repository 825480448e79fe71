//! Training on the device: the gradient of any objective of the selected tokens' log-probs,
//! entropies and values (SFT, DPO, GRPO, PPO: `Model::token_objective_gradients`) and of the
//! reward model's pair loss (`hidden_objective_gradients`), mirroring `model/backward.rs`.
//!
//! ```text
//! forward, keeping each layer's activations (input, norm statistics and output, q/k/v after
//!   RoPE, attention output and log-sum-exp, MLP pre-activations and activation), or with
//!   gradient checkpointing each layer's input only (the backward recomputes the rest):
//!   embedding_fwd → per layer: rmsnorm_fwd | layernorm_fwd (with statistics), q/k/v
//!   (matmul + bias, + LoRA), rope_fwd, attention_prefill_fwd (tiles of 16 query rows per
//!   sequence, log-sum-exp per row and head), o-proj, residual, norm, MLP, residual → norm
//! LM head in chunks of 256 rows, twice: logsoftmax_gather_fwd (log-prob, log-sum-exp,
//!   entropy) → (value head on the host) → the objective on the host → logsoftmax_gather_bwd
//!   (log-prob and entropy terms) → dH = dlogits · head, dhead += dlogitsᵀ · H (cuBLAS)
//! backward: final norm, per layer in reverse: down/proj, swiglu_bwd | gelu_tanh_bwd,
//!   gate/up/fc, norm, o-proj, attention_bwd_delta + attention_prefill_bwd (dQ, dK, dV with
//!   atomics; grouped KV heads sum their query heads), rope_bwd, q/k/v, norm; embedding_bwd
//!   (token and learned position tables); biases = column sums (a GEMM with a ones vector);
//!   LoRA: the adapters' gradients only (a frozen base has no gradient buffers)
//! gradients copied to the host into `Gradients` (the CPU path's structure), or kept on the
//!   device for a Trainer's own step (`optim.rs`)
//! ```
//!
//! The score and value heads (one row of `C` weights) run on the host on the downloaded final
//! hidden states. Sums run in other orders than on the CPU (and dQ/dK/dV, norm weights and
//! embeddings accumulate with atomics), so gradients agree with the CPU within tolerance, not
//! bit for bit. Training needs the f32 device weights (a Trainer makes them).
//!
//! Also here: [`CudaModel::refresh`], the re-upload of weights changed on the host.
//!
//! Not yet run on a GPU: compiled and type-checked only.

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig};
use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{
    CudaFunction, CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};

use super::super::cuda_error;
use super::super::gpu::{
    driver, elementwise, function, int, load_module, long, need, per_row, Gpu, NULL, ROW_THREADS,
};
use super::{CudaModel, DLayer, DLinear, DMat, DMlp, DNorm, LOGIT_ROWS};
use crate::backend::cpu::simd::dot;

// The optimizer on the device: a child module, so it reaches the gradients' and weights'
// device buffers.
#[path = "optim.rs"]
mod optim;
use crate::error::{Error, Result};
use crate::model::{Gradients, Linear, Mlp, Model, ModelWeights, Norm, TokenObjective};
use crate::model::{TokenOutputGrads, TokenOutputs};
use crate::tensor::Tensor;
pub(in crate::backend::cuda) use optim::OptimKernels;
pub(crate) use optim::{AdamStep, DeviceGrads, DeviceMoments};

/// Query/key rows per tile of the prefill attention kernels (`TILE` in attention.cu).
const TILE: usize = 16;
/// The largest head size the prefill attention kernels take (`TILE_DMAX`).
const TILE_DMAX: usize = 128;
/// Threads per block of the prefill attention kernels (at least `TILE`).
const ATTN_THREADS: u32 = 128;
/// Threads per block of `attention_bwd_delta` (one warp per row).
const DELTA_THREADS: u32 = 256;

/// Dynamic shared memory of `attention_prefill_fwd`: Q, K, V, O tiles, S, m, l, corr.
fn prefill_fwd_smem(d: usize) -> usize {
    (4 * TILE * d + TILE * TILE + 3 * TILE) * 4
}

/// Dynamic shared memory of `attention_prefill_bwd`: K, V, dK, dV, Q, dO tiles, P, dS, lse,
/// delta.
fn prefill_bwd_smem(d: usize) -> usize {
    (6 * TILE * d + 2 * TILE * TILE + 2 * TILE) * 4
}

/// The kernels the backward launches (loaded once per model, on the first gradient call).
pub(super) struct Kernels {
    rmsnorm_fwd: CudaFunction,
    rmsnorm_bwd: CudaFunction,
    layernorm_fwd: CudaFunction,
    layernorm_bwd: CudaFunction,
    rope_bwd: CudaFunction,
    swiglu_bwd: CudaFunction,
    gelu_tanh_bwd: CudaFunction,
    attention_prefill_fwd: CudaFunction,
    attention_bwd_delta: CudaFunction,
    attention_prefill_bwd: CudaFunction,
    logsoftmax_gather_fwd: CudaFunction,
    logsoftmax_gather_bwd: CudaFunction,
    embedding_bwd: CudaFunction,
}

impl Kernels {
    fn load(gpu: &Gpu, head_dim: usize) -> Result<Kernels> {
        let (ctx, arch) = (&gpu.ctx, gpu.arch());
        let norm = load_module(ctx, arch, "norm")?;
        let rope = load_module(ctx, arch, "rope")?;
        let activation = load_module(ctx, arch, "activation")?;
        let attention = load_module(ctx, arch, "attention")?;
        let logsoftmax = load_module(ctx, arch, "logsoftmax")?;
        let embedding = load_module(ctx, arch, "embedding")?;
        let k = Kernels {
            rmsnorm_fwd: function(&norm, "rmsnorm_fwd")?,
            rmsnorm_bwd: function(&norm, "rmsnorm_bwd")?,
            layernorm_fwd: function(&norm, "layernorm_fwd")?,
            layernorm_bwd: function(&norm, "layernorm_bwd")?,
            rope_bwd: function(&rope, "rope_bwd")?,
            swiglu_bwd: function(&activation, "swiglu_bwd")?,
            gelu_tanh_bwd: function(&activation, "gelu_tanh_bwd")?,
            attention_prefill_fwd: function(&attention, "attention_prefill_fwd")?,
            attention_bwd_delta: function(&attention, "attention_bwd_delta")?,
            attention_prefill_bwd: function(&attention, "attention_prefill_bwd")?,
            logsoftmax_gather_fwd: function(&logsoftmax, "logsoftmax_gather_fwd")?,
            logsoftmax_gather_bwd: function(&logsoftmax, "logsoftmax_gather_bwd")?,
            embedding_bwd: function(&embedding, "embedding_bwd")?,
        };
        // Above 48 KiB of dynamic shared memory a kernel must opt in (head_dim 128 needs
        // 50 KiB in the backward); every device rlx runs on (sm_70+) allows at least 96 KiB.
        for (f, bytes, name) in [
            (
                &k.attention_prefill_fwd,
                prefill_fwd_smem(head_dim),
                "attention_prefill_fwd",
            ),
            (
                &k.attention_prefill_bwd,
                prefill_bwd_smem(head_dim),
                "attention_prefill_bwd",
            ),
        ] {
            f.set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                int(bytes, "shared memory")?,
            )
            .map_err(|e| cuda_error(format!("{name}: shared memory of {bytes} bytes: {e}")))?;
        }
        Ok(k)
    }
}

/// The packed batch's sequence layout as the prefill attention kernels read it.
struct Tiles {
    cu_seqlens: CudaSlice<i32>,
    tile_seq: CudaSlice<i32>,
    tile_start: CudaSlice<i32>,
    n_seqs: usize,
    n_tiles: usize,
}

/// Host arrays of [`Tiles`]: `cu_seqlens` (n + 1 offsets) and one (sequence, first row) per
/// tile of [`TILE`] rows of each sequence.
fn tile_lists(lens: &[usize]) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let mut cu = Vec::with_capacity(lens.len() + 1);
    let (mut seq, mut start) = (Vec::new(), Vec::new());
    let mut at = 0usize;
    cu.push(0);
    for (i, &len) in lens.iter().enumerate() {
        at += len;
        // Callers checked that the packed total fits an i32.
        cu.push(at as i32);
        for s in (0..len).step_by(TILE) {
            seq.push(i as i32);
            start.push(s as i32);
        }
    }
    (cu, seq, start)
}

/// A norm's output with the statistics its backward reads.
struct NormTape {
    y: CudaSlice<f32>,
    rstd: CudaSlice<f32>,
    /// LayerNorm only.
    mean: Option<CudaSlice<f32>>,
}

/// What the forward keeps of one layer: its whole tape, or (gradient checkpointing) its
/// input only, from which the backward recomputes the tape.
enum Kept {
    Tape(Box<LayerTape>),
    Input(CudaSlice<f32>),
}

/// What one layer's backward reads.
struct LayerTape {
    x_in: CudaSlice<f32>,
    n1: NormTape,
    /// After RoPE, as attention read them.
    q: CudaSlice<f32>,
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
    att: CudaSlice<f32>,
    lse: CudaSlice<f32>,
    x_mid: CudaSlice<f32>,
    n2: NormTape,
    /// fc (GELU) or gate (SwiGLU) output.
    m1: CudaSlice<f32>,
    /// up (SwiGLU) output.
    m2: Option<CudaSlice<f32>>,
    act: CudaSlice<f32>,
}

/// A linear map's gradients: the base weight and bias (`None` when the base is frozen under
/// LoRA, or for an absent bias) and the adapter's `A`, `B`.
struct GLinear {
    w: Option<CudaSlice<f32>>,
    b: Option<CudaSlice<f32>>,
    lora: Option<(CudaSlice<f32>, CudaSlice<f32>)>,
}

/// A norm's gradients (`None` when the base is frozen; `b` for LayerNorm only).
struct GNorm {
    w: Option<CudaSlice<f32>>,
    b: Option<CudaSlice<f32>>,
}

struct GLayer {
    attn_norm: GNorm,
    q: GLinear,
    k: GLinear,
    v: GLinear,
    o: GLinear,
    mlp_norm: GNorm,
    /// `[fc, proj]` or `[gate, up, down]`, as `LayerGrads::mlp`.
    mlp: Vec<GLinear>,
}

/// Every trainable parameter's gradient on the device (zeroed, then accumulated). With LoRA
/// adapters the base is frozen: only the adapters' gradients exist.
struct DGrads {
    tok_emb: Option<CudaSlice<f32>>,
    pos_emb: Option<CudaSlice<f32>>,
    layers: Vec<GLayer>,
    final_norm: GNorm,
    lm_head: Option<CudaSlice<f32>>,
}

/// What a taped forward leaves for the backward.
struct Taped {
    layers: Vec<Kept>,
    /// The final norm's input and tape (its output `nf.y` is the LM head's input).
    x_final: CudaSlice<f32>,
    nf: NormTape,
    ids: CudaSlice<i32>,
    positions: CudaSlice<i32>,
    tiles: Tiles,
    t: usize,
}

/// Gradients of the heads that run on the host (score: `C` values; value: `C` weights and
/// the bias).
#[derive(Default)]
struct HeadGrads {
    score: Option<Vec<f32>>,
    value: Option<(Vec<f32>, f32)>,
}

/// An objective of the final hidden states `[T, C]` (on the host): returns `∂loss/∂H` and the
/// score head's gradient when it has one.
pub(crate) type HiddenObjective<'a> =
    dyn FnMut(&[f32]) -> Result<(Vec<f32>, Option<Vec<f32>>)> + 'a;

/// The value head's bias (0 without one).
fn value_bias(head: &Linear) -> f64 {
    head.b
        .as_ref()
        .and_then(|b| b.as_slice().first().copied())
        .unwrap_or(0.0) as f64
}

/// One column-major SGEMM (cuBLAS's convention): `C[m, n] = op(A)[m, k] · op(B)[k, n]`, `op`
/// transposing when `ta` / `tb`, with leading dimensions. A row-major `[r, c]` matrix is the
/// column-major `[c, r]` one with leading dimension `c`, which is how the row-major products of
/// the linear layers' backward become these shapes.
#[derive(Debug, Clone, Copy, PartialEq)]
struct GemmShape {
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldb: usize,
    ldc: usize,
}

impl GemmShape {
    /// `dx[T, K] = dy[T, N] · W[N, K]` as column-major `dxᵀ[K, T] = Wᵀ[K, N] · dyᵀ[N, T]`:
    /// A = W (column-major `K × N`, ld K), B = dy (column-major `N × T`, ld N), C = dx (ld K).
    fn dx(t: usize, n: usize, k: usize) -> GemmShape {
        GemmShape {
            ta: false,
            tb: false,
            m: k,
            n: t,
            k: n,
            lda: k,
            ldb: n,
            ldc: k,
        }
    }

    /// `dW[N, K] += dy[T, N]ᵀ · x[T, K]` as column-major `dWᵀ[K, N] = xᵀ[K, T] · dy[T, N]`:
    /// A = x (column-major `K × T`, ld K), B = dy (column-major `N × T`, ld N, transposed),
    /// C = dW (ld K).
    fn dw(t: usize, n: usize, k: usize) -> GemmShape {
        GemmShape {
            ta: false,
            tb: true,
            m: k,
            n,
            k: t,
            lda: k,
            ldb: n,
            ldc: k,
        }
    }

    /// `db[N] += Σ_t dy[t, :]` as column-major `db[N, 1] = dyᵀ[N, T] · ones[T, 1]`: A = dy
    /// (column-major `N × T`, ld N), B = ones (ld T), C = db (ld N).
    fn bias(t: usize, n: usize) -> GemmShape {
        GemmShape {
            ta: false,
            tb: false,
            m: n,
            n: 1,
            k: t,
            lda: n,
            ldb: t,
            ldc: n,
        }
    }

    /// The values A, B and C must hold (leading dimension × columns), or an error when a
    /// leading dimension is shorter than its matrix's rows.
    fn lens(&self) -> Result<(usize, usize, usize)> {
        let (a_rows, a_cols) = if self.ta {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        };
        let (b_rows, b_cols) = if self.tb {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        };
        if self.lda < a_rows || self.ldb < b_rows || self.ldc < self.m {
            return Err(cuda_error("internal: GEMM leading dimension too small"));
        }
        Ok((self.lda * a_cols, self.ldb * b_cols, self.ldc * self.n))
    }
}

/// Launch wrappers of the backward's kernels and the GEMMs of the linear layers' backward.
/// Each argument list follows the kernel's C signature (`int` ↔ i32, `long long` ↔ i64,
/// pointers ↔ CudaSlice, optional outputs ↔ a null u64); buffer sizes are checked first.
impl Gpu {
    /// Column-major SGEMM `C = op(A) · op(B) + beta · C` of shape `s`.
    fn sgemm<A, B, C>(&self, s: GemmShape, a: &A, b: &B, c: &mut C, beta: f32) -> Result<()>
    where
        A: DevicePtr<f32>,
        B: DevicePtr<f32>,
        C: DevicePtrMut<f32>,
    {
        self.sgemm_scaled(s, a, b, c, 1.0, beta)
    }

    /// Column-major SGEMM `C = alpha · op(A) · op(B) + beta · C` of shape `s`.
    fn sgemm_scaled<A, B, C>(
        &self,
        s: GemmShape,
        a: &A,
        b: &B,
        c: &mut C,
        alpha: f32,
        beta: f32,
    ) -> Result<()>
    where
        A: DevicePtr<f32>,
        B: DevicePtr<f32>,
        C: DevicePtrMut<f32>,
    {
        if s.m == 0 || s.n == 0 || s.k == 0 {
            return Ok(());
        }
        let (a_len, b_len, c_len) = s.lens()?;
        need(a, a_len, "gemm a")?;
        need(b, b_len, "gemm b")?;
        need(c, c_len, "gemm c")?;
        let op = |t: bool| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        let cfg = GemmConfig {
            transa: op(s.ta),
            transb: op(s.tb),
            m: int(s.m, "gemm m")?,
            n: int(s.n, "gemm n")?,
            k: int(s.k, "gemm k")?,
            alpha,
            lda: int(s.lda, "gemm lda")?,
            ldb: int(s.ldb, "gemm ldb")?,
            beta,
            ldc: int(s.ldc, "gemm ldc")?,
        };
        // SAFETY: each matrix was checked above to hold its leading dimension × columns
        // values (`GemmShape::lens`); all three live on this handle's stream's device.
        unsafe { self.blas.gemm(cfg, a, b, c) }.map_err(|e| {
            cuda_error(format!(
                "cuBLAS SGEMM ({}×{} · {}×{}): {e:?}",
                s.m, s.k, s.k, s.n
            ))
        })
    }

    /// `dx[T, K] (+)= dy[T, N] · W[N, K]` (row-major), see [`GemmShape::dx`].
    #[allow(clippy::too_many_arguments)]
    fn linear_dx<O: DevicePtrMut<f32>, Y: DevicePtr<f32>>(
        &self,
        dx: &mut O,
        dy: &Y,
        w: &CudaSlice<f32>,
        t: usize,
        n: usize,
        k: usize,
        accumulate: bool,
    ) -> Result<()> {
        let beta = if accumulate { 1.0 } else { 0.0 };
        self.sgemm(GemmShape::dx(t, n, k), w, dy, dx, beta)
    }

    /// `dW[N, K] += dy[T, N]ᵀ · x[T, K]` (row-major), see [`GemmShape::dw`].
    fn linear_dw<X: DevicePtr<f32>, Y: DevicePtr<f32>>(
        &self,
        dw: &mut CudaSlice<f32>,
        dy: &Y,
        x: &X,
        t: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        self.sgemm(GemmShape::dw(t, n, k), x, dy, dw, 1.0)
    }

    /// `db[N] += Σ_t dy[t, :]`, see [`GemmShape::bias`].
    fn bias_grad(
        &self,
        db: &mut CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        ones: &CudaSlice<f32>,
        t: usize,
        n: usize,
    ) -> Result<()> {
        self.sgemm(GemmShape::bias(t, n), dy, ones, db, 1.0)
    }

    /// RMSNorm forward keeping `1/rms` per row.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_stats(
        &self,
        k: &Kernels,
        y: &mut CudaSlice<f32>,
        rstd: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        need(x, rows * dim, "norm x")?;
        need(y, rows * dim, "norm y")?;
        need(rstd, rows, "norm rstd")?;
        need(w, dim, "norm w")?;
        let (r_arg, d_arg) = (int(rows, "rows")?, int(dim, "hidden size")?);
        let mut l = self.stream.launch_builder(&k.rmsnorm_fwd);
        l.arg(x)
            .arg(w)
            .arg(y)
            .arg(rstd)
            .arg(&r_arg)
            .arg(&d_arg)
            .arg(&eps);
        // SAFETY: rmsnorm_fwd(const float* x, const float* w, float* y, float* rstd, int rows,
        // int dim, float eps); one block of 256 threads per row; sizes checked above.
        unsafe { l.launch(per_row(rows, ROW_THREADS)) }
            .map(drop)
            .map_err(driver("rmsnorm_fwd"))
    }

    /// LayerNorm forward keeping the mean and `1/std` per row.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_stats(
        &self,
        k: &Kernels,
        y: &mut CudaSlice<f32>,
        (mean, rstd): (&mut CudaSlice<f32>, &mut CudaSlice<f32>),
        x: &CudaSlice<f32>,
        (w, b): (&CudaSlice<f32>, &CudaSlice<f32>),
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        need(x, rows * dim, "norm x")?;
        need(y, rows * dim, "norm y")?;
        need(mean, rows, "norm mean")?;
        need(rstd, rows, "norm rstd")?;
        need(w, dim, "norm w")?;
        need(b, dim, "norm b")?;
        let (r_arg, d_arg) = (int(rows, "rows")?, int(dim, "hidden size")?);
        let mut l = self.stream.launch_builder(&k.layernorm_fwd);
        l.arg(x)
            .arg(w)
            .arg(b)
            .arg(y)
            .arg(mean)
            .arg(rstd)
            .arg(&r_arg)
            .arg(&d_arg)
            .arg(&eps);
        // SAFETY: layernorm_fwd(const float* x, const float* w, const float* b, float* y,
        // float* mean_out, float* rstd_out, int rows, int dim, float eps); one block of 256
        // threads per row; sizes checked above.
        unsafe { l.launch(per_row(rows, ROW_THREADS)) }
            .map(drop)
            .map_err(driver("layernorm_fwd"))
    }

    /// RMSNorm backward: `dx` written, `dw` accumulated.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_bwd(
        &self,
        k: &Kernels,
        dx: &mut CudaSlice<f32>,
        dw: Option<&mut CudaSlice<f32>>,
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
        rows: usize,
        dim: usize,
    ) -> Result<()> {
        for (buf, n, what) in [(dy, rows * dim, "dy"), (x, rows * dim, "x"), (w, dim, "w")] {
            need(buf, n, what)?;
        }
        need(rstd, rows, "rstd")?;
        need(dx, rows * dim, "dx")?;
        if let Some(dw) = &dw {
            need(*dw, dim, "dw")?;
        }
        let (r_arg, d_arg) = (int(rows, "rows")?, int(dim, "hidden size")?);
        let mut l = self.stream.launch_builder(&k.rmsnorm_bwd);
        l.arg(x).arg(w).arg(rstd).arg(dy).arg(dx);
        match dw {
            Some(dw) => l.arg(dw),
            None => l.arg(&NULL),
        };
        l.arg(&r_arg).arg(&d_arg);
        // SAFETY: rmsnorm_bwd(const float* x, const float* w, const float* rstd,
        // const float* dy, float* dx, float* dw (nullable), int rows, int dim); one block of
        // 256 threads per row (its block reduction needs a multiple of 32); sizes checked
        // above.
        unsafe { l.launch(per_row(rows, ROW_THREADS)) }
            .map(drop)
            .map_err(driver("rmsnorm_bwd"))
    }

    /// LayerNorm backward: `dx` written, `dw` and `db` accumulated.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_bwd(
        &self,
        k: &Kernels,
        dx: &mut CudaSlice<f32>,
        dwb: Option<(&mut CudaSlice<f32>, &mut CudaSlice<f32>)>,
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        (mean, rstd): (&CudaSlice<f32>, &CudaSlice<f32>),
        rows: usize,
        dim: usize,
    ) -> Result<()> {
        for (buf, n, what) in [(dy, rows * dim, "dy"), (x, rows * dim, "x"), (w, dim, "w")] {
            need(buf, n, what)?;
        }
        need(mean, rows, "mean")?;
        need(rstd, rows, "rstd")?;
        need(dx, rows * dim, "dx")?;
        if let Some((dw, db)) = &dwb {
            need(*dw, dim, "dw")?;
            need(*db, dim, "db")?;
        }
        let (r_arg, d_arg) = (int(rows, "rows")?, int(dim, "hidden size")?);
        let mut l = self.stream.launch_builder(&k.layernorm_bwd);
        l.arg(x).arg(w).arg(mean).arg(rstd).arg(dy).arg(dx);
        match dwb {
            Some((dw, db)) => l.arg(dw).arg(db),
            None => l.arg(&NULL).arg(&NULL),
        };
        l.arg(&r_arg).arg(&d_arg);
        // SAFETY: layernorm_bwd(const float* x, const float* w, const float* mean_in,
        // const float* rstd_in, const float* dy, float* dx, float* dw, float* db (both
        // nullable), int rows, int dim); one block of 256 threads per row; sizes checked
        // above.
        unsafe { l.launch(per_row(rows, ROW_THREADS)) }
            .map(drop)
            .map_err(driver("layernorm_bwd"))
    }

    /// `d_gate`, `d_up` of `out = silu(gate) · up` over `n` values.
    #[allow(clippy::too_many_arguments)]
    fn swiglu_bwd(
        &self,
        k: &Kernels,
        d_gate: &mut CudaSlice<f32>,
        d_up: &mut CudaSlice<f32>,
        gate: &CudaSlice<f32>,
        up: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        n: usize,
    ) -> Result<()> {
        for (buf, what) in [(gate, "gate"), (up, "up"), (dy, "dy")] {
            need(buf, n, what)?;
        }
        need(d_gate, n, "d_gate")?;
        need(d_up, n, "d_up")?;
        let n_arg = long(n, "n")?;
        let mut l = self.stream.launch_builder(&k.swiglu_bwd);
        l.arg(gate)
            .arg(up)
            .arg(dy)
            .arg(d_gate)
            .arg(d_up)
            .arg(&n_arg);
        // SAFETY: swiglu_bwd(const float* gate, const float* up, const float* dy,
        // float* d_gate, float* d_up, long long n); grid-stride; sizes checked above.
        unsafe { l.launch(elementwise(n)) }
            .map(drop)
            .map_err(driver("swiglu_bwd"))
    }

    /// `dx` of `out = gelu_tanh(x)` over `n` values.
    fn gelu_bwd(
        &self,
        k: &Kernels,
        dx: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        n: usize,
    ) -> Result<()> {
        need(x, n, "gelu x")?;
        need(dy, n, "gelu dy")?;
        need(dx, n, "gelu dx")?;
        let n_arg = long(n, "n")?;
        let mut l = self.stream.launch_builder(&k.gelu_tanh_bwd);
        l.arg(x).arg(dy).arg(dx).arg(&n_arg);
        // SAFETY: gelu_tanh_bwd(const float* x, const float* dy, float* dx, long long n);
        // grid-stride; sizes checked above.
        unsafe { l.launch(elementwise(n)) }
            .map(drop)
            .map_err(driver("gelu_tanh_bwd"))
    }

    /// Causal attention over the packed sequences of `tiles`: `out` (`[T, hq, D]`) and the
    /// log-sum-exp of each (row, head) (`lse`, `[T, hq]`).
    #[allow(clippy::too_many_arguments)]
    fn prefill_attention(
        &self,
        k: &Kernels,
        out: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
        (q, kk, v): (&CudaSlice<f32>, &CudaSlice<f32>, &CudaSlice<f32>),
        tiles: &Tiles,
        t: usize,
        (hq, hkv): (usize, usize),
        head_dim: usize,
    ) -> Result<()> {
        check_heads(hq, hkv, head_dim)?;
        need(q, t * hq * head_dim, "q")?;
        need(kk, t * hkv * head_dim, "k")?;
        need(v, t * hkv * head_dim, "v")?;
        need(out, t * hq * head_dim, "attention out")?;
        need(lse, t * hq, "lse")?;
        need(&tiles.cu_seqlens, tiles.n_seqs + 1, "cu_seqlens")?;
        need(&tiles.tile_seq, tiles.n_tiles, "tile_seq")?;
        need(&tiles.tile_start, tiles.n_tiles, "tile_start")?;
        let (hq_arg, hkv_arg, d_arg) = (
            int(hq, "heads")?,
            int(hkv, "kv heads")?,
            int(head_dim, "head_dim")?,
        );
        let scale = 1.0f32 / (head_dim as f32).sqrt();
        let mut l = self.stream.launch_builder(&k.attention_prefill_fwd);
        l.arg(q)
            .arg(kk)
            .arg(v)
            .arg(&tiles.cu_seqlens)
            .arg(&tiles.tile_seq)
            .arg(&tiles.tile_start)
            .arg(out)
            .arg(lse)
            .arg(&hq_arg)
            .arg(&hkv_arg)
            .arg(&d_arg)
            .arg(&scale);
        let cfg = LaunchConfig {
            grid_dim: (int(tiles.n_tiles.max(1), "tiles")? as u32, hq as u32, 1),
            block_dim: (ATTN_THREADS, 1, 1),
            shared_mem_bytes: prefill_fwd_smem(head_dim) as u32,
        };
        // SAFETY: attention_prefill_fwd(const float* q, const float* k, const float* v,
        // const int* cu_seqlens, const int* tile_seq, const int* tile_start, float* out,
        // float* lse, int hq, int hkv, int head_dim, float scale); grid (tiles, hq), 128 ≥ TILE
        // threads, the dynamic shared memory its tiles take (opted in at load); head_dim ≤ 128
        // and whole groups checked; the tiles come from the sequences' lengths (`tile_lists`),
        // whose total is T, so every row it reads or writes is < T.
        unsafe { l.launch(cfg) }
            .map(drop)
            .map_err(driver("attention_prefill_fwd"))
    }

    /// `delta[r] = Σ_d dO[r, d] · O[r, d]` over `rows` rows of `head_dim`.
    fn attention_delta(
        &self,
        k: &Kernels,
        delta: &mut CudaSlice<f32>,
        out: &CudaSlice<f32>,
        d_out: &CudaSlice<f32>,
        rows: usize,
        head_dim: usize,
    ) -> Result<()> {
        need(out, rows * head_dim, "attention out")?;
        need(d_out, rows * head_dim, "attention d_out")?;
        need(delta, rows, "delta")?;
        let (r_arg, d_arg) = (int(rows, "rows")?, int(head_dim, "head_dim")?);
        let warps = (DELTA_THREADS / 32) as usize;
        let mut l = self.stream.launch_builder(&k.attention_bwd_delta);
        l.arg(out).arg(d_out).arg(delta).arg(&r_arg).arg(&d_arg);
        let cfg = LaunchConfig {
            grid_dim: (int(rows.div_ceil(warps).max(1), "rows")? as u32, 1, 1),
            block_dim: (DELTA_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: attention_bwd_delta(const float* out, const float* d_out, float* delta,
        // int rows, int head_dim); one warp per row (8 per block), rows beyond `rows` return.
        unsafe { l.launch(cfg) }
            .map(drop)
            .map_err(driver("attention_bwd_delta"))
    }

    /// The attention backward: dQ, dK, dV added (atomics) into zeroed buffers.
    #[allow(clippy::too_many_arguments)]
    fn prefill_attention_bwd(
        &self,
        k: &Kernels,
        (dq, dk, dv): (
            &mut CudaSlice<f32>,
            &mut CudaSlice<f32>,
            &mut CudaSlice<f32>,
        ),
        (q, kk, v): (&CudaSlice<f32>, &CudaSlice<f32>, &CudaSlice<f32>),
        (d_out, lse, delta): (&CudaSlice<f32>, &CudaSlice<f32>, &CudaSlice<f32>),
        tiles: &Tiles,
        t: usize,
        (hq, hkv): (usize, usize),
        head_dim: usize,
    ) -> Result<()> {
        check_heads(hq, hkv, head_dim)?;
        let (qn, kvn) = (t * hq * head_dim, t * hkv * head_dim);
        for (buf, n, what) in [
            (q, qn, "q"),
            (kk, kvn, "k"),
            (v, kvn, "v"),
            (d_out, qn, "dO"),
        ] {
            need(buf, n, what)?;
        }
        need(lse, t * hq, "lse")?;
        need(delta, t * hq, "delta")?;
        need(dq, qn, "dq")?;
        need(dk, kvn, "dk")?;
        need(dv, kvn, "dv")?;
        need(&tiles.cu_seqlens, tiles.n_seqs + 1, "cu_seqlens")?;
        need(&tiles.tile_seq, tiles.n_tiles, "tile_seq")?;
        need(&tiles.tile_start, tiles.n_tiles, "tile_start")?;
        let (hq_arg, hkv_arg, d_arg) = (
            int(hq, "heads")?,
            int(hkv, "kv heads")?,
            int(head_dim, "head_dim")?,
        );
        let scale = 1.0f32 / (head_dim as f32).sqrt();
        let mut l = self.stream.launch_builder(&k.attention_prefill_bwd);
        l.arg(q)
            .arg(kk)
            .arg(v)
            .arg(d_out)
            .arg(lse)
            .arg(delta)
            .arg(&tiles.cu_seqlens)
            .arg(&tiles.tile_seq)
            .arg(&tiles.tile_start)
            .arg(dq)
            .arg(dk)
            .arg(dv)
            .arg(&hq_arg)
            .arg(&hkv_arg)
            .arg(&d_arg)
            .arg(&scale);
        let cfg = LaunchConfig {
            grid_dim: (int(tiles.n_tiles.max(1), "tiles")? as u32, hq as u32, 1),
            block_dim: (ATTN_THREADS, 1, 1),
            shared_mem_bytes: prefill_bwd_smem(head_dim) as u32,
        };
        // SAFETY: attention_prefill_bwd(const float* q, const float* k, const float* v,
        // const float* d_out, const float* lse, const float* delta, const int* cu_seqlens,
        // const int* tile_seq, const int* tile_start, float* dq, float* dk, float* dv, int hq,
        // int hkv, int head_dim, float scale); grid (key tiles, hq), 128 ≥ TILE threads, the
        // dynamic shared memory of its tiles (opted in at load); rows bounded as in the forward.
        unsafe { l.launch(cfg) }
            .map(drop)
            .map_err(driver("attention_prefill_bwd"))
    }

    /// Per row of `logits`: the target's log-prob (0 without one), log-sum-exp and entropy at
    /// temperature 1.
    #[allow(clippy::too_many_arguments)]
    fn logsoftmax_stats(
        &self,
        k: &Kernels,
        (logp, lse, entropy): (
            &mut CudaSlice<f32>,
            &mut CudaSlice<f32>,
            &mut CudaSlice<f32>,
        ),
        logits: &CudaSlice<f32>,
        targets: &CudaSlice<i32>,
        rows: usize,
        vocab: usize,
    ) -> Result<()> {
        need(logits, rows * vocab, "logits")?;
        need(targets, rows, "targets")?;
        need(logp, rows, "log-probs")?;
        need(lse, rows, "lse")?;
        need(entropy, rows, "entropy")?;
        let (r_arg, v_arg, temp) = (int(rows, "rows")?, int(vocab, "vocab")?, 1.0f32);
        let mut l = self.stream.launch_builder(&k.logsoftmax_gather_fwd);
        l.arg(logits)
            .arg(targets)
            .arg(logp)
            .arg(lse)
            .arg(entropy)
            .arg(&r_arg)
            .arg(&v_arg)
            .arg(&temp);
        // SAFETY: logsoftmax_gather_fwd(const float* logits, const int* targets, float* logp,
        // float* lse_out, float* entropy, int rows, int vocab, float temp); one block of 256
        // threads per row; targets outside 0..vocab are ignored; sizes checked above.
        unsafe { l.launch(per_row(rows, ROW_THREADS)) }
            .map(drop)
            .map_err(driver("logsoftmax_gather_fwd"))
    }

    /// `d_logits[r, j] = d_logp[r] · (1[j = target] − p_j) − d_H[r] · p_j · (log p_j + H[r])`
    /// at temperature 1 (no log-prob part for rows without a target; the entropy part only
    /// with `entropy` = (H, d_H) per row).
    #[allow(clippy::too_many_arguments)]
    fn logsoftmax_bwd(
        &self,
        k: &Kernels,
        d_logits: &mut CudaSlice<f32>,
        (logits, targets, lse): (&CudaSlice<f32>, &CudaSlice<i32>, &CudaSlice<f32>),
        d_logp: &CudaSlice<f32>,
        entropy: Option<(&CudaSlice<f32>, &CudaSlice<f32>)>,
        rows: usize,
        vocab: usize,
    ) -> Result<()> {
        need(logits, rows * vocab, "logits")?;
        need(d_logits, rows * vocab, "d_logits")?;
        need(targets, rows, "targets")?;
        need(lse, rows, "lse")?;
        need(d_logp, rows, "d_logp")?;
        if let Some((h, dh)) = entropy {
            need(h, rows, "entropy")?;
            need(dh, rows, "d_entropy")?;
        }
        let (r_arg, v_arg, temp) = (int(rows, "rows")?, int(vocab, "vocab")?, 1.0f32);
        let mut l = self.stream.launch_builder(&k.logsoftmax_gather_bwd);
        l.arg(logits).arg(targets).arg(lse).arg(d_logp);
        match entropy {
            Some((h, dh)) => l.arg(h).arg(dh),
            None => l.arg(&NULL).arg(&NULL),
        };
        l.arg(d_logits).arg(&r_arg).arg(&v_arg).arg(&temp);
        // SAFETY: logsoftmax_gather_bwd(const float* logits, const int* targets,
        // const float* lse, const float* d_logp, const float* entropy,
        // const float* d_entropy, float* d_logits, int rows, int vocab, float temp); one
        // block per row; entropy and d_entropy both set or both null; sizes checked above.
        unsafe { l.launch(per_row(rows, ROW_THREADS)) }
            .map(drop)
            .map_err(driver("logsoftmax_gather_bwd"))
    }

    /// `d_table[ids[t]] += d_out[t]` (and `d_pos[positions[t]]`), atomics.
    #[allow(clippy::too_many_arguments)]
    fn embedding_bwd(
        &self,
        k: &Kernels,
        d_table: &mut CudaSlice<f32>,
        d_pos: Option<&mut CudaSlice<f32>>,
        d_out: &CudaSlice<f32>,
        ids: &CudaSlice<i32>,
        positions: &CudaSlice<i32>,
        n_tokens: usize,
        dim: usize,
    ) -> Result<()> {
        need(d_out, n_tokens * dim, "embedding d_out")?;
        need(ids, n_tokens, "ids")?;
        need(positions, n_tokens, "positions")?;
        let (t_arg, d_arg) = (int(n_tokens, "tokens")?, int(dim, "hidden size")?);
        let mut l = self.stream.launch_builder(&k.embedding_bwd);
        l.arg(d_out).arg(ids).arg(positions).arg(d_table);
        match d_pos {
            Some(p) => l.arg(p),
            None => l.arg(&NULL),
        };
        l.arg(&t_arg).arg(&d_arg);
        // SAFETY: embedding_bwd(const float* d_out, const int* ids, const int* positions,
        // float* d_table, float* d_pos (nullable), int n_tokens, int dim); one block per token;
        // ids < vocab and positions < max_position_embeddings were checked on the host, and
        // the tables' gradients have the tables' shapes.
        unsafe { l.launch(per_row(n_tokens, ROW_THREADS)) }
            .map(drop)
            .map_err(driver("embedding_bwd"))
    }

    /// Copies the first `dst.len()` values of `buf` into `dst` (queued; the caller syncs).
    fn fetch_into(&self, buf: &CudaSlice<f32>, dst: &mut [f32]) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        need(buf, dst.len(), "gradient")?;
        let view = buf
            .try_slice(0..dst.len())
            .ok_or_else(|| cuda_error("internal: download range"))?;
        self.stream
            .memcpy_dtoh(&view, dst)
            .map_err(driver("copying from the device"))
    }

    /// Overwrites a matrix with host f32 values in its own storage (bf16 rounded to nearest
    /// even); same length, checked.
    fn store_mat(&self, dst: &mut DMat, src: &[f32], what: &str) -> Result<()> {
        match dst {
            DMat::F32(d) => self.store(d, src, what),
            DMat::Bf16(d) => {
                same_len(d.len(), src.len(), what)?;
                self.stream
                    .memcpy_htod(&super::bf16_bits(src), d)
                    .map_err(driver("copying to the device"))
            }
        }
    }

    /// Overwrites `dst` with `src` (same length, checked).
    fn store(&self, dst: &mut CudaSlice<f32>, src: &[f32], what: &str) -> Result<()> {
        if src.is_empty() && dst.len() == 1 {
            // An empty tensor is uploaded as one placeholder value.
            return Ok(());
        }
        same_len(dst.len(), src.len(), what)?;
        self.stream
            .memcpy_htod(src, dst)
            .map_err(driver("copying to the device"))
    }
}

/// A host tensor's length must be its device copy's.
fn same_len(device: usize, host: usize, what: &str) -> Result<()> {
    if device != host {
        return Err(cuda_error(format!(
            "{what}: the host tensor has {host} values, the device copy {device}"
        )));
    }
    Ok(())
}

fn check_heads(hq: usize, hkv: usize, head_dim: usize) -> Result<()> {
    if head_dim > TILE_DMAX || head_dim == 0 || hkv == 0 || !hq.is_multiple_of(hkv) {
        return Err(Error::Unsupported(format!(
            "training on cuda needs head_dim ≤ {TILE_DMAX} and whole query groups (this model: \
             head_dim {head_dim}, {hq} query heads over {hkv} KV heads)"
        )));
    }
    Ok(())
}

impl CudaModel {
    fn bwd_kernels(&self) -> Result<&Kernels> {
        if let Some(k) = self.bwd.get() {
            return Ok(k);
        }
        let k = Kernels::load(&self.gpu, self.cfg.head_dim)?;
        // Calls are serialised by `enter`; a lost race would only drop a duplicate.
        let _ = self.bwd.set(k);
        self.bwd
            .get()
            .ok_or_else(|| cuda_error("internal: backward kernels not kept"))
    }

    /// Copies the host weights (changed on the host: `weights_mut`) over the device copy in
    /// place. Shapes must be those uploaded at load; LoRA adapters are uploaded, updated or
    /// dropped as the host has them.
    pub(crate) fn refresh(&mut self, weights: &ModelWeights) -> Result<()> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.gpu.bind()?;
        let g = &self.gpu;
        let w = &mut self.w;
        let tensor =
            |dst: &mut DMat, src: &Tensor, what: &str| g.store_mat(dst, src.as_slice(), what);
        let linear = |dst: &mut DLinear, src: &Linear, what: &str| -> Result<()> {
            // Adapters attached, changed, merged or removed on the host.
            match (&mut dst.lora, &src.lora) {
                (Some(d), Some(s)) if d.r == s.rank() => {
                    g.store(&mut d.a, s.a.as_slice(), what)?;
                    g.store(&mut d.b, s.b.as_slice(), what)?;
                    d.scale = s.scale;
                }
                (_, Some(s)) => dst.lora = Some(super::upload_lora(g, s, dst.n, dst.k, what)?),
                (_, None) => dst.lora = None,
            }
            g.store_mat(&mut dst.w, src.w.as_slice(), what)?;
            match (&mut dst.b, &src.b) {
                (Some(d), Some(s)) => g.store(d, s.as_slice(), what),
                (None, None) => Ok(()),
                _ => Err(cuda_error(format!(
                    "{what}: bias added or removed on the host"
                ))),
            }
        };
        let norm = |dst: &mut DNorm, src: &Norm, what: &str| -> Result<()> {
            match (dst, src) {
                (DNorm::Rms { w: d }, Norm::Rms { w: s }) => g.store(d, s.as_slice(), what),
                (DNorm::Layer { w: dw, b: db }, Norm::Layer { w: sw, b: sb }) => {
                    g.store(dw, sw.as_slice(), what)?;
                    g.store(db, sb.as_slice(), what)
                }
                _ => Err(cuda_error(format!("{what}: norm kind changed on the host"))),
            }
        };
        if weights.layers.len() != w.layers.len() {
            return Err(cuda_error("the host model's layer count changed"));
        }
        tensor(&mut w.tok_emb, &weights.tok_emb, "embedding")?;
        match (&mut w.pos_emb, &weights.pos_emb) {
            (Some(d), Some(s)) => tensor(d, s, "position embedding")?,
            (None, None) => {}
            _ => {
                return Err(cuda_error(
                    "position embedding added or removed on the host",
                ))
            }
        }
        for (i, (d, s)) in w.layers.iter_mut().zip(&weights.layers).enumerate() {
            let name = |n: &str| format!("layers.{i}.{n}");
            norm(&mut d.attn_norm, &s.attn_norm, &name("attn_norm"))?;
            linear(&mut d.q, &s.q, &name("q"))?;
            linear(&mut d.k, &s.k, &name("k"))?;
            linear(&mut d.v, &s.v, &name("v"))?;
            linear(&mut d.o, &s.o, &name("o"))?;
            norm(&mut d.mlp_norm, &s.mlp_norm, &name("mlp_norm"))?;
            match (&mut d.mlp, &s.mlp) {
                (DMlp::Gelu { fc, proj }, Mlp::Gelu { fc: sf, proj: sp }) => {
                    linear(fc, sf, &name("mlp.fc"))?;
                    linear(proj, sp, &name("mlp.proj"))?;
                }
                (
                    DMlp::SwiGlu { gate, up, down },
                    Mlp::SwiGlu {
                        gate: sg,
                        up: su,
                        down: sd,
                    },
                ) => {
                    linear(gate, sg, &name("mlp.gate"))?;
                    linear(up, su, &name("mlp.up"))?;
                    linear(down, sd, &name("mlp.down"))?;
                }
                _ => {
                    return Err(cuda_error(format!(
                        "layer {i}: MLP kind changed on the host"
                    )))
                }
            }
        }
        norm(&mut w.final_norm, &weights.final_norm, "final norm")?;
        match (&mut w.lm_head, &weights.lm_head) {
            (Some(d), Some(s)) => tensor(d, s, "lm_head")?,
            (None, None) => {}
            // `add_score_head` drops the LM head (a reward model).
            (Some(_), None) => w.lm_head = None,
            (None, Some(_)) => return Err(cuda_error("LM head added on the host")),
        }
        g.sync()?;
        self.has_lm_head = self.w.lm_head.is_some() || self.cfg.tie_word_embeddings;
        Ok(())
    }

    fn norm_fwd(
        &self,
        k: &Kernels,
        norm: &DNorm,
        x: &CudaSlice<f32>,
        t: usize,
    ) -> Result<NormTape> {
        let g = &self.gpu;
        let (c, eps) = (self.cfg.hidden_size, self.cfg.norm_eps);
        let mut y = g.zeros::<f32>(t * c)?;
        let mut rstd = g.zeros::<f32>(t)?;
        let mean = match norm {
            DNorm::Rms { w } => {
                g.rmsnorm_stats(k, &mut y, &mut rstd, x, w, t, c, eps)?;
                None
            }
            DNorm::Layer { w, b } => {
                let mut mean = g.zeros::<f32>(t)?;
                g.layernorm_stats(k, &mut y, (&mut mean, &mut rstd), x, (w, b), t, c, eps)?;
                Some(mean)
            }
        };
        Ok(NormTape { y, rstd, mean })
    }

    /// `dx` (written) and the norm's weight gradients (accumulated) from `dy`.
    #[allow(clippy::too_many_arguments)]
    fn norm_bwd(
        &self,
        k: &Kernels,
        norm: &DNorm,
        grad: &mut GNorm,
        dx: &mut CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        tape: &NormTape,
        t: usize,
    ) -> Result<()> {
        let g = &self.gpu;
        let c = self.cfg.hidden_size;
        match (norm, &tape.mean) {
            (DNorm::Rms { w }, _) => {
                g.rmsnorm_bwd(k, dx, grad.w.as_mut(), dy, x, w, &tape.rstd, t, c)
            }
            (DNorm::Layer { w, .. }, Some(mean)) => {
                let dwb = match (grad.w.as_mut(), grad.b.as_mut()) {
                    (Some(dw), Some(db)) => Some((dw, db)),
                    (None, None) => None,
                    _ => return Err(cuda_error("internal: LayerNorm gradients")),
                };
                g.layernorm_bwd(k, dx, dwb, dy, x, w, (mean, &tape.rstd), t, c)
            }
            _ => Err(cuda_error("internal: LayerNorm without its statistics")),
        }
    }

    /// `dx` (written or added) and the layer's weight and bias gradients from `dy`.
    #[allow(clippy::too_many_arguments)]
    fn linear_bwd(
        &self,
        lin: &DLinear,
        grad: &mut GLinear,
        dx: &mut CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        ones: &CudaSlice<f32>,
        t: usize,
        accumulate: bool,
    ) -> Result<()> {
        let g = &self.gpu;
        g.linear_dx(dx, dy, lin.w.f32()?, t, lin.n, lin.k, accumulate)?;
        // A frozen base (LoRA) has no weight or bias gradient.
        if let Some(dw) = grad.w.as_mut() {
            g.linear_dw(dw, dy, x, t, lin.n, lin.k)?;
        }
        if let Some(db) = grad.b.as_mut() {
            g.bias_grad(db, dy, ones, t, lin.n)?;
        }
        if let (Some(ad), Some((ga, gb))) = (&lin.lora, grad.lora.as_mut()) {
            // y += s·(x·Aᵀ)·Bᵀ: with u = s·x·Aᵀ, dB += dyᵀ·u, du = s·dy·B, dA += duᵀ·x,
            // dx += du·A (as lora.rs on the CPU).
            let r = ad.r;
            let mut u = g.zeros::<f32>(t * r)?;
            g.gemm_scaled(&mut u, x, &ad.a, (t, r, lin.k), ad.scale, 0.0)?;
            g.linear_dw(gb, dy, &u, t, lin.n, r)?;
            let mut du = g.zeros::<f32>(t * r)?;
            g.sgemm_scaled(
                GemmShape::dx(t, lin.n, r),
                &ad.b,
                dy,
                &mut du,
                ad.scale,
                0.0,
            )?;
            g.linear_dw(ga, &du, x, t, r, lin.k)?;
            g.linear_dx(dx, &du, &ad.a, t, r, lin.k, true)?;
        }
        Ok(())
    }

    /// The number of values in the device weights (what the gradients take).
    fn parameter_count(&self) -> usize {
        let lin = |l: &DLinear| l.n * l.k + l.b.as_ref().map_or(0, |b| b.len());
        let norm = |n: &DNorm| match n {
            DNorm::Rms { w } => w.len(),
            DNorm::Layer { w, b } => w.len() + b.len(),
        };
        let w = &self.w;
        let layers: usize = w
            .layers
            .iter()
            .map(|l| {
                let mlp = match &l.mlp {
                    DMlp::Gelu { fc, proj } => lin(fc) + lin(proj),
                    DMlp::SwiGlu { gate, up, down } => lin(gate) + lin(up) + lin(down),
                };
                norm(&l.attn_norm)
                    + lin(&l.q)
                    + lin(&l.k)
                    + lin(&l.v)
                    + lin(&l.o)
                    + norm(&l.mlp_norm)
                    + mlp
            })
            .sum();
        w.tok_emb.len()
            + w.pos_emb.as_ref().map_or(0, |p| p.len())
            + layers
            + norm(&w.final_norm)
            + w.lm_head.as_ref().map_or(0, |h| h.len())
    }

    /// Whether LoRA adapters are attached (the base is then frozen: no gradient for it).
    fn base_frozen(&self) -> bool {
        self.w
            .layers
            .iter()
            .any(|l| l.linears().iter().any(|lin| lin.lora.is_some()))
    }

    /// The values `zero_grads` allocates: every weight's, or with LoRA the adapters' alone.
    fn gradient_values(&self) -> usize {
        if !self.base_frozen() {
            return self.parameter_count();
        }
        self.w
            .layers
            .iter()
            .flat_map(|l| l.linears())
            .filter_map(|lin| lin.lora.as_ref().map(|ad| ad.r * (lin.k + lin.n)))
            .sum()
    }

    fn zero_grads(&self) -> Result<DGrads> {
        let g = &self.gpu;
        let frozen = self.base_frozen();
        let base = |n: usize| -> Result<Option<CudaSlice<f32>>> {
            if frozen {
                Ok(None)
            } else {
                Ok(Some(g.zeros(n)?))
            }
        };
        let lin = |l: &DLinear| -> Result<GLinear> {
            Ok(GLinear {
                w: base(l.n * l.k)?,
                b: match &l.b {
                    Some(_) => base(l.n)?,
                    None => None,
                },
                lora: match &l.lora {
                    Some(ad) => Some((g.zeros(ad.r * l.k)?, g.zeros(l.n * ad.r)?)),
                    None => None,
                },
            })
        };
        let c = self.cfg.hidden_size;
        let norm = |n: &DNorm| -> Result<GNorm> {
            Ok(GNorm {
                w: base(c)?,
                b: match n {
                    DNorm::Layer { .. } => base(c)?,
                    DNorm::Rms { .. } => None,
                },
            })
        };
        let mut layers = Vec::with_capacity(self.w.layers.len());
        for l in &self.w.layers {
            layers.push(GLayer {
                attn_norm: norm(&l.attn_norm)?,
                q: lin(&l.q)?,
                k: lin(&l.k)?,
                v: lin(&l.v)?,
                o: lin(&l.o)?,
                mlp_norm: norm(&l.mlp_norm)?,
                mlp: match &l.mlp {
                    DMlp::Gelu { fc, proj } => vec![lin(fc)?, lin(proj)?],
                    DMlp::SwiGlu { gate, up, down } => vec![lin(gate)?, lin(up)?, lin(down)?],
                },
            });
        }
        Ok(DGrads {
            tok_emb: base(self.w.tok_emb.len())?,
            pos_emb: match &self.w.pos_emb {
                Some(p) => base(p.len())?,
                None => None,
            },
            layers,
            final_norm: norm(&self.w.final_norm)?,
            lm_head: match &self.w.lm_head {
                Some(h) => base(h.len())?,
                None => None,
            },
        })
    }

    /// The training forward over `t` packed tokens: what each layer keeps for the backward
    /// (its whole tape, or with `checkpointed` only its input, the tape being recomputed in
    /// the backward), the final norm's input and its tape (whose output is the LM head's
    /// input).
    fn forward_taped(
        &self,
        k: &Kernels,
        (ids, positions): (&CudaSlice<i32>, &CudaSlice<i32>),
        tiles: &Tiles,
        t: usize,
        checkpointed: bool,
    ) -> Result<(Vec<Kept>, CudaSlice<f32>, NormTape)> {
        let (g, c) = (&self.gpu, self.cfg.hidden_size);
        let w = &self.w;
        let mut x = g.zeros::<f32>(t * c)?;
        g.embed(&mut x, &w.tok_emb, w.pos_emb.as_ref(), ids, positions, t, c)?;
        let mut kept = Vec::with_capacity(w.layers.len());
        for layer in &w.layers {
            let (tape, x_out) = self.layer_forward(k, layer, x, positions, tiles, t)?;
            kept.push(if checkpointed {
                Kept::Input(tape.x_in)
            } else {
                Kept::Tape(Box::new(tape))
            });
            x = x_out;
        }
        let nf = self.norm_fwd(k, &w.final_norm, &x, t)?;
        Ok((kept, x, nf))
    }

    /// One layer of the training forward from its input `x_in`: the layer's tape (which owns
    /// `x_in`) and its output.
    fn layer_forward(
        &self,
        k: &Kernels,
        layer: &DLayer,
        x_in: CudaSlice<f32>,
        positions: &CudaSlice<i32>,
        tiles: &Tiles,
        t: usize,
    ) -> Result<(LayerTape, CudaSlice<f32>)> {
        let g = &self.gpu;
        let ((c, qd, kvd, f), (hq, hkv, hd)) = (self.widths(), self.heads());
        let n1 = self.norm_fwd(k, &layer.attn_norm, &x_in, t)?;
        let mut q = g.zeros::<f32>(t * qd)?;
        let mut kk = g.zeros::<f32>(t * kvd)?;
        let mut v = g.zeros::<f32>(t * kvd)?;
        self.linear(&mut q, &n1.y, &layer.q, t)?;
        self.linear(&mut kk, &n1.y, &layer.k, t)?;
        self.linear(&mut v, &n1.y, &layer.v, t)?;
        if let Some(inv) = &self.inv_freq {
            g.rope(&mut q, positions, inv, t, hq, hd)?;
            g.rope(&mut kk, positions, inv, t, hkv, hd)?;
        }
        let mut att = g.zeros::<f32>(t * qd)?;
        let mut lse = g.zeros::<f32>(t * hq)?;
        g.prefill_attention(
            k,
            &mut att,
            &mut lse,
            (&q, &kk, &v),
            tiles,
            t,
            (hq, hkv),
            hd,
        )?;
        let mut out = g.zeros::<f32>(t * c)?;
        self.linear(&mut out, &att, &layer.o, t)?;
        let mut x_mid = g.zeros::<f32>(t * c)?;
        g.copy_within(&x_in, 0, &mut x_mid, 0, t * c)?;
        g.add(&mut x_mid, &out, t * c)?;
        let n2 = self.norm_fwd(k, &layer.mlp_norm, &x_mid, t)?;
        let mut m1 = g.zeros::<f32>(t * f)?;
        let mut act = g.zeros::<f32>(t * f)?;
        let m2 = match &layer.mlp {
            DMlp::Gelu { fc, proj } => {
                self.linear(&mut m1, &n2.y, fc, t)?;
                g.gelu(&mut act, &m1, t * f)?;
                self.linear(&mut out, &act, proj, t)?;
                None
            }
            DMlp::SwiGlu { gate, up, down } => {
                let mut m2 = g.zeros::<f32>(t * f)?;
                self.linear(&mut m1, &n2.y, gate, t)?;
                self.linear(&mut m2, &n2.y, up, t)?;
                g.swiglu(&mut act, &m1, &m2, t * f)?;
                self.linear(&mut out, &act, down, t)?;
                Some(m2)
            }
        };
        let mut x = g.zeros::<f32>(t * c)?;
        g.copy_within(&x_mid, 0, &mut x, 0, t * c)?;
        g.add(&mut x, &out, t * c)?;
        let tape = LayerTape {
            x_in,
            n1,
            q,
            k: kk,
            v,
            att,
            lse,
            x_mid,
            n2,
            m1,
            m2,
            act,
        };
        Ok((tape, x))
    }

    /// Checks and uploads a packed batch and runs the taped forward. `extra` is what the
    /// caller will allocate besides (logit chunks), counted in the memory check.
    fn taped_forward(
        &self,
        k: &Kernels,
        (tokens, seq_lens): (&[u32], &[usize]),
        checkpointed: bool,
        extra: u64,
    ) -> Result<Taped> {
        let cfg = &self.cfg;
        let (t, c, v) = (tokens.len(), cfg.hidden_size, cfg.vocab_size);
        let (qd, kvd, f) = (cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
        let (hq, hkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        check_heads(hq, hkv, hd)?;
        if seq_lens.iter().sum::<usize>() != t || seq_lens.is_empty() {
            return Err(cuda_error(
                "internal: sequence lengths do not cover the tokens",
            ));
        }
        int(t.saturating_mul(hq), "token × head rows")?;
        let mut ids = Vec::with_capacity(t);
        let mut positions = Vec::with_capacity(t);
        for &len in seq_lens {
            if len > cfg.max_position_embeddings {
                return Err(Error::ContextOverflow {
                    requested: len,
                    max: cfg.max_position_embeddings,
                });
            }
            positions.extend((0..len).map(|p| p as i32));
        }
        for &tok in tokens {
            if tok as usize >= v {
                return Err(Error::TokenOutOfRange { id: tok, vocab: v });
            }
            ids.push(tok as i32);
        }
        let g = &self.gpu;
        // The activations kept for the backward, the gradients (the size of the weights), the
        // backward's working buffers and the caller's extra: refuse before allocating them
        // when the device cannot hold them.
        // A whole tape per layer, or (checkpointed) each layer's input plus one recomputed tape.
        let tape = 4 * c + 2 * qd + 2 * kvd + 3 * f + hq + 4;
        let kept = if checkpointed {
            crate::memory::f32_bytes(&[t, cfg.num_layers, c])
                .saturating_add(crate::memory::f32_bytes(&[t, tape]))
        } else {
            crate::memory::f32_bytes(&[t, cfg.num_layers, tape])
        };
        let needed = kept
            .saturating_add(crate::memory::f32_bytes(&[self.gradient_values()]))
            .saturating_add(crate::memory::f32_bytes(&[
                t,
                5 * c + 3 * f + 3 * qd + 3 * kvd + hq,
            ]))
            .saturating_add(extra);
        let (free, _) = g.memory()?;
        if needed > free as u64 {
            return Err(Error::OutOfMemory {
                what: format!("the training step's activations on cuda:{}", g.ordinal()),
                needed,
                available: free as u64,
            });
        }
        let ids_d = g.upload(&ids)?;
        let positions_d = g.upload(&positions)?;
        let (cu, tile_seq, tile_start) = tile_lists(seq_lens);
        let tiles = Tiles {
            n_seqs: seq_lens.len(),
            n_tiles: tile_seq.len(),
            cu_seqlens: g.upload(&cu)?,
            tile_seq: g.upload(&tile_seq)?,
            tile_start: g.upload(&tile_start)?,
        };
        let (layers, x_final, nf) =
            self.forward_taped(k, (&ids_d, &positions_d), &tiles, t, checkpointed)?;
        Ok(Taped {
            layers,
            x_final,
            nf,
            ids: ids_d,
            positions: positions_d,
            tiles,
            t,
        })
    }

    /// The gradient of `objective` (of the selected tokens' log-probs, entropies and, with a
    /// value head, values) with respect to every weight, on the device; the same contract as
    /// the CPU path (`Model::token_objective_gradients`, which checked the inputs): `seq_lens`
    /// are the packed sequences' lengths, `selected` the (row, target, sequence) of each
    /// selected token in order. The value head (one row of `C` weights) runs on the host on
    /// the downloaded final hidden states, as the CPU computes it.
    pub(crate) fn token_objective_gradients(
        &self,
        model: &Model,
        tokens: &[u32],
        seq_lens: &[usize],
        selected: &[(usize, u32, usize)],
        objective: &mut TokenObjective<'_>,
    ) -> Result<(f64, Gradients)> {
        let cfg = &self.cfg;
        let (t, c, v) = (tokens.len(), cfg.hidden_size, cfg.vocab_size);
        if !self.has_lm_head {
            return Err(Error::invalid(
                "this reward model has no LM head: it cannot give token probabilities",
            ));
        }
        let mut targets = vec![-1i32; t];
        for &(row, target, seq) in selected {
            let slot = targets
                .get_mut(row)
                .filter(|_| seq < seq_lens.len())
                .ok_or_else(|| cuda_error("internal: selected row out of range"))?;
            *slot = target as i32;
        }
        let n_seq = seq_lens.len();
        let value_head = model.weights().value.as_ref();
        // Fail before any work on a bf16-stored model (training needs the f32 weights).
        self.w.tok_emb.f32()?;

        let guard = self.enter()?;
        let k = self.bwd_kernels()?;
        let g = &self.gpu;
        let logit_bytes = crate::memory::f32_bytes(&[2, LOGIT_ROWS.min(t), v]);
        let checkpointed = model.gradient_checkpointing();
        let taped = self.taped_forward(k, (tokens, seq_lens), checkpointed, logit_bytes)?;
        let hf = &taped.nf.y;

        // Pass 1: log-probs, log-sum-exps and entropies of every row, in chunks.
        let head = self.w.lm_head.as_ref().unwrap_or(&self.w.tok_emb).f32()?;
        let chunk = LOGIT_ROWS.min(t);
        let mut logits = g.zeros::<f32>(chunk * v)?;
        let mut chunks = Vec::new();
        let mut all_logp = Vec::with_capacity(t);
        let mut all_ent = Vec::with_capacity(t);
        let mut r0 = 0;
        while r0 < t {
            let rows = chunk.min(t - r0);
            let x = hf
                .try_slice(r0 * c..(r0 + rows) * c)
                .ok_or_else(|| cuda_error("internal: LM head rows out of range"))?;
            g.gemm(&mut logits, &x, head, rows, v, c)?;
            let targets_d = g.upload(&targets[r0..r0 + rows])?;
            let mut logp = g.zeros::<f32>(rows)?;
            let mut lse = g.zeros::<f32>(rows)?;
            let mut ent = g.zeros::<f32>(rows)?;
            g.logsoftmax_stats(
                k,
                (&mut logp, &mut lse, &mut ent),
                &logits,
                &targets_d,
                rows,
                v,
            )?;
            all_logp.extend(g.download(&logp, rows)?);
            all_ent.extend(g.download(&ent, rows)?);
            chunks.push((r0, rows, targets_d, lse, ent));
            r0 += rows;
        }
        // The value head reads the final hidden states on the host.
        let hf_host = match value_head {
            Some(_) => Some(g.download(hf, t * c)?),
            None => None,
        };
        let mut out = TokenOutputs {
            logp: vec![Vec::new(); n_seq],
            entropy: vec![Vec::new(); n_seq],
            value: value_head.map(|_| vec![Vec::new(); n_seq]),
        };
        for &(row, _, seq) in selected {
            out.logp[seq].push(all_logp[row] as f64);
            out.entropy[seq].push(all_ent[row] as f64);
        }
        if let (Some(values), Some(vh), Some(h)) = (out.value.as_mut(), value_head, &hf_host) {
            let bias = value_bias(vh);
            for &(row, _, seq) in selected {
                let x = &h[row * c..(row + 1) * c];
                values[seq].push(dot(x, vh.w.as_slice()) as f64 + bias);
            }
        }
        // The objective runs on the host without holding the device (it may use the model).
        drop(guard);
        let (loss, d) = objective(&out)?;
        let _guard = self.enter()?;
        check_output_grads(&d, &out)?;
        let mut d_logp = vec![0f32; t];
        let mut d_ent = d.entropy.as_ref().map(|_| vec![0f32; t]);
        let mut d_value = d.value.as_ref().map(|_| vec![0f32; t]);
        let mut taken = vec![0usize; n_seq];
        for &(row, _, seq) in selected {
            let i = taken[seq];
            d_logp[row] = d.logp[seq][i] as f32;
            if let (Some(de), Some(src)) = (d_ent.as_mut(), d.entropy.as_ref()) {
                de[row] = src[seq][i] as f32;
            }
            if let (Some(dv), Some(src)) = (d_value.as_mut(), d.value.as_ref()) {
                dv[row] = src[seq][i] as f32;
            }
            taken[seq] += 1;
        }

        // Pass 2: dlogits → dH (the final norm's output gradient) and the head's gradient.
        let mut grads = self.zero_grads()?;
        let mut dhf = g.zeros::<f32>(t * c)?;
        let mut d_logits = g.zeros::<f32>(chunk * v)?;
        for (r0, rows, targets_d, lse, ent) in &chunks {
            let (r0, rows) = (*r0, *rows);
            let x = hf
                .try_slice(r0 * c..(r0 + rows) * c)
                .ok_or_else(|| cuda_error("internal: LM head rows out of range"))?;
            g.gemm(&mut logits, &x, head, rows, v, c)?;
            let d_logp_d = g.upload(&d_logp[r0..r0 + rows])?;
            let d_ent_d = match &d_ent {
                Some(de) => Some(g.upload(&de[r0..r0 + rows])?),
                None => None,
            };
            g.logsoftmax_bwd(
                k,
                &mut d_logits,
                (&logits, targets_d, lse),
                &d_logp_d,
                d_ent_d.as_ref().map(|de| (ent, de)),
                rows,
                v,
            )?;
            let mut dx = dhf
                .try_slice_mut(r0 * c..(r0 + rows) * c)
                .ok_or_else(|| cuda_error("internal: LM head rows out of range"))?;
            g.linear_dx(&mut dx, &d_logits, head, rows, v, c, false)?;
            // The head's gradient (the embedding's when tied); none with a frozen base.
            let dhead = if self.w.lm_head.is_some() {
                grads.lm_head.as_mut()
            } else {
                grads.tok_emb.as_mut()
            };
            if let Some(dhead) = dhead {
                g.linear_dw(dhead, &d_logits, &x, rows, v, c)?;
            }
        }
        drop((logits, d_logits));
        // The value head's part of dH, and its own gradient, on the host.
        let mut head_grads = HeadGrads::default();
        if let (Some(dv), Some(vh), Some(h)) = (&d_value, value_head, &hf_host) {
            let mut dh_value = vec![0f32; t * c];
            let mut gw = vec![0f32; c];
            let mut gb = 0f32;
            for &(row, _, _) in selected {
                let dvalue = dv[row];
                let x = &h[row * c..(row + 1) * c];
                for (dh, &wv) in dh_value[row * c..(row + 1) * c]
                    .iter_mut()
                    .zip(vh.w.as_slice())
                {
                    *dh += dvalue * wv;
                }
                for (gw, &hv) in gw.iter_mut().zip(x) {
                    *gw += dvalue * hv;
                }
                gb += dvalue;
            }
            let dh_value = g.upload(&dh_value)?;
            g.add(&mut dhf, &dh_value, t * c)?;
            head_grads.value = Some((gw, gb));
        }
        self.backbone_backward(k, &taped, &dhf, &mut grads)?;
        let host = self.download_grads(model, grads, head_grads)?;
        Ok((loss, host))
    }

    /// The gradient of an objective of the final hidden states (reward-model training):
    /// `objective` receives the final-normed hidden states `[T, C]` of the packed sequences
    /// on the host and returns `∂loss/∂H` (same shape) and the gradient of the score head,
    /// if it trains one; the backbone's backward runs on the device.
    pub(crate) fn hidden_objective_gradients(
        &self,
        model: &Model,
        tokens: &[u32],
        seq_lens: &[usize],
        objective: &mut HiddenObjective<'_>,
    ) -> Result<Gradients> {
        let (t, c) = (tokens.len(), self.cfg.hidden_size);
        self.w.tok_emb.f32()?; // f32 weights, as above
        let guard = self.enter()?;
        let k = self.bwd_kernels()?;
        let checkpointed = model.gradient_checkpointing();
        let taped = self.taped_forward(k, (tokens, seq_lens), checkpointed, 0)?;
        let hf = self.gpu.download(&taped.nf.y, t * c)?;
        drop(guard);
        let (dhf, score) = objective(&hf)?;
        if dhf.len() != t * c {
            return Err(cuda_error("internal: hidden-state gradient shape"));
        }
        let _guard = self.enter()?;
        let dhf = self.gpu.upload(&dhf)?;
        let mut grads = self.zero_grads()?;
        self.backbone_backward(k, &taped, &dhf, &mut grads)?;
        let heads = HeadGrads { score, value: None };
        self.download_grads(model, grads, heads)
    }

    /// Runs the layers in reverse from `dhf` (the gradient of the final-normed hidden states),
    /// accumulating every backbone weight's gradient into `grads`.
    fn backbone_backward(
        &self,
        k: &Kernels,
        taped: &Taped,
        dhf: &CudaSlice<f32>,
        grads: &mut DGrads,
    ) -> Result<()> {
        let g = &self.gpu;
        let t = taped.t;
        let ((c, qd, kvd, f), (hq, hkv, hd)) = (self.widths(), self.heads());
        let ones = g.upload(&vec![1f32; t])?;
        let mut dx = g.zeros::<f32>(t * c)?;
        self.norm_bwd(
            k,
            &self.w.final_norm,
            &mut grads.final_norm,
            &mut dx,
            dhf,
            &taped.x_final,
            &taped.nf,
            t,
        )?;
        let mut d_act = g.zeros::<f32>(t * f)?;
        let mut dm1 = g.zeros::<f32>(t * f)?;
        let mut dm2 = g.zeros::<f32>(t * f)?;
        let mut dh = g.zeros::<f32>(t * c)?;
        let mut dnorm = g.zeros::<f32>(t * c)?;
        let mut d_att = g.zeros::<f32>(t * qd)?;
        let mut delta = g.zeros::<f32>(t * hq)?;
        for ((layer, kept), gl) in self
            .w
            .layers
            .iter()
            .zip(&taped.layers)
            .zip(grads.layers.iter_mut())
            .rev()
        {
            // A checkpointed layer's tape is recomputed from its kept input, one layer at a time.
            let recomputed;
            let lt: &LayerTape = match kept {
                Kept::Tape(tape) => tape,
                Kept::Input(x_in) => {
                    let mut x = g.zeros::<f32>(t * c)?;
                    g.copy_within(x_in, 0, &mut x, 0, t * c)?;
                    recomputed = self
                        .layer_forward(k, layer, x, &taped.positions, &taped.tiles, t)?
                        .0;
                    &recomputed
                }
            };
            // MLP block: x_out = x_mid + out_proj(act).
            match &layer.mlp {
                DMlp::Gelu { fc, proj } => {
                    let [g_fc, g_proj] = &mut gl.mlp[..] else {
                        return Err(cuda_error("internal: GELU MLP gradients"));
                    };
                    self.linear_bwd(proj, g_proj, &mut d_act, &dx, &lt.act, &ones, t, false)?;
                    g.gelu_bwd(k, &mut dm1, &lt.m1, &d_act, t * f)?;
                    self.linear_bwd(fc, g_fc, &mut dh, &dm1, &lt.n2.y, &ones, t, false)?;
                }
                DMlp::SwiGlu { gate, up, down } => {
                    let ([g_gate, g_up, g_down], Some(m2)) = (&mut gl.mlp[..], &lt.m2) else {
                        return Err(cuda_error("internal: SwiGLU MLP gradients"));
                    };
                    self.linear_bwd(down, g_down, &mut d_act, &dx, &lt.act, &ones, t, false)?;
                    g.swiglu_bwd(k, &mut dm1, &mut dm2, &lt.m1, m2, &d_act, t * f)?;
                    self.linear_bwd(gate, g_gate, &mut dh, &dm1, &lt.n2.y, &ones, t, false)?;
                    self.linear_bwd(up, g_up, &mut dh, &dm2, &lt.n2.y, &ones, t, true)?;
                }
            }
            let mlp_norm = &layer.mlp_norm;
            self.norm_bwd(
                k,
                mlp_norm,
                &mut gl.mlp_norm,
                &mut dnorm,
                &dh,
                &lt.x_mid,
                &lt.n2,
                t,
            )?;
            g.add(&mut dx, &dnorm, t * c)?; // now d x_mid

            // Attention block: x_mid = x_in + o(att).
            self.linear_bwd(
                &layer.o, &mut gl.o, &mut d_att, &dx, &lt.att, &ones, t, false,
            )?;
            g.attention_delta(k, &mut delta, &lt.att, &d_att, t * hq, hd)?;
            let mut dq = g.zeros::<f32>(t * qd)?;
            let mut dk = g.zeros::<f32>(t * kvd)?;
            let mut dv = g.zeros::<f32>(t * kvd)?;
            g.prefill_attention_bwd(
                k,
                (&mut dq, &mut dk, &mut dv),
                (&lt.q, &lt.k, &lt.v),
                (&d_att, &lt.lse, &delta),
                &taped.tiles,
                t,
                (hq, hkv),
                hd,
            )?;
            if let Some(inv) = &self.inv_freq {
                g.rope_with(
                    &k.rope_bwd,
                    "rope_bwd",
                    &mut dq,
                    &taped.positions,
                    inv,
                    (t, hq, hd),
                )?;
                g.rope_with(
                    &k.rope_bwd,
                    "rope_bwd",
                    &mut dk,
                    &taped.positions,
                    inv,
                    (t, hkv, hd),
                )?;
            }
            let h1 = &lt.n1.y;
            self.linear_bwd(&layer.q, &mut gl.q, &mut dh, &dq, h1, &ones, t, false)?;
            self.linear_bwd(&layer.k, &mut gl.k, &mut dh, &dk, h1, &ones, t, true)?;
            self.linear_bwd(&layer.v, &mut gl.v, &mut dh, &dv, h1, &ones, t, true)?;
            let attn_norm = &layer.attn_norm;
            self.norm_bwd(
                k,
                attn_norm,
                &mut gl.attn_norm,
                &mut dnorm,
                &dh,
                &lt.x_in,
                &lt.n1,
                t,
            )?;
            g.add(&mut dx, &dnorm, t * c)?; // now d x_in
        }
        match grads.tok_emb.as_mut() {
            Some(d_table) => g.embedding_bwd(
                k,
                d_table,
                grads.pos_emb.as_mut(),
                &dx,
                &taped.ids,
                &taped.positions,
                t,
                c,
            ),
            None => Ok(()), // a frozen base
        }
    }

    /// The device gradients in the CPU path's `Gradients` (zeros for what the device does not
    /// train, which `token_objective_gradients`' caller refused already).
    fn download_grads(&self, model: &Model, d: DGrads, heads: HeadGrads) -> Result<Gradients> {
        let g = &self.gpu;
        // A Trainer's own step keeps the device's gradients there: the host part is then the
        // heads' alone.
        let on_device = model.gradients_on_device();
        let mut h = if on_device {
            Gradients::heads_only(model)
        } else {
            Gradients::zeros(model)
        };
        if let (Some(src), Some(dst)) = (heads.score, h.score.as_mut()) {
            if src.len() != dst.len() {
                return Err(cuda_error("internal: score head gradient shape"));
            }
            *dst = src;
        }
        if let (Some((w, b)), Some(dst)) = (heads.value, h.value.as_mut()) {
            if w.len() != dst.w.len() {
                return Err(cuda_error("internal: value head gradient shape"));
            }
            dst.w = w;
            if let Some(db) = dst.b.as_mut().and_then(|b| b.first_mut()) {
                *db = b;
            }
        }
        if on_device {
            let frozen = self.base_frozen();
            h.device = Some(std::sync::Arc::new(DeviceGrads::new(d, frozen)));
            return Ok(h);
        }
        // Both lists are in `params_mut` order; the host's ends with the heads.
        let (src, dst) = (d.flat(), h.flat_mut());
        if dst.len() < src.len() {
            return Err(cuda_error("internal: the host gradients lack tensors"));
        }
        for (buf, out) in src.into_iter().zip(dst) {
            if buf.len() != out.len() {
                return Err(cuda_error("internal: gradient shapes differ"));
            }
            g.fetch_into(buf, out)?;
        }
        g.sync()?;
        Ok(h)
    }
}

/// The objective's gradients must have the outputs' shapes (as the CPU path checks).
fn check_output_grads(d: &TokenOutputGrads, out: &TokenOutputs) -> Result<()> {
    let same_shape = |g: &[Vec<f64>]| {
        g.len() == out.logp.len() && g.iter().zip(&out.logp).all(|(a, b)| a.len() == b.len())
    };
    if !same_shape(&d.logp)
        || !d.entropy.as_deref().is_none_or(same_shape)
        || !d.value.as_deref().is_none_or(same_shape)
        || (d.value.is_some() && out.value.is_none())
    {
        return Err(Error::invalid(
            "the objective returned gradients of the wrong shape",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// cuBLAS's SGEMM on the host: column-major, `C = op(A) · op(B) + beta · C`, reading
    /// only the values `GemmShape::lens` allows.
    fn sgemm_ref(s: GemmShape, a: &[f32], b: &[f32], c: &mut [f32], beta: f32) {
        let (la, lb, lc) = s.lens().unwrap();
        let (a, b, c) = (&a[..la], &b[..lb], &mut c[..lc]);
        for j in 0..s.n {
            for i in 0..s.m {
                let mut acc = 0.0f32;
                for p in 0..s.k {
                    let av = if s.ta {
                        a[p + i * s.lda]
                    } else {
                        a[i + p * s.lda]
                    };
                    let bv = if s.tb {
                        b[j + p * s.ldb]
                    } else {
                        b[p + j * s.ldb]
                    };
                    acc += av * bv;
                }
                let at = i + j * s.ldc;
                c[at] = beta * c[at] + acc;
            }
        }
    }

    #[test]
    fn the_linear_backward_gemm_shapes_compute_the_row_major_products() {
        let (t, n, k) = (3usize, 4usize, 5usize);
        let val = |i: usize, salt: usize| ((i * 7 + salt * 13) % 11) as f32 - 5.0;
        let x: Vec<f32> = (0..t * k).map(|i| val(i, 1)).collect(); // [T, K]
        let w: Vec<f32> = (0..n * k).map(|i| val(i, 2)).collect(); // [N, K]
        let dy: Vec<f32> = (0..t * n).map(|i| val(i, 3)).collect(); // [T, N]
                                                                    // dx[t, k] = Σ_n dy[t, n] W[n, k]
        let mut dx = vec![0f32; t * k];
        sgemm_ref(GemmShape::dx(t, n, k), &w, &dy, &mut dx, 0.0);
        for r in 0..t {
            for c in 0..k {
                let want: f32 = (0..n).map(|j| dy[r * n + j] * w[j * k + c]).sum();
                assert_eq!(dx[r * k + c], want, "dx[{r}, {c}]");
            }
        }
        // dW[n, k] += Σ_t dy[t, n] x[t, k], onto a non-zero dW
        let mut dw = vec![1f32; n * k];
        sgemm_ref(GemmShape::dw(t, n, k), &x, &dy, &mut dw, 1.0);
        for j in 0..n {
            for c in 0..k {
                let want: f32 = 1.0 + (0..t).map(|r| dy[r * n + j] * x[r * k + c]).sum::<f32>();
                assert_eq!(dw[j * k + c], want, "dW[{j}, {c}]");
            }
        }
        // db[n] += Σ_t dy[t, n]
        let mut db = vec![2f32; n];
        sgemm_ref(GemmShape::bias(t, n), &dy, &vec![1.0; t], &mut db, 1.0);
        for j in 0..n {
            let want: f32 = 2.0 + (0..t).map(|r| dy[r * n + j]).sum::<f32>();
            assert_eq!(db[j], want, "db[{j}]");
        }
        // The forward's x · Wᵀ (gpu.rs's gemm) in the same convention, for comparison.
        let fwd = GemmShape {
            ta: true,
            tb: false,
            m: n,
            n: t,
            k,
            lda: k,
            ldb: k,
            ldc: n,
        };
        let mut y = vec![0f32; t * n];
        sgemm_ref(fwd, &w, &x, &mut y, 0.0);
        for r in 0..t {
            for j in 0..n {
                let want: f32 = (0..k).map(|c| x[r * k + c] * w[j * k + c]).sum();
                assert_eq!(y[r * n + j], want, "y[{r}, {j}]");
            }
        }
        // A leading dimension shorter than its matrix is an error, not an overrun.
        let bad = GemmShape {
            lda: 1,
            ..GemmShape::dx(t, n, k)
        };
        assert!(bad.lens().is_err());
    }

    #[test]
    fn tiles_cover_each_sequence_in_rows_of_sixteen() {
        let (cu, seq, start) = tile_lists(&[3, 16, 17]);
        assert_eq!(cu, [0, 3, 19, 36]);
        assert_eq!(seq, [0, 1, 2, 2]);
        assert_eq!(start, [0, 0, 0, 16]);
        // Shared memory of the tiles at the largest head size: the backward needs the opt-in.
        assert_eq!(prefill_fwd_smem(128), 33984);
        assert_eq!(prefill_bwd_smem(128), 51328);
    }
}
