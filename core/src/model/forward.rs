//! The decoder forward pass over a packed batch: tokens of several sequences concatenated, each
//! with its sequence and position (`Slot`). Prefill and decode are the same call: a prefill
//! passes a sequence's prompt, a decode step passes one token per sequence.

use crate::backend::cpu::activation::{add_inplace, gelu_tanh, silu_mul};
use crate::backend::cpu::attention::{attention, Heads, KvView, Slot};
use crate::backend::cpu::matmul::matmul;
use crate::backend::cpu::norm::{layernorm, rmsnorm};
use crate::backend::cpu::quant_matmul::QuantProduct;
use crate::backend::cpu::rope;
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;

use super::bf16_compute::{LinearPanels, K, MLP, O, Q, V};
use super::weights::{Layer, Linear, Mlp, Norm};
use super::Model;

/// Activation buffers for one call, reused across decode steps (`Vec::resize` keeps capacity).
#[derive(Default)]
pub(crate) struct Scratch {
    /// `(T, C)` residual stream.
    pub x: Vec<f32>,
    /// `(T, C)` normed input of a sub-block; after `forward`, the final-normed hidden states.
    pub h: Vec<f32>,
    /// `(T, NH·HS)`.
    q: Vec<f32>,
    /// `(T, NKV·HS)`.
    k: Vec<f32>,
    v: Vec<f32>,
    /// `(T, NH·HS)` attention output before the projection.
    att: Vec<f32>,
    /// `(T, C)` sub-block output before the residual add.
    out: Vec<f32>,
    /// `(T, F)` MLP hidden (and the SwiGLU `up` branch).
    m1: Vec<f32>,
    m2: Vec<f32>,
    positions: Vec<usize>,
    next_pos: Vec<usize>,
}

impl Scratch {
    /// Bytes its buffers hold (capacities).
    pub(crate) fn held_bytes(&self) -> usize {
        [
            &self.x, &self.h, &self.q, &self.k, &self.v, &self.att, &self.out, &self.m1, &self.m2,
        ]
        .iter()
        .map(|b| b.capacity() * 4)
        .sum()
    }

    /// Sizes every per-layer buffer (all but the residual stream `x`) for `t` tokens.
    fn resize_for(&mut self, cfg: &crate::config::ModelConfig, t: usize) {
        let (c, qd, kvd, f) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
        );
        self.h.resize(t * c, 0.0);
        self.q.resize(t * qd, 0.0);
        self.k.resize(t * kvd, 0.0);
        self.v.resize(t * kvd, 0.0);
        self.att.resize(t * qd, 0.0);
        self.out.resize(t * c, 0.0);
        self.m1.resize(t * f, 0.0);
        self.m2.resize(t * f, 0.0);
    }
}

/// Activations one layer keeps for its backward pass (each `(T, ·)`).
#[derive(Default)]
pub(crate) struct LayerTape {
    /// Residual stream entering the layer.
    pub x_in: Vec<f32>,
    /// Input of the q/k/v projections (attention norm output).
    pub h1: Vec<f32>,
    /// Queries after RoPE.
    pub q: Vec<f32>,
    /// Attention output before the o projection.
    pub att: Vec<f32>,
    /// Residual stream after the attention block.
    pub x_mid: Vec<f32>,
    /// Input of the MLP (MLP norm output).
    pub h2: Vec<f32>,
    /// GELU input (GPT-2) or SwiGLU gate before SiLU (Llama).
    pub m1: Vec<f32>,
    /// SwiGLU `up` branch (Llama only).
    pub m2: Vec<f32>,
    /// Input of the MLP's output projection.
    pub act: Vec<f32>,
}

/// Everything the training backward needs from one forward call.
#[derive(Default)]
pub(crate) struct Tape {
    pub layers: Vec<LayerTape>,
    /// Residual stream entering the final norm.
    pub x_final: Vec<f32>,
    /// RoPE tables of the call's positions.
    pub rope: Option<(Vec<f32>, Vec<f32>)>,
    /// Gradient checkpointing: `layers` keep only `x_in`; the backward pass recomputes the
    /// rest of each layer when it reaches it.
    pub checkpointed: bool,
}

impl LayerTape {
    fn held_bytes(&self) -> usize {
        [
            &self.x_in,
            &self.h1,
            &self.q,
            &self.att,
            &self.x_mid,
            &self.h2,
            &self.m1,
            &self.m2,
            &self.act,
        ]
        .iter()
        .map(|b| b.capacity() * 4)
        .sum()
    }
}

impl Tape {
    /// Bytes its vectors hold (capacities).
    pub(crate) fn held_bytes(&self) -> usize {
        self.layers.iter().map(LayerTape::held_bytes).sum::<usize>() + self.x_final.capacity() * 4
    }
}

