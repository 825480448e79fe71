//! A GGUF file: the header, metadata and tensor table (`GgufFile::open`), every tensor's bytes
//! (in place, quantized view, dequantized to f32), `config_from_gguf`, the tokenizer built from
//! `tokenizer.ggml.*` (encode, decode, streaming), the chat template in
//! `tokenizer.chat_template`, and, when the config is small, the whole model (`Model::load`,
//! quantized and dequantized) and one forward pass.
//!
//! Must be a clean `Err` or `Ok`; never a panic, an out-of-bounds read or an unbounded
//! allocation (sizes only come from bytes actually in the file, or are capped here).

#![no_main]

use libfuzzer_sys::fuzz_target;
use rlx::model::ModelWeights;
use rlx::tokenizer_gguf::tokenizer_from_gguf;
use rlx::weights::{config_from_gguf, GgufFile, GgufSource};
use rlx::{ChatTemplate, LoadOptions, Message, Model, ModelConfig, TextStream, Tokenizer};

/// Largest tensor dequantized to f32 (16 MiB of f32).
const MAX_F32_ELEMENTS: usize = 1 << 22;

/// Whether a config's own allocations (RoPE tables, caches for one short forward pass) are
/// small; the weights themselves must be in the file, so they are bounded by its size.
fn small(c: &ModelConfig) -> bool {
    c.hidden_size <= 1024
        && c.intermediate_size <= 4096
        && c.vocab_size <= 1 << 16
        && c.num_layers <= 8
        && c.num_heads <= 64
        && c.head_dim <= 256
        && c.max_position_embeddings <= 1 << 16
}

fn exercise_tokenizer(tok: &Tokenizer, sample: &str) {
    for (text, special) in [
        (sample, false),
        ("Hello, world! 1234 <|im_start|> 🙂", true),
        ("", true),
    ] {
        if let Ok(ids) = tok.encode(text, special) {
            let _ = tok.decode(&ids, false);
            let _ = tok.decode(&ids, true);
        }
    }
    // Streaming decodes the ids so far at every token: a few tokens are enough.
    if let Ok(ids) = tok.encode(sample, false) {
        let mut stream = TextStream::new();
        for &id in ids.iter().take(8) {
            let _ = stream.push(tok, id);
        }
        let _ = stream.finish(tok);
    }
    // Ids outside the vocabulary.
    let v = tok.vocab_size() as u32;
    let _ = tok.decode(&[0, v, v.wrapping_add(1), u32::MAX], false);
    let _ = tok.token_to_id(sample);
    let _ = tok.eos_token_id();
}

fuzz_target!(|data: &[u8]| {
    let path = rlx_fuzz::scratch_file("model.gguf", data);
    let file = match GgufFile::open(&path) {
        Ok(f) => f,
        Err(e) => return rlx_fuzz::trace!("open: {e}"),
    };

    for info in file.tensors() {
        assert_eq!(file.tensor_bytes(info).len(), info.n_bytes);
        let _ = file.tensor_quantized(&info.name);
        if info.n_elements() <= MAX_F32_ELEMENTS {
            if let Ok(t) = file.tensor_f32(&info.name) {
                assert_eq!(t.shape(), info.shape().as_slice());
            }
        }
    }
    let _ = file.tensor_f32("no such tensor");

    let tokenizer = tokenizer_from_gguf(&file)
        .inspect_err(|e| rlx_fuzz::trace!("tokenizer: {e}"))
        .ok()
        .flatten();
    if let Some(tok) = &tokenizer {
        exercise_tokenizer(
            tok,
            &rlx_fuzz::text(&data[data.len().saturating_sub(64)..], 64),
        );
    }
    if let Some(src) = file.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
        let (bos, eos) = tokenizer
            .as_ref()
            .map_or((None, None), |t| (t.bos_token(), t.eos_token()));
        if let Ok(t) = ChatTemplate::new(src, bos, eos) {
            let msgs = [
                Message::new("system", "Be brief."),
                Message::new("user", "Hi"),
                Message::new("assistant", "Hello"),
            ];
            let r = t.render(&msgs, true);
            rlx_fuzz::trace!("chat template: {:?}", r.map(|s| s.len()));
        }
    }

    let config = match config_from_gguf(&file) {
        Ok(c) => c,
        Err(e) => return rlx_fuzz::trace!("config: {e}"),
    };
    assert!(config.validate().is_ok());
    if !small(&config) {
        return;
    }
    for keep_quantized in [true, false] {
        let source = GgufSource {
            file: &file,
            config: &config,
            keep_quantized,
        };
        let w = ModelWeights::from_source(&source, &config);
        rlx_fuzz::trace!("weights (keep_quantized {keep_quantized}): {:?}", w.err());
    }
    drop(file);
    for keep_quantized in [true, false] {
        // One load accepts NaN/inf weights, so the forward passes run on fuzzed values too.
        let options = LoadOptions {
            threads: 0,
            keep_quantized,
            allow_non_finite: keep_quantized,
            ..LoadOptions::default()
        };
        match Model::load(&path, options) {
            Ok(model) => {
                let _ = model.logits(&[0]);
                let last = model.config().vocab_size as u32 - 1;
                let r = model.logits(&[last, 0, last]);
                rlx_fuzz::trace!("logits: {:?}", r.map(|l| l.len()));
            }
            Err(e) => rlx_fuzz::trace!("load: {e}"),
        }
    }
});
