//! Inputs that crashed a fuzz target (fuzz/, docs/RELIABILITY.md), fed through the public API:
//! each must now be a clean `Err` (or `Ok`), never a panic. The raw inputs are in
//! fuzz/regressions/; `cargo fuzz run -O -a <target> regressions/<file>` (in fuzz/) replays one.

use std::path::{Path, PathBuf};

use rlx::weights::GgufFile;
use rlx::{ChatTemplate, Error, LoadOptions, Message, Model};
use rlx_tests::tiny_llama_gguf;

/// `fuzz/regressions/<name>`.
fn regression(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(name)
}

fn write(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

/// gguf: a tensor whose row length times the bytes per block overflows `usize`
/// (`GgmlType::row_bytes` multiplied unchecked: a panic with overflow checks, and without them a
/// wrapped, tiny byte count that then passed the bounds check). Now a format error naming the
/// tensor. Input: fuzz/regressions/gguf-row-bytes-overflow.
#[test]
fn gguf_row_byte_count_overflow_is_a_format_error() {
    let path = regression("gguf-row-bytes-overflow");
    let err = GgufFile::open(&path).err().expect("must not open");
    assert!(matches!(err, Error::Format { .. }), "{err}");
    assert!(Model::load(&path, LoadOptions::default()).is_err());

    // The same lie in a valid model: an f32 row of 2^62 values (2^64 bytes), and a Q8_0 row
    // whose block count times 34 bytes overflows.
    for (dims, ggml_type) in [(vec![1u64 << 62], 0u32), (vec![u64::MAX - 31], 8)] {
        let mut b = tiny_llama_gguf();
        let t = b
            .tensors
            .iter_mut()
            .find(|t| t.0 == "output_norm.weight")
            .unwrap();
        t.1 = dims;
        t.2 = ggml_type;
        let (_dir, path) = write(&b.build());
        let err = GgufFile::open(&path).err().expect("must not open");
        assert!(matches!(err, Error::Format { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("output_norm.weight") && msg.contains("overflows"),
            "{msg}"
        );
    }
}

/// chat_template: `{%for in messages%}` compiles (`in` taken as the loop variable) and fails at
/// render time with an error whose source span ends before it starts. `ChatTemplate` formatted
/// errors with minijinja's alternate formatting (`{e:#}`), whose source excerpt (rendered when
/// minijinja has debug info, on by default in builds with debug assertions) computed
/// `end_col - start_col` and panicked (overflow with overflow checks, "capacity overflow" in
/// `str::repeat` without). Errors are now formatted as kind, detail and line.
/// Input: fuzz/regressions/chat_template-for-without-variable.
#[test]
fn chat_template_error_with_inverted_span_is_an_error() {
    let t =
        ChatTemplate::new("{%for in messages%}{%endfor%}", Some(""), Some("")).expect("compiles");
    for add_generation_prompt in [true, false] {
        // Nothing to unpack without messages; with one, the render error.
        assert!(t.render(&[], add_generation_prompt).is_ok());
        let err = t
            .render(&[Message::new("user", "")], add_generation_prompt)
            .unwrap_err();
        assert!(matches!(err, Error::Template(_)), "{err}");
    }
}
