//! Training with bf16 compute (`TrainConfig::compute = ComputeDtype::Bf16`): the matrix products
//! of the training forward and backward — every linear layer and the LM head — take
//! bf16-rounded operands and sum in f32 ([`crate::backend::cpu::bf16_gemm`]); everything else
//! (norms, attention, activations, the loss, gradients as stored, AdamW and the master weights)
//! stays f32. This is PyTorch's CPU bf16 autocast applied to the linear layers, with f32
//! outputs.
//!
//! The weights' bf16 copies are packed once per optimizer step, in the two layouts the
//! products read ([`LinearPanels`]); the activations are converted at each product.

use crate::backend::cpu::bf16_gemm::{
    gemm_bf16, interleave_rows, to_pair_rows, Bf16Panel, PairsA, PairsB,
};
use crate::backend::cpu::matmul::bias_backward;

use super::weights::ModelWeights;

/// Indices into a layer's panels (the order of `Layer::linears`).
pub(crate) const Q: usize = 0;
pub(crate) const K: usize = 1;
pub(crate) const V: usize = 2;
pub(crate) const O: usize = 3;
/// First MLP matrix (`fc` or `gate`); the next ones follow.
pub(crate) const MLP: usize = 4;

thread_local! {
    /// Conversion buffers of the activations, reused from product to product: fresh ones each
    /// time would cost a page fault per 4 KiB on every call.
    static BUFFERS: std::cell::RefCell<[Vec<u32>; 2]> = const {
        std::cell::RefCell::new([Vec::new(), Vec::new()])
    };
}

/// Runs `f` with this thread's two conversion buffers (fresh ones if they are in use).
fn with_buffers<R>(f: impl FnOnce(&mut Vec<u32>, &mut Vec<u32>) -> R) -> R {
    BUFFERS.with(|cell| match cell.try_borrow_mut() {
        Ok(mut bufs) => {
            let [a, b] = &mut *bufs;
            let out = f(a, b);
            // Layer-sized buffers stay; a large one (the LM head's, vocabulary-wide) is freed,
            // so no worker thread keeps one between steps.
            for buf in [a, b] {
                if buf.capacity() > KEPT_BUFFER_VALUES {
                    *buf = Vec::new();
                }
            }
            out
        }
        Err(_) => f(&mut Vec::new(), &mut Vec::new()),
    })
}

/// The most values (32 MiB) a thread's conversion buffer keeps between products.
const KEPT_BUFFER_VALUES: usize = 8 << 20;

/// A weight `w (n, k)` packed for `x · wᵀ` (`fwd`) and for `dout · w` (`bwd`).
#[derive(Debug)]
pub(crate) struct LinearPanels {
    fwd: Bf16Panel,
    bwd: Bf16Panel,
    n: usize,
    k: usize,
}

impl LinearPanels {
    pub(crate) fn new(w: &[f32], n: usize, k: usize) -> Self {
        LinearPanels {
            fwd: Bf16Panel::transposed(w, n, k),
            bwd: Bf16Panel::direct(w, n, k),
            n,
            k,
        }
    }

    /// Packs `w` (same shape) again into this memory.
    fn refill(&mut self, w: &[f32]) {
        self.fwd.fill_transposed(w, self.n, self.k);
        self.bwd.fill_direct(w, self.n, self.k);
    }

    /// `out (t, n) = x (t, k) · wᵀ + bias`.
    pub(crate) fn forward(&self, out: &mut [f32], x: &[f32], bias: Option<&[f32]>, t: usize) {
        let (n, k) = (self.n, self.k);
        with_buffers(|xa, _| {
            to_pair_rows(xa, &x[..t * k], t, k);
            let a = PairsA {
                data: xa,
                row_stride: k.div_ceil(2),
                col_stride: 1,
            };
            gemm_bf16(
                &mut out[..t * n],
                n,
                false,
                a,
                self.fwd.as_b(),
                t,
                n,
                self.fwd.pairs(),
            );
        });
        if let Some(b) = bias {
            for row in out[..t * n].chunks_exact_mut(n) {
                for (o, b) in row.iter_mut().zip(b) {
                    *o += b;
                }
            }
        }
    }

