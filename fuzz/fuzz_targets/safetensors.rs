//! Safetensors checkpoints: a single `model.safetensors`, or a `model.safetensors.index.json`
//! with its shards.
//!
//! Input: without the separator `rlx_fuzz::BINARY_SEP`, the whole input is `model.safetensors`.
//! With it, the first part is the index and part `i` (from 1) is written under the `i`-th
//! distinct shard name the index lists (only names that are plain, short ASCII file names are
//! written; rlx must refuse any other name itself). Then every tensor is read back with its own
//! shape (and transposed when 2-D), and the checkpoint is gathered as the weights of the tiny
//! Llama and GPT-2 configs below.

#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rlx::model::ModelWeights;
use rlx::weights::SafetensorsCheckpoint;
use rlx::ModelConfig;
use serde_json::Value;

/// Configs the checkpoint is gathered for (the seeds hold their tensors).
const TINY_LLAMA: &str = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 4,
    "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
    "num_key_value_heads": 1, "vocab_size": 6, "max_position_embeddings": 8,
    "attention_bias": true, "mlp_bias": true}"#;
const TINY_GPT2: &str = r#"{"architectures": ["GPT2LMHeadModel"], "n_embd": 4, "n_head": 2,
    "n_layer": 1, "n_positions": 4, "vocab_size": 6, "tie_word_embeddings": false}"#;

fn configs() -> &'static [ModelConfig] {
    static CONFIGS: OnceLock<Vec<ModelConfig>> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        [TINY_LLAMA, TINY_GPT2]
            .iter()
            .map(|c| {
                ModelConfig::from_json(&serde_json::from_str(c).expect("JSON")).expect("config")
            })
            .collect()
    })
}

/// The distinct shard names of an index, in first-seen order (best effort: rlx's own parser is
/// what is being tested).
fn shard_names(index: &[u8]) -> Vec<String> {
    let Ok(v) = serde_json::from_slice::<Value>(index) else {
        return Vec::new();
    };
    let mut names: Vec<String> = Vec::new();
    if let Some(map) = v.get("weight_map").and_then(Value::as_object) {
        for file in map.values().filter_map(Value::as_str) {
            if !names.iter().any(|n| n == file) {
                names.push(file.to_owned());
            }
        }
    }
    names
}

fn exercise(dir: &Path) {
    let ck = match SafetensorsCheckpoint::open_dir(dir) {
        Ok(ck) => ck,
        Err(e) => return rlx_fuzz::trace!("open: {e}"),
    };
    let names: Vec<String> = ck.names().map(str::to_owned).collect();
    for name in &names {
        let shape = ck.shape(name).expect("listed tensor").to_vec();
        match ck.tensor(name, &shape) {
            Ok(t) => assert_eq!(t.shape(), shape.as_slice()),
            Err(e) => rlx_fuzz::trace!("tensor: {e}"),
        }
        if let [rows, cols] = shape[..] {
            if let Ok(t) = ck.tensor_transposed(name, [rows, cols]) {
                assert_eq!(t.shape(), &[cols, rows]);
            }
        }
        let mut wrong = shape.clone();
        wrong.push(1);
        assert!(ck.tensor(name, &wrong).is_err());
    }
    for config in configs() {
        let w = ModelWeights::from_source(&ck, config);
        rlx_fuzz::trace!("weights: {:?}", w.err());
    }
}

fuzz_target!(|data: &[u8]| {
    let dir = rlx_fuzz::fresh_dir("checkpoint");
    let parts = rlx_fuzz::split(data, rlx_fuzz::BINARY_SEP);
    if parts.len() == 1 {
        std::fs::write(dir.join("model.safetensors"), data).expect("write");
    } else {
        std::fs::write(dir.join("model.safetensors.index.json"), parts[0]).expect("write");
        for (name, bytes) in shard_names(parts[0]).iter().zip(&parts[1..]) {
            if rlx_fuzz::safe_file_name(name) {
                std::fs::write(dir.join(name), bytes).expect("write");
            }
        }
    }
    exercise(&dir);
});
