//! The training backward pass: the forward run in reverse, layer by layer, calling each kernel's
//! `_backward` twin (llm.c style — no autograd graph). Parameter gradients accumulate (`+=`);
//! activation gradients are written.
//!
//! Every objective is a function of the selected (response) tokens' log-probs, entropies and
//! values ([`Model::token_objective_gradients`]). The LM head and log-softmax run over chunks of
//! selected rows in two passes (statistics, then gradients); the selected rows' logits are kept
//! between the passes when they fit a fixed budget and recomputed otherwise, and the full
//! `(T × V)` matrix over every position is never materialised.

use rayon::prelude::*;

use crate::backend::cpu::activation::{gelu_tanh_backward, silu_mul_backward};
use crate::backend::cpu::attention::{attention_backward, Heads, KvGrad, KvView, Slot};
use crate::backend::cpu::matmul::{matmul, matmul_backward};
use crate::backend::cpu::norm::{layernorm_backward, rmsnorm_backward};
use crate::backend::cpu::rope;
#[cfg(target_arch = "x86_64")]
use crate::backend::cpu::simd::Isa;
use crate::backend::cpu::simd::{dot, exp, isa};
use crate::backend::cpu::zeroed;
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;

use super::bf16_compute::{LinearPanels, K, MLP, O, Q, V};
use super::forward::{Scratch, Tape};
use super::lora::LoraGrad;
use super::weights::{Linear, Mlp, Norm};
use super::Model;

const LOSS_ROWS: usize = 32;

/// The most memory the training pass spends on keeping every selected row's logits between its
/// two passes (4 × 256 tokens of a 49k vocabulary need 176 MiB).
const KEPT_LOGITS_BYTES: usize = 512 << 20;

/// Tests lower the budget to run the recomputing path on small models.
#[cfg(test)]
static KEPT_LOGITS_OVERRIDE: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(usize::MAX);

fn kept_logits_budget() -> usize {
    #[cfg(test)]
    {
        let o = KEPT_LOGITS_OVERRIDE.load(std::sync::atomic::Ordering::Relaxed);
        if o != usize::MAX {
            return o;
        }
    }
    KEPT_LOGITS_BYTES
}

/// An objective of per-token log-probs: given each sequence's selected log-probs, returns the
/// loss and `∂loss/∂logp` of each.
pub type LogprobObjective<'a> = dyn FnMut(&[Vec<f64>]) -> Result<(f64, Vec<Vec<f64>>)> + Send + 'a;

/// What the forward produced at each selected token, per sequence and in order.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenOutputs {
    /// `log p(token | prefix)` at temperature 1.
    pub logp: Vec<Vec<f64>>,
    /// Entropy of the whole next-token distribution the token was drawn from.
    pub entropy: Vec<Vec<f64>>,
    /// The value head's estimate at the position that predicts the token (the state before
    /// it), when the model has a value head.
    pub value: Option<Vec<Vec<f64>>>,
}

/// `∂loss/∂` each of [`TokenOutputs`], same shapes; `None` stands for zeros.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenOutputGrads {
    pub logp: Vec<Vec<f64>>,
    pub entropy: Option<Vec<Vec<f64>>>,
    pub value: Option<Vec<Vec<f64>>>,
}

/// An objective of per-token outputs (PPO, GRPO): returns the loss and its gradients.
pub type TokenObjective<'a> =
    dyn FnMut(&TokenOutputs) -> Result<(f64, TokenOutputGrads)> + Send + 'a;

/// A token whose log-prob enters the objective: the packed row that predicts it, the token,
/// and its sequence.
struct Selected {
    row: usize,
    target: u32,
    seq: usize,
}

/// Gradient of one linear layer, laid out like its weights. With a frozen base (LoRA), `w` is
/// empty and `b` is `None`: nothing is computed for them.
#[derive(Debug, Clone)]
pub struct LinearGrad {
    pub w: Vec<f32>,
    pub b: Option<Vec<f32>>,
    pub lora: Option<LoraGrad>,
}

/// Gradient of one norm's scale (and shift, for LayerNorm); empty with a frozen base.
#[derive(Debug, Clone)]
pub struct NormGrad {
    pub w: Vec<f32>,
    pub b: Option<Vec<f32>>,
}

#[derive(Debug, Clone)]
pub struct LayerGrads {
    pub attn_norm: NormGrad,
    pub q: LinearGrad,
    pub k: LinearGrad,
    pub v: LinearGrad,
    pub o: LinearGrad,
    pub mlp_norm: NormGrad,
    /// `[fc, proj]` (GPT-2) or `[gate, up, down]` (Llama).
    pub mlp: Vec<LinearGrad>,
}

/// Gradients of every parameter, in the model's own layout (`[out, in]` linear weights).
#[derive(Debug, Clone)]
pub struct Gradients {
    pub tok_emb: Vec<f32>,
    pub pos_emb: Option<Vec<f32>>,
    pub layers: Vec<LayerGrads>,
    pub final_norm: NormGrad,
    /// `None` when the head is tied to the embedding (its gradient is in `tok_emb`).
    pub lm_head: Option<Vec<f32>>,
    /// `(1, C)` reward head, when the model has one.
    pub score: Option<Vec<f32>>,
    /// PPO value head (`w` then `b`), when the model has one.
    pub value: Option<LinearGrad>,
    /// The backbone's gradients when they stay on a CUDA device (a Trainer's own steps on a
    /// CUDA model): the host backbone vectors above are then empty.
    #[cfg(feature = "cuda")]
    pub(crate) device: Option<std::sync::Arc<crate::backend::cuda::DeviceGrads>>,
}

