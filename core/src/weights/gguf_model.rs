//! A GGUF file seen as a model: `ModelConfig` from its metadata and tensors under HF names.
//!
//! llama.cpp's converter renames tensors (`blk.N.attn_q.weight` for
//! `model.layers.N.self_attn.q_proj.weight`) and permutes the rows of the q and k projections
//! (interleaved RoPE pairs instead of rotate-half halves). Both are undone here, so the model
//! computes exactly what transformers computes from the same file.

use super::gguf::{GgufFile, MetaValue};
use crate::config::{Activation, Architecture, ModelConfig, RopeConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::model::TensorSource;
use crate::tensor::Tensor;

/// `ModelConfig` for `general.architecture` = `llama` or `gpt2`.
pub fn config_from_gguf(f: &GgufFile) -> Result<ModelConfig> {
    let arch = meta_str(f, "general.architecture")?;
    match arch {
        "llama" => {}
        "gpt2" => return gpt2_config(f),
        _ => {
            return Err(Error::Unsupported(format!(
                "GGUF architecture `{arch}` (supported: llama, gpt2)"
            )))
        }
    }
    let key = |k: &str| format!("{arch}.{k}");
    let hidden_size = meta_usize(f, &key("embedding_length"))?;
    let num_heads = meta_usize(f, &key("attention.head_count"))?;
    if num_heads == 0 {
        return Err(Error::Config(
            "attention.head_count must be positive".into(),
        ));
    }
    let num_kv_heads = opt_usize(f, &key("attention.head_count_kv"))?.unwrap_or(num_heads);
    let head_dim = opt_usize(f, &key("attention.key_length"))?.unwrap_or(hidden_size / num_heads);
    if let Some(rot) = opt_usize(f, &key("rope.dimension_count"))? {
        if rot != head_dim {
            return Err(Error::Unsupported(format!(
                "partial rotary embedding ({rot} of {head_dim} dims)"
            )));
        }
    }
    if f.tensor_info("rope_freqs.weight").is_some() {
        return Err(Error::Unsupported(
            "GGUF rope_freqs (llama3-style RoPE scaling baked into the file)".into(),
        ));
    }
    let scaling = match f.get(&key("rope.scaling.type")).and_then(MetaValue::as_str) {
        None | Some("none") => RopeScaling::None,
        Some("linear") => RopeScaling::Linear {
            factor: meta_f64(f, &key("rope.scaling.factor"))?,
        },
        Some(other) => return Err(Error::Unsupported(format!("GGUF rope scaling `{other}`"))),
    };
    let vocab_size = vocab_size(f, &key("vocab_size"))?;
    let config = ModelConfig {
        architecture: Architecture::Llama,
        vocab_size,
        hidden_size,
        num_layers: meta_usize(f, &key("block_count"))?,
        num_heads,
        num_kv_heads,
        head_dim,
        intermediate_size: meta_usize(f, &key("feed_forward_length"))?,
        max_position_embeddings: meta_usize(f, &key("context_length"))?,
        norm_eps: meta_f64(f, &key("attention.layer_norm_rms_epsilon"))? as f32,
        activation: Activation::Silu,
        rope: Some(RopeConfig {
            theta: match f.get(&key("rope.freq_base")) {
                Some(v) => v
                    .as_f64()
                    .ok_or_else(|| Error::Config("rope.freq_base must be a number".into()))?,
                None => 10000.0,
            },
            scaling,
        }),
        tie_word_embeddings: f.tensor_info("output.weight").is_none(),
        qkv_bias: f.tensor_info("blk.0.attn_q.bias").is_some(),
        attn_out_bias: f.tensor_info("blk.0.attn_output.bias").is_some(),
        mlp_bias: false,
        sliding_window: None,
        bos_token_id: opt_u32(f, "tokenizer.ggml.bos_token_id")?,
        eos_token_ids: opt_u32(f, "tokenizer.ggml.eos_token_id")?
            .into_iter()
            .collect(),
        score_head: false,
    };
    config.validate()?;
    Ok(config)
}

/// GPT-2 as llama.cpp's converter writes it (`gpt2.*` keys, Conv1D weights already `[out, in]`).
fn gpt2_config(f: &GgufFile) -> Result<ModelConfig> {
    let hidden_size = meta_usize(f, "gpt2.embedding_length")?;
    let num_heads = meta_usize(f, "gpt2.attention.head_count")?;
    if num_heads == 0 {
        return Err(Error::Config(
            "gpt2.attention.head_count must be positive".into(),
        ));
    }
    let vocab_size = vocab_size(f, "gpt2.vocab_size")?;
    let config = ModelConfig {
        architecture: Architecture::Gpt2,
        vocab_size,
        hidden_size,
        num_layers: meta_usize(f, "gpt2.block_count")?,
        num_heads,
        num_kv_heads: num_heads,
        head_dim: hidden_size / num_heads,
        intermediate_size: meta_usize(f, "gpt2.feed_forward_length")?,
        max_position_embeddings: meta_usize(f, "gpt2.context_length")?,
        norm_eps: meta_f64(f, "gpt2.attention.layer_norm_epsilon")? as f32,
        activation: Activation::GeluTanh,
        rope: None,
        tie_word_embeddings: f.tensor_info("output.weight").is_none(),
        qkv_bias: true,
        attn_out_bias: true,
        mlp_bias: true,
        sliding_window: None,
        bos_token_id: opt_u32(f, "tokenizer.ggml.bos_token_id")?,
        eos_token_ids: opt_u32(f, "tokenizer.ggml.eos_token_id")?
            .into_iter()
            .collect(),
        score_head: false,
    };
    config.validate()?;
    Ok(config)
}

/// `<arch>.vocab_size`, else the tokenizer's token count, else the embedding's row count.
fn vocab_size(f: &GgufFile, key: &str) -> Result<usize> {
    if let Some(v) = opt_usize(f, key)? {
        return Ok(v);
    }
    if let Some(tokens) = f.get("tokenizer.ggml.tokens").and_then(MetaValue::as_array) {
        return Ok(tokens.len());
    }
    f.tensor_info("token_embd.weight")
        .map(|t| t.shape()[0])
        .ok_or_else(|| Error::Config("cannot tell the vocabulary size".into()))
}

/// GGUF tensors under their HF names, with the q/k row permutation undone.
pub struct GgufSource<'a> {
    pub file: &'a GgufFile,
    pub config: &'a ModelConfig,
    /// Keep matrices in their quantized blocks where the quantized kernels read the type
    /// (inference); otherwise every tensor is dequantized to f32.
    pub keep_quantized: bool,
}