impl Model {
    /// Runs all layers over `tokens`, appending their K/V to `caches[slot.seq]`; leaves the
    /// final-normed hidden states in `s.h` as `(T, C)`.
    pub(crate) fn forward(
        &self,
        tokens: &[u32],
        slots: &[Slot],
        caches: &mut [KvCache],
        s: &mut Scratch,
    ) -> Result<()> {
        self.forward_taped(tokens, slots, caches, s, None)
    }

    /// [`Model::forward`], optionally keeping every layer's activations for a backward pass.
    /// Inference and training share this one code path, which is what makes their log-probs
    /// identical.
    pub(crate) fn forward_taped(
        &self,
        tokens: &[u32],
        slots: &[Slot],
        caches: &mut [KvCache],
        s: &mut Scratch,
        mut tape: Option<&mut Tape>,
    ) -> Result<()> {
        let cfg = &self.config;
        let (t, c) = (tokens.len(), cfg.hidden_size);
        if slots.len() != t {
            return Err(Error::invalid("one slot per token is required"));
        }
        // Positions of each sequence must continue its cache without gaps.
        s.next_pos.clear();
        s.next_pos.extend(caches.iter().map(KvCache::len));
        for (&tok, slot) in tokens.iter().zip(slots) {
            if tok as usize >= cfg.vocab_size {
                return Err(Error::TokenOutOfRange {
                    id: tok,
                    vocab: cfg.vocab_size,
                });
            }
            let next = s
                .next_pos
                .get_mut(slot.seq)
                .ok_or_else(|| Error::invalid("slot names a missing sequence"))?;
            if slot.pos != *next {
                return Err(Error::invalid("token positions must continue the cache"));
            }
            if slot.pos >= caches[slot.seq].capacity() || slot.pos >= cfg.max_position_embeddings {
                return Err(Error::ContextOverflow {
                    requested: slot.pos + 1,
                    max: caches[slot.seq].capacity().min(cfg.max_position_embeddings),
                });
            }
            *next += 1;
        }
        let kvd = cfg.kv_dim();
        s.x.resize(t * c, 0.0);
        s.resize_for(cfg, t);
        s.positions.clear();
        s.positions.extend(slots.iter().map(|sl| sl.pos));

        self.embed(tokens, &s.positions, &mut s.x);
        let rope_tables = self
            .rope_inv_freq
            .as_ref()
            .map(|f| rope::tables(f, &s.positions));
        // A tape handed in from an earlier step keeps its vectors' memory: they are refilled
        // in place (no fresh pages for the largest allocation of a training step).
        let mut recycled = Vec::new();
        if let Some(tape) = tape.as_deref_mut() {
            recycled = std::mem::take(&mut tape.layers);
            recycled.reverse();
            tape.rope = rope_tables.clone();
        }
        for (l, layer) in self.weights.layers.iter().enumerate() {
            // With checkpointing the tape keeps only each layer's input; the backward pass
            // recomputes the rest one layer at a time.
            let full_tape = tape.as_ref().is_some_and(|tp| !tp.checkpointed);
            let mut lt = tape.as_ref().map(|_| {
                let mut lt = recycled.pop().unwrap_or_default();
                if !full_tape {
                    // A checkpointed tape keeps only the input: no memory for the rest.
                    lt = LayerTape {
                        x_in: std::mem::take(&mut lt.x_in),
                        ..Default::default()
                    };
                }
                lt.x_in.clone_from(&s.x);
                lt
            });
            let panels = self.layer_panels(l);
            self.attention_inputs(layer, panels, s, rope_tables.as_ref(), t);
            for (i, slot) in slots.iter().enumerate() {
                caches[slot.seq].write(
                    l,
                    slot.pos,
                    &s.k[i * kvd..(i + 1) * kvd],
                    &s.v[i * kvd..(i + 1) * kvd],
                );
            }
            self.layer_rest(
                l,
                layer,
                slots,
                caches,
                s,
                lt.as_mut().filter(|_| full_tape),
            );
            if let (Some(tape), Some(lt)) = (tape.as_deref_mut(), lt) {
                tape.layers.push(lt);
            }
        }
        if let Some(tape) = tape {
            tape.x_final.clone_from(&s.x);
        }
        self.norm(&self.weights.final_norm, &mut s.h, &s.x);
        for (cache, &next) in caches.iter_mut().zip(&s.next_pos) {
            cache.set_len(next);
        }
        Ok(())
    }

