//! Shared helpers of the integration tests: fixture paths, transformers reference outputs, and
//! small hand-made checkpoints for bad-input tests.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};

/// `tests/fixtures/<name>` (written by `tests/gen_fixtures.py`).
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
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
            let bytes = (0..n)
                .flat_map(|i| {
                    let x = ((i * 7919 + k * 104729) % 1000) as f32 / 1000.0 - 0.5;
                    x.to_le_bytes()
                })
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
