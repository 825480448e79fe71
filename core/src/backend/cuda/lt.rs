//! cuBLASLt for the products that carry a bias (GPT-2's linear maps, Qwen2's q/k/v): `out =
//! x·Wᵀ + b` in one call through the BIAS epilogue, instead of an SGEMM and a separate bias
//! kernel that reads and writes `out` again. f32 compute (no TF32), as the SGEMM path. A
//! shape's descriptor, layouts and the heuristic's algorithm are made once and kept (a decode
//! step runs the same few shapes every token); only the bias pointer is set per call.
//!
//! cudarc's safe cuBLASLt wrapper computes f32 products in TF32 and panics in its destructors,
//! so this calls its `result` layer directly, with small RAII guards whose destructors ignore
//! errors. Without libcublasLt (or when the heuristic offers no algorithm) the caller falls
//! back to SGEMM + `add_bias_rows`.
//!
//! Not yet run on a GPU: compiled and type-checked only.

use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use super::cuda_error;
use super::gpu::need;
use crate::error::Result;

/// Workspace offered to cuBLASLt's algorithms (NVIDIA's recommendation for Hopper; enough
/// for the others).
const WORKSPACE_BYTES: usize = 32 << 20;

/// Shapes whose plans are kept before the cache starts over.
const MAX_PLANS: usize = 512;

/// What one product shape needs, made once (descriptor, layouts, the heuristic's algorithm).
struct Plan {
    desc: Desc,
    a: Layout,
    b: Layout,
    d: Layout,
    algo: Option<sys::cublasLtMatmulAlgo_t>,
}

/// A cuBLASLt handle, its workspace on one stream, and the plans of the shapes seen.
pub(crate) struct Lt {
    // Emptied in Drop before the handle goes (descriptors and layouts do not belong to a
    // handle in cuBLASLt, but nothing of this handle's outlives it that way).
    plans: Mutex<HashMap<(usize, usize, usize), Plan>>,
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    stream: Arc<CudaStream>,
}

// SAFETY: the handle is used only under the model's lock (one call at a time), on its stream;
// cuBLASLt handles may be used from any thread.
unsafe impl Send for Lt {}
// SAFETY: as above: every use is serialised by the owning model's lock.
unsafe impl Sync for Lt {}

impl Drop for Lt {
    fn drop(&mut self) {
        self.plans
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        // SAFETY: the handle was created by cublasLtCreate and is destroyed once, here.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

struct Desc(sys::cublasLtMatmulDesc_t);
impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtMatmulDescCreate, destroyed once.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}

struct Layout(sys::cublasLtMatrixLayout_t);
impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtMatrixLayoutCreate, destroyed once.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}

struct Pref(sys::cublasLtMatmulPreference_t);
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtMatmulPreferenceCreate, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

fn lt_error(what: &str) -> impl FnOnce(lt::CublasError) -> crate::error::Error + '_ {
    move |e| cuda_error(format!("cuBLASLt {what}: {e:?}"))
}

/// Sets one attribute of a matmul description from a plain value.
///
/// # Safety
/// `T` must be the attribute's documented type.
unsafe fn set_desc<T>(
    desc: &Desc,
    attr: sys::cublasLtMatmulDescAttributes_t,
    value: &T,
) -> Result<()> {
    // SAFETY: `value` points to a live T of the size passed; the caller vouches for the type.
    unsafe {
        lt::set_matmul_desc_attribute(
            desc.0,
            attr,
            value as *const T as *const c_void,
            size_of::<T>(),
        )
    }
    .map_err(lt_error("descriptor attribute"))
}

impl Lt {
    /// A handle on `stream`, or None when libcublasLt cannot be loaded (the caller then uses
    /// SGEMM and a bias kernel).
    pub(crate) fn new(stream: &Arc<CudaStream>) -> Result<Option<Lt>> {
        // SAFETY: only tries to dlopen the library by name; no symbol is called.
        if !unsafe { sys::is_culib_present() } {
            return Ok(None);
        }
        let handle = lt::create_handle().map_err(lt_error("handle"))?;
        let workspace = match stream.alloc_zeros::<u8>(WORKSPACE_BYTES) {
            Ok(w) => w,
            Err(e) => {
                // SAFETY: created just above, destroyed once.
                let _ = unsafe { lt::destroy_handle(handle) };
                return Err(cuda_error(format!("cuBLASLt workspace: {e}")));
            }
        };
        Ok(Some(Lt {
            plans: Mutex::new(HashMap::new()),
            handle,
            workspace,
            stream: stream.clone(),
        }))
    }