    /// Attention sub-block up to the cache write: `h = norm(x)`, then q, k, v (with RoPE).
    fn attention_inputs(
        &self,
        layer: &Layer,
        panels: Option<&[LinearPanels]>,
        s: &mut Scratch,
        rope_tables: Option<&(Vec<f32>, Vec<f32>)>,
        t: usize,
    ) {
        let cfg = &self.config;
        self.norm(&layer.attn_norm, &mut s.h, &s.x);
        linears(
            [&mut s.q, &mut s.k, &mut s.v],
            [&layer.q, &layer.k, &layer.v],
            &s.h,
            t,
            [Q, K, V].map(|i| panels.map(|p| &p[i])),
            self.int8_activations,
        );
        if let Some((cos, sin)) = rope_tables {
            rope::apply(&mut s.q, cos, sin, cfg.num_heads, cfg.head_dim);
            rope::apply(&mut s.k, cos, sin, cfg.num_kv_heads, cfg.head_dim);
        }
    }

    /// The rest of layer `l` once its K/V are in the caches: attention, output projection,
    /// residual, MLP block, residual. Fills `lt` (all but `x_in`) when given.
    fn layer_rest(
        &self,
        l: usize,
        layer: &Layer,
        slots: &[Slot],
        caches: &[KvCache],
        s: &mut Scratch,
        mut lt: Option<&mut LayerTape>,
    ) {
        let cfg = &self.config;
        let (t, f) = (slots.len(), cfg.intermediate_size);
        let heads = Heads {
            nh: cfg.num_heads,
            nkv: cfg.num_kv_heads,
            hs: cfg.head_dim,
        };
        let views: Vec<KvView<'_>> = caches
            .iter()
            .map(|cache| {
                let (k, v) = cache.layer(l);
                KvView { k, v }
            })
            .collect();
        attention(&mut s.att, &s.q, slots, &views, heads);
        let panels = self.layer_panels(l);
        let mlp_panel = |i: usize| panels.map(|p| &p[MLP + i]);
        linear(
            &mut s.out,
            &s.att,
            &layer.o,
            t,
            panels.map(|p| &p[O]),
            self.int8_activations,
        );
        add_inplace(&mut s.x, &s.out);
        if let Some(lt) = lt.as_deref_mut() {
            lt.h1.clone_from(&s.h);
            lt.q.clone_from(&s.q);
            lt.att.clone_from(&s.att);
            lt.x_mid.clone_from(&s.x);
        }

        // MLP block.
        self.norm(&layer.mlp_norm, &mut s.h, &s.x);
        match &layer.mlp {
            Mlp::Gelu { fc, proj } => {
                linear(&mut s.m1, &s.h, fc, t, mlp_panel(0), self.int8_activations);
                if let Some(lt) = lt.as_deref_mut() {
                    copy_into(&mut lt.m1, &s.m1[..t * f]);
                }
                gelu_tanh(&mut s.m1);
                linear(
                    &mut s.out,
                    &s.m1,
                    proj,
                    t,
                    mlp_panel(1),
                    self.int8_activations,
                );
            }
            Mlp::SwiGlu { gate, up, down } => {
                linears(
                    [&mut s.m1, &mut s.m2],
                    [gate, up],
                    &s.h,
                    t,
                    [mlp_panel(0), mlp_panel(1)],
                    self.int8_activations,
                );
                if let Some(lt) = lt.as_deref_mut() {
                    copy_into(&mut lt.m1, &s.m1[..t * f]);
                    copy_into(&mut lt.m2, &s.m2[..t * f]);
                }
                silu_mul(&mut s.m1, &s.m2);
                linear(
                    &mut s.out,
                    &s.m1,
                    down,
                    t,
                    mlp_panel(2),
                    self.int8_activations,
                );
            }
        }
        add_inplace(&mut s.x, &s.out);
        if let Some(lt) = lt {
            lt.h2.clone_from(&s.h);
            copy_into(&mut lt.act, &s.m1[..t * f]);
        }
    }

    /// Recomputes the full tape of layer `l` from its input `x_in` (gradient checkpointing);
    /// the layer's K/V are already in `caches`.
    pub(crate) fn recompute_layer(
        &self,
        l: usize,
        slots: &[Slot],
        caches: &[KvCache],
        tape: &Tape,
        s: &mut Scratch,
    ) -> LayerTape {
        let t = slots.len();
        let layer = &self.weights.layers[l];
        s.x.clear();
        s.x.extend_from_slice(&tape.layers[l].x_in);
        s.resize_for(&self.config, t);
        self.attention_inputs(layer, self.layer_panels(l), s, tape.rope.as_ref(), t);
        let mut lt = LayerTape {
            x_in: Vec::new(),
            ..Default::default()
        };
        self.layer_rest(l, layer, slots, caches, s, Some(&mut lt));
        lt
    }

