//! Shared helpers of the integration tests: fixture paths, transformers reference outputs, and
//! small hand-made checkpoints for bad-input tests.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};

/// `tests/fixtures/<name>` (written by `tests/gen_fixtures.py`); `RLX_FIXTURES` points
/// elsewhere (a test binary carried to another machine, e.g. by `scripts/gpu-check.sh`).
pub fn fixture(name: &str) -> PathBuf {
    match std::env::var_os("RLX_FIXTURES") {
        Some(dir) => PathBuf::from(dir).join(name),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures")
            .join(name),
    }
}

/// One reference case written by transformers.
pub struct Case {
    pub input_ids: Vec<u32>,
    pub greedy_prompt: Vec<u32>,
    pub greedy_new_tokens: Vec<u32>,
}

/// `reference.json` + `reference.safetensors` of a fixture folder.
pub struct Reference {
    pub cases: Vec<Case>,
    pub temperature_case: f32,
    tensors: HashMap<String, Vec<f32>>,
}

impl Reference {
    pub fn load(dir: &Path) -> Reference {
        let meta: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("reference.json")).expect("reference.json"),
        )
        .expect("reference.json is JSON");
        let ids = |v: &Value| -> Vec<u32> {
            v.as_array()
                .expect("id list")
                .iter()
                .map(|x| x.as_u64().expect("id") as u32)
                .collect()
        };
        let cases = meta["cases"]
            .as_array()
            .expect("cases")
            .iter()
            .map(|c| Case {
                input_ids: ids(&c["input_ids"]),
                greedy_prompt: ids(&c["greedy_prompt"]),
                greedy_new_tokens: ids(&c["greedy_new_tokens"]),
            })
            .collect();
        let bytes =
            std::fs::read(dir.join("reference.safetensors")).expect("reference.safetensors");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("reference tensors");
        let tensors = st
            .tensors()
            .into_iter()
            .map(|(name, view)| {
                assert_eq!(view.dtype(), Dtype::F32, "{name}");
                let values = view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                (name, values)
            })
            .collect();
        Reference {
            cases,
            temperature_case: meta["temperature_case"].as_f64().unwrap_or(0.7) as f32,
            tensors,
        }
    }

    pub fn tensor(&self, name: &str) -> &[f32] {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("reference tensor {name} missing"))
    }
}

/// Largest absolute difference, with the index where it occurs.
pub fn max_abs_diff(got: &[f32], want: &[f32]) -> (f32, usize) {
    assert_eq!(got.len(), want.len(), "length mismatch");
    got.iter()
        .zip(want)
        .enumerate()
        .map(|(i, (g, w))| ((g - w).abs(), i))
        .fold(
            (0.0, 0),
            |a, b| if b.0 > a.0 || b.0.is_nan() { b } else { a },
        )
}

/// A tiny Llama config (2 layers, C=16, GQA 4/2, V=32) as JSON, for hand-made checkpoints.
pub fn tiny_llama_config() -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32,
        "max_position_embeddings": 24, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": false, "eos_token_id": 2, "bos_token_id": 1
    })
}

/// Names and shapes of every tensor of `tiny_llama_config()`.
pub fn tiny_llama_tensors() -> Vec<(String, Vec<usize>)> {
    let mut t = vec![
        ("model.embed_tokens.weight".to_string(), vec![32, 16]),
        ("model.norm.weight".to_string(), vec![16]),
        ("lm_head.weight".to_string(), vec![32, 16]),
    ];
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        for (n, s) in [
            ("input_layernorm.weight", vec![16]),
            ("post_attention_layernorm.weight", vec![16]),
            ("self_attn.q_proj.weight", vec![16, 16]),
            ("self_attn.k_proj.weight", vec![8, 16]),
            ("self_attn.v_proj.weight", vec![8, 16]),
            ("self_attn.o_proj.weight", vec![16, 16]),
            ("mlp.gate_proj.weight", vec![32, 16]),
            ("mlp.up_proj.weight", vec![32, 16]),
            ("mlp.down_proj.weight", vec![16, 32]),
        ] {
            t.push((format!("{p}.{n}"), s));
        }
    }
    t
}