/// The memory of one training step's activations (the tape, the working buffers, the logits)
/// and gradients, handed from step to step by a Trainer: each step refills it instead of
/// faulting in fresh pages, and it stays in one place instead of moving between the allocator
/// arenas of whichever worker thread runs the step.
#[derive(Default)]
pub(crate) struct TrainingBuffers {
    tape: Tape,
    scratch: Scratch,
    hidden: Vec<f32>,
    logits: Vec<f32>,
    /// Gradients of an earlier step of the same model (so the same layout), zeroed before use.
    pub(crate) grads: Option<Gradients>,
}

impl TrainingBuffers {
    /// Bytes these buffers already hold: memory a step reuses rather than asks for.
    fn held_bytes(&self) -> u64 {
        let grads = self
            .grads
            .as_ref()
            .map_or(0, |g| g.flat().iter().map(|t| t.len() * 4).sum::<usize>());
        (self.tape.held_bytes()
            + self.scratch.held_bytes()
            + (self.hidden.capacity() + self.logits.capacity()) * 4
            + grads) as u64
    }

    /// Zeroed gradients of `model`: the recycled ones (same model, so same layout) or new.
    pub(crate) fn zeroed_gradients(&mut self, model: &Model) -> Gradients {
        match self.grads.take() {
            Some(mut g) => {
                g.fill_zero();
                g
            }
            None => Gradients::zeros(model),
        }
    }
}

/// Where a Trainer lends its [`TrainingBuffers`] to its model for one gradient call. A clone
/// of the model starts with an empty slot.
#[derive(Default)]
pub(crate) struct BufferSlot(std::sync::Mutex<Option<TrainingBuffers>>);

impl Clone for BufferSlot {
    fn clone(&self) -> Self {
        BufferSlot::default()
    }
}

impl BufferSlot {
    pub(crate) fn put(&self, buffers: TrainingBuffers) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(buffers);
        }
    }

    pub(crate) fn take(&self) -> Option<TrainingBuffers> {
        self.0.lock().ok().and_then(|mut slot| slot.take())
    }
}

fn zero_linear(l: &Linear, frozen: bool) -> LinearGrad {
    LinearGrad {
        w: if frozen {
            Vec::new()
        } else {
            zeroed(l.w.as_slice().len())
        },
        b: l.b
            .as_ref()
            .filter(|_| !frozen)
            .map(|b| vec![0.0; b.as_slice().len()]),
        lora: l.lora.as_ref().map(|ad| LoraGrad {
            a: vec![0.0; ad.a.as_slice().len()],
            b: vec![0.0; ad.b.as_slice().len()],
        }),
    }
}

fn zero_norm(n: &Norm, frozen: bool) -> NormGrad {
    if frozen {
        return NormGrad {
            w: Vec::new(),
            b: None,
        };
    }
    match n {
        Norm::Rms { w } => NormGrad {
            w: vec![0.0; w.as_slice().len()],
            b: None,
        },
        Norm::Layer { w, b } => NormGrad {
            w: vec![0.0; w.as_slice().len()],
            b: Some(vec![0.0; b.as_slice().len()]),
        },
    }
}

impl Gradients {
    /// Sets every value to zero (in parallel, in the vectors' own memory).
    pub(crate) fn fill_zero(&mut self) {
        self.flat_mut()
            .into_par_iter()
            .for_each(|g| g.par_chunks_mut(1 << 16).for_each(|c| c.fill(0.0)));
    }

    pub(crate) fn zeros(model: &Model) -> Self {
        Self::zeros_with(model, model.weights().base_frozen())
    }

    /// Zeros, with empty backbone tensors when `skip_backbone` (a frozen base, or a backbone
    /// whose gradients live on the device).
    pub(crate) fn zeros_with(model: &Model, skip_backbone: bool) -> Self {
        let w = model.weights();
        let frozen = skip_backbone;
        let zeros = |t: &crate::tensor::Tensor| {
            if frozen {
                Vec::new()
            } else {
                zeroed(t.as_slice().len())
            }
        };
        Gradients {
            tok_emb: zeros(&w.tok_emb),
            pos_emb: w.pos_emb.as_ref().filter(|_| !frozen).map(zeros),
            layers: w
                .layers
                .iter()
                .map(|l| LayerGrads {
                    attn_norm: zero_norm(&l.attn_norm, frozen),
                    q: zero_linear(&l.q, frozen),
                    k: zero_linear(&l.k, frozen),
                    v: zero_linear(&l.v, frozen),
                    o: zero_linear(&l.o, frozen),
                    mlp_norm: zero_norm(&l.mlp_norm, frozen),
                    mlp: match &l.mlp {
                        Mlp::Gelu { fc, proj } => {
                            vec![zero_linear(fc, frozen), zero_linear(proj, frozen)]
                        }
                        Mlp::SwiGlu { gate, up, down } => vec![
                            zero_linear(gate, frozen),
                            zero_linear(up, frozen),
                            zero_linear(down, frozen),
                        ],
                    },
                })
                .collect(),
            final_norm: zero_norm(&w.final_norm, frozen),
            lm_head: w.lm_head.as_ref().filter(|_| !frozen).map(zeros),
            score: w.score.as_ref().map(|h| vec![0.0; h.as_slice().len()]),
            value: w.value.as_ref().map(|v| zero_linear(v, false)),
            #[cfg(feature = "cuda")]
            device: None,
        }
    }