impl GgufSource<'_> {
    /// The GGUF name of an HF tensor name, and the head count its rows are permuted by.
    fn map_name(&self, hf: &str) -> Option<(String, Option<usize>)> {
        if self.config.family() == crate::config::Family::Gpt2 {
            return gpt2_name(hf).map(|n| (n, None));
        }
        let fixed = match hf {
            "model.embed_tokens.weight" => Some("token_embd.weight"),
            "model.norm.weight" => Some("output_norm.weight"),
            "lm_head.weight" => Some("output.weight"),
            _ => None,
        };
        if let Some(n) = fixed {
            return Some((n.to_owned(), None));
        }
        let rest = hf.strip_prefix("model.layers.")?;
        let (layer, tail) = rest.split_once('.')?;
        let (module, suffix) = tail.rsplit_once('.')?;
        let (short, heads) = match module {
            "input_layernorm" => ("attn_norm", None),
            "post_attention_layernorm" => ("ffn_norm", None),
            "self_attn.q_proj" => ("attn_q", Some(self.config.num_heads)),
            "self_attn.k_proj" => ("attn_k", Some(self.config.num_kv_heads)),
            "self_attn.v_proj" => ("attn_v", None),
            "self_attn.o_proj" => ("attn_output", None),
            "mlp.gate_proj" => ("ffn_gate", None),
            "mlp.up_proj" => ("ffn_up", None),
            "mlp.down_proj" => ("ffn_down", None),
            _ => return None,
        };
        Some((format!("blk.{layer}.{short}.{suffix}"), heads))
    }
}

impl TensorSource for GgufSource<'_> {
    fn contains(&self, name: &str) -> bool {
        self.map_name(name)
            .is_some_and(|(n, _)| self.file.tensor_info(&n).is_some())
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (gguf_name, heads) = self.map_name(name).ok_or_else(|| Error::TensorMissing {
            name: name.to_owned(),
        })?;
        let info = self
            .file
            .tensor_info(&gguf_name)
            .ok_or_else(|| Error::TensorMissing {
                name: format!("{gguf_name} ({name})"),
            })?;
        if info.shape() != shape {
            return Err(Error::TensorShape {
                name: gguf_name,
                expected: shape.to_vec(),
                got: info.shape(),
            });
        }
        let quantized = if self.keep_quantized {
            self.file.tensor_quantized(&gguf_name)
        } else {
            None
        };
        let t = match quantized {
            Some(t) => t,
            None => self.file.tensor_f32(&gguf_name)?,
        };
        match heads {
            Some(h) => unpermute_rows(&t, h).ok_or_else(|| {
                Error::format(
                    self.file.path(),
                    format!("`{gguf_name}`: rows do not split into {h} heads"),
                )
            }),
            None => Ok(t),
        }
    }

    /// GPT-2's Conv1D weights: HF stores `(in, out)`, llama.cpp's converter already wrote them
    /// transposed, so the GGUF tensor is the `(out, in)` the kernels want.
    fn tensor_transposed(&self, name: &str, stored: [usize; 2]) -> Result<Tensor> {
        self.tensor(name, &[stored[1], stored[0]])
    }
}