/// Serializes f32 tensors (deterministic pseudo-random values) to safetensors bytes.
pub fn safetensors_bytes(tensors: &[(String, Vec<usize>)]) -> Vec<u8> {
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let n: usize = shape.iter().product();
            let bytes = tensor_values(k, n)
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            (name.clone(), shape.clone(), bytes)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).expect("view"),
            )
        })
        .collect();
    safetensors::serialize(views, None).expect("serialize")
}

/// Writes a complete tiny Llama folder (config + weights, no tokenizer) into `dir`.
pub fn write_tiny_llama(dir: &Path) {
    std::fs::write(dir.join("config.json"), tiny_llama_config().to_string()).expect("config");
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors_bytes(&tiny_llama_tensors()),
    )
    .expect("weights");
}

/// Deterministic pseudo-random f32 values of tensor number `k` (what `safetensors_bytes` writes).
pub fn tensor_values(k: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 + k * 104729) % 1000) as f32 / 1000.0 - 0.5)
        .collect()
}

/// A GGUF file assembled field by field, so tests can write valid files and break them.
pub struct GgufBuilder {
    pub version: u32,
    pub alignment: usize,
    /// (key, value type, encoded value).
    pub kv: Vec<(String, u32, Vec<u8>)>,
    /// (name, ggml dims, ggml type, data).
    pub tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

pub fn gguf_string(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

impl GgufBuilder {
    pub fn new() -> Self {
        GgufBuilder {
            version: 3,
            alignment: 32,
            kv: Vec::new(),
            tensors: Vec::new(),
        }
    }

    pub fn u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.kv.push((key.into(), 4, v.to_le_bytes().to_vec()));
        self
    }

    pub fn f32(&mut self, key: &str, v: f32) -> &mut Self {
        self.kv.push((key.into(), 6, v.to_le_bytes().to_vec()));
        self
    }

    pub fn string(&mut self, key: &str, v: &str) -> &mut Self {
        self.kv.push((key.into(), 8, gguf_string(v)));
        self
    }

    /// An f32 tensor given in row-major HF shape (stored with reversed dims, as GGUF does).
    pub fn tensor_f32(&mut self, name: &str, shape: &[usize], values: &[f32]) -> &mut Self {
        let dims = shape.iter().rev().map(|&d| d as u64).collect();
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensors.push((name.into(), dims, 0, data));
        self
    }

    /// A 2-D tensor quantized to Q8_0 blocks (rows of a multiple of 32 values), as llama.cpp's
    /// quantizer writes them: `d = max|x| / 127` as f16, `q = round(x / d)`.
    pub fn tensor_q8_0(&mut self, name: &str, shape: &[usize], values: &[f32]) -> &mut Self {
        let dims = shape.iter().rev().map(|&d| d as u64).collect();
        let mut data = Vec::new();
        for block in values.chunks_exact(32) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            data.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
            data.extend(block.iter().map(|v| (v * inv).round() as i8 as u8));
        }
        self.tensors.push((name.into(), dims, 8, data));
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        for (k, ty, v) in &self.kv {
            out.extend(gguf_string(k));
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(v);
        }
        let mut offset = 0usize;
        let mut offsets = Vec::new();
        for (name, dims, ty, data) in &self.tensors {
            out.extend(gguf_string(name));
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offsets.push(offset);
            offset = (offset + data.len()).next_multiple_of(self.alignment);
        }
        let start = out.len().next_multiple_of(self.alignment);
        out.resize(start, 0);
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            out.resize(start + off, 0);
            out.extend_from_slice(data);
        }
        out
    }
}