    /// Only the score and value heads' gradients (the rest empty): the host part of
    /// gradients whose other tensors stay on a CUDA device.
    #[cfg(feature = "cuda")]
    pub(crate) fn heads_only(model: &Model) -> Self {
        let mut g = Self::zeros_with(model, true);
        for l in &mut g.layers {
            for lin in [&mut l.q, &mut l.k, &mut l.v, &mut l.o]
                .into_iter()
                .chain(l.mlp.iter_mut())
            {
                lin.lora = None;
            }
        }
        g
    }

    /// True when the embedding, norms, linear weights and LM head get no gradient (LoRA).
    pub fn base_frozen(&self) -> bool {
        #[cfg(feature = "cuda")]
        if let Some(d) = &self.device {
            return d.base_frozen();
        }
        self.tok_emb.is_empty()
    }

    /// Every gradient, in the order of `ModelWeights::params_mut`.
    pub fn flat(&self) -> Vec<&[f32]> {
        let mut out: Vec<&[f32]> = vec![&self.tok_emb];
        if let Some(p) = &self.pos_emb {
            out.push(p);
        }
        fn norm<'a>(n: &'a NormGrad, out: &mut Vec<&'a [f32]>) {
            out.push(&n.w);
            if let Some(b) = &n.b {
                out.push(b);
            }
        }
        fn lin<'a>(g: &'a LinearGrad, out: &mut Vec<&'a [f32]>) {
            out.push(&g.w);
            if let Some(b) = &g.b {
                out.push(b);
            }
            if let Some(l) = &g.lora {
                out.push(&l.a);
                out.push(&l.b);
            }
        }
        for l in &self.layers {
            norm(&l.attn_norm, &mut out);
            for g in [&l.q, &l.k, &l.v, &l.o] {
                lin(g, &mut out);
            }
            norm(&l.mlp_norm, &mut out);
            for g in &l.mlp {
                lin(g, &mut out);
            }
        }
        norm(&self.final_norm, &mut out);
        if let Some(h) = &self.lm_head {
            out.push(h);
        }
        if let Some(h) = &self.score {
            out.push(h);
        }
        if let Some(v) = &self.value {
            lin(v, &mut out);
        }
        // A frozen base leaves its gradients empty; trainable tensors are never empty.
        out.retain(|g| !g.is_empty());
        out
    }

    /// Mutable views of every gradient, in [`Gradients::flat`] order.
    pub fn flat_mut(&mut self) -> Vec<&mut [f32]> {
        fn lin<'a>(l: &'a mut LinearGrad, out: &mut Vec<&'a mut [f32]>) {
            out.push(&mut l.w);
            if let Some(b) = l.b.as_mut() {
                out.push(b);
            }
            if let Some(lg) = l.lora.as_mut() {
                out.push(&mut lg.a);
                out.push(&mut lg.b);
            }
        }
        fn norm<'a>(n: &'a mut NormGrad, out: &mut Vec<&'a mut [f32]>) {
            out.push(&mut n.w);
            if let Some(b) = n.b.as_mut() {
                out.push(b);
            }
        }
        let mut out: Vec<&mut [f32]> = vec![&mut self.tok_emb];
        if let Some(p) = self.pos_emb.as_mut() {
            out.push(p);
        }
        for l in &mut self.layers {
            norm(&mut l.attn_norm, &mut out);
            for g in [&mut l.q, &mut l.k, &mut l.v, &mut l.o] {
                lin(g, &mut out);
            }
            norm(&mut l.mlp_norm, &mut out);
            for g in &mut l.mlp {
                lin(g, &mut out);
            }
        }
        norm(&mut self.final_norm, &mut out);
        if let Some(h) = self.lm_head.as_mut() {
            out.push(h);
        }
        if let Some(h) = self.score.as_mut() {
            out.push(h);
        }
        if let Some(v) = self.value.as_mut() {
            lin(v, &mut out);
        }
        out.retain(|g| !g.is_empty());
        out
    }

    /// Llama-family gradients under their HF parameter names.
    pub fn named_llama(&self) -> Vec<(String, &[f32])> {
        let mut out: Vec<(String, &[f32])> = vec![
            ("model.embed_tokens.weight".into(), &self.tok_emb),
            ("model.norm.weight".into(), &self.final_norm.w),
        ];
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".into(), h));
        }
        if let Some(h) = &self.score {
            out.push(("score.weight".into(), h));
        }
        if let Some(v) = &self.value {
            out.push((super::weights::VALUE_HEAD_WEIGHT.into(), &v.w));
            if let Some(b) = &v.b {
                out.push((super::weights::VALUE_HEAD_BIAS.into(), b));
            }
        }
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), &l.attn_norm.w));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                &l.mlp_norm.w,
            ));
            let lin = [
                ("self_attn.q_proj", &l.q),
                ("self_attn.k_proj", &l.k),
                ("self_attn.v_proj", &l.v),
                ("self_attn.o_proj", &l.o),
            ];
            let mlp_names = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"];
            for (n, g) in lin.into_iter().chain(mlp_names.into_iter().zip(&l.mlp)) {
                if !g.w.is_empty() {
                    out.push((format!("{p}.{n}.weight"), &g.w));
                }
                if let Some(b) = &g.b {
                    out.push((format!("{p}.{n}.bias"), b));
                }
                if let Some(lg) = &g.lora {
                    let peft = format!("base_model.model.{p}.{n}");
                    out.push((format!("{peft}.lora_A.weight"), &lg.a));
                    out.push((format!("{peft}.lora_B.weight"), &lg.b));
                }
            }
        }
        out.retain(|(_, g)| !g.is_empty());
        out
    }
}

