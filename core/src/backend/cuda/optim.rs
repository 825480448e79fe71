//! The optimizer on the device: the Trainer of a CUDA model keeps AdamW's moments next to the
//! weights (f32, as the CPU's), accumulates micro-batches' gradients there, takes the global
//! gradient norm there, and runs `adamw_step` on every backbone tensor; only the updated
//! weights come back to the host (one copy per step, so the host model — what checkpoints,
//! clones and the CPU read — stays current). Score and value heads (one row of `C` values
//! each) train on the host, as they are computed there.
//!
//! The device tensors are listed in `ModelWeights::params_mut` order (the backbone's prefix
//! of it): `DGrads::flat` and `DWeights::flat_mut` below must keep that order.
//!
//! Not yet run on a GPU: compiled and type-checked only.

use cudarc::driver::{CudaFunction, CudaSlice, PushKernelArg};

use super::super::super::cuda_error;
use super::super::super::gpu::{driver, elementwise, function, load_module, long, need};
use super::super::{CudaModel, DLinear, DMlp, DNorm, DWeights};
use super::{DGrads, GLinear, GNorm};
use crate::error::Result;
use crate::model::{Gradients, ModelWeights};

/// Blocks of the gradient-norm kernel (its blocks meet in one f64 atomic each).
const NORM_BLOCKS: u32 = 1024;

/// The optimizer's kernels (loaded on the first step).
pub(in crate::backend::cuda) struct OptimKernels {
    adamw_step: CudaFunction,
    axpy_in_place: CudaFunction,
    scale_in_place: CudaFunction,
    sum_squares: CudaFunction,
}

/// Gradients of the tensors a CUDA model holds (the backbone, or with LoRA the adapters),
/// kept on the device (in a Trainer's step); whether the base was frozen.
pub struct DeviceGrads(DGrads, bool);

impl std::fmt::Debug for DeviceGrads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceGrads")
            .field("tensors", &self.0.flat().len())
            .finish()
    }
}

impl DeviceGrads {
    pub(super) fn new(g: DGrads, base_frozen: bool) -> DeviceGrads {
        DeviceGrads(g, base_frozen)
    }

    /// True when these are LoRA adapters' gradients (the base was frozen).
    pub(crate) fn base_frozen(&self) -> bool {
        self.1
    }

    /// The number of tensors (the backbone's prefix of `params_mut`).
    pub(crate) fn tensor_count(&self) -> usize {
        self.0.flat().len()
    }
}

/// AdamW's first and second moments of a CUDA model's backbone, on the device.
pub struct DeviceMoments {
    m: DGrads,
    v: DGrads,
}

impl DeviceMoments {
    /// The number of tensors (the backbone's prefix of `params_mut`).
    pub(crate) fn tensor_count(&self) -> usize {
        self.m.flat().len()
    }
}

impl std::fmt::Debug for DeviceMoments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceMoments")
            .field("tensors", &self.m.flat().len())
            .finish()
    }
}

/// One AdamW step's settings (torch.optim.AdamW): `grad_scale` multiplies every gradient
/// first (the clipping factor); `bias1 = 1 − β₁ᵗ`, `bias2 = 1 − β₂ᵗ`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub bias1: f32,
    pub bias2: f32,
    pub grad_scale: f32,
}

impl GLinear {
    fn push<'a>(&'a self, out: &mut Vec<&'a CudaSlice<f32>>) {
        out.extend(self.w.as_ref());
        out.extend(self.b.as_ref());
        if let Some((a, b)) = &self.lora {
            out.push(a);
            out.push(b);
        }
    }

    fn push_mut<'a>(&'a mut self, out: &mut Vec<&'a mut CudaSlice<f32>>) {
        out.extend(self.w.as_mut());
        out.extend(self.b.as_mut());
        if let Some((a, b)) = &mut self.lora {
            out.push(a);
            out.push(b);
        }
    }
}

impl GNorm {
    fn push<'a>(&'a self, out: &mut Vec<&'a CudaSlice<f32>>) {
        out.extend(self.w.as_ref());
        out.extend(self.b.as_ref());
    }

    fn push_mut<'a>(&'a mut self, out: &mut Vec<&'a mut CudaSlice<f32>>) {
        out.extend(self.w.as_mut());
        out.extend(self.b.as_mut());
    }
}

