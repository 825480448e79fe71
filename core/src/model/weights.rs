//! The model's parameters, gathered from a checkpoint under their HF names and checked against
//! the config's shapes. All linear weights are `[out, in]`.

use crate::config::{Family, ModelConfig};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::weights::quant::GgmlType;
use crate::weights::SafetensorsCheckpoint;

/// Where tensors come from, by HF name: a safetensors checkpoint or a GGUF file.
pub trait TensorSource {
    fn contains(&self, name: &str) -> bool;
    /// The tensor `name` as f32 with exactly `shape`.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor>;
    /// A tensor stored `(rows, cols)` returned as `(cols, rows)` (GPT-2's Conv1D).
    fn tensor_transposed(&self, name: &str, stored: [usize; 2]) -> Result<Tensor>;
}

impl TensorSource for SafetensorsCheckpoint {
    fn contains(&self, name: &str) -> bool {
        SafetensorsCheckpoint::contains(self, name)
    }
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        SafetensorsCheckpoint::tensor(self, name, shape)
    }
    fn tensor_transposed(&self, name: &str, stored: [usize; 2]) -> Result<Tensor> {
        SafetensorsCheckpoint::tensor_transposed(self, name, stored)
    }
}

#[derive(Clone)]
pub struct Linear {
    /// `(out, in)`.
    pub w: Tensor,
    /// `(out)`.
    pub b: Option<Tensor>,
    /// A trainable low-rank update `scale · B·A` added to `w` (LoRA).
    pub lora: Option<super::lora::LoraAdapter>,
}

#[derive(Clone)]
pub enum Norm {
    Layer { w: Tensor, b: Tensor },
    Rms { w: Tensor },
}

// One per layer: the size difference between the variants costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum Mlp {
    /// GPT-2: `proj(gelu(fc(x)))`.
    Gelu { fc: Linear, proj: Linear },
    /// Llama: `down(silu(gate(x)) * up(x))`.
    SwiGlu {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
}

#[derive(Clone)]
pub struct Layer {
    pub attn_norm: Norm,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub mlp_norm: Norm,
    pub mlp: Mlp,
}

#[derive(Clone)]
pub struct ModelWeights {
    /// `(V, C)`.
    pub tok_emb: Tensor,
    /// `(P, C)` learned positions (GPT-2 only).
    pub pos_emb: Option<Tensor>,
    pub layers: Vec<Layer>,
    pub final_norm: Norm,
    /// `(V, C)`; `None` when tied to `tok_emb` (or absent, in a reward model).
    pub lm_head: Option<Tensor>,
    /// `(1, C)` scalar reward head of a `*ForSequenceClassification` model.
    pub score: Option<Tensor>,
    /// Per-token value head for PPO (TRL's `v_head.summary`): `value_t = w · h_t + b`.
    pub value: Option<Linear>,
    /// The LoRA settings when adapters are attached (see [`super::lora`]).
    pub lora: Option<super::lora::LoraConfig>,
}

impl Linear {
    pub fn new(w: Tensor, b: Option<Tensor>) -> Self {
        Linear { w, b, lora: None }
    }

    /// Trainable tensors of this map, named under `name`, with their weight-decay flag: the
    /// weight and bias unless the base is frozen, and the LoRA factors when present.
    fn params_mut<'a>(&'a mut self, name: &str, frozen_base: bool, out: &mut Params<'a>) {
        if !frozen_base {
            out.push((format!("{name}.weight"), &mut self.w, true));
            if let Some(b) = self.b.as_mut() {
                out.push((format!("{name}.bias"), b, false));
            }
        }
        if let Some(l) = self.lora.as_mut() {
            out.push((format!("{name}.lora_A"), &mut l.a, true));
            out.push((format!("{name}.lora_B"), &mut l.b, true));
        }
    }
}

/// Named trainable tensors with their weight-decay flag.
pub type Params<'a> = Vec<(String, &'a mut Tensor, bool)>;