/// `dx = dout · W`, `dW += doutᵀ · x`, `db += Σ dout` for one linear layer (no `dW`, `db`
/// for a frozen base), plus its LoRA adapter's gradients and input gradient. With bf16
/// compute (`panels`) the products run on the weight's bf16 copy.
fn linear_backward(
    mut dx: Option<&mut [f32]>,
    g: &mut LinearGrad,
    dout: &[f32],
    x: &[f32],
    l: &Linear,
    t: usize,
    panels: Option<&LinearPanels>,
) {
    let shape = l.w.shape();
    let (n, k) = (shape[0], shape[1]);
    let dw = (!g.w.is_empty()).then_some(g.w.as_mut_slice());
    match panels {
        Some(p) => p.backward(dx.as_deref_mut(), dw, g.b.as_deref_mut(), dout, x, t),
        None => matmul_backward(
            dx.as_deref_mut(),
            dw,
            g.b.as_deref_mut(),
            dout,
            x,
            l.w.as_slice(),
            t,
            n,
            k,
        ),
    }
    if let (Some(ad), Some(lg)) = (&l.lora, g.lora.as_mut()) {
        ad.backward(dx, lg, dout, x, t);
    }
}

impl Model {
    fn norm_backward(&self, norm: &Norm, g: &mut NormGrad, dx: &mut [f32], dy: &[f32], x: &[f32]) {
        let (c, eps) = (self.config().hidden_size, self.config().norm_eps);
        // A frozen norm still passes the gradient through; its own goes to a throwaway buffer.
        let mut spare_w = Vec::new();
        let mut spare_b = Vec::new();
        let dw = if g.w.is_empty() {
            spare_w.resize(c, 0.0);
            &mut spare_w
        } else {
            &mut g.w
        };
        match norm {
            Norm::Layer { w, .. } => {
                let db = match g.b.as_mut() {
                    Some(b) => b,
                    None => {
                        spare_b.resize(c, 0.0);
                        &mut spare_b
                    }
                };
                layernorm_backward(dx, dw, db, dy, x, w.as_slice(), c, eps)
            }
            Norm::Rms { w } => rmsnorm_backward(dx, dw, dy, x, w.as_slice(), c, eps),
        }
    }

    /// Supervised fine-tuning loss and the gradient of every parameter: mean cross-entropy
    /// (temperature 1) over the tokens selected by `masks` (one flag per token; token 0 cannot
    /// be selected). Returns `(loss, gradients)`.
    pub fn sft_gradients<S: AsRef<[u32]> + Sync>(
        &self,
        sequences: &[S],
        masks: &[Vec<bool>],
    ) -> Result<(f64, Gradients)> {
        self.logprob_objective_gradients(sequences, masks, &mut |logps: &[Vec<f64>]| {
            let n = logps.iter().map(Vec::len).sum::<usize>() as f64;
            let loss = -logps.iter().flatten().sum::<f64>() / n;
            let d = logps.iter().map(|s| vec![-1.0 / n; s.len()]).collect();
            Ok((loss, d))
        })
    }

    /// The gradient of any objective built on per-token log-probs (SFT, DPO):
    /// `objective` receives, for each sequence, the log-probs (temperature 1) of its selected
    /// tokens in order, and returns the loss and `∂loss/∂logp` for each of them.
    pub fn logprob_objective_gradients<S: AsRef<[u32]> + Sync>(
        &self,
        sequences: &[S],
        masks: &[Vec<bool>],
        objective: &mut LogprobObjective<'_>,
    ) -> Result<(f64, Gradients)> {
        self.token_objective_gradients(sequences, masks, &mut |out: &TokenOutputs| {
            let (loss, logp) = objective(&out.logp)?;
            Ok((
                loss,
                TokenOutputGrads {
                    logp,
                    ..Default::default()
                },
            ))
        })
    }

