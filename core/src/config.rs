//! `ModelConfig`: the architecture facts the engine needs, read from an HF `config.json`.
//!
//! Two families are supported. **GPT-2**: LayerNorm, learned positions, GELU (tanh), fused
//! `c_attn`, tied head. **Llama** (Llama, SmolLM/SmolLM2, TinyLlama, Mistral, Qwen2): RMSNorm,
//! RoPE (rotate-half), SwiGLU, grouped-query attention, optional q/k/v bias (Qwen2), tied or
//! untied head. A field that would change the math and that rlx does not implement is an error
//! naming the field, never silently ignored.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Which code path computes the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Gpt2,
    Llama,
}

/// The HF architecture the config named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Gpt2,
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    pub fn family(self) -> Family {
        match self {
            Architecture::Gpt2 => Family::Gpt2,
            _ => Family::Llama,
        }
    }

    /// The `architectures` entry transformers writes for this model.
    pub fn hf_class(self) -> &'static str {
        match self {
            Architecture::Gpt2 => "GPT2LMHeadModel",
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// GELU with the tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// SiLU gate of a SwiGLU MLP.
    Silu,
}

/// How RoPE frequencies are rescaled for long context.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.x frequency-band scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// Everything about a model's shape and math, independent of where its weights live.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    /// C: width of the residual stream.
    pub hidden_size: usize,
    pub num_layers: usize,
    /// NH: query heads.
    pub num_heads: usize,
    /// NKV: key/value heads (== NH without GQA).
    pub num_kv_heads: usize,
    /// HS: per-head width.
    pub head_dim: usize,
    pub intermediate_size: usize,
    /// Longest sequence (prompt + generated) the model accepts.
    pub max_position_embeddings: usize,
    pub norm_eps: f32,
    pub activation: Activation,
    /// RoPE settings (Llama family); GPT-2 uses learned positions instead.
    pub rope: Option<RopeConfig>,
    pub tie_word_embeddings: bool,
    /// Bias on the q/k/v projections (GPT-2, Qwen2, Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the attention output projection (GPT-2, Llama with `attention_bias`).
    pub attn_out_bias: bool,
    /// Bias on the MLP projections (GPT-2, Llama with `mlp_bias`).
    pub mlp_bias: bool,
    /// Attention window rlx does not implement: sequences longer than this are refused.
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// A `*ForSequenceClassification` checkpoint: a scalar `score` head (num_labels = 1) and no
    /// LM head.
    pub score_head: bool,
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::from_json(&value)
    }

    /// Builds a config from the parsed JSON object of an HF `config.json`.
    pub fn from_json(value: &Value) -> Result<Self> {
        let obj = value
            .as_object()
            .ok_or_else(|| Error::Config("config.json must hold a JSON object".into()))?;
        let c = Fields(obj);
        let architecture = detect_architecture(&c)?;
        let mut config = match architecture.family() {
            Family::Gpt2 => gpt2_config(&c)?,
            Family::Llama => llama_config(&c, architecture)?,
        };
        config.score_head = is_sequence_classifier(&c);
        if config.score_head {
            let labels = match c.0.get("id2label") {
                Some(Value::Object(m)) => Some(m.len()),
                _ => c.opt_usize("num_labels")?,
            };
            if labels.is_some_and(|n| n != 1) {
                return Err(Error::Unsupported(format!(
                    "a sequence classifier with {} labels (a reward model has num_labels = 1)",
                    labels.unwrap_or_default()
                )));
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks the relations between sizes that the kernels rely on.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(Error::Config(format!("`{name}` must be positive")));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(Error::Config(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            )));
        }
        if self.family() == Family::Gpt2 && self.head_dim * self.num_heads != self.hidden_size {
            return Err(Error::Config(format!(
                "n_embd ({}) must be divisible by n_head ({})",
                self.hidden_size, self.num_heads
            )));
        }
        if self.rope.is_some() && !self.head_dim.is_multiple_of(2) {
            return Err(Error::Config(format!(
                "RoPE needs an even head_dim, got {}",
                self.head_dim
            )));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps >= 0.0) {
            return Err(Error::Config(format!(
                "normalization epsilon must be finite and non-negative, got {}",
                self.norm_eps
            )));
        }
        // Keep every size product of later allocations far from overflow.
        let limit = 1usize << 24;
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v > limit {
                return Err(Error::Config(format!("`{name}` = {v} exceeds {limit}")));
            }
        }
        if self.num_layers > 4096 || self.num_heads > 4096 || self.head_dim > 4096 {
            return Err(Error::Config(
                "layer count, head count or head_dim above 4096".into(),
            ));
        }
        for &id in self.eos_token_ids.iter().chain(self.bos_token_id.iter()) {
            if id as usize >= self.vocab_size {
                return Err(Error::Config(format!(
                    "special token id {id} is outside the vocabulary ({})",
                    self.vocab_size
                )));
            }
        }
        Ok(())
    }

    pub fn family(&self) -> Family {
        self.architecture.family()
    }

    /// Width of one position's K (or V) across all KV heads.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Width of one position's Q across all heads.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }
}