    /// The descriptor, layouts and algorithm of one shape (`algo` None: cuBLASLt offers none).
    fn plan(&self, t: usize, n: usize, k: usize) -> Result<Plan> {
        let (t64, n64, k64) = (t as u64, n as u64, k as u64);
        let f32_type = sys::cudaDataType_t::CUDA_R_32F;
        let desc = Desc(
            lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, f32_type)
                .map_err(lt_error("descriptor"))?,
        );
        // SAFETY: each attribute gets its documented type: TRANSA/TRANSB a cublasOperation_t
        // (i32), EPILOGUE a cublasLtEpilogue_t. (The bias pointer is set per call.)
        unsafe {
            use sys::cublasLtMatmulDescAttributes_t as A;
            set_desc(&desc, A::CUBLASLT_MATMUL_DESC_TRANSA, &1i32)?;
            set_desc(&desc, A::CUBLASLT_MATMUL_DESC_TRANSB, &0i32)?;
            set_desc(
                &desc,
                A::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            )?;
        }
        let layout = |rows: u64, cols: u64, ld: u64| -> Result<Layout> {
            lt::create_matrix_layout(f32_type, rows, cols, ld as i64)
                .map(Layout)
                .map_err(lt_error("layout"))
        };
        let (a, b, d) = (
            layout(k64, n64, k64)?,
            layout(k64, t64, k64)?,
            layout(n64, t64, n64)?,
        );
        let pref = Pref(lt::create_matmul_pref().map_err(lt_error("preference"))?);
        let ws = WORKSPACE_BYTES as u64;
        // SAFETY: MAX_WORKSPACE_BYTES takes a u64.
        unsafe {
            lt::set_matmul_pref_attribute(
                pref.0,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                size_of::<u64>(),
            )
        }
        .map_err(lt_error("preference attribute"))?;
        // SAFETY: every descriptor and layout is live (guards above); the heuristic only
        // reads them. The algorithm it picks does not depend on the bias pointer's value.
        let algo = unsafe {
            lt::get_matmul_algo_heuristic(self.handle, desc.0, a.0, b.0, d.0, d.0, pref.0)
        }
        .ok()
        .map(|h| h.algo);
        Ok(Plan {
            desc,
            a,
            b,
            d,
            algo,
        })
    }

    /// `out[T, N] = x[T, K] · W[N, K]ᵀ + b[N]` (row-major) in one cuBLASLt call; `Ok(false)`
    /// when cuBLASLt offers no algorithm for the shape (nothing was written: the caller runs
    /// the SGEMM path). Column-major, as the SGEMM path: `outᵀ [N, T] = op(W) · xᵀ` with W
    /// read transposed (`K × N`, ld K), x as `K × T` (ld K), out `N × T` (ld N), and the bias
    /// added to every column (length N = the rows of D).
    /// Whole allocations only (cudarc's are 256-byte aligned, which the heuristic's default
    /// alignment preferences assume).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn linear_bias(
        &self,
        out: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        t: usize,
        n: usize,
        k: usize,
    ) -> Result<bool> {
        if t == 0 || n == 0 || k == 0 {
            return Ok(true);
        }
        need(x, t * k, "matmul x")?;
        need(w, n * k, "matmul w")?;
        need(b, n, "bias")?;
        need(out, t * n, "matmul out")?;
        let stream = &self.stream;
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        if !plans.contains_key(&(t, n, k)) {
            // T varies with the batch: keep the cache bounded.
            if plans.len() >= MAX_PLANS {
                plans.clear();
            }
            let plan = self.plan(t, n, k)?;
            plans.insert((t, n, k), plan);
        }
        let Some(plan) = plans.get(&(t, n, k)) else {
            return Err(cuda_error("internal: cuBLASLt plan not kept"));
        };
        let Some(algo) = &plan.algo else {
            return Ok(false);
        };
        let (bias_ptr, _bias_sync) = b.device_ptr(stream);
        // SAFETY: BIAS_POINTER takes a device pointer (u64), here to N f32 values (checked
        // above), alive until the call below returns (the sync guard is held); the plan's
        // descriptor is used by this call only (the model's lock serialises calls).
        unsafe {
            set_desc(
                &plan.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &bias_ptr,
            )?
        };
        let (desc, a_l, b_l, d_l) = (&plan.desc, &plan.a, &plan.b, &plan.d);
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (w_ptr, _w_sync) = w.device_ptr(stream);
        let (x_ptr, _x_sync) = x.device_ptr(stream);
        let (o_ptr, _o_sync) = out.device_ptr_mut(stream);
        let (ws_ptr, _ws_sync) = self.workspace.device_ptr(stream);
        // SAFETY: A = W (N·K values), B = x (T·K), C = D = out (T·N), all checked above and
        // on this stream's device; the layouts describe exactly those shapes; the workspace
        // holds WORKSPACE_BYTES, the most the preference allowed; alpha/beta are f32 as the
        // f32 scale type requires; C with beta 0 is only written.
        unsafe {
            lt::matmul(
                self.handle,
                desc.0,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                w_ptr as *const c_void,
                a_l.0,
                x_ptr as *const c_void,
                b_l.0,
                o_ptr as *const c_void,
                d_l.0,
                o_ptr as *mut c_void,
                d_l.0,
                algo,
                ws_ptr as *mut c_void,
                WORKSPACE_BYTES,
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(lt_error("matmul"))?;
        Ok(true)
    }
}