impl Norm {
    fn params_mut<'a>(&'a mut self, name: &str, frozen_base: bool, out: &mut Params<'a>) {
        if frozen_base {
            return;
        }
        match self {
            Norm::Rms { w } => out.push((format!("{name}.weight"), w, false)),
            Norm::Layer { w, b } => {
                out.push((format!("{name}.weight"), w, false));
                out.push((format!("{name}.bias"), b, false));
            }
        }
    }
}

impl Layer {
    /// The layer's linear maps in a fixed order: q, k, v, o, then the MLP's.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut out = vec![&self.q, &self.k, &self.v, &self.o];
        match &self.mlp {
            Mlp::Gelu { fc, proj } => out.extend([fc, proj]),
            Mlp::SwiGlu { gate, up, down } => out.extend([gate, up, down]),
        }
        out
    }

    /// [`Layer::linears`], mutable.
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = vec![&mut self.q, &mut self.k, &mut self.v, &mut self.o];
        match &mut self.mlp {
            Mlp::Gelu { fc, proj } => out.extend([fc, proj]),
            Mlp::SwiGlu { gate, up, down } => out.extend([gate, up, down]),
        }
        out
    }
}

impl ModelWeights {
    /// True when LoRA adapters are attached: the base weights are frozen and only the
    /// adapters (and any score or value head) train.
    pub fn base_frozen(&self) -> bool {
        self.lora.is_some()
    }

    /// Every trainable tensor with whether weight decay applies to it (linear weights, LoRA
    /// factors and an untied head: yes; norms, biases, embeddings: no). The order matches
    /// `Gradients::flat`.
    pub fn params_mut(&mut self) -> Vec<(&mut Tensor, bool)> {
        self.named_params_mut()
            .into_iter()
            .map(|(_, t, d)| (t, d))
            .collect()
    }