fn detect_architecture(c: &Fields) -> Result<Architecture> {
    let named: Option<String> = match c.0.get("architectures") {
        Some(Value::Array(list)) => list.first().and_then(|v| v.as_str()).map(str::to_owned),
        _ => None,
    };
    let model_type = c.opt_str("model_type")?;
    let arch = match (named.as_deref(), model_type.as_deref()) {
        (Some("GPT2LMHeadModel" | "GPT2Model" | "GPT2ForSequenceClassification"), _)
        | (None, Some("gpt2")) => Architecture::Gpt2,
        (Some("LlamaForCausalLM" | "LlamaModel" | "LlamaForSequenceClassification"), _)
        | (None, Some("llama")) => Architecture::Llama,
        (Some("MistralForCausalLM" | "MistralModel" | "MistralForSequenceClassification"), _)
        | (None, Some("mistral")) => Architecture::Mistral,
        (Some("Qwen2ForCausalLM" | "Qwen2Model" | "Qwen2ForSequenceClassification"), _)
        | (None, Some("qwen2")) => Architecture::Qwen2,
        (Some(other), _) => {
            return Err(Error::Unsupported(format!(
                "architecture `{other}` (supported: GPT2LMHeadModel, LlamaForCausalLM, \
                 MistralForCausalLM, Qwen2ForCausalLM)"
            )))
        }
        (None, Some(other)) => {
            return Err(Error::Unsupported(format!("model_type `{other}`")));
        }
        (None, None) => {
            return Err(Error::Config(
                "config names neither `architectures` nor `model_type`".into(),
            ))
        }
    };
    Ok(arch)
}

fn is_sequence_classifier(c: &Fields) -> bool {
    matches!(c.0.get("architectures"), Some(Value::Array(list))
        if list.first().and_then(|v| v.as_str()).is_some_and(|a| a.ends_with("ForSequenceClassification")))
}

fn gpt2_config(c: &Fields) -> Result<ModelConfig> {
    let hidden_size = c.usize("n_embd")?;
    let num_heads = c.usize("n_head")?;
    if num_heads == 0 {
        return Err(Error::Config("`n_head` must be positive".into()));
    }
    match c.opt_str("activation_function")?.as_deref() {
        None | Some("gelu_new" | "gelu_pytorch_tanh" | "gelu_fast") => {}
        Some(other) => {
            return Err(Error::Unsupported(format!(
                "activation_function `{other}` (supported: gelu_new, gelu_pytorch_tanh)"
            )))
        }
    }
    if c.opt_bool("scale_attn_by_inverse_layer_idx")? == Some(true) {
        return Err(Error::Unsupported(
            "scale_attn_by_inverse_layer_idx = true".into(),
        ));
    }
    if c.opt_bool("scale_attn_weights")? == Some(false) {
        return Err(Error::Unsupported("scale_attn_weights = false".into()));
    }
    if c.opt_bool("add_cross_attention")? == Some(true) {
        return Err(Error::Unsupported("add_cross_attention = true".into()));
    }
    let intermediate_size = c.opt_usize("n_inner")?.unwrap_or(4 * hidden_size);
    Ok(ModelConfig {
        architecture: Architecture::Gpt2,
        vocab_size: c.usize("vocab_size")?,
        hidden_size,
        num_layers: c.usize("n_layer")?,
        num_heads,
        num_kv_heads: num_heads,
        head_dim: hidden_size / num_heads,
        intermediate_size,
        max_position_embeddings: c.usize("n_positions")?,
        norm_eps: c.opt_f64("layer_norm_epsilon")?.unwrap_or(1e-5) as f32,
        activation: Activation::GeluTanh,
        rope: None,
        tie_word_embeddings: c.opt_bool("tie_word_embeddings")?.unwrap_or(true),
        qkv_bias: true,
        attn_out_bias: true,
        mlp_bias: true,
        sliding_window: None,
        bos_token_id: c.opt_token_id("bos_token_id")?,
        eos_token_ids: c.token_ids("eos_token_id")?,
        score_head: false,
    })
}

