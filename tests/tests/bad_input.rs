//! Every kind of bad input gets a clear error naming the problem — never a panic.

use std::path::Path;

use rlx::{Error, LoadOptions, Model, SamplingParams};
use rlx_tests::{safetensors_bytes, tiny_llama_config, tiny_llama_tensors, write_tiny_llama};

fn load(dir: &Path) -> Result<Model, Error> {
    Model::load(dir, LoadOptions::default())
}

fn tiny() -> (tempfile::TempDir, Model) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_llama(dir.path());
    let model = load(dir.path()).expect("tiny llama loads");
    (dir, model)
}

/// A safetensors file with the given JSON header and `data_len` zero bytes of data.
fn raw_safetensors(header: &str, data_len: usize) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.resize(out.len() + data_len, 0);
    out
}

fn with_weights(bytes: &[u8]) -> Result<Model, Error> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        tiny_llama_config().to_string(),
    )
    .unwrap();
    std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
    load(dir.path())
}

#[test]
fn missing_files_are_named() {
    let err = load(Path::new("/no/such/model")).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(err.to_string().contains("/no/such/model"));

    let dir = tempfile::tempdir().unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(err.to_string().contains("config.json"), "{err}");

    std::fs::write(
        dir.path().join("config.json"),
        tiny_llama_config().to_string(),
    )
    .unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(err.to_string().contains("model.safetensors"), "{err}");

    let file = dir.path().join("config.json");
    let err = load(&file).unwrap_err();
    assert!(matches!(err, Error::Format { .. }), "{err}");
}

#[test]
fn malformed_json_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_llama(dir.path());
    std::fs::write(dir.path().join("config.json"), "{\"hidden_size\": 16,").unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Json { .. }), "{err}");

    write_tiny_llama(dir.path());
    std::fs::write(dir.path().join("generation_config.json"), "[not json").unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(err.to_string().contains("generation_config.json"), "{err}");

    std::fs::remove_file(dir.path().join("generation_config.json")).unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Tokenizer(_)), "{err}");
}

#[test]
fn lying_safetensors_headers_are_rejected() {
    let cases = [
        // Offsets past the end of the data.
        (
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            8,
        ),
        // Overlapping ranges.
        (
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
            24,
        ),
        // Byte count differs from shape × dtype.
        (
            r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,8]}}"#,
            8,
        ),
        // Trailing bytes nobody owns.
        (
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            64,
        ),
        // Shape whose element count overflows.
        (
            r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}}"#,
            8,
        ),
        // Not JSON at all.
        ("this is not json", 0),
    ];
    for (header, data_len) in cases {
        let err = with_weights(&raw_safetensors(header, data_len)).unwrap_err();
        assert!(matches!(err, Error::Format { .. }), "{header}: {err}");
        assert!(err.to_string().contains("model.safetensors"), "{err}");
    }
    // A header length pointing past the end of the file.
    let mut bytes = raw_safetensors("{}", 0);
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(matches!(with_weights(&bytes), Err(Error::Format { .. })));
}

#[test]
fn truncated_weights_are_rejected_at_every_cut() {
    let good = safetensors_bytes(&tiny_llama_tensors());
    assert!(with_weights(&good).is_ok());
    let step = (good.len() / 97).max(1);
    for cut in (0..good.len()).step_by(step) {
        let err = with_weights(&good[..cut]).unwrap_err();
        assert!(matches!(err, Error::Format { .. }), "cut at {cut}: {err}");
    }
}

#[test]
fn wrong_shape_missing_and_unreadable_tensors_are_named() {
    let mut tensors = tiny_llama_tensors();
    let q = tensors
        .iter_mut()
        .find(|(n, _)| n == "model.layers.1.self_attn.q_proj.weight")
        .unwrap();
    q.1 = vec![16, 8];
    let err = with_weights(&safetensors_bytes(&tensors)).unwrap_err();
    assert!(matches!(err, Error::TensorShape { .. }), "{err}");
    assert!(err
        .to_string()
        .contains("model.layers.1.self_attn.q_proj.weight"));

    let mut tensors = tiny_llama_tensors();
    tensors.retain(|(n, _)| n != "lm_head.weight");
    let err = with_weights(&safetensors_bytes(&tensors)).unwrap_err();
    assert!(err.to_string().contains("lm_head.weight"), "{err}");

    let header =
        r#"{"model.embed_tokens.weight":{"dtype":"I32","shape":[32,16],"data_offsets":[0,2048]}}"#;
    let err = with_weights(&raw_safetensors(header, 2048)).unwrap_err();
    assert!(matches!(err, Error::TensorDtype { .. }), "{err}");
}

#[test]
fn shard_index_cannot_escape_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_llama(dir.path());
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        r#"{"weight_map": {"lm_head.weight": "../model.safetensors"}}"#,
    )
    .unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(err.to_string().contains("same folder"), "{err}");

    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        r#"{"weight_map": {"lm_head.weight": "missing-00001.safetensors"}}"#,
    )
    .unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(
        err.to_string().contains("missing-00001.safetensors"),
        "{err}"
    );
}

#[test]
fn bad_tokens_and_lengths_are_errors() {
    let (_dir, model) = tiny();
    let err = model.logprobs(&[vec![1u32, 32]], 1.0).unwrap_err();
    assert!(
        matches!(err, Error::TokenOutOfRange { id: 32, vocab: 32 }),
        "{err}"
    );
    let err = model
        .generate(&[vec![99u32]], &SamplingParams::greedy(2), None)
        .unwrap_err();
    assert!(matches!(err, Error::TokenOutOfRange { .. }), "{err}");
    let err = model.logits(&[5u32; 25]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ContextOverflow {
                requested: 25,
                max: 24
            }
        ),
        "{err}"
    );
    let err = model
        .generate(&[vec![1u32; 20]], &SamplingParams::greedy(5), None)
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::ContextOverflow {
                requested: 25,
                max: 24
            }
        ),
        "{err}"
    );
    let err = model.logprobs(&[Vec::<u32>::new()], 1.0).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert!(model.logprobs(&[vec![1u32, 2]], f32::NAN).is_err());
    assert!(model.logprobs(&[vec![1u32, 2]], -1.0).is_err());
    let bad = SamplingParams {
        top_p: 1.5,
        ..SamplingParams::default()
    };
    assert!(matches!(
        model.generate(&[vec![1u32]], &bad, None),
        Err(Error::InvalidArgument(_))
    ));
    // The text helpers need a tokenizer this model does not have.
    assert!(matches!(
        model.generate_text("hi", &SamplingParams::greedy(1)),
        Err(Error::NoTokenizer)
    ));
}

#[test]
fn masks_must_fit_their_sequences() {
    let (_dir, model) = tiny();
    let seqs = [vec![1u32, 5, 6, 7]];
    let sums = model
        .masked_logprob_sums(&seqs, &[vec![false, false, true, true]], 1.0)
        .unwrap();
    let lps = model.logprobs(&seqs, 1.0).unwrap();
    assert_eq!(sums[0], lps[0][1] as f64 + lps[0][2] as f64);
    assert!(model
        .masked_logprob_sums(&seqs, &[vec![true; 4]], 1.0)
        .is_err());
    assert!(model
        .masked_logprob_sums(&seqs, &[vec![false; 3]], 1.0)
        .is_err());
    assert!(model.masked_logprob_sums(&seqs, &[], 1.0).is_err());
}
