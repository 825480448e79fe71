//! JSONL datasets: `read_jsonl` (strict and with `skip_bad`), `load`, and every `Formatter`
//! method (SFT, preference pairs, RL prompts) on every line, with the model's chat template and
//! with plain-text formatting.
//!
//! The model is the tiny Llama test fixture (`tests/fixtures/llama-f32`), loaded once, with a
//! ChatML template added (the fixture has none) so the chat path runs too.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rlx::pipeline::data::{load, read_jsonl, Formatter};
use rlx::{LoadOptions, Model};

/// ChatML, as the SmolLM2 and Qwen2 templates render it (without a default system turn, so
/// short lines fit the fixture's 128 positions).
const TEMPLATE: &str = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Longest sequence a line may make, in tokens.
const MAX_LEN: usize = 128;

fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = rlx_fuzz::fresh_dir("jsonl-model");
        let src = rlx_fuzz::fixture("llama-f32")
            .canonicalize()
            .expect("fixture");
        for file in ["config.json", "model.safetensors", "tokenizer.json"] {
            std::os::unix::fs::symlink(src.join(file), dir.join(file)).expect("link");
        }
        let cfg =
            serde_json::json!({"bos_token": "<s>", "eos_token": "</s>", "chat_template": TEMPLATE});
        std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).expect("write");
        let model = Model::load(&dir, LoadOptions::default()).expect("tiny llama loads");
        assert!(model.chat_template().is_some());
        model
    })
}

fn formatters() -> &'static [Formatter<'static>; 2] {
    static F: OnceLock<[Formatter<'static>; 2]> = OnceLock::new();
    F.get_or_init(|| {
        [
            Formatter::new(model(), true, MAX_LEN).expect("chat formatter"),
            Formatter::new(model(), false, MAX_LEN).expect("plain formatter"),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let path = rlx_fuzz::scratch_file("data.jsonl", data);
    let strict = read_jsonl(&path, false);
    let Ok((rows, bad)) = read_jsonl(&path, true) else {
        assert!(strict.is_err());
        return;
    };
    assert!(!rows.is_empty());
    if let Ok((strict_rows, strict_bad)) = &strict {
        assert!(strict_bad.is_empty() && bad.is_empty());
        assert_eq!(strict_rows.len(), rows.len());
    }
    for f in formatters() {
        for (_, v) in &rows {
            match f.sft(v) {
                Ok(e) => {
                    assert_eq!(e.tokens.len(), e.mask.len());
                    assert!(e.tokens.len() <= MAX_LEN);
                    rlx_fuzz::trace!("sft: {} tokens", e.tokens.len());
                }
                Err(e) => rlx_fuzz::trace!("sft: {e}"),
            }
            let pairs = f.pairs(v);
            rlx_fuzz::trace!(
                "pairs: {:?}",
                pairs.as_ref().map(Vec::len).map_err(|e| e.to_string())
            );
            if let Ok(pairs) = pairs {
                for p in pairs {
                    assert_eq!(p.chosen.tokens.len(), p.chosen.mask.len());
                    assert_eq!(p.rejected.tokens.len(), p.rejected.mask.len());
                }
            }
            match f.prompt(v) {
                Ok(p) => assert!(p.tokens.len() < MAX_LEN),
                Err(e) => rlx_fuzz::trace!("prompt: {e}"),
            }
        }
        let _ = load(&path, true, |v| f.sft(v));
        let _ = load(&path, false, |v| f.prompt(v));
    }
});
