//! One CUDA device as the model code uses it: the context, one stream, a cuBLAS handle on that
//! stream, and the kernels of `rlx-cuda-kernels` compiled (NVRTC) and loaded for the device's
//! architecture. Every launch goes through a small method here whose argument list follows the
//! kernel's C signature; buffers are `CudaSlice<f32>` / `CudaSlice<i32>` in device memory.
//!
//! Nothing here has run on a GPU yet: it is compiled and type-checked only.

use std::sync::Arc;

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    DeviceRepr, DeviceSlice, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

use super::model::{DMat, KvBuf, KV_BLOCK};
use super::{compile, cuda_error};
use crate::error::{Error, Result};

/// Threads per block of the row kernels (norms, log-softmax): a multiple of 32, as the block
/// reductions of `common.cuh` require.
pub(super) const ROW_THREADS: u32 = 256;
/// `attention_decode_paged*` keeps per-warp state for exactly 4 warps.
const DECODE_THREADS: u32 = 128;
/// `sample_rows` sizes its shared arrays for 1024 threads.
const SAMPLE_THREADS: u32 = 1024;
/// Rows of x and of W per block of `matmul_bf16w` (`MM_BT`, `MM_BN` in matmul.cu).
const MATMUL_TILE: usize = 64;
/// `matmul_bf16w`'s 16 × 16 threads, each owning 4 × 4 outputs.
const MATMUL_THREADS: u32 = 256;
/// Threads per block of the elementwise (grid-stride) kernels.
const ELEMENT_THREADS: u32 = 256;

/// A null pointer argument (`0` as a 64-bit device address) for the kernels' optional outputs.
pub(super) const NULL: u64 = 0;

pub(super) fn driver(what: &str) -> impl FnOnce(cudarc::driver::DriverError) -> Error + '_ {
    move |e| cuda_error(format!("{what}: {e}"))
}

/// A count as the kernels' `int`, or an error when it does not fit.
pub(crate) fn int(n: usize, what: &str) -> Result<i32> {
    i32::try_from(n).map_err(|_| cuda_error(format!("{what} = {n} exceeds the kernels' int range")))
}

pub(super) fn long(n: usize, what: &str) -> Result<i64> {
    i64::try_from(n).map_err(|_| cuda_error(format!("{what} = {n} exceeds the kernels' range")))
}

