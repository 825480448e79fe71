//! Parity with transformers on the tiny random fixture models (`tests/gen_fixtures.py`).
//!
//! Tolerances: logits and log-probs max |Δ| ≤ 1e-4 absolute. That holds for the bf16 and f16
//! folders too, because rlx widens half-precision weights to f32 exactly, and the reference
//! loads the same half-precision file upcast to f32. Greedy continuations must be identical.

use rlx::{LoadOptions, Model, SamplingParams};
use rlx_tests::{fixture, max_abs_diff, Reference};

const TOL: f32 = 1e-4;

fn check(name: &str) {
    let dir = fixture(name);
    let model = Model::load(&dir, LoadOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
    let reference = Reference::load(&dir);
    let v = model.config().vocab_size;
    for (i, case) in reference.cases.iter().enumerate() {
        let ids = &case.input_ids;
        let logits = model.logits(ids).unwrap();
        let want = reference.tensor(&format!("logits_{i}"));
        let (d, at) = max_abs_diff(&logits, want);
        assert!(
            d <= TOL,
            "{name} case {i}: logits max |Δ| = {d:e} at token {} vocab {} (rlx {} vs transformers {})",
            at / v,
            at % v,
            logits[at],
            want[at]
        );

        let lp = model.logprobs(std::slice::from_ref(ids), 1.0).unwrap();
        let (d, at) = max_abs_diff(&lp[0], reference.tensor(&format!("logprobs_{i}")));
        assert!(
            d <= TOL,
            "{name} case {i}: log-probs max |Δ| = {d:e} at {at}"
        );

        let t = reference.temperature_case;
        let lp = model.logprobs(std::slice::from_ref(ids), t).unwrap();
        let (d, at) = max_abs_diff(&lp[0], reference.tensor(&format!("logprobs_t07_{i}")));
        assert!(
            d <= TOL,
            "{name} case {i}: log-probs at T={t} max |Δ| = {d:e} at {at}"
        );

        // transformers generated exactly this many tokens (EOS disabled), so do we.
        let params = SamplingParams {
            stop_token_ids: Some(Vec::new()),
            ..SamplingParams::greedy(case.greedy_new_tokens.len())
        };
        let out = model
            .generate(std::slice::from_ref(&case.greedy_prompt), &params, None)
            .unwrap();
        assert_eq!(
            out[0].tokens, case.greedy_new_tokens,
            "{name} case {i}: greedy tokens"
        );
    }
}

#[test]
fn gpt2_f32() {
    check("gpt2-f32");
}

#[test]
fn gpt2_bf16() {
    check("gpt2-bf16");
}

#[test]
fn llama_f32_gqa_untied() {
    check("llama-f32");
}

#[test]
fn llama_bf16() {
    check("llama-bf16");
}

#[test]
fn llama_f16() {
    check("llama-f16");
}

#[test]
fn llama_sharded() {
    assert!(fixture("llama-sharded")
        .join("model.safetensors.index.json")
        .is_file());
    check("llama-sharded");
}

#[test]
fn qwen2_qkv_bias_tied() {
    check("qwen2-f32");
}

#[test]
fn f32_weights_are_used_in_place() {
    let model = Model::load(fixture("llama-f32"), LoadOptions::default()).unwrap();
    let w = model.weights();
    assert!(w.tok_emb.is_mapped(), "f32 embedding should be zero-copy");
    assert!(w
        .layers
        .iter()
        .all(|l| l.q.w.is_mapped() && l.o.w.is_mapped()));
    let model = Model::load(fixture("llama-bf16"), LoadOptions::default()).unwrap();
    assert!(
        !model.weights().tok_emb.is_mapped(),
        "bf16 is widened to f32 at load"
    );
}

#[test]
fn tokenizer_matches_transformers_ids() {
    // Case 2 of each reference was tokenized by transformers with add_special_tokens=True.
    for name in ["gpt2-f32", "llama-f32"] {
        let dir = fixture(name);
        let model = Model::load(&dir, LoadOptions::default()).unwrap();
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
                .unwrap();
        let Some(text) = meta["tokenized_text"].as_str() else {
            panic!("{name}: reference.json has no tokenized_text");
        };
        let want: Vec<u32> = meta["tokenized_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = model
            .require_tokenizer()
            .unwrap()
            .encode(text, true)
            .unwrap();
        assert_eq!(got, want, "{name}");
    }
}