/// GGUF name of a GPT-2 tensor (HF names with or without the `transformer.` prefix).
fn gpt2_name(hf: &str) -> Option<String> {
    let hf = hf.strip_prefix("transformer.").unwrap_or(hf);
    let fixed = match hf {
        "wte.weight" => Some("token_embd.weight"),
        "wpe.weight" => Some("position_embd.weight"),
        "ln_f.weight" => Some("output_norm.weight"),
        "ln_f.bias" => Some("output_norm.bias"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some(n.to_owned());
    }
    let rest = hf.strip_prefix("h.")?;
    let (layer, tail) = rest.split_once('.')?;
    let (module, suffix) = tail.rsplit_once('.')?;
    let short = match module {
        "ln_1" => "attn_norm",
        "attn.c_attn" => "attn_qkv",
        "attn.c_proj" => "attn_output",
        "ln_2" => "ffn_norm",
        "mlp.c_fc" => "ffn_up",
        "mlp.c_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.{suffix}"))
}

/// Undoes llama.cpp's q/k permutation. Within each head of `hs` rows, GGUF row `2i + j` holds
/// HF row `j·hs/2 + i` (i < hs/2, j ∈ {0, 1}); biases (1-D) are permuted the same way.
/// A quantized matrix has its rows permuted as whole runs of blocks.
fn unpermute_rows(t: &Tensor, heads: usize) -> Option<Tensor> {
    let shape = t.shape().to_vec();
    let rows = shape[0];
    let cols: usize = shape[1..].iter().product();
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return None;
    }
    if let Some(q) = t.quant() {
        let row_bytes = q.data.len() / rows;
        let out = permuted(q.data, rows / heads, row_bytes);
        return Tensor::quantized_owned(q.ty, out, [rows, cols]);
    }
    Tensor::owned(permuted(t.as_slice(), rows / heads, cols), shape)
}

/// Rows of `row_len` items: within each head of `hs` rows, source row `2i + j` goes to row
/// `j·hs/2 + i`.
fn permuted<T: Copy + Default + Send + Sync>(src: &[T], hs: usize, row_len: usize) -> Vec<T> {
    use rayon::prelude::*;
    let half = hs / 2;
    let mut out = vec![T::default(); src.len()];
    // Heads in parallel: at load this copy (and the first touch of its pages) is a good part
    // of the time to the first token.
    out.par_chunks_mut(hs * row_len)
        .zip(src.par_chunks(hs * row_len))
        .for_each(|(dst, head)| {
            for i in 0..half {
                for j in 0..2 {
                    let (from, to) = (2 * i + j, j * half + i);
                    dst[to * row_len..(to + 1) * row_len]
                        .copy_from_slice(&head[from * row_len..(from + 1) * row_len]);
                }
            }
        });
    out
}

fn meta_str<'a>(f: &'a GgufFile, key: &str) -> Result<&'a str> {
    f.get(key)
        .ok_or_else(|| Error::Config(format!("GGUF metadata `{key}` is missing")))?
        .as_str()
        .ok_or_else(|| Error::Config(format!("GGUF metadata `{key}` must be a string")))
}

fn opt_usize(f: &GgufFile, key: &str) -> Result<Option<usize>> {
    match f.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| Error::Config(format!("GGUF metadata `{key}` must be an integer"))),
    }
}

fn meta_usize(f: &GgufFile, key: &str) -> Result<usize> {
    opt_usize(f, key)?.ok_or_else(|| Error::Config(format!("GGUF metadata `{key}` is missing")))
}

fn opt_u32(f: &GgufFile, key: &str) -> Result<Option<u32>> {
    opt_usize(f, key)?
        .map(|v| u32::try_from(v).map_err(|_| Error::Config(format!("`{key}` is too large"))))
        .transpose()
}

fn meta_f64(f: &GgufFile, key: &str) -> Result<f64> {
    f.get(key)
        .ok_or_else(|| Error::Config(format!("GGUF metadata `{key}` is missing")))?
        .as_f64()
        .ok_or_else(|| Error::Config(format!("GGUF metadata `{key}` must be a number")))
}