    /// The gradient of any objective built on the per-token log-probs, entropies and values
    /// of the tokens selected by `masks` (PPO, GRPO). One forward, then the LM head and
    /// log-softmax run twice over chunks of rows (values, then gradients) so no `(T × V)`
    /// matrix is kept.
    pub fn token_objective_gradients<S: AsRef<[u32]> + Sync>(
        &self,
        sequences: &[S],
        masks: &[Vec<bool>],
        objective: &mut TokenObjective<'_>,
    ) -> Result<(f64, Gradients)> {
        if sequences.is_empty() {
            return Err(Error::invalid("empty batch"));
        }
        self.require_lm_head()?;
        super::check_masks(sequences, masks)?;
        let mut rows: Vec<Selected> = Vec::new();
        let mut tokens: Vec<u32> = Vec::new();
        let mut slots: Vec<Slot> = Vec::new();
        for (i, (seq, mask)) in sequences.iter().zip(masks).enumerate() {
            let seq = seq.as_ref();
            self.check_tokens(seq, 0)?;
            let offset = tokens.len();
            for (t, &m) in mask.iter().enumerate().skip(1) {
                if m {
                    rows.push(Selected {
                        row: offset + t - 1,
                        target: seq[t],
                        seq: i,
                    });
                }
            }
            tokens.extend_from_slice(seq);
            slots.extend((0..seq.len()).map(|pos| Slot { seq: i, pos }));
        }
        if rows.is_empty() {
            return Err(Error::invalid("the masks select no tokens"));
        }
        #[cfg(feature = "cuda")]
        if let Some(gpu) = self.cuda()? {
            let lens: Vec<usize> = sequences.iter().map(|s| s.as_ref().len()).collect();
            let selected: Vec<(usize, u32, usize)> =
                rows.iter().map(|r| (r.row, r.target, r.seq)).collect();
            return gpu.token_objective_gradients(self, &tokens, &lens, &selected, objective);
        }
        self.install(|| self.objective_backward(sequences, &tokens, &slots, &rows, objective))
    }