    /// Backward of [`LinearPanels::forward`]: writes `dx = dout · w`, accumulates `dw +=
    /// doutᵀ · x` and `db += Σ_t dout`.
    pub(crate) fn backward(
        &self,
        dx: Option<&mut [f32]>,
        dw: Option<&mut [f32]>,
        db: Option<&mut [f32]>,
        dout: &[f32],
        x: &[f32],
        t: usize,
    ) {
        let (n, k) = (self.n, self.k);
        let dout = &dout[..t * n];
        with_buffers(|first, second| {
            if let Some(dx) = dx {
                to_pair_rows(first, dout, t, n);
                let a = PairsA {
                    data: first,
                    row_stride: n.div_ceil(2),
                    col_stride: 1,
                };
                gemm_bf16(
                    &mut dx[..t * k],
                    k,
                    false,
                    a,
                    self.bwd.as_b(),
                    t,
                    k,
                    self.bwd.pairs(),
                );
            }
            if let Some(dw) = dw {
                interleave_rows(first, dout, t, n);
                interleave_rows(second, &x[..t * k], t, k);
                let a = PairsA {
                    data: first,
                    row_stride: 1,
                    col_stride: n,
                };
                gemm_bf16(
                    &mut dw[..n * k],
                    k,
                    true,
                    a,
                    PairsB::interleaved(second, k),
                    n,
                    k,
                    t.div_ceil(2),
                );
            }
        });
        if let Some(db) = db {
            bias_backward(db, dout, t, n);
        }
    }
}

/// The bf16 copies a Trainer lends its model for one gradient call. A clone of the model does
/// not get them (it would keep using copies that go stale).
#[derive(Default)]
pub(crate) struct LentCopies(pub(crate) Option<std::sync::Arc<Bf16Weights>>);

impl Clone for LentCopies {
    fn clone(&self) -> Self {
        LentCopies(None)
    }
}

/// The packed bf16 copies of a model's matrices for one optimizer step.
#[derive(Debug)]
pub(crate) struct Bf16Weights {
    /// Per layer, in `Layer::linears` order ([`Q`], [`K`], [`V`], [`O`], then [`MLP`]…).
    pub(crate) layers: Vec<Vec<LinearPanels>>,
    /// The LM head (the embedding when tied); `None` for a model without one.
    pub(crate) head: Option<LinearPanels>,
}

impl Bf16Weights {
    pub(crate) fn new(w: &ModelWeights, has_lm_head: bool) -> Self {
        let panels = |t: &crate::tensor::Tensor| {
            let shape = t.shape();
            LinearPanels::new(t.as_slice(), shape[0], shape[1])
        };
        Bf16Weights {
            layers: w
                .layers
                .iter()
                .map(|layer| layer.linears().iter().map(|l| panels(&l.w)).collect())
                .collect(),
            head: has_lm_head.then(|| panels(w.lm_head())),
        }
    }

    /// Packs the current values of `w` into the same memory (no fresh pages after each
    /// optimizer step); false, and nothing changed, when `w`'s matrices are not the shapes
    /// these copies were made for.
    pub(crate) fn refill(&mut self, w: &ModelWeights) -> bool {
        let same_shape =
            |p: &LinearPanels, t: &crate::tensor::Tensor| t.shape() == [p.n, p.k].as_slice();
        let layers_match = self.layers.len() == w.layers.len()
            && self.layers.iter().zip(&w.layers).all(|(panels, layer)| {
                let linears = layer.linears();
                panels.len() == linears.len()
                    && panels.iter().zip(linears).all(|(p, l)| same_shape(p, &l.w))
            });
        if !layers_match
            || self
                .head
                .as_ref()
                .is_some_and(|h| !same_shape(h, w.lm_head()))
        {
            return false;
        }
        for (panels, layer) in self.layers.iter_mut().zip(&w.layers) {
            for (p, l) in panels.iter_mut().zip(layer.linears()) {
                p.refill(l.w.as_slice());
            }
        }
        if let Some(h) = self.head.as_mut() {
            h.refill(w.lm_head().as_slice());
        }
        true
    }
}