impl DGrads {
    /// Every tensor in `ModelWeights::params_mut` order.
    pub(in crate::backend::cuda) fn flat(&self) -> Vec<&CudaSlice<f32>> {
        let mut out: Vec<&CudaSlice<f32>> = self.tok_emb.iter().collect();
        out.extend(self.pos_emb.as_ref());
        for l in &self.layers {
            l.attn_norm.push(&mut out);
            for g in [&l.q, &l.k, &l.v, &l.o] {
                g.push(&mut out);
            }
            l.mlp_norm.push(&mut out);
            for g in &l.mlp {
                g.push(&mut out);
            }
        }
        self.final_norm.push(&mut out);
        out.extend(self.lm_head.as_ref());
        out
    }

    fn flat_mut(&mut self) -> Vec<&mut CudaSlice<f32>> {
        let mut out: Vec<&mut CudaSlice<f32>> = self.tok_emb.iter_mut().collect();
        out.extend(self.pos_emb.as_mut());
        for l in &mut self.layers {
            l.attn_norm.push_mut(&mut out);
            for g in [&mut l.q, &mut l.k, &mut l.v, &mut l.o] {
                g.push_mut(&mut out);
            }
            l.mlp_norm.push_mut(&mut out);
            for g in &mut l.mlp {
                g.push_mut(&mut out);
            }
        }
        self.final_norm.push_mut(&mut out);
        out.extend(self.lm_head.as_mut());
        out
    }
}

impl DWeights {
    /// Every trainable tensor with its weight-decay flag, in `ModelWeights::params_mut` order
    /// (decay on linear weights, an untied LM head and LoRA adapters, as there); with LoRA
    /// (`frozen`) the adapters alone. The optimizer needs f32 storage (a Trainer's device copy
    /// always is).
    fn flat_mut(&mut self, frozen: bool) -> Result<Vec<(&mut CudaSlice<f32>, bool)>> {
        type Out<'a> = Vec<(&'a mut CudaSlice<f32>, bool)>;
        fn lin<'a>(l: &'a mut DLinear, frozen: bool, out: &mut Out<'a>) -> Result<()> {
            if !frozen {
                out.push((l.w.f32_mut()?, true));
                if let Some(b) = l.b.as_mut() {
                    out.push((b, false));
                }
            }
            if let Some(ad) = l.lora.as_mut() {
                out.push((&mut ad.a, true));
                out.push((&mut ad.b, true));
            }
            Ok(())
        }
        fn norm<'a>(n: &'a mut DNorm, frozen: bool, out: &mut Out<'a>) {
            match n {
                _ if frozen => {}
                DNorm::Rms { w } => out.push((w, false)),
                DNorm::Layer { w, b } => {
                    out.push((w, false));
                    out.push((b, false));
                }
            }
        }
        let mut out: Out<'_> = Vec::new();
        if !frozen {
            out.push((self.tok_emb.f32_mut()?, false));
            if let Some(p) = self.pos_emb.as_mut() {
                out.push((p.f32_mut()?, false));
            }
        }
        for l in &mut self.layers {
            norm(&mut l.attn_norm, frozen, &mut out);
            for g in [&mut l.q, &mut l.k, &mut l.v, &mut l.o] {
                lin(g, frozen, &mut out)?;
            }
            norm(&mut l.mlp_norm, frozen, &mut out);
            match &mut l.mlp {
                DMlp::Gelu { fc, proj } => {
                    lin(fc, frozen, &mut out)?;
                    lin(proj, frozen, &mut out)?;
                }
                DMlp::SwiGlu { gate, up, down } => {
                    lin(gate, frozen, &mut out)?;
                    lin(up, frozen, &mut out)?;
                    lin(down, frozen, &mut out)?;
                }
            }
        }
        norm(&mut self.final_norm, frozen, &mut out);
        if let (false, Some(h)) = (frozen, self.lm_head.as_mut()) {
            out.push((h.f32_mut()?, true));
        }
        Ok(out)
    }
}

impl CudaModel {
    fn optim_kernels(&self) -> Result<&OptimKernels> {
        if let Some(k) = self.optim.get() {
            return Ok(k);
        }
        let (ctx, arch) = (&self.gpu.ctx, self.gpu.arch());
        let adamw = load_module(ctx, arch, "adamw")?;
        let reduce = load_module(ctx, arch, "reduce")?;
        let k = OptimKernels {
            adamw_step: function(&adamw, "adamw_step")?,
            axpy_in_place: function(&reduce, "axpy_in_place")?,
            scale_in_place: function(&reduce, "scale_in_place")?,
            sum_squares: function(&reduce, "sum_squares")?,
        };
        // Calls are serialised by `enter`; a lost race would only drop a duplicate.
        let _ = self.optim.set(k);
        self.optim
            .get()
            .ok_or_else(|| cuda_error("internal: optimizer kernels not kept"))
    }