    fn objective_backward<S: AsRef<[u32]>>(
        &self,
        sequences: &[S],
        tokens: &[u32],
        slots: &[Slot],
        rows: &[Selected],
        objective: &mut TokenObjective<'_>,
    ) -> Result<(f64, Gradients)> {
        let cfg = self.config();
        let w = self.weights();
        let (t, c, v) = (tokens.len(), cfg.hidden_size, cfg.vocab_size);
        // Buffers lent by a Trainer (see `TrainingBuffers`), or fresh ones; what they already
        // hold is not asked for again.
        let lent = self.training_buffers.take();
        let was_lent = lent.is_some();
        let mut lent = lent.unwrap_or_default();
        crate::memory::ensure_fits(
            training_bytes(self, t).saturating_sub(lent.held_bytes()),
            "the training step's activations",
        )?;
        let mut caches = sequences
            .iter()
            .map(|s| KvCache::new(cfg, s.as_ref().len()))
            .collect::<Result<Vec<_>>>()?;
        let mut s = std::mem::take(&mut lent.scratch);
        let mut tape = std::mem::take(&mut lent.tape);
        tape.checkpointed = self.gradient_checkpointing();
        self.forward_taped(tokens, slots, &mut caches, &mut s, Some(&mut tape))?;
        let mut grads = lent.zeroed_gradients(self);
        let head = w.lm_head();
        let head_panels = self.bf16_compute.0.as_deref().and_then(|b| b.head.as_ref());
        // The logits of every selected row stay from the statistics pass to the gradient pass
        // when they fit in KEPT_LOGITS_BYTES (PyTorch holds them all): then each pass is one
        // product over all of them, so the head (and its gradient) is streamed once, not once
        // per LOSS_ROWS rows. Otherwise blocks of LOSS_ROWS rows are recomputed in the second
        // pass. Either way each output gets the same chain of operations.
        let keep = rows.len().saturating_mul(v) <= kept_logits_budget() / 4;
        let block = if keep { rows.len().max(1) } else { LOSS_ROWS };
        let mut hidden = std::mem::take(&mut lent.hidden);
        let mut logits = std::mem::take(&mut lent.logits);
        for (buf, len) in [(&mut hidden, block * c), (&mut logits, block * v)] {
            buf.clear();
            buf.resize(len, 0.0);
        }
        // (max, log Σ exp, entropy) of each selected row's logits, kept between the passes.
        let mut norms: Vec<(f64, f64, f64)> = Vec::with_capacity(rows.len());
        let n_seq = sequences.len();
        let mut out = TokenOutputs {
            logp: vec![Vec::new(); n_seq],
            entropy: vec![Vec::new(); n_seq],
            value: w.value.as_ref().map(|_| vec![Vec::new(); n_seq]),
        };
        let chunk_logits = |chunk: &[Selected], hidden: &mut [f32], logits: &mut [f32]| {
            let m = chunk.len();
            for (i, sel) in chunk.iter().enumerate() {
                hidden[i * c..(i + 1) * c].copy_from_slice(&s.h[sel.row * c..(sel.row + 1) * c]);
            }
            match head_panels {
                Some(p) => p.forward(&mut logits[..m * v], &hidden[..m * c], None, m),
                None => matmul(
                    &mut logits[..m * v],
                    &hidden[..m * c],
                    head.as_slice(),
                    None,
                    m,
                    v,
                    c,
                ),
            }
        };
        for chunk in rows.chunks(block) {
            let m = chunk.len();
            let buf = &mut logits[..m * v];
            chunk_logits(chunk, &mut hidden, buf);
            let stats: Vec<(f64, f64, f64, f32)> = buf
                .par_chunks(v)
                .zip(chunk)
                .map(|(row, sel)| {
                    let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
                    let (mut z, mut zl) = (0f64, 0f64);
                    for &l in row {
                        let e = (l as f64 - max).exp();
                        z += e;
                        zl += e * (l as f64 - max);
                    }
                    let log_z = z.ln();
                    // H = −Σ p log p = log Z − E_p[l − max].
                    let entropy = log_z - zl / z;
                    // Rounded to f32 exactly as `logprobs` and `generate` report it, so a ratio
                    // against log-probs recorded at rollout time is exactly 1 (with f32
                    // compute; bf16 products move the log-probs slightly).
                    let logp = (row[sel.target as usize] as f64 - max - log_z) as f32;
                    (max, log_z, entropy, logp)
                })
                .collect();
            for (sel, (max, log_z, entropy, logp)) in chunk.iter().zip(stats) {
                norms.push((max, log_z, entropy));
                out.logp[sel.seq].push(logp as f64);
                out.entropy[sel.seq].push(entropy);
            }
        }
        if let (Some(values), Some(head)) = (out.value.as_mut(), w.value.as_ref()) {
            let bias = head
                .b
                .as_ref()
                .and_then(|b| b.as_slice().first().copied())
                .unwrap_or(0.0) as f64;
            for sel in rows {
                let h = &s.h[sel.row * c..(sel.row + 1) * c];
                values[sel.seq].push(dot(h, head.w.as_slice()) as f64 + bias);
            }
        }
        let (loss, d) = objective(&out)?;
        let same_shape = |g: &[Vec<f64>]| {
            g.len() == n_seq && g.iter().zip(&out.logp).all(|(a, b)| a.len() == b.len())
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
        let head_trainable = !grads.base_frozen();
        let mut dhf = vec![0f32; t * c];
        let mut dh_chunk = vec![0f32; block * c];
        let mut taken = vec![0usize; n_seq];
        for (ci, chunk) in rows.chunks(block).enumerate() {
            let m = chunk.len();
            if !keep {
                chunk_logits(chunk, &mut hidden, &mut logits);
            }
            // (With `keep` there is one block: `hidden` and `logits` still hold it.)
            let buf = &mut logits[..m * v];
            let coefs: Vec<(f64, f64, usize)> = chunk
                .iter()
                .map(|sel| {
                    let k = taken[sel.seq];
                    taken[sel.seq] += 1;
                    let dent = d.entropy.as_ref().map_or(0.0, |e| e[sel.seq][k]);
                    (d.logp[sel.seq][k], dent, sel.target as usize)
                })
                .collect();
            buf.par_chunks_mut(v).zip(&coefs).enumerate().for_each(
                |(i, (row, &(dlogp, dent, target)))| {
                    let (max, log_z, entropy) = norms[ci * block + i];
                    logit_gradients(row, (max + log_z) as f32, dlogp, dent, entropy, target);
                },
            );
            // The head's gradient accumulates straight into its buffer (the embedding's when tied).
            let dhead = match grads.lm_head.as_mut() {
                Some(h) => h.as_mut_slice(),
                None => grads.tok_emb.as_mut_slice(),
            };
            match head_panels {
                Some(p) => p.backward(
                    Some(&mut dh_chunk[..m * c]),
                    head_trainable.then_some(dhead),
                    None,
                    buf,
                    &hidden[..m * c],
                    m,
                ),
                None => matmul_backward(
                    Some(&mut dh_chunk[..m * c]),
                    head_trainable.then_some(dhead),
                    None,
                    buf,
                    &hidden[..m * c],
                    head.as_slice(),
                    m,
                    v,
                    c,
                ),
            }
            for (i, sel) in chunk.iter().enumerate() {
                dhf[sel.row * c..(sel.row + 1) * c].copy_from_slice(&dh_chunk[i * c..(i + 1) * c]);
            }
        }
        if let (Some(dv), Some(head), Some(g)) =
            (d.value.as_ref(), w.value.as_ref(), grads.value.as_mut())
        {
            taken.fill(0);
            for sel in rows {
                let k = taken[sel.seq];
                taken[sel.seq] += 1;
                let dvalue = dv[sel.seq][k] as f32;
                let h = &s.h[sel.row * c..(sel.row + 1) * c];
                for (dh, &wv) in dhf[sel.row * c..(sel.row + 1) * c]
                    .iter_mut()
                    .zip(head.w.as_slice())
                {
                    *dh += dvalue * wv;
                }
                for (gw, &hv) in g.w.iter_mut().zip(h) {
                    *gw += dvalue * hv;
                }
                if let Some(b) = g.b.as_mut().and_then(|b| b.first_mut()) {
                    *b += dvalue;
                }
            }
        }
        self.backbone_backward(tokens, slots, &caches, &tape, &dhf, &mut grads);
        // Back to the Trainer that lent them; a call outside a Trainer keeps nothing.
        if was_lent {
            self.training_buffers.put(TrainingBuffers {
                tape,
                scratch: s,
                hidden,
                logits,
                grads: None,
            });
        }
        Ok((loss, grads))
    }

    /// Runs the layers in reverse from `dhf`, the gradient of the final-normed hidden states
    /// `(T, C)`, accumulating every backbone parameter's gradient into `grads`.
    pub(crate) fn backbone_backward(
        &self,
        tokens: &[u32],
        slots: &[Slot],
        caches: &[KvCache],
        tape: &Tape,
        dhf: &[f32],
        grads: &mut Gradients,
    ) {
        let cfg = self.config();
        let w = self.weights();
        let (t, c, f) = (tokens.len(), cfg.hidden_size, cfg.intermediate_size);
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let heads = Heads {
            nh: cfg.num_heads,
            nkv: cfg.num_kv_heads,
            hs: cfg.head_dim,
        };

        let mut dx = vec![0f32; t * c];
        self.norm_backward(
            &w.final_norm,
            &mut grads.final_norm,
            &mut dx,
            dhf,
            &tape.x_final,
        );

        let mut d_act = vec![0f32; t * f];
        let mut dm1 = vec![0f32; t * f];
        let mut dm2 = vec![0f32; t * f];
        let mut dh = vec![0f32; t * c];
        let mut tmp = vec![0f32; t * c];
        let mut dnorm = vec![0f32; t * c];
        let mut d_att = vec![0f32; t * qd];
        let mut dq = vec![0f32; t * qd];
        let mut dk_rows = vec![0f32; t * kvd];
        let mut dv_rows = vec![0f32; t * kvd];
        let mut recompute_scratch = Scratch::default();
        for (l, layer) in w.layers.iter().enumerate().rev() {
            let recomputed;
            let lt = if tape.checkpointed {
                recomputed = self.recompute_layer(l, slots, caches, tape, &mut recompute_scratch);
                &recomputed
            } else {
                &tape.layers[l]
            };
            let x_in = &tape.layers[l].x_in;
            let g = &mut grads.layers[l];
            let panels = self.layer_panels(l);
            let panel = |i: usize| panels.map(|p| &p[i]);
            // MLP block: x_out = x_mid + out_proj(act).
            let (out_proj, out_grad) = match &layer.mlp {
                Mlp::Gelu { proj, .. } => (proj, 1),
                Mlp::SwiGlu { down, .. } => (down, 2),
            };
            linear_backward(
                Some(&mut d_act),
                &mut g.mlp[out_grad],
                &dx,
                &lt.act,
                out_proj,
                t,
                panel(MLP + out_grad),
            );
            match &layer.mlp {
                Mlp::Gelu { fc, .. } => {
                    gelu_tanh_backward(&mut dm1, &d_act, &lt.m1);
                    linear_backward(
                        Some(&mut dh),
                        &mut g.mlp[0],
                        &dm1,
                        &lt.h2,
                        fc,
                        t,
                        panel(MLP),
                    );
                }
                Mlp::SwiGlu { gate, up, .. } => {
                    silu_mul_backward(&mut dm1, &mut dm2, &d_act, &lt.m1, &lt.m2);
                    linear_backward(
                        Some(&mut dh),
                        &mut g.mlp[0],
                        &dm1,
                        &lt.h2,
                        gate,
                        t,
                        panel(MLP),
                    );
                    linear_backward(
                        Some(&mut tmp),
                        &mut g.mlp[1],
                        &dm2,
                        &lt.h2,
                        up,
                        t,
                        panel(MLP + 1),
                    );
                    add(&mut dh, &tmp);
                }
            }
            self.norm_backward(&layer.mlp_norm, &mut g.mlp_norm, &mut dnorm, &dh, &lt.x_mid);
            add(&mut dx, &dnorm); // now d x_mid

            // Attention block: x_mid = x_in + o(att).
            linear_backward(
                Some(&mut d_att),
                &mut g.o,
                &dx,
                &lt.att,
                &layer.o,
                t,
                panel(O),
            );
            let views: Vec<KvView<'_>> = caches
                .iter()
                .map(|cache| {
                    let (k, v) = cache.layer(l);
                    KvView { k, v }
                })
                .collect();
            let mut dk_bufs: Vec<Vec<f32>> = caches
                .iter()
                .map(|cache| vec![0f32; cache.capacity() * kvd])
                .collect();
            let mut dv_bufs: Vec<Vec<f32>> = dk_bufs.clone();
            {
                let mut dkv: Vec<KvGrad<'_>> = dk_bufs
                    .iter_mut()
                    .zip(dv_bufs.iter_mut())
                    .map(|(dk, dv)| KvGrad { dk, dv })
                    .collect();
                attention_backward(
                    &mut dq, &mut dkv, &d_att, &lt.att, &lt.q, slots, &views, heads,
                );
            }
            for (i, slot) in slots.iter().enumerate() {
                let at = slot.pos * kvd;
                dk_rows[i * kvd..(i + 1) * kvd].copy_from_slice(&dk_bufs[slot.seq][at..at + kvd]);
                dv_rows[i * kvd..(i + 1) * kvd].copy_from_slice(&dv_bufs[slot.seq][at..at + kvd]);
            }
            if let Some((cos, sin)) = &tape.rope {
                rope::apply_backward(&mut dq, cos, sin, heads.nh, heads.hs);
                rope::apply_backward(&mut dk_rows, cos, sin, heads.nkv, heads.hs);
            }
            linear_backward(Some(&mut dh), &mut g.q, &dq, &lt.h1, &layer.q, t, panel(Q));
            linear_backward(
                Some(&mut tmp),
                &mut g.k,
                &dk_rows,
                &lt.h1,
                &layer.k,
                t,
                panel(K),
            );
            add(&mut dh, &tmp);
            linear_backward(
                Some(&mut tmp),
                &mut g.v,
                &dv_rows,
                &lt.h1,
                &layer.v,
                t,
                panel(V),
            );
            add(&mut dh, &tmp);
            self.norm_backward(&layer.attn_norm, &mut g.attn_norm, &mut dnorm, &dh, x_in);
            add(&mut dx, &dnorm); // now d x_in
        }

        // Embeddings.
        if grads.base_frozen() {
            return;
        }
        for (i, (&tok, slot)) in tokens.iter().zip(slots).enumerate() {
            let row = &dx[i * c..(i + 1) * c];
            add(&mut grads.tok_emb[tok as usize * c..][..c], row);
            if let Some(dp) = grads.pos_emb.as_mut() {
                add(&mut dp[slot.pos * c..][..c], row);
            }
        }
    }
}
/// Turns one row of logits into `∂loss/∂logits` in place: `∂logp/∂l_j = 1[j = target] − p_j`,
/// `∂H/∂l_j = −p_j (log p_j + H)`, with `log p_j = l_j − shift` (`shift` = max + log Z from the
/// statistics pass, which stays in f64). In f32 with the vectorised [`exp`] (3e-7 relative):
/// the result is f32 anyway, and this runs once per vocabulary entry of every selected row.
fn logit_gradients(
    row: &mut [f32],
    shift: f32,
    dlogp: f64,
    dent: f64,
    entropy: f64,
    target: usize,
) {
    #[inline(always)]
    fn body(row: &mut [f32], shift: f32, dlogp: f32, dent: f32, entropy: f32) {
        for l in row.iter_mut() {
            let logp = *l - shift;
            let p = exp(logp);
            *l = -dlogp * p - dent * p * (logp + entropy);
        }
    }
    let (dlogp32, dent32, entropy32) = (dlogp as f32, dent as f32, entropy as f32);
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() reports AVX2 and FMA only after detecting them.
        Isa::Avx2Fma | Isa::Avx512 => unsafe { wide(row, shift, dlogp32, dent32, entropy32) },
        _ => body(row, shift, dlogp32, dent32, entropy32),
    }
    if let Some(l) = row.get_mut(target) {
        *l += dlogp32;
    }

