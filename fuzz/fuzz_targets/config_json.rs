//! `config.json`, `generation_config.json` and `tokenizer_config.json`.
//!
//! Input: up to three parts separated by NUL bytes — `config.json`, then (optional)
//! `generation_config.json` and `tokenizer_config.json`. The config part goes through
//! `ModelConfig::from_json` (when it is JSON) and `ModelConfig::from_file`; when it comes out
//! small, the three files are put beside the weights and `tokenizer.json` of the matching test
//! fixture (tiny Llama, Qwen2 or GPT-2) and the folder is loaded with `Model::load`, which reads
//! the generation config (EOS ids, sampling defaults) and the chat template; a loaded model
//! then generates two tokens with the sampling defaults the generation config asked for.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rlx::{Architecture, LoadOptions, Model, ModelConfig};

const NAMES: [&str; 3] = [
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
];

/// A scratch folder per fixture with links to its weights and `tokenizer.json`.
fn folder(fixture: &str) -> PathBuf {
    static DIRS: OnceLock<Vec<(String, PathBuf)>> = OnceLock::new();
    let dirs = DIRS.get_or_init(|| {
        ["llama-f32", "qwen2-f32", "gpt2-f32"]
            .iter()
            .map(|f| {
                let dir = rlx_fuzz::fresh_dir(&format!("config-{f}"));
                let src = rlx_fuzz::fixture(f).canonicalize().expect("fixture");
                for file in ["model.safetensors", "tokenizer.json"] {
                    std::os::unix::fs::symlink(src.join(file), dir.join(file)).expect("link");
                }
                (f.to_string(), dir)
            })
            .collect()
    });
    dirs.iter()
        .find(|(f, _)| f == fixture)
        .map(|(_, d)| d.clone())
        .expect("known fixture")
}

fn small(c: &ModelConfig) -> bool {
    c.hidden_size <= 256
        && c.intermediate_size <= 1024
        && c.vocab_size <= 4096
        && c.num_layers <= 4
        && c.max_position_embeddings <= 4096
}

fuzz_target!(|data: &[u8]| {
    let parts = rlx_fuzz::split(data, rlx_fuzz::TEXT_SEP);
    if parts.len() > NAMES.len() {
        return;
    }
    let from_json = serde_json::from_slice(parts[0])
        .ok()
        .map(|v| ModelConfig::from_json(&v));
    if let Some(Ok(c)) = &from_json {
        assert!(c.validate().is_ok());
        let _ = (c.kv_dim(), c.q_dim(), c.family());
    }
    let file = rlx_fuzz::scratch_file("config.json", parts[0]);
    let from_file = ModelConfig::from_file(&file);
    if let Some(from_json) = &from_json {
        assert_eq!(from_json.is_ok(), from_file.is_ok());
    }
    let config = match from_file {
        Ok(c) => c,
        Err(e) => return rlx_fuzz::trace!("config: {e}"),
    };
    if !small(&config) {
        return;
    }
    let fixture = match config.architecture {
        Architecture::Gpt2 => "gpt2-f32",
        Architecture::Qwen2 => "qwen2-f32",
        Architecture::Llama | Architecture::Mistral => "llama-f32",
    };
    let dir = folder(fixture);
    for (i, name) in NAMES.iter().enumerate() {
        let path = dir.join(name);
        match parts.get(i) {
            Some(bytes) => std::fs::write(&path, bytes).expect("write"),
            None => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    let options = LoadOptions {
        threads: 0,
        ..LoadOptions::default()
    };
    let model = match Model::load(&dir, options) {
        Ok(m) => m,
        Err(e) => return rlx_fuzz::trace!("load: {e}"),
    };
    for &id in model.eos_token_ids() {
        assert!((id as usize) < model.config().vocab_size);
    }
    let mut params = model.generation_defaults().clone();
    params.max_new_tokens = params.max_new_tokens.min(2);
    let g = model.generate(&[[1u32]], &params, None);
    rlx_fuzz::trace!("generate: {:?}", g.map(|g| g[0].tokens.len()));
    if model.chat_template().is_some() {
        let r = model.encode_chat(&[rlx::Message::new("user", "Hi")], true);
        rlx_fuzz::trace!("encode_chat: {:?}", r.map(|t| t.len()));
    }
});