impl Default for GgufBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// The tiny Llama of `tiny_llama_config()` as a llama.cpp-style GGUF: GGUF tensor names, q/k
/// rows permuted the way llama.cpp's converter permutes them, same values as
/// `write_tiny_llama`.
pub fn tiny_llama_gguf() -> GgufBuilder {
    let mut b = GgufBuilder::new();
    b.string("general.architecture", "llama")
        .u32("llama.context_length", 24)
        .u32("llama.embedding_length", 16)
        .u32("llama.block_count", 2)
        .u32("llama.feed_forward_length", 32)
        .u32("llama.attention.head_count", 4)
        .u32("llama.attention.head_count_kv", 2)
        .f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        .f32("llama.rope.freq_base", 10000.0)
        .u32("llama.vocab_size", 32)
        .u32("tokenizer.ggml.eos_token_id", 2)
        .u32("tokenizer.ggml.bos_token_id", 1);
    for (k, (name, shape)) in tiny_llama_tensors().iter().enumerate() {
        let n: usize = shape.iter().product();
        let mut values = tensor_values(k, n);
        let heads = if name.ends_with("q_proj.weight") {
            Some(4)
        } else if name.ends_with("k_proj.weight") {
            Some(2)
        } else {
            None
        };
        if let Some(h) = heads {
            values = permute_rows_like_llama_cpp(&values, shape[0], shape[1], h);
        }
        b.tensor_f32(&gguf_name(name), shape, &values);
    }
    b
}

fn permute_rows_like_llama_cpp(v: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let hs = rows / heads;
    let half = hs / 2;
    let mut out = vec![0f32; v.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let hf = h * hs + j * half + i;
                let gg = h * hs + 2 * i + j;
                out[gg * cols..(gg + 1) * cols].copy_from_slice(&v[hf * cols..(hf + 1) * cols]);
            }
        }
    }
    out
}

fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").expect("layer tensor");
    let (layer, tail) = rest.split_once('.').expect("layer index");
    let short = match tail {
        "input_layernorm.weight" => "attn_norm",
        "post_attention_layernorm.weight" => "ffn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        other => panic!("unmapped {other}"),
    };
    format!("blk.{layer}.{short}.weight")
}

/// A JSON list of token-id lists.
pub fn id_lists(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
        .expect("list of sequences")
        .iter()
        .map(|s| {
            s.as_array()
                .expect("sequence")
                .iter()
                .map(|x| x.as_u64().expect("token id") as u32)
                .collect()
        })
        .collect()
}

/// The f32 values of a safetensors view.
pub fn f32_values(view: &TensorView<'_>) -> Vec<f32> {
    view.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Asserts max |got − want| ≤ `tol` × max |want| (gradient tolerances are stated this way).
pub fn assert_rel_close(name: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-9);
    let diff = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        diff / scale <= tol,
        "{name}: max |Δ| = {diff:e}, max |want| = {scale:e}"
    );
}

/// Masks selecting each sequence's tokens from its start index on (JSON list of starts).
pub fn masks_from_starts(seqs: &[Vec<u32>], starts: &Value) -> Vec<Vec<bool>> {
    let starts = starts.as_array().expect("starts must be a list");
    seqs.iter()
        .zip(starts)
        .map(|(s, k)| {
            let k = k.as_u64().expect("start must be an integer") as usize;
            (0..s.len()).map(|t| t >= k).collect()
        })
        .collect()
}

/// A JSON list of numbers.
pub fn f64_list(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("expected a list")
        .iter()
        .map(|x| x.as_f64().expect("expected a number"))
        .collect()
}

/// A JSON list of lists of numbers.
pub fn f64_rows(v: &Value) -> Vec<Vec<f64>> {
    v.as_array()
        .expect("expected a list")
        .iter()
        .map(f64_list)
        .collect()
}

/// Reads a fixture's JSON file.
pub fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture file")).expect("JSON")
}

/// `(rows, cols)` → `(cols, rows)`: GPT-2's Conv1D layout from rlx's `[out, in]`.
pub fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = v[r * cols + c];
        }
    }
    out
}