    /// # Safety
    /// AVX2 and FMA are present.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn wide(row: &mut [f32], shift: f32, dlogp: f32, dent: f32, entropy: f32) {
        body(row, shift, dlogp, dent, entropy)
    }
}

pub(crate) fn add(a: &mut [f32], b: &[f32]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

/// What a training step over `t` tokens allocates beyond the weights: KV caches, the tape of
/// activations (all layers, or one layer's input each with checkpointing), the gradients (of
/// the trainable tensors only: with LoRA, the adapters), the kept logits (bounded), the
/// working buffers of one layer and the attention backward's score matrices.
fn training_bytes(model: &Model, t: usize) -> u64 {
    use crate::memory::f32_bytes;
    let cfg = model.config();
    let (c, qd, kvd, f) = (
        cfg.hidden_size,
        cfg.q_dim(),
        cfg.kv_dim(),
        cfg.intermediate_size,
    );
    let per_layer_full = 4 * c + 2 * qd + 3 * f;
    let per_layer = if model.gradient_checkpointing() {
        c
    } else {
        per_layer_full
    };
    f32_bytes(&[t, cfg.num_layers, 2 * kvd + per_layer])
        .saturating_add(f32_bytes(&[t, 4 * per_layer_full]))
        .saturating_add(f32_bytes(&[model.weights().trainable_parameter_count()]))
        .saturating_add(f32_bytes(&[t, cfg.vocab_size]).min(KEPT_LOGITS_BYTES as u64))
        // The attention backward's (L, L) score buffers, two per running task (L ≤ 2048).
        .saturating_add(f32_bytes(&[
            rayon::current_num_threads(),
            2,
            t.min(2048),
            t.min(2048),
        ]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LoadOptions;

    /// With every selected row's logits kept, the head runs as one product per pass; without,
    /// in blocks of LOSS_ROWS recomputed in the gradient pass. The gradients agree bit for bit
    /// (each output is the same chain of operations either way).
    #[test]
    fn recomputed_logit_blocks_give_the_kept_gradients() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama-f32");
        let model = Model::load(&dir, LoadOptions::default()).unwrap();
        // 2 × 60 tokens, 100 selected rows: four blocks of LOSS_ROWS when recomputed.
        let seqs: Vec<Vec<u32>> = (0..2u32)
            .map(|s| (0..60u32).map(|i| 1 + (i * 37 + s * 11) % 300).collect())
            .collect();
        let masks: Vec<Vec<bool>> = seqs
            .iter()
            .map(|q| (0..q.len()).map(|i| i >= 10).collect())
            .collect();
        let bits = |(loss, g): (f64, Gradients)| {
            let flat: Vec<Vec<u32>> = g
                .flat()
                .iter()
                .map(|t| t.iter().map(|v| v.to_bits()).collect())
                .collect();
            (loss.to_bits(), flat)
        };
        let kept = bits(model.sft_gradients(&seqs, &masks).unwrap());
        KEPT_LOGITS_OVERRIDE.store(0, std::sync::atomic::Ordering::Relaxed);
        let recomputed = model.sft_gradients(&seqs, &masks);
        KEPT_LOGITS_OVERRIDE.store(usize::MAX, std::sync::atomic::Ordering::Relaxed);
        assert!(kept == bits(recomputed.unwrap()));
        // Outside a Trainer a gradient call keeps none of its buffers.
        assert!(model.training_buffers.take().is_none());
    }
}