    /// [`ModelWeights::params_mut`] with stable names (`layers.3.q.weight`, `lm_head`, …) that
    /// checkpoints of optimizer state are keyed by.
    pub fn named_params_mut(&mut self) -> Params<'_> {
        let frozen = self.base_frozen();
        let mut out: Params<'_> = Vec::new();
        if !frozen {
            out.push(("tok_emb".into(), &mut self.tok_emb, false));
            if let Some(p) = self.pos_emb.as_mut() {
                out.push(("pos_emb".into(), p, false));
            }
        }
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("layers.{i}");
            l.attn_norm
                .params_mut(&format!("{p}.attn_norm"), frozen, &mut out);
            for (n, lin) in [
                ("q", &mut l.q),
                ("k", &mut l.k),
                ("v", &mut l.v),
                ("o", &mut l.o),
            ] {
                lin.params_mut(&format!("{p}.{n}"), frozen, &mut out);
            }
            l.mlp_norm
                .params_mut(&format!("{p}.mlp_norm"), frozen, &mut out);
            let mlp: Vec<(&str, &mut Linear)> = match &mut l.mlp {
                Mlp::Gelu { fc, proj } => vec![("fc", fc), ("proj", proj)],
                Mlp::SwiGlu { gate, up, down } => vec![("gate", gate), ("up", up), ("down", down)],
            };
            for (n, lin) in mlp {
                lin.params_mut(&format!("{p}.mlp.{n}"), frozen, &mut out);
            }
        }
        self.final_norm.params_mut("final_norm", frozen, &mut out);
        if !frozen {
            if let Some(h) = self.lm_head.as_mut() {
                out.push(("lm_head".into(), h, true));
            }
        }
        if let Some(s) = self.score.as_mut() {
            out.push(("score".into(), s, true));
        }
        if let Some(v) = self.value.as_mut() {
            v.params_mut("value", false, &mut out);
        }
        out
    }

    /// Every tensor kept in quantized blocks becomes f32 (training reads and writes f32).
    pub fn dequantize(&mut self) {
        self.tok_emb.dequantize_in_place();
        for t in [
            self.pos_emb.as_mut(),
            self.lm_head.as_mut(),
            self.score.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            t.dequantize_in_place();
        }
        for layer in &mut self.layers {
            for lin in layer.linears_mut() {
                lin.w.dequantize_in_place();
            }
        }
        if let Some(v) = self.value.as_mut() {
            v.w.dequantize_in_place();
        }
    }

    /// Every tensor with a short name (`layers.3.q.weight`), for checks that visit them all.
    pub fn tensors(&self) -> Vec<(String, &Tensor)> {
        let mut out: Vec<(String, &Tensor)> = vec![("tok_emb".into(), &self.tok_emb)];
        fn push_norm<'a>(out: &mut Vec<(String, &'a Tensor)>, name: String, n: &'a Norm) {
            match n {
                Norm::Rms { w } => out.push((format!("{name}.weight"), w)),
                Norm::Layer { w, b } => {
                    out.push((format!("{name}.weight"), w));
                    out.push((format!("{name}.bias"), b));
                }
            }
        }
        fn push_linear<'a>(out: &mut Vec<(String, &'a Tensor)>, name: String, l: &'a Linear) {
            out.push((format!("{name}.weight"), &l.w));
            if let Some(b) = &l.b {
                out.push((format!("{name}.bias"), b));
            }
        }
        for (name, t) in [
            ("pos_emb", self.pos_emb.as_ref()),
            ("lm_head", self.lm_head.as_ref()),
            ("score", self.score.as_ref()),
        ] {
            if let Some(t) = t {
                out.push((name.into(), t));
            }
        }
        push_norm(&mut out, "final_norm".into(), &self.final_norm);
        if let Some(v) = &self.value {
            push_linear(&mut out, "value".into(), v);
        }
        const NAMES: [&str; 7] = ["q", "k", "v", "o", "mlp.0", "mlp.1", "mlp.2"];
        for (l, layer) in self.layers.iter().enumerate() {
            push_norm(&mut out, format!("layers.{l}.attn_norm"), &layer.attn_norm);
            push_norm(&mut out, format!("layers.{l}.mlp_norm"), &layer.mlp_norm);
            for (lin, name) in layer.linears().into_iter().zip(NAMES) {
                push_linear(&mut out, format!("layers.{l}.{name}"), lin);
            }
        }
        out
    }

    /// The first tensor holding a NaN or infinite value (for quantized blocks: a scale), by name.
    pub fn first_non_finite(&self) -> Option<String> {
        self.tensors()
            .into_iter()
            .find(|(_, t)| t.has_non_finite())
            .map(|(name, _)| name)
    }

    /// Values in all weights (what a full set of gradients holds), without reading them.
    pub fn parameter_count(&self) -> usize {
        let len = |t: &Tensor| t.shape().iter().product::<usize>();
        let norm = |n: &Norm| match n {
            Norm::Rms { w } => len(w),
            Norm::Layer { w, b } => len(w) + len(b),
        };
        let linear = |l: &Linear| len(&l.w) + l.b.as_ref().map_or(0, len);
        let mut n = len(&self.tok_emb) + norm(&self.final_norm);
        n += [
            self.pos_emb.as_ref(),
            self.lm_head.as_ref(),
            self.score.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(len)
        .sum::<usize>();
        n += self.value.as_ref().map_or(0, linear);
        for layer in &self.layers {
            n += norm(&layer.attn_norm) + norm(&layer.mlp_norm);
            n += layer.linears().into_iter().map(linear).sum::<usize>();
        }
        n
    }

    /// Values a training step holds gradients for: everything, or with LoRA (frozen base) only
    /// the adapters and the score/value heads (what `Gradients::zeros` allocates).
    pub fn trainable_parameter_count(&self) -> usize {
        if !self.base_frozen() {
            return self.parameter_count();
        }
        let len = |t: &Tensor| t.shape().iter().product::<usize>();
        let adapters: usize = self
            .layers
            .iter()
            .flat_map(|l| l.linears())
            .filter_map(|lin| lin.lora.as_ref())
            .map(|ad| len(&ad.a) + len(&ad.b))
            .sum();
        let heads = self.score.as_ref().map_or(0, len)
            + self
                .value
                .as_ref()
                .map_or(0, |v| len(&v.w) + v.b.as_ref().map_or(0, len));
        adapters + heads
    }

    /// True when some matrix is kept in quantized blocks.
    pub fn has_quantized(&self) -> bool {
        self.tok_emb.is_quantized()
            || self.lm_head.as_ref().is_some_and(Tensor::is_quantized)
            || self
                .layers
                .iter()
                .any(|l| l.linears().iter().any(|lin| lin.w.is_quantized()))
    }

    /// Whether some matrix is kept in blocks of a type `accept`s.
    pub fn has_quantized_of(&self, accept: impl Fn(GgmlType) -> bool) -> bool {
        let of = |t: &Tensor| t.quant().is_some_and(|q| accept(q.ty));
        of(self.lm_head())
            || self
                .layers
                .iter()
                .any(|l| l.linears().iter().any(|lin| of(&lin.w)))
    }

    pub fn lm_head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.tok_emb)
    }

    pub fn from_source(ck: &dyn TensorSource, cfg: &ModelConfig) -> Result<Self> {
        match cfg.family() {
            Family::Gpt2 => gpt2(ck, cfg),
            Family::Llama => llama(ck, cfg),
        }
    }
}

