//! `save_hf_folder`: a GGUF written as an HF folder loads back with the same logits; the write is
//! all-or-nothing.

use rlx::convert::{save_hf_folder, SaveDtype};
use rlx::{Error, LoadOptions, Model};
use rlx_tests::tiny_llama_gguf;

fn gguf_model(dir: &std::path::Path) -> Model {
    let path = dir.join("tiny.gguf");
    std::fs::write(&path, tiny_llama_gguf().build()).unwrap();
    Model::load(&path, LoadOptions::default()).unwrap()
}

#[test]
fn converted_folder_reproduces_the_logits() {
    let dir = tempfile::tempdir().unwrap();
    let model = gguf_model(dir.path());
    let ids = [1u32, 4, 8, 15, 16, 23, 31];
    let want = model.logits(&ids).unwrap();

    let out = dir.path().join("hf-f32");
    save_hf_folder(&model, &out, SaveDtype::F32).unwrap();
    let back = Model::load(&out, LoadOptions::default()).unwrap();
    assert_eq!(back.logits(&ids).unwrap(), want, "f32 round trip is exact");
    assert_eq!(back.eos_token_ids(), model.eos_token_ids());

    let out = dir.path().join("hf-bf16");
    save_hf_folder(&model, &out, SaveDtype::Bf16).unwrap();
    let back = Model::load(&out, LoadOptions::default()).unwrap();
    let got = back.logits(&ids).unwrap();
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 0.05, "bf16 rounding moved a logit by {worst}");
    // No temporary folder is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn existing_or_unwritable_targets_are_errors_and_nothing_is_left() {
    let dir = tempfile::tempdir().unwrap();
    let model = gguf_model(dir.path());
    let out = dir.path().join("exists");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let err = save_hf_folder(&model, &out, SaveDtype::F32).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );

    let missing_parent = dir.path().join("no/such/parent/out");
    assert!(save_hf_folder(&model, &missing_parent, SaveDtype::F32).is_err());
    assert!(!dir.path().join("no").exists());
}

#[test]
fn every_fixture_family_round_trips() {
    for name in ["gpt2-f32", "llama-f32", "qwen2-f32"] {
        let dir = tempfile::tempdir().unwrap();
        let src = rlx_tests::fixture(name);
        let model = Model::load(&src, LoadOptions::default()).unwrap();
        let out = dir.path().join("copy");
        save_hf_folder(&model, &out, SaveDtype::F32).unwrap();
        let back = Model::load(&out, LoadOptions::default()).unwrap();
        assert_eq!(back.config(), model.config(), "{name}");
        let ids = [1u32, 2, 3, 50, 60];
        assert_eq!(
            back.logits(&ids).unwrap(),
            model.logits(&ids).unwrap(),
            "{name}"
        );
        let text = "Hello 123";
        assert_eq!(
            back.require_tokenizer()
                .unwrap()
                .encode(text, true)
                .unwrap(),
            model
                .require_tokenizer()
                .unwrap()
                .encode(text, true)
                .unwrap(),
            "{name}"
        );
    }
}
