//! The `rlx` command on the fixture models: output equals the library's, errors exit non-zero.

use std::process::{Command, Output};

use rlx::{LoadOptions, Model, SamplingParams};
use rlx_tests::fixture;

fn rlx(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rlx"))
        .args(args)
        .output()
        .expect("run rlx")
}

#[test]
fn generate_streams_the_greedy_continuation() {
    for name in ["gpt2-f32", "llama-f32"] {
        let dir = fixture(name);
        let path = dir.to_str().unwrap();
        let out = rlx(&[
            "generate",
            "--model",
            path,
            "--max-new-tokens",
            "10",
            "The answer is",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        let model = Model::load(&dir, LoadOptions::default()).unwrap();
        let want = model
            .generate_text("The answer is", &SamplingParams::greedy(10))
            .unwrap();
        let got = String::from_utf8(out.stdout).unwrap();
        assert_eq!(got.strip_suffix('\n').unwrap(), want, "{name}");
    }
}

/// `--ignore-eos` generates exactly `--max-new-tokens` tokens: the library's generation with no
/// stop ids, which here runs through an end-of-sequence token (where the default would stop).
#[test]
fn ignore_eos_generates_exactly_the_requested_tokens() {
    let dir = fixture("llama-f32");
    let model = Model::load(&dir, LoadOptions::default()).unwrap();
    let tok = model.require_tokenizer().unwrap();
    let n = 24;
    let mut passed_eos = false;
    for (seed, prompt) in ["hello", "The answer is", "a b c"].iter().enumerate() {
        let sampled = |stop: Option<Vec<u32>>| SamplingParams {
            max_new_tokens: n,
            temperature: 1.5,
            seed: seed as u64,
            stop_token_ids: stop,
            ..SamplingParams::default()
        };
        let ids = tok.encode(prompt, true).unwrap();
        let all = model
            .generate(&[ids], &sampled(Some(Vec::new())), None)
            .unwrap();
        assert_eq!(all[0].tokens.len(), n);
        passed_eos |= all[0].tokens[..n - 1]
            .iter()
            .any(|t| model.eos_token_ids().contains(t));
        let out = rlx(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--max-new-tokens",
            &n.to_string(),
            "--temperature",
            "1.5",
            "--seed",
            &seed.to_string(),
            "--ignore-eos",
            prompt,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The CLI prints text without special tokens.
        let want = tok.decode(&all[0].tokens, true).unwrap();
        let got = String::from_utf8(out.stdout).unwrap();
        assert_eq!(got.strip_suffix('\n').unwrap(), want, "{prompt}");
    }
    assert!(
        passed_eos,
        "no run sampled an end-of-sequence token before its last position"
    );
}

#[test]
fn sampling_flags_are_reproducible() {
    let path = fixture("llama-f32");
    let path = path.to_str().unwrap();
    let args = [
        "generate",
        "--model",
        path,
        "--max-new-tokens",
        "12",
        "--temperature",
        "0.9",
        "--top-p",
        "0.9",
        "--top-k",
        "40",
        "--seed",
        "7",
        "hello",
    ];
    let a = rlx(&args);
    let b = rlx(&args);
    assert!(a.status.success());
    assert_eq!(a.stdout, b.stdout);
}

#[test]
fn logprobs_prints_json_matching_the_library() {
    let dir = fixture("llama-f32");
    let out = rlx(&[
        "logprobs",
        "--model",
        dir.to_str().unwrap(),
        "Hello world, 123",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let model = Model::load(&dir, LoadOptions::default()).unwrap();
    let ids = model
        .require_tokenizer()
        .unwrap()
        .encode("Hello world, 123", true)
        .unwrap();
    let tokens: Vec<u32> = json["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(tokens, ids);
    assert_eq!(
        ids[0], 1,
        "llama-style tokenizer adds BOS like transformers"
    );
    let lps: Vec<f32> = json["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let want = model.logprobs(&[ids], 1.0).unwrap();
    assert_eq!(lps, want[0]);
}

/// A copy of the llama fixture whose first stored weight value is NaN.
fn nan_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture("llama-f32")).unwrap() {
        let entry = entry.unwrap();
        if entry.path().is_file() {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
    }
    let st = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + header..12 + header].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&st, bytes).unwrap();
    dir
}

#[test]
fn nan_weights_are_a_clear_error_unless_allowed() {
    let dir = nan_fixture();
    let model = dir.path().to_str().unwrap();
    let out = rlx(&["generate", "--model", model, "--max-new-tokens", "2", "hi"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("NaN or infinite") && !err.contains("panicked"),
        "{err}"
    );
    let out = rlx(&[
        "generate",
        "--model",
        model,
        "--allow-non-finite",
        "--max-new-tokens",
        "2",
        "hi",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn errors_go_to_stderr_with_a_failing_exit_code() {
    let out = rlx(&["generate", "--model", "/no/such/folder", "hi"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("rlx: ") && err.contains("/no/such/folder"),
        "{err}"
    );
    assert!(out.stdout.is_empty());

    let path = fixture("gpt2-f32");
    let out = rlx(&[
        "generate",
        "--model",
        path.to_str().unwrap(),
        "--max-new-tokens",
        "100000",
        "hi",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("context length"), "{err}");
    assert!(!err.contains("panicked"));

    let out = rlx(&[
        "logprobs",
        "--model",
        path.to_str().unwrap(),
        "--temperature",
        "-1",
        "hi",
    ]);
    assert!(!out.status.success());
}

#[test]
fn chat_answers_with_the_default_model() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if !root
        .join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        .is_file()
    {
        eprintln!("SKIPPED: default model not fetched (scripts/fetch_model.sh)");
        return;
    }
    // No --model: the default model is found from the working folder.
    let out = Command::new(env!("CARGO_BIN_EXE_rlx"))
        .current_dir(&root)
        .args(["chat", "What is the capital of France?"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer = String::from_utf8(out.stdout).unwrap();
    assert!(answer.contains("Paris"), "{answer}");

    // The interactive loop keeps going after /reset and ends at end of input.
    let mut child = Command::new(env!("CARGO_BIN_EXE_rlx"))
        .current_dir(&root)
        .args(["chat", "--max-new-tokens", "8"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hello!\n/reset\nSay hi.\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("conversation cleared"));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
}

#[test]
fn chat_without_a_template_is_a_clear_error() {
    let path = fixture("gpt2-f32");
    let out = rlx(&["chat", "--model", path.to_str().unwrap(), "hi"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no chat template"), "{err}");
}

#[test]
fn convert_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let path = fixture("llama-f32");
    let out = rlx(&[
        "convert",
        path.to_str().unwrap(),
        dir.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let target = dir.path().join("copy");
    let out = rlx(&[
        "convert",
        path.to_str().unwrap(),
        target.to_str().unwrap(),
        "--dtype",
        "bf16",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = Model::load(&path, LoadOptions::default()).unwrap();
    let b = Model::load(&target, LoadOptions::default()).unwrap();
    assert_eq!(a.config(), b.config());
}