fn llama(ck: &dyn TensorSource, cfg: &ModelConfig) -> Result<ModelWeights> {
    let (c, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
    let linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
        Ok(Linear::new(
            ck.tensor(&format!("{name}.weight"), &[out, inp])?,
            if bias {
                Some(ck.tensor(&format!("{name}.bias"), &[out])?)
            } else {
                None
            },
        ))
    };
    let rms = |name: &str| -> Result<Norm> {
        Ok(Norm::Rms {
            w: ck.tensor(&format!("{name}.weight"), &[c])?,
        })
    };
    let tok_emb = ck.tensor("model.embed_tokens.weight", &[v, c])?;
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        layers.push(Layer {
            attn_norm: rms(&format!("{p}.input_layernorm"))?,
            q: linear(&format!("{p}.self_attn.q_proj"), qd, c, cfg.qkv_bias)?,
            k: linear(&format!("{p}.self_attn.k_proj"), kvd, c, cfg.qkv_bias)?,
            v: linear(&format!("{p}.self_attn.v_proj"), kvd, c, cfg.qkv_bias)?,
            o: linear(&format!("{p}.self_attn.o_proj"), c, qd, cfg.attn_out_bias)?,
            mlp_norm: rms(&format!("{p}.post_attention_layernorm"))?,
            mlp: Mlp::SwiGlu {
                gate: linear(&format!("{p}.mlp.gate_proj"), f, c, cfg.mlp_bias)?,
                up: linear(&format!("{p}.mlp.up_proj"), f, c, cfg.mlp_bias)?,
                down: linear(&format!("{p}.mlp.down_proj"), c, f, cfg.mlp_bias)?,
            },
        });
    }
    let (lm_head, score) = heads(ck, cfg)?;
    Ok(ModelWeights {
        tok_emb,
        pos_emb: None,
        layers,
        final_norm: rms("model.norm")?,
        lm_head,
        score,
        value: value_head(ck, cfg)?,
        lora: None,
    })
}