    /// Zeroed moments shaped like the backbone's weights.
    pub(crate) fn zero_moments(&self) -> Result<DeviceMoments> {
        let _guard = self.enter()?;
        Ok(DeviceMoments {
            m: self.zero_grads()?,
            v: self.zero_grads()?,
        })
    }

    /// `acc += a · g`, tensor by tensor.
    pub(crate) fn grads_axpy(&self, acc: &mut DeviceGrads, g: &DeviceGrads, a: f32) -> Result<()> {
        let _guard = self.enter()?;
        let k = self.optim_kernels()?;
        let (dst, src) = (acc.0.flat_mut(), g.0.flat());
        if dst.len() != src.len() {
            return Err(cuda_error("internal: gradients of two models accumulated"));
        }
        for (x, y) in dst.into_iter().zip(src) {
            let n = x.len();
            need(y, n, "accumulated gradient")?;
            let n_arg = long(n, "n")?;
            let mut l = self.gpu.stream.launch_builder(&k.axpy_in_place);
            l.arg(x).arg(y).arg(&n_arg).arg(&a);
            // SAFETY: axpy_in_place(float* x, const float* y, long long n, float a); both hold
            // at least n values (checked).
            unsafe { l.launch(elementwise(n)) }
                .map(drop)
                .map_err(driver("axpy_in_place"))?;
        }
        Ok(())
    }

    /// A second device copy of `g`.
    pub(crate) fn grads_copy(&self, g: &DeviceGrads) -> Result<DeviceGrads> {
        let mut out = {
            let _guard = self.enter()?;
            DeviceGrads(self.zero_grads()?, g.1)
        };
        self.grads_axpy(&mut out, g, 1.0)?;
        Ok(out)
    }

    /// `g *= a`, every tensor.
    pub(crate) fn grads_scale(&self, g: &mut DeviceGrads, a: f32) -> Result<()> {
        let _guard = self.enter()?;
        let k = self.optim_kernels()?;
        for x in g.0.flat_mut() {
            let n = x.len();
            let n_arg = long(n, "n")?;
            let mut l = self.gpu.stream.launch_builder(&k.scale_in_place);
            l.arg(x).arg(&n_arg).arg(&a);
            // SAFETY: scale_in_place(float* x, long long n, float a); x holds n values.
            unsafe { l.launch(elementwise(n)) }
                .map(drop)
                .map_err(driver("scale_in_place"))?;
        }
        Ok(())
    }

    /// `Σ g²` over every tensor (each tensor's blocks meet in f64 on the device; tensors are
    /// summed in f64 on the host, in order).
    pub(crate) fn grads_sum_squares(&self, g: &DeviceGrads) -> Result<f64> {
        let _guard = self.enter()?;
        let k = self.optim_kernels()?;
        let tensors = g.0.flat();
        let mut sums = self.gpu.zeros::<f64>(tensors.len())?;
        for (i, x) in tensors.into_iter().enumerate() {
            let n = x.len();
            let n_arg = long(n, "n")?;
            let mut out = sums
                .try_slice_mut(i..i + 1)
                .ok_or_else(|| cuda_error("internal: norm slot"))?;
            let mut l = self.gpu.stream.launch_builder(&k.sum_squares);
            l.arg(x).arg(&n_arg).arg(&mut out);
            // A few blocks per multiprocessor: each block adds its sum with one f64 atomic.
            let mut cfg = elementwise(n);
            cfg.grid_dim.0 = cfg.grid_dim.0.min(NORM_BLOCKS);
            // SAFETY: sum_squares(const float* x, long long n, double* out), a grid-stride
            // loop; x holds n values, out one; the block size (256) is a multiple of 32 as
            // block_sum requires.
            unsafe { l.launch(cfg) }
                .map(drop)
                .map_err(driver("sum_squares"))?;
        }
        let n = sums.len();
        Ok(self.gpu.download(&sums, n)?.iter().sum())
    }

    /// The backbone part of host gradients (`Gradients::flat` order; the first
    /// `tensor_count` tensors) copied to the device; the rest (heads) stays on the host.
    pub(crate) fn upload_grads(&self, host: &Gradients) -> Result<DeviceGrads> {
        let _guard = self.enter()?;
        let mut d = self.zero_grads()?;
        let src = host.flat();
        let dst = d.flat_mut();
        if src.len() < dst.len() {
            return Err(cuda_error("gradients do not match this model"));
        }
        for (x, y) in dst.into_iter().zip(src) {
            self.gpu.store(x, y, "gradient")?;
        }
        Ok(DeviceGrads(d, self.base_frozen()))
    }