/// Grid of a grid-stride elementwise kernel over `n` values.
pub(super) fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(ELEMENT_THREADS as usize).clamp(1, 1 << 20) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (ELEMENT_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block per row (`rows` ≥ 1, checked by the callers through [`int`]).
pub(super) fn per_row(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Errors unless `buf` holds at least `n` values (cudarc asserts on short copies; rlx must
/// return an error instead, and a kernel must never run past a buffer).
pub(super) fn need<T>(buf: &impl DeviceSlice<T>, n: usize, what: &str) -> Result<()> {
    if buf.len() < n {
        return Err(cuda_error(format!(
            "internal: buffer {what} holds {} values, {n} needed",
            buf.len()
        )));
    }
    Ok(())
}

/// The largest architecture rlx compiles for that a device of compute capability
/// `major.minor` runs, capped at sm_90: newer devices run the compute_90 PTX through the
/// driver's JIT, so an older NVRTC still serves them.
pub(crate) fn arch_for(major: i32, minor: i32) -> Result<&'static str> {
    const KNOWN: &[(i32, &str)] = &[
        (70, "sm_70"),
        (75, "sm_75"),
        (80, "sm_80"),
        (86, "sm_86"),
        (89, "sm_89"),
        (90, "sm_90"),
    ];
    let cc = major * 10 + minor;
    KNOWN
        .iter()
        .rev()
        .find(|(k, _)| *k <= cc)
        .map(|(_, a)| *a)
        .ok_or_else(|| {
            cuda_error(format!(
                "compute capability {major}.{minor} is older than 7.0, which rlx's kernels need"
            ))
        })
}

/// The kernels the model forward and generation launch.
struct Kernels {
    embedding_fwd_f32: CudaFunction,
    embedding_fwd_bf16: CudaFunction,
    matmul_bf16w: CudaFunction,
    rmsnorm_fwd: CudaFunction,
    layernorm_fwd: CudaFunction,
    rope_fwd: CudaFunction,
    swiglu_fwd: CudaFunction,
    gelu_tanh_fwd: CudaFunction,
    attention_decode_paged_f32: CudaFunction,
    kv_cache_append_f32: CudaFunction,
    attention_decode_paged: CudaFunction,
    kv_cache_append: CudaFunction,
    logsoftmax_gather_fwd: CudaFunction,
    sample_rows: CudaFunction,
    add_in_place: CudaFunction,
    add_bias_rows: CudaFunction,
}

/// A device ready to run a model.
pub(crate) struct Gpu {
    ordinal: usize,
    arch: &'static str,
    name: String,
    // Field order is drop order: cuBLAS handles and kernels before the context they live in.
    /// cuBLASLt for biased products, when libcublasLt loads.
    pub(super) lt: Option<super::lt::Lt>,
    pub(super) blas: CudaBlas,
    k: Kernels,
    pub(super) stream: Arc<CudaStream>,
    pub(super) ctx: Arc<CudaContext>,
}

pub(super) fn load_module(
    ctx: &Arc<CudaContext>,
    arch: &str,
    name: &str,
) -> Result<Arc<CudaModule>> {
    let module = rlx_cuda_kernels::module(name)
        .ok_or_else(|| cuda_error(format!("internal: no kernel module {name}")))?;
    let ptx = compile(module, arch)?;
    ctx.load_module(Ptx::from_src(ptx.to_string()))
        .map_err(|e| cuda_error(format!("loading module {name} for {arch}: {e}")))
}

pub(super) fn function(module: &Arc<CudaModule>, name: &str) -> Result<CudaFunction> {
    module
        .load_function(name)
        .map_err(|e| cuda_error(format!("kernel {name}: {e}")))
}

impl Gpu {
    /// Opens device `ordinal`: checks the driver, the device, NVRTC and cuBLAS (each missing
    /// one is an error naming it), creates the context, stream and cuBLAS handle, and compiles
    /// and loads the kernels for the device's architecture.
    pub(crate) fn new(ordinal: usize) -> Result<Gpu> {
        super::check_device(ordinal)?;
        if !super::nvrtc_available() {
            return Err(cuda_error(
                "NVRTC (libnvrtc.so) not found: install the CUDA toolkit or the \
                 nvidia-cuda-nvrtc-cu12 wheel and add its lib folder to LD_LIBRARY_PATH",
            ));
        }
        if !super::cublas_available() {
            return Err(cuda_error(
                "cuBLAS (libcublas.so) not found: install the CUDA toolkit or the \
                 nvidia-cublas-cu12 wheel and add its lib folder to LD_LIBRARY_PATH",
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(driver("creating the CUDA context"))?;
        // SAFETY: every buffer this context allocates is used on one stream only (`stream`
        // below, which cuBLAS shares), so cudarc's per-buffer events that order work across
        // streams are not needed; turning them off before any allocation saves two event
        // creations per buffer.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx
            .compute_capability()
            .map_err(driver("reading the compute capability"))?;
        let arch = arch_for(major, minor)?;
        let name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| cuda_error(format!("creating the cuBLAS handle: {e:?}")))?;
        // cuBLASLt only saves a bias pass: when its handle cannot be made, SGEMM + the bias
        // kernel compute the same product.
        let lt = super::lt::Lt::new(&stream).ok().flatten();
        let embedding = load_module(&ctx, arch, "embedding")?;
        let norm = load_module(&ctx, arch, "norm")?;
        let rope = load_module(&ctx, arch, "rope")?;
        let activation = load_module(&ctx, arch, "activation")?;
        let attention = load_module(&ctx, arch, "attention")?;
        let logsoftmax = load_module(&ctx, arch, "logsoftmax")?;
        let sampling = load_module(&ctx, arch, "sampling")?;
        let reduce = load_module(&ctx, arch, "reduce")?;
        let matmul = load_module(&ctx, arch, "matmul")?;
        let k = Kernels {
            embedding_fwd_f32: function(&embedding, "embedding_fwd_f32")?,
            embedding_fwd_bf16: function(&embedding, "embedding_fwd_bf16")?,
            matmul_bf16w: function(&matmul, "matmul_bf16w")?,
            rmsnorm_fwd: function(&norm, "rmsnorm_fwd")?,
            layernorm_fwd: function(&norm, "layernorm_fwd")?,
            rope_fwd: function(&rope, "rope_fwd")?,
            swiglu_fwd: function(&activation, "swiglu_fwd")?,
            gelu_tanh_fwd: function(&activation, "gelu_tanh_fwd")?,
            attention_decode_paged_f32: function(&attention, "attention_decode_paged_f32")?,
            kv_cache_append_f32: function(&attention, "kv_cache_append_f32")?,
            attention_decode_paged: function(&attention, "attention_decode_paged")?,
            kv_cache_append: function(&attention, "kv_cache_append")?,
            logsoftmax_gather_fwd: function(&logsoftmax, "logsoftmax_gather_fwd")?,
            sample_rows: function(&sampling, "sample_rows")?,
            add_in_place: function(&reduce, "add_in_place")?,
            add_bias_rows: function(&reduce, "add_bias_rows")?,
        };
        Ok(Gpu {
            ordinal,
            arch,
            name,
            lt,
            blas,
            k,
            stream,
            ctx,
        })
    }

    pub(crate) fn ordinal(&self) -> usize {
        self.ordinal
    }

    pub(crate) fn arch(&self) -> &'static str {
        self.arch
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Makes this device's context current on the calling thread (cuBLAS uses the current
    /// context; a model may be called from any thread).
    pub(crate) fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(driver("binding the CUDA context"))
    }

    /// Waits for all queued work; reports an error a kernel raised.
    pub(crate) fn sync(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(driver("waiting for the GPU"))
    }

    /// Free and total device memory in bytes.
    pub(crate) fn memory(&self) -> Result<(usize, usize)> {
        self.ctx
            .mem_get_info()
            .map_err(driver("reading device memory"))
    }

    /// `n` zeros (at least one value: no zero-sized allocations).
    pub(crate) fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros::<T>(n.max(1))
            .map_err(driver("allocating device memory"))
    }

    /// A device copy of `values` (at least one value is allocated).
    pub(crate) fn upload<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        values: &[T],
    ) -> Result<CudaSlice<T>> {
        if values.is_empty() {
            return self.zeros(1);
        }
        self.stream
            .clone_htod(values)
            .map_err(driver("copying to the device"))
    }

    /// The first `n` values of `buf`, on the host (waits for the queued work).
    pub(crate) fn download<T: DeviceRepr + Default + Clone>(
        &self,
        buf: &CudaSlice<T>,
        n: usize,
    ) -> Result<Vec<T>> {
        need(buf, n, "download")?;
        let mut out = vec![T::default(); n];
        if n == 0 {
            return Ok(out);
        }
        let view = buf
            .try_slice(0..n)
            .ok_or_else(|| cuda_error("internal: download range"))?;
        self.stream
            .memcpy_dtoh(&view, &mut out[..])
            .map_err(driver("copying from the device"))?;
        self.sync()?;
        Ok(out)
    }

    /// `dst[dst_at..dst_at+n] = src[src_at..src_at+n]` on the device.
    pub(crate) fn copy_within(
        &self,
        src: &CudaSlice<f32>,
        src_at: usize,
        dst: &mut CudaSlice<f32>,
        dst_at: usize,
        n: usize,
    ) -> Result<()> {
        let bad = || cuda_error("internal: device copy out of range");
        let from = src.try_slice(src_at..src_at + n).ok_or_else(bad)?;
        let mut to = dst.try_slice_mut(dst_at..dst_at + n).ok_or_else(bad)?;
        self.stream
            .memcpy_dtod(&from, &mut to)
            .map_err(driver("copying on the device"))
    }

    /// `out[T, N] = x[T, K] · W[N, K]ᵀ` (row-major) through cuBLAS SGEMM (f32 in, f32
    /// accumulate). Row-major `out` is column-major `outᵀ [N, T]`, so cuBLAS computes
    /// `outᵀ = W · xᵀ`: A = W read transposed (column-major `[K, N]`, lda K), B = x
    /// (column-major `[K, T]`, ldb K), C = out (ldc N).
    pub(crate) fn gemm<X, W, O>(
        &self,
        out: &mut O,
        x: &X,
        w: &W,
        t: usize,
        n: usize,
        k: usize,
    ) -> Result<()>
    where
        X: DevicePtr<f32>,
        W: DevicePtr<f32>,
        O: DevicePtrMut<f32>,
    {
        self.gemm_scaled(out, x, w, (t, n, k), 1.0, 0.0)
    }

    /// `out = alpha · x · Wᵀ + beta · out`, shapes as [`Gpu::gemm`] (`(t, n, k)`).
    pub(crate) fn gemm_scaled<X, W, O>(
        &self,
        out: &mut O,
        x: &X,
        w: &W,
        (t, n, k): (usize, usize, usize),
        alpha: f32,
        beta: f32,
    ) -> Result<()>
    where
        X: DevicePtr<f32>,
        W: DevicePtr<f32>,
        O: DevicePtrMut<f32>,
    {
        if t == 0 || n == 0 || k == 0 {
            return Ok(());
        }
        need(x, t * k, "gemm x")?;
        need(w, n * k, "gemm w")?;
        need(out, t * n, "gemm out")?;
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: int(n, "gemm n")?,
            n: int(t, "gemm t")?,
            k: int(k, "gemm k")?,
            alpha,
            lda: int(k, "gemm k")?,
            ldb: int(k, "gemm k")?,
            beta,
            ldc: int(n, "gemm n")?,
        };
        // SAFETY: the sizes were checked above: W holds N·K values (read as the column-major
        // K×N matrix, transposed), x holds T·K (column-major K×T), out holds T·N (column-major
        // N×T); all three live on this handle's stream's device.
        unsafe { self.blas.gemm(cfg, w, x, out) }
            .map_err(|e| cuda_error(format!("cuBLAS SGEMM ({t}×{k} · {n}×{k}ᵀ): {e:?}")))
    }

    /// `out[T, N] = x[T, K] · W[N, K]ᵀ` for either storage of W: cuBLAS SGEMM for f32,
    /// `matmul_bf16w` (f32 activations, bf16 weights widened in shared memory, f32 sums) for
    /// bf16.
    pub(crate) fn matmul<X, O>(
        &self,
        out: &mut O,
        x: &X,
        w: &DMat,
        t: usize,
        n: usize,
        k: usize,
    ) -> Result<()>
    where
        X: DevicePtr<f32>,
        O: DevicePtrMut<f32>,
    {
        let w = match w {
            DMat::F32(w) => return self.gemm(out, x, w, t, n, k),
            DMat::Bf16(w) => w,
        };
        if t == 0 || n == 0 || k == 0 {
            return Ok(());
        }
        need(x, t * k, "matmul x")?;
        need(w, n * k, "matmul w")?;
        need(out, t * n, "matmul out")?;
        let (t_arg, n_arg, k_arg) = (
            int(t, "matmul t")?,
            int(n, "matmul n")?,
            int(k, "matmul k")?,
        );
        let grid_y = u32::try_from(t.div_ceil(MATMUL_TILE))
            .ok()
            .filter(|&g| g <= 65_535)
            .ok_or_else(|| cuda_error(format!("matmul of {t} rows exceeds the grid")))?;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(MATMUL_TILE) as u32, grid_y, 1),
            block_dim: (MATMUL_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // x and out may be views (`try_slice`): passed as their device addresses.
        let (x_ptr, _x_sync) = x.device_ptr(&self.stream);
        let (out_ptr, _out_sync) = out.device_ptr_mut(&self.stream);
        let mut l = self.stream.launch_builder(&self.k.matmul_bf16w);
        l.arg(&x_ptr)
            .arg(w)
            .arg(&out_ptr)
            .arg(&t_arg)
            .arg(&n_arg)
            .arg(&k_arg);
        // SAFETY: matmul_bf16w(const float* x, const bf16_t* w, float* y, int T, int N, int K);
        // x holds T·K values, w N·K, y T·N (checked); grid (⌈N/64⌉, ⌈T/64⌉) of 256 threads, the
        // tile sizes the kernel assumes; every access is bounds-checked in the kernel.
        unsafe { l.launch(cfg) }
            .map(drop)
            .map_err(driver("matmul_bf16w"))
    }

    /// `y[r, j] += b[j]` for `rows` rows of `n`.
    pub(crate) fn add_bias(
        &self,
        y: &mut CudaSlice<f32>,
        b: &CudaSlice<f32>,
        rows: usize,
        n: usize,
    ) -> Result<()> {
        need(y, rows * n, "bias out")?;
        need(b, n, "bias")?;
        let (rows_arg, n_arg) = (long(rows, "rows")?, int(n, "bias size")?);
        let mut l = self.stream.launch_builder(&self.k.add_bias_rows);
        l.arg(y).arg(b).arg(&rows_arg).arg(&n_arg);
        // SAFETY: add_bias_rows(float* y, const float* b, long long rows, int n); y holds
        // rows·n values and b n (checked above); grid-stride loop, any grid.
        unsafe { l.launch(elementwise(rows * n)) }
            .map(drop)
            .map_err(driver("add_bias_rows"))
    }

    /// `x += y` over `n` values.
    pub(crate) fn add(&self, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>, n: usize) -> Result<()> {
        need(x, n, "add x")?;
        need(y, n, "add y")?;
        let n_arg = long(n, "n")?;
        let mut l = self.stream.launch_builder(&self.k.add_in_place);
        l.arg(x).arg(y).arg(&n_arg);
        // SAFETY: add_in_place(float* x, const float* y, long long n); both hold n values.
        unsafe { l.launch(elementwise(n)) }
            .map(drop)
            .map_err(driver("add_in_place"))
    }

    /// `out[t] = table[ids[t]] (+ pos[positions[t]])` for `n_tokens` rows of `dim`. The ids and
    /// positions were checked on the host against the tables' row counts.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn embed(
        &self,
        out: &mut CudaSlice<f32>,
        table: &DMat,
        pos: Option<&DMat>,
        ids: &CudaSlice<i32>,
        positions: &CudaSlice<i32>,
        n_tokens: usize,
        dim: usize,
    ) -> Result<()> {
        need(out, n_tokens * dim, "embedding out")?;
        need(ids, n_tokens, "ids")?;
        need(positions, n_tokens, "positions")?;
        let (t_arg, d_arg) = (int(n_tokens, "tokens")?, int(dim, "hidden size")?);
        let mixed = || cuda_error("internal: token and position tables of different types");
        let (f, name) = match (table, pos) {
            (DMat::F32(_), None | Some(DMat::F32(_))) => {
                (&self.k.embedding_fwd_f32, "embedding_fwd_f32")
            }
            (DMat::Bf16(_), None | Some(DMat::Bf16(_))) => {
                (&self.k.embedding_fwd_bf16, "embedding_fwd_bf16")
            }
            _ => return Err(mixed()),
        };
        let mut l = self.stream.launch_builder(f);
        match table {
            DMat::F32(t) => l.arg(t),
            DMat::Bf16(t) => l.arg(t),
        };
        match pos {
            Some(DMat::F32(p)) => l.arg(p),
            Some(DMat::Bf16(p)) => l.arg(p),
            None => l.arg(&NULL),
        };
        l.arg(ids).arg(positions).arg(out).arg(&t_arg).arg(&d_arg);
        // SAFETY: embedding_fwd_{f32,bf16}(const T* table, const T* pos (nullable),
        // const int* ids, const int* positions, float* out, int n_tokens, int dim) with T
        // matching both tables (checked above); one block per token; ids < vocab and
        // positions < rows of pos were checked by the caller.
        unsafe { l.launch(per_row(n_tokens, ROW_THREADS)) }
            .map(drop)
            .map_err(driver(name))
    }

    /// RMSNorm of `rows` rows of `dim`: `y = x / rms(x) · w`.
    pub(crate) fn rmsnorm(
        &self,
        y: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        need(x, rows * dim, "norm x")?;
        need(y, rows * dim, "norm y")?;
        need(w, dim, "norm w")?;
        let (r_arg, d_arg) = (int(rows, "rows")?, int(dim, "hidden size")?);
        let mut l = self.stream.launch_builder(&self.k.rmsnorm_fwd);
        l.arg(x)
            .arg(w)
            .arg(y)
            .arg(&NULL)
            .arg(&r_arg)
            .arg(&d_arg)
            .arg(&eps);
        // SAFETY: rmsnorm_fwd(const float* x, const float* w, float* y, float* rstd (null:
        // not kept), int rows, int dim, float eps); one block of 256 threads per row.
        unsafe { l.launch(per_row(rows, ROW_THREADS)) }
            .map(drop)
            .map_err(driver("rmsnorm_fwd"))
    }

    /// LayerNorm of `rows` rows of `dim`: `y = (x − mean) / std · w + b`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn layernorm(
        &self,
        y: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        need(x, rows * dim, "norm x")?;
        need(y, rows * dim, "norm y")?;
        need(w, dim, "norm w")?;
        need(b, dim, "norm b")?;
        let (r_arg, d_arg) = (int(rows, "rows")?, int(dim, "hidden size")?);
        let mut l = self.stream.launch_builder(&self.k.layernorm_fwd);
        l.arg(x)
            .arg(w)
            .arg(b)
            .arg(y)
            .arg(&NULL)
            .arg(&NULL)
            .arg(&r_arg)
            .arg(&d_arg)
            .arg(&eps);
        // SAFETY: layernorm_fwd(const float* x, const float* w, const float* b, float* y,
        // float* mean_out (null), float* rstd_out (null), int rows, int dim, float eps); one
        // block of 256 threads per row.
        unsafe { l.launch(per_row(rows, ROW_THREADS)) }
            .map(drop)
            .map_err(driver("layernorm_fwd"))
    }

    /// RoPE (rotate-half) in place on `x` = `[n_tokens, heads, head_dim]`.
    pub(crate) fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        positions: &CudaSlice<i32>,
        inv_freq: &CudaSlice<f32>,
        n_tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        let shape = (n_tokens, heads, head_dim);
        self.rope_with(&self.k.rope_fwd, "rope_fwd", x, positions, inv_freq, shape)
    }

    /// Launches `rope_fwd` or `rope_bwd` (the transpose), which share one signature:
    /// `(float* x, const int* positions, const float* inv_freq, int n_tokens, int heads,
    /// int head_dim)`, in place on `x` = `[n_tokens, heads, head_dim]`, one block per token.
    pub(super) fn rope_with(
        &self,
        kernel: &CudaFunction,
        name: &'static str,
        x: &mut CudaSlice<f32>,
        positions: &CudaSlice<i32>,
        inv_freq: &CudaSlice<f32>,
        (n_tokens, heads, head_dim): (usize, usize, usize),
    ) -> Result<()> {
        need(x, n_tokens * heads * head_dim, "rope x")?;
        need(positions, n_tokens, "positions")?;
        need(inv_freq, head_dim / 2, "inv_freq")?;
        let (t_arg, h_arg, d_arg) = (
            int(n_tokens, "tokens")?,
            int(heads, "heads")?,
            int(head_dim, "head_dim")?,
        );
        let mut l = self.stream.launch_builder(kernel);
        l.arg(x)
            .arg(positions)
            .arg(inv_freq)
            .arg(&t_arg)
            .arg(&h_arg)
            .arg(&d_arg);
        // SAFETY: the signature above (both kernels); sizes checked above; one block per token.
        unsafe { l.launch(per_row(n_tokens, ROW_THREADS)) }
            .map(drop)
            .map_err(driver(name))
    }

    /// `out = silu(gate) · up` over `n` values.
    pub(crate) fn swiglu(
        &self,
        out: &mut CudaSlice<f32>,
        gate: &CudaSlice<f32>,
        up: &CudaSlice<f32>,
        n: usize,
    ) -> Result<()> {
        need(out, n, "swiglu out")?;
        need(gate, n, "swiglu gate")?;
        need(up, n, "swiglu up")?;
        let n_arg = long(n, "n")?;
        let mut l = self.stream.launch_builder(&self.k.swiglu_fwd);
        l.arg(gate).arg(up).arg(out).arg(&n_arg);
        // SAFETY: swiglu_fwd(const float* gate, const float* up, float* out, long long n).
        unsafe { l.launch(elementwise(n)) }
            .map(drop)
            .map_err(driver("swiglu_fwd"))
    }

    /// `out = gelu_tanh(x)` over `n` values.
    pub(crate) fn gelu(
        &self,
        out: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        n: usize,
    ) -> Result<()> {
        need(out, n, "gelu out")?;
        need(x, n, "gelu x")?;
        let n_arg = long(n, "n")?;
        let mut l = self.stream.launch_builder(&self.k.gelu_tanh_fwd);
        l.arg(x).arg(out).arg(&n_arg);
        // SAFETY: gelu_tanh_fwd(const float* x, float* out, long long n).
        unsafe { l.launch(elementwise(n)) }
            .map(drop)
            .map_err(driver("gelu_tanh_fwd"))
    }

    /// Writes the K and V rows of `n_tokens` tokens (`[n_tokens, kv_dim]` each) into rows
    /// `slots[t]` of the caches (`[cache_slots, kv_dim]`, f32 or bf16); every slot value is
    /// below `cache_slots` (the caller's `Plan` checked it).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn kv_append(
        &self,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        k_cache: &mut KvBuf,
        v_cache: &mut KvBuf,
        slots: &CudaSlice<i32>,
        n_tokens: usize,
        hkv: usize,
        head_dim: usize,
        cache_slots: usize,
    ) -> Result<()> {
        let kvd = hkv * head_dim;
        need(k, n_tokens * kvd, "k")?;
        need(v, n_tokens * kvd, "v")?;
        need(slots, n_tokens, "slots")?;
        if k_cache.len() < cache_slots * kvd || v_cache.len() < cache_slots * kvd {
            return Err(cuda_error("internal: KV cache smaller than its slots"));
        }
        let (t_arg, h_arg, d_arg) = (
            int(n_tokens, "tokens")?,
            int(hkv, "kv heads")?,
            int(head_dim, "head_dim")?,
        );
        let (f, name) = match (&*k_cache, &*v_cache) {
            (KvBuf::F32(_), KvBuf::F32(_)) => (&self.k.kv_cache_append_f32, "kv_cache_append_f32"),
            (KvBuf::Bf16(_), KvBuf::Bf16(_)) => (&self.k.kv_cache_append, "kv_cache_append"),
            _ => return Err(cuda_error("internal: K and V caches of different types")),
        };
        let mut l = self.stream.launch_builder(f);
        l.arg(k).arg(v);
        match (k_cache, v_cache) {
            (KvBuf::F32(kc), KvBuf::F32(vc)) => l.arg(kc).arg(vc),
            (KvBuf::Bf16(kc), KvBuf::Bf16(vc)) => l.arg(kc).arg(vc),
            _ => return Err(cuda_error("internal: K and V caches of different types")),
        };
        l.arg(slots).arg(&t_arg).arg(&h_arg).arg(&d_arg);
        // SAFETY: kv_cache_append{_f32}(const float* k, const float* v, T* k_cache,
        // T* v_cache, const int* slots, int n_tokens, int hkv, int head_dim) with T = float or
        // bf16_t matching the buffers; one block per token; every slot is < cache_slots and
        // both caches hold cache_slots × kv_dim values (checked).
        unsafe { l.launch(per_row(n_tokens, ROW_THREADS)) }
            .map(drop)
            .map_err(driver(name))
    }

    /// Causal attention of `rows` packed query rows (`q`: `[rows, hq, head_dim]`) against a
    /// paged cache (f32 or bf16; blocks of `KV_BLOCK` positions): row `r` reads positions
    /// `0..context_lens[r]` through the blocks listed in row `row_seq[r]` of `tables`
    /// (`[sequences, max_blocks]`). `out`: `[rows, hq, head_dim]`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention(
        &self,
        out: &mut CudaSlice<f32>,
        q: &CudaSlice<f32>,
        (k_cache, v_cache): (&KvBuf, &KvBuf),
        (tables, row_seq, max_blocks): (&CudaSlice<i32>, &CudaSlice<i32>, usize),
        context_lens: &CudaSlice<i32>,
        rows: usize,
        heads: (usize, usize),
        head_dim: usize,
    ) -> Result<()> {
        let (hq, hkv) = heads;
        if head_dim > 256 || hkv == 0 || hq % hkv != 0 {
            return Err(cuda_error(format!(
                "attention with {hq} query heads over {hkv} KV heads of size {head_dim} is not \
                 supported (head_dim ≤ 256, whole groups)"
            )));
        }
        need(q, rows * hq * head_dim, "q")?;
        need(out, rows * hq * head_dim, "attention out")?;
        need(row_seq, rows, "row sequences")?;
        need(context_lens, rows, "context lengths")?;
        // The caches' bounds (blocks in the pool, positions within a sequence's blocks) are
        // the caller's: `model::Plan` checks them.
        let (hq_arg, hkv_arg, d_arg, bs_arg, mb_arg) = (
            int(hq, "heads")?,
            int(hkv, "kv heads")?,
            int(head_dim, "head_dim")?,
            int(KV_BLOCK, "block size")?,
            int(max_blocks, "blocks per sequence")?,
        );
        let scale = 1.0f32 / (head_dim as f32).sqrt();
        let (f, name) = match (k_cache, v_cache) {
            (KvBuf::F32(_), KvBuf::F32(_)) => (
                &self.k.attention_decode_paged_f32,
                "attention_decode_paged_f32",
            ),
            (KvBuf::Bf16(_), KvBuf::Bf16(_)) => {
                (&self.k.attention_decode_paged, "attention_decode_paged")
            }
            _ => return Err(cuda_error("internal: K and V caches of different types")),
        };
        let mut l = self.stream.launch_builder(f);
        l.arg(q);
        match (k_cache, v_cache) {
            (KvBuf::F32(kc), KvBuf::F32(vc)) => l.arg(kc).arg(vc),
            (KvBuf::Bf16(kc), KvBuf::Bf16(vc)) => l.arg(kc).arg(vc),
            _ => return Err(cuda_error("internal: K and V caches of different types")),
        };
        l.arg(tables)
            .arg(row_seq)
            .arg(context_lens)
            .arg(out)
            .arg(&hq_arg)
            .arg(&hkv_arg)
            .arg(&d_arg)
            .arg(&bs_arg)
            .arg(&mb_arg)
            .arg(&scale);
        let cfg = LaunchConfig {
            grid_dim: (rows.max(1) as u32, hq as u32, 1),
            block_dim: (DECODE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: attention_decode_paged{_f32}(const float* q, const T* k_cache,
        // const T* v_cache, const int* block_tables, const int* row_seq,
        // const int* context_lens, float* out, int hq, int hkv, int head_dim, int block_size,
        // int max_blocks, float scale) with T matching the caches; grid (rows, hq), exactly 4
        // warps per block as the kernel's shared arrays assume; head_dim ≤ 256; row r reads
        // blocks tables[row_seq[r]][p / KV_BLOCK] for p < context_lens[r]: row_seq[r] is a
        // row of `tables` (sequences × max_blocks values) and every entry is a block of the
        // pool, all checked by the caller's Plan.
        unsafe { l.launch(cfg) }.map(drop).map_err(driver(name))
    }

    /// Per row of `logits` (`[rows, vocab]`): `log softmax(x / temp)[targets[r]]` (0 where
    /// the target is negative) into `logp`.
    pub(crate) fn logsoftmax_gather(
        &self,
        logp: &mut CudaSlice<f32>,
        logits: &CudaSlice<f32>,
        targets: &CudaSlice<i32>,
        rows: usize,
        vocab: usize,
        temp: f32,
    ) -> Result<()> {
        need(logits, rows * vocab, "logits")?;
        need(targets, rows, "targets")?;
        need(logp, rows, "log-probs")?;
        let (r_arg, v_arg) = (int(rows, "rows")?, int(vocab, "vocab")?);
        let mut l = self.stream.launch_builder(&self.k.logsoftmax_gather_fwd);
        l.arg(logits)
            .arg(targets)
            .arg(logp)
            .arg(&NULL)
            .arg(&NULL)
            .arg(&r_arg)
            .arg(&v_arg)
            .arg(&temp);
        // SAFETY: logsoftmax_gather_fwd(const float* logits, const int* targets, float* logp,
        // float* lse_out (null), float* entropy (null), int rows, int vocab, float temp); one
        // block of 256 threads per row; the kernel ignores targets outside 0..vocab.
        unsafe { l.launch(per_row(rows, ROW_THREADS)) }
            .map(drop)
            .map_err(driver("logsoftmax_gather_fwd"))
    }

    /// One token per row of `logits` (`[rows, vocab]`) into `tokens`: argmax at `temp` 0, else
    /// a draw from `softmax(x / temp)` after top-k / top-p, with the uniform number from
    /// (`seed`, `streams[r]`, `step`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn sample(
        &self,
        tokens: &mut CudaSlice<i32>,
        logits: &CudaSlice<f32>,
        streams: &CudaSlice<u64>,
        rows: usize,
        vocab: usize,
        seed: u64,
        step: u64,
        temp: f32,
        top_k: usize,
        top_p: f32,
    ) -> Result<()> {
        need(logits, rows * vocab, "logits")?;
        need(streams, rows, "streams")?;
        need(tokens, rows, "tokens")?;
        let (r_arg, v_arg) = (int(rows, "rows")?, int(vocab, "vocab")?);
        // top_k ≥ vocab keeps everything, as 0 does.
        let k_arg = i32::try_from(top_k).unwrap_or(0);
        let mut l = self.stream.launch_builder(&self.k.sample_rows);
        l.arg(logits)
            .arg(&r_arg)
            .arg(&v_arg)
            .arg(streams)
            .arg(&seed)
            .arg(&step)
            .arg(&temp)
            .arg(&k_arg)
            .arg(&top_p)
            .arg(tokens)
            .arg(&NULL);
        // SAFETY: sample_rows(const float* logits, int rows, int vocab,
        // const unsigned long long* streams, unsigned long long seed, unsigned long long step,
        // float temp, int top_k, float top_p, int* tokens, float* logprobs (null)); one block
        // of exactly 1024 threads per row, as its shared arrays assume.
        unsafe { l.launch(per_row(rows, SAMPLE_THREADS)) }
            .map(drop)
            .map_err(driver("sample_rows"))
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // Queued work may still read buffers owned elsewhere; wait for it (errors are moot
        // here: the device is being released).
        let _ = self.stream.synchronize();
    }
}

#[cfg(test)]
mod tests {
    use super::arch_for;

    #[test]
    fn architecture_is_the_largest_known_at_most_sm90() {
        for ((major, minor), want) in [
            ((7, 0), "sm_70"),
            ((7, 5), "sm_75"),
            ((8, 0), "sm_80"),
            ((8, 6), "sm_86"),
            ((8, 7), "sm_86"),
            ((8, 9), "sm_89"),
            ((9, 0), "sm_90"),
            ((10, 0), "sm_90"),
            ((12, 0), "sm_90"),
        ] {
            assert_eq!(arch_for(major, minor).unwrap(), want, "{major}.{minor}");
        }
        assert!(arch_for(6, 1).is_err());
    }
}