fn llama_config(c: &Fields, architecture: Architecture) -> Result<ModelConfig> {
    let hidden_size = c.usize("hidden_size")?;
    let num_heads = c.usize("num_attention_heads")?;
    if num_heads == 0 {
        return Err(Error::Config(
            "`num_attention_heads` must be positive".into(),
        ));
    }
    let num_kv_heads = c.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
    let head_dim = c.opt_usize("head_dim")?.unwrap_or(hidden_size / num_heads);
    match c.opt_str("hidden_act")?.as_deref() {
        None | Some("silu" | "swish") => {}
        Some(other) => {
            return Err(Error::Unsupported(format!(
                "hidden_act `{other}` (supported: silu)"
            )))
        }
    }
    let attention_bias = c.opt_bool("attention_bias")?.unwrap_or(false);
    let (qkv_bias, attn_out_bias) = match architecture {
        // Qwen2 always carries q/k/v biases and never an output bias.
        Architecture::Qwen2 => (true, false),
        _ => (attention_bias, attention_bias),
    };
    let sliding_window = match architecture {
        Architecture::Mistral => c.opt_usize("sliding_window")?,
        Architecture::Qwen2 if c.opt_bool("use_sliding_window")? == Some(true) => {
            c.opt_usize("sliding_window")?
        }
        _ => None,
    };
    Ok(ModelConfig {
        architecture,
        vocab_size: c.usize("vocab_size")?,
        hidden_size,
        num_layers: c.usize("num_hidden_layers")?,
        num_heads,
        num_kv_heads,
        head_dim,
        intermediate_size: c.usize("intermediate_size")?,
        max_position_embeddings: c.usize("max_position_embeddings")?,
        norm_eps: c.opt_f64("rms_norm_eps")?.unwrap_or(1e-6) as f32,
        activation: Activation::Silu,
        rope: Some(rope_config(c)?),
        tie_word_embeddings: c.opt_bool("tie_word_embeddings")?.unwrap_or(false),
        qkv_bias,
        attn_out_bias,
        mlp_bias: c.opt_bool("mlp_bias")?.unwrap_or(false),
        sliding_window,
        bos_token_id: c.opt_token_id("bos_token_id")?,
        eos_token_ids: c.token_ids("eos_token_id")?,
        score_head: false,
    })
}

/// RoPE from either transformers 5's `rope_parameters` or the older `rope_theta` + `rope_scaling`.
fn rope_config(c: &Fields) -> Result<RopeConfig> {
    let params = match c.0.get("rope_parameters") {
        Some(Value::Object(p)) => Some(p),
        None | Some(Value::Null) => None,
        Some(_) => return Err(Error::Config("`rope_parameters` must be an object".into())),
    };
    let scaling_obj = match c.0.get("rope_scaling") {
        Some(Value::Object(p)) => Some(p),
        None | Some(Value::Null) => None,
        Some(_) => return Err(Error::Config("`rope_scaling` must be an object".into())),
    };
    let theta = match params.map(Fields) {
        Some(p) if p.0.contains_key("rope_theta") => p.f64("rope_theta")?,
        _ => c.opt_f64("rope_theta")?.unwrap_or(10000.0),
    };
    if !(theta.is_finite() && theta > 0.0) {
        return Err(Error::Config(format!(
            "rope_theta must be positive, got {theta}"
        )));
    }
    // transformers 5 keeps the scaling keys inside `rope_parameters`; older configs use `rope_scaling`.
    let scaling_src = params.or(scaling_obj).map(Fields);
    let scaling = match scaling_src {
        None => RopeScaling::None,
        Some(s) => {
            let kind = match s.opt_str("rope_type")? {
                Some(k) => Some(k),
                None => s.opt_str("type")?,
            };
            match kind.as_deref() {
                None | Some("default") => RopeScaling::None,
                Some("linear") => RopeScaling::Linear {
                    factor: positive(s.f64("factor")?, "rope factor")?,
                },
                Some("llama3") => RopeScaling::Llama3 {
                    factor: positive(s.f64("factor")?, "rope factor")?,
                    low_freq_factor: positive(s.f64("low_freq_factor")?, "low_freq_factor")?,
                    high_freq_factor: positive(s.f64("high_freq_factor")?, "high_freq_factor")?,
                    original_max_position_embeddings: positive(
                        s.f64("original_max_position_embeddings")?,
                        "original_max_position_embeddings",
                    )?,
                },
                Some(other) => {
                    return Err(Error::Unsupported(format!(
                        "rope type `{other}` (supported: default, linear, llama3)"
                    )))
                }
            }
        }
    };
    Ok(RopeConfig { theta, scaling })
}

fn positive(v: f64, what: &str) -> Result<f64> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(Error::Config(format!("{what} must be positive, got {v}")))
    }
}