    /// One AdamW step of every backbone tensor on the device, in place.
    pub(crate) fn adamw(
        &mut self,
        moments: &mut DeviceMoments,
        g: &DeviceGrads,
        s: AdamStep,
    ) -> Result<()> {
        self.optim_kernels()?;
        let guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.gpu.bind()?;
        let k = self
            .optim
            .get()
            .ok_or_else(|| cuda_error("internal: optimizer kernels not kept"))?;
        let stream = self.gpu.stream.clone();
        let frozen = self.base_frozen();
        let params = self.w.flat_mut(frozen)?;
        let (ms, vs, gs) = (moments.m.flat_mut(), moments.v.flat_mut(), g.0.flat());
        if params.len() != gs.len() || ms.len() != gs.len() || vs.len() != gs.len() {
            return Err(cuda_error(
                "internal: optimizer state does not match the model",
            ));
        }
        for (((p, decay), (m, v)), gr) in params.into_iter().zip(ms.into_iter().zip(vs)).zip(gs) {
            let n = p.len();
            need(gr, n, "gradient")?;
            need(&*m, n, "first moment")?;
            need(&*v, n, "second moment")?;
            let n_arg = long(n, "n")?;
            let wd = if decay { s.weight_decay } else { 0.0 };
            let null: u64 = 0;
            let mut l = stream.launch_builder(&k.adamw_step);
            l.arg(p)
                .arg(gr)
                .arg(m)
                .arg(v)
                .arg(&null)
                .arg(&n_arg)
                .arg(&s.lr)
                .arg(&s.beta1)
                .arg(&s.beta2)
                .arg(&s.eps)
                .arg(&wd)
                .arg(&s.bias1)
                .arg(&s.bias2)
                .arg(&s.grad_scale);
            // SAFETY: adamw_step(float* p, const float* g, float* m, float* v,
            // bf16_t* p_bf16, long long n, float lr, float beta1, float beta2, float eps,
            // float weight_decay, float bc1, float bc2, float grad_scale); p, g, m, v hold n
            // values (checked); p_bf16 is null (no bf16 copy).
            unsafe { l.launch(elementwise(n)) }
                .map(drop)
                .map_err(driver("adamw_step"))?;
        }
        drop(guard);
        Ok(())
    }

    /// Copies the device's backbone weights over the host's (`weights.named_params_mut`
    /// prefix), after an optimizer step on the device.
    pub(crate) fn download_weights(&mut self, weights: &mut ModelWeights) -> Result<()> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.gpu.bind()?;
        let g = &self.gpu;
        let frozen = self.base_frozen();
        let src = self.w.flat_mut(frozen)?;
        let mut dst = weights.named_params_mut();
        if dst.len() < src.len() {
            return Err(cuda_error("internal: the host model lost tensors"));
        }
        for ((d, _), (name, t, _)) in src.into_iter().zip(dst.iter_mut()) {
            let host = t.as_mut_slice();
            if host.len() != d.len() {
                return Err(cuda_error(format!(
                    "{name}: the host tensor has {} values, the device copy {}",
                    host.len(),
                    d.len()
                )));
            }
            g.fetch_into(d, host)?;
        }
        g.sync()
    }

    /// The moments on the host (`params_mut` order, backbone tensors only).
    pub(crate) fn moments_to_host(&self, mo: &DeviceMoments) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
        let _guard = self.enter()?;
        let mut out = Vec::new();
        for (m, v) in mo.m.flat().into_iter().zip(mo.v.flat()) {
            out.push((
                self.gpu.download(m, m.len())?,
                self.gpu.download(v, v.len())?,
            ));
        }
        Ok(out)
    }

    /// Overwrites the moments with host values (`params_mut` order, backbone tensors only;
    /// lengths checked).
    pub(crate) fn moments_from_host(
        &self,
        mo: &mut DeviceMoments,
        host: &[(Vec<f32>, Vec<f32>)],
    ) -> Result<()> {
        let _guard = self.enter()?;
        let (ms, vs) = (mo.m.flat_mut(), mo.v.flat_mut());
        if host.len() != ms.len() {
            return Err(cuda_error("optimizer state does not match the model"));
        }
        for ((m, v), (hm, hv)) in ms.into_iter().zip(vs).zip(host) {
            self.gpu.store(m, hm, "first moment")?;
            self.gpu.store(v, hv, "second moment")?;
        }
        self.gpu.sync()
    }
}