    /// `x = wte[token] (+ wpe[pos])`.
    fn embed(&self, tokens: &[u32], positions: &[usize], x: &mut [f32]) {
        let c = self.config.hidden_size;
        let wte = &self.weights.tok_emb;
        let wpe = self.weights.pos_emb.as_ref().map(|p| p.as_slice());
        for (i, (&tok, &pos)) in tokens.iter().zip(positions).enumerate() {
            let row = &mut x[i * c..(i + 1) * c];
            wte.copy_row(tok as usize, row);
            if let Some(wpe) = wpe {
                for (r, p) in row.iter_mut().zip(&wpe[pos * c..][..c]) {
                    *r += p;
                }
            }
        }
    }

    fn norm(&self, norm: &Norm, out: &mut [f32], x: &[f32]) {
        let (c, eps) = (self.config.hidden_size, self.config.norm_eps);
        match norm {
            Norm::Layer { w, b } => layernorm(out, x, w.as_slice(), b.as_slice(), c, eps),
            Norm::Rms { w } => rmsnorm(out, x, w.as_slice(), c, eps),
        }
    }

    /// Layer `l`'s bf16 weight copies while a Trainer with bf16 compute runs its gradients.
    pub(crate) fn layer_panels(&self, l: usize) -> Option<&[LinearPanels]> {
        self.bf16_compute
            .0
            .as_deref()
            .and_then(|b| b.layers.get(l))
            .map(Vec::as_slice)
    }
}

/// `dst = src`, in `dst`'s memory when it has the room.
fn copy_into(dst: &mut Vec<f32>, src: &[f32]) {
    dst.clear();
    dst.extend_from_slice(src);
}

/// Several [`linear`]s of the same input: one parallel step for all when their weights are
/// kept in blocks (q/k/v and gate/up of a decode step are small products, and each step costs
/// a thread hand-off), the same bits as one call each.
fn linears<const N: usize>(
    outs: [&mut [f32]; N],
    layers: [&Linear; N],
    x: &[f32],
    t: usize,
    panels: [Option<&LinearPanels>; N],
    int8_activations: bool,
) {
    // All N matrices in blocks (and no bf16 panels), or one call each.
    let ws = match all_some(layers.map(|l| l.w.quant())) {
        Some(ws) if panels.iter().all(Option::is_none) => ws,
        _ => {
            for ((out, layer), panels) in outs.into_iter().zip(layers).zip(panels) {
                linear(out, x, layer, t, panels, int8_activations);
            }
            return;
        }
    };
    let mut outs = outs.into_iter();
    let mut list = std::array::from_fn::<_, N, _>(|i| {
        let (n, out) = (layers[i].w.shape()[0], outs.next().unwrap_or_default());
        let w = ws[i];
        let bias = layers[i].b.as_ref().map(|b| b.as_slice());
        QuantProduct {
            out: &mut out[..t * n],
            w,
            bias,
        }
    });
    super::quantized_products(
        int8_activations,
        &mut list,
        &x[..t * layers[0].w.shape()[1]],
        t,
    );
    for (p, layer) in list.iter_mut().zip(layers) {
        super::lora::add_adapter(p.out, x, layer, t);
    }
}

/// `[Some(a), Some(b), …]` as `Some([a, b, …])`; `None` if any is `None` (no allocation: this
/// runs per layer in decode).
fn all_some<T: Copy, const N: usize>(items: [Option<T>; N]) -> Option<[T; N]> {
    let mut out = [items.iter().flatten().next().copied()?; N];
    for (o, item) in out.iter_mut().zip(items) {
        *o = item?;
    }
    Some(out)
}

/// `out (T, out) = x (T, in) · Wᵀ + b`; with bf16 compute (`panels`), on the weight's bf16 copy.
fn linear(
    out: &mut [f32],
    x: &[f32],
    layer: &Linear,
    t: usize,
    panels: Option<&LinearPanels>,
    int8_activations: bool,
) {
    let shape = layer.w.shape();
    let (n, k) = (shape[0], shape[1]);
    let bias = layer.b.as_ref().map(|b| b.as_slice());
    if let Some(p) = panels {
        p.forward(&mut out[..t * n], &x[..t * k], bias, t);
        super::lora::add_adapter(out, x, layer, t);
        return;
    }
    if let Some(q) = layer.w.quant() {
        super::quantized_product(int8_activations, &mut out[..t * n], &x[..t * k], q, bias, t);
        super::lora::add_adapter(out, x, layer, t);
        return;
    }
    matmul(
        &mut out[..t * n],
        &x[..t * k],
        layer.w.as_slice(),
        layer.b.as_ref().map(|b| b.as_slice()),
        t,
        n,
        k,
    );
    super::lora::add_adapter(out, x, layer, t);
}