/// Typed access to a JSON object with errors that name the field.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn present(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| Error::Config(format!("missing field `{key}`")))
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    Error::Config(format!("`{key}` must be a non-negative integer, got {v}"))
                }),
        }
    }

    fn f64(&self, key: &str) -> Result<f64> {
        self.opt_f64(key)?
            .ok_or_else(|| Error::Config(format!("missing field `{key}`")))
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| Error::Config(format!("`{key}` must be a number, got {v}"))),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| Error::Config(format!("`{key}` must be true or false, got {v}"))),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<String>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(|s| Some(s.to_owned()))
                .ok_or_else(|| Error::Config(format!("`{key}` must be a string, got {v}"))),
        }
    }

    fn opt_token_id(&self, key: &str) -> Result<Option<u32>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => token_id(key, v).map(Some),
        }
    }

    /// A token id field that may be one id or a list of ids (as `eos_token_id` is).
    fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        match self.present(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(list)) => list.iter().map(|v| token_id(key, v)).collect(),
            Some(v) => Ok(vec![token_id(key, v)?]),
        }
    }
}

fn token_id(key: &str, v: &Value) -> Result<u32> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| Error::Config(format!("`{key}` must hold token ids, got {v}")))
}

/// Reads token ids (`eos_token_id`, one or a list) from a `generation_config.json`, if present.
pub(crate) fn generation_eos_ids(value: &Value) -> Result<Option<Vec<u32>>> {
    let Some(obj) = value.as_object() else {
        return Err(Error::Config(
            "generation_config.json must hold a JSON object".into(),
        ));
    };
    let f = Fields(obj);
    if f.present("eos_token_id").is_none() {
        return Ok(None);
    }
    f.token_ids("eos_token_id").map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn llama_json() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
            "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "eos_token_id": [2, 3], "bos_token_id": 1
        })
    }

    #[test]
    fn llama_reads_sizes_and_rope_theta() {
        let c = ModelConfig::from_json(&llama_json()).unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (4, 2, 16));
        assert_eq!(c.rope.as_ref().unwrap().theta, 500000.0);
        assert_eq!(c.eos_token_ids, vec![2, 3]);
        assert!(!c.tie_word_embeddings);
    }

    #[test]
    fn rope_parameters_of_transformers_5_are_read() {
        let mut v = llama_json();
        v.as_object_mut().unwrap().remove("rope_theta");
        v["rope_parameters"] = json!({"rope_type": "llama3", "rope_theta": 250000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let c = ModelConfig::from_json(&v).unwrap();
        let rope = c.rope.unwrap();
        assert_eq!(rope.theta, 250000.0);
        assert!(matches!(rope.scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    }

    #[test]
    fn unsupported_fields_are_named() {
        let mut v = llama_json();
        v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        let err = ModelConfig::from_json(&v).unwrap_err().to_string();
        assert!(err.contains("yarn"), "{err}");

        let mut v = llama_json();
        v["hidden_act"] = json!("relu");
        assert!(ModelConfig::from_json(&v)
            .unwrap_err()
            .to_string()
            .contains("relu"));

        let mut v = llama_json();
        v["architectures"] = json!(["BertForMaskedLM"]);
        assert!(ModelConfig::from_json(&v)
            .unwrap_err()
            .to_string()
            .contains("BertForMaskedLM"));
    }

    #[test]
    fn bad_values_are_errors() {
        let mut v = llama_json();
        v["num_key_value_heads"] = json!(3);
        assert!(ModelConfig::from_json(&v)
            .unwrap_err()
            .to_string()
            .contains("multiple"));
        let mut v = llama_json();
        v["hidden_size"] = json!("wide");
        assert!(ModelConfig::from_json(&v)
            .unwrap_err()
            .to_string()
            .contains("hidden_size"));
        let mut v = llama_json();
        v.as_object_mut().unwrap().remove("vocab_size");
        assert!(ModelConfig::from_json(&v)
            .unwrap_err()
            .to_string()
            .contains("vocab_size"));
        let mut v = llama_json();
        v["eos_token_id"] = json!(1000);
        assert!(ModelConfig::from_json(&v).is_err());
        assert!(ModelConfig::from_json(&json!([1, 2])).is_err());
    }

    #[test]
    fn gpt2_defaults() {
        let v = json!({"architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_head": 4,
            "n_layer": 2, "n_positions": 128, "vocab_size": 300, "eos_token_id": 0});
        let c = ModelConfig::from_json(&v).unwrap();
        assert_eq!(c.intermediate_size, 256);
        assert!(c.tie_word_embeddings && c.rope.is_none());
        let mut bad = v.clone();
        bad["activation_function"] = json!("relu");
        assert!(ModelConfig::from_json(&bad).is_err());
    }

    #[test]
    fn qwen2_has_qkv_bias_and_mistral_window() {
        let mut v = llama_json();
        v["architectures"] = json!(["Qwen2ForCausalLM"]);
        v["sliding_window"] = json!(32);
        let c = ModelConfig::from_json(&v).unwrap();
        assert!(c.qkv_bias && !c.attn_out_bias && c.sliding_window.is_none());
        v["architectures"] = json!(["MistralForCausalLM"]);
        let c = ModelConfig::from_json(&v).unwrap();
        assert_eq!(c.sliding_window, Some(32));
    }
}