fn gpt2(ck: &dyn TensorSource, cfg: &ModelConfig) -> Result<ModelWeights> {
    let (c, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    // Checkpoints saved from GPT2LMHeadModel prefix names with `transformer.`; the original
    // OpenAI conversions do not.
    let prefix = if ck.contains("transformer.wte.weight") {
        "transformer."
    } else {
        ""
    };
    let name = |n: &str| format!("{prefix}{n}");
    // Conv1D stores `(in, out)`; transpose to `(out, in)`.
    let conv = |n: &str, inp: usize, out: usize| -> Result<Linear> {
        Ok(Linear::new(
            ck.tensor_transposed(&name(&format!("{n}.weight")), [inp, out])?,
            Some(ck.tensor(&name(&format!("{n}.bias")), &[out])?),
        ))
    };
    let ln = |n: &str| -> Result<Norm> {
        Ok(Norm::Layer {
            w: ck.tensor(&name(&format!("{n}.weight")), &[c])?,
            b: ck.tensor(&name(&format!("{n}.bias")), &[c])?,
        })
    };
    let tok_emb = ck.tensor(&name("wte.weight"), &[v, c])?;
    let pos_emb = ck.tensor(&name("wpe.weight"), &[cfg.max_position_embeddings, c])?;
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for l in 0..cfg.num_layers {
        let p = format!("h.{l}");
        // The fused c_attn `(C, 3C)` becomes three `(C, C)` projections.
        let qkv = conv(&format!("{p}.attn.c_attn"), c, 3 * c)?;
        let (q, k, v) = split_rows(&qkv, c, c)?;
        layers.push(Layer {
            attn_norm: ln(&format!("{p}.ln_1"))?,
            q,
            k,
            v,
            o: conv(&format!("{p}.attn.c_proj"), c, c)?,
            mlp_norm: ln(&format!("{p}.ln_2"))?,
            mlp: Mlp::Gelu {
                fc: conv(&format!("{p}.mlp.c_fc"), c, f)?,
                proj: conv(&format!("{p}.mlp.c_proj"), f, c)?,
            },
        });
    }
    let (lm_head, score) = heads(ck, cfg)?;
    Ok(ModelWeights {
        tok_emb,
        pos_emb: Some(pos_emb),
        layers,
        final_norm: ln("ln_f")?,
        lm_head,
        score,
        value: value_head(ck, cfg)?,
        lora: None,
    })
}

/// The LM head (untied) or, for a reward model, the score head.
fn heads(ck: &dyn TensorSource, cfg: &ModelConfig) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let (v, c) = (cfg.vocab_size, cfg.hidden_size);
    if cfg.score_head {
        return Ok((None, Some(ck.tensor("score.weight", &[1, c])?)));
    }
    if cfg.tie_word_embeddings {
        Ok((None, None))
    } else {
        Ok((Some(ck.tensor("lm_head.weight", &[v, c])?), None))
    }
}

/// Name of the value head's weight in a checkpoint (TRL's `AutoModelForCausalLMWithValueHead`
/// saves it beside the model's own tensors); the bias is `…bias`.
pub const VALUE_HEAD_WEIGHT: &str = "v_head.summary.weight";
pub const VALUE_HEAD_BIAS: &str = "v_head.summary.bias";

/// The PPO value head, when the checkpoint carries one.
fn value_head(ck: &dyn TensorSource, cfg: &ModelConfig) -> Result<Option<Linear>> {
    if !ck.contains(VALUE_HEAD_WEIGHT) {
        return Ok(None);
    }
    Ok(Some(Linear::new(
        ck.tensor(VALUE_HEAD_WEIGHT, &[1, cfg.hidden_size])?,
        Some(ck.tensor(VALUE_HEAD_BIAS, &[1])?),
    )))
}

/// Splits a `(3·rows, cols)` projection into three `(rows, cols)` ones (quantized blocks stay
/// quantized: rows are whole runs of blocks).
fn split_rows(fused: &Linear, rows: usize, cols: usize) -> Result<(Linear, Linear, Linear)> {
    let b = fused.b.as_ref().map(|b| b.as_slice());
    let part = |i: usize| -> Result<Linear> {
        let bv = b.map(|b| b[i * rows..(i + 1) * rows].to_vec());
        let bad = || Error::Config("c_attn does not split into q, k, v".into());
        let w = match fused.w.quant() {
            Some(q) => {
                let part = q.data.len() / 3;
                let bytes = q.data[i * part..(i + 1) * part].to_vec();
                Tensor::quantized_owned(q.ty, bytes, [rows, cols])
            }
            None => {
                let w = fused.w.as_slice();
                Tensor::owned(
                    w[i * rows * cols..(i + 1) * rows * cols].to_vec(),
                    vec![rows, cols],
                )
            }
        };
        Ok(Linear::new(
            w.ok_or_else(bad)?,
            match bv {
                Some(bv) => Some(Tensor::owned(bv, vec![rows]).ok_or_else(bad)?),
                None => None,
            },
        ))
    };
    Ok((part(0)?, part(1)?, part(2)?))
}
