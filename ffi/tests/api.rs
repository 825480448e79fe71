//! The C ABI called from Rust, as a C program would: NULL handles and buffers, small buffers,
//! bad paths and bad inputs must give the documented status and a message, never a crash.
#![allow(clippy::undocumented_unsafe_blocks)] // every call below is an FFI call with test data

use std::ffi::{CStr, CString};
use std::path::PathBuf;
use std::ptr::{null, null_mut};

use rlx::*;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(rlx_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Asserts a failed call's status and that it left a message.
#[track_caller]
fn assert_fails(status: rlx_status, expected: rlx_status) {
    assert_eq!(status, expected, "message: {}", last_error());
    assert!(!last_error().is_empty(), "{expected:?} without a message");
}

#[track_caller]
fn assert_ok(status: rlx_status) {
    assert_eq!(status, rlx_status::RLX_OK, "message: {}", last_error());
    assert_eq!(last_error(), "");
}

/// An owned handle that frees itself.
struct Handle(*mut rlx_model);

impl Drop for Handle {
    fn drop(&mut self) {
        unsafe { rlx_model_free(self.0) };
    }
}

fn load(name: &str) -> Handle {
    let path = CString::new(fixture(name).to_str().unwrap()).unwrap();
    let mut params = rlx_model_default_params();
    params.threads = 2;
    let mut m = null_mut();
    assert_ok(unsafe { rlx_model_load(path.as_ptr(), &params, &mut m) });
    assert!(!m.is_null());
    Handle(m)
}

fn tokenize(m: &Handle, text: &str) -> Vec<u32> {
    let text = CString::new(text).unwrap();
    let mut n = 0usize;
    let st = unsafe { rlx_tokenize(m.0, text.as_ptr(), true, null_mut(), 0, &mut n) };
    assert_fails(st, rlx_status::RLX_BUFFER_TOO_SMALL);
    let mut ids = vec![0u32; n];
    let mut n2 = 0usize;
    assert_ok(unsafe {
        rlx_tokenize(
            m.0,
            text.as_ptr(),
            true,
            ids.as_mut_ptr(),
            ids.len(),
            &mut n2,
        )
    });
    assert_eq!(n, n2);
    ids
}

fn greedy(max_new_tokens: u32) -> rlx_sampling_params {
    rlx_sampling_params {
        max_new_tokens,
        temperature: 0.0,
        ..rlx_sampling_default_params()
    }
}

fn generate(m: &Handle, prompt: &[u32], p: &rlx_sampling_params) -> (Vec<u32>, Vec<f32>) {
    let cap = p.max_new_tokens as usize;
    let (mut toks, mut lps, mut n) = (vec![0u32; cap], vec![0f32; cap], 0usize);
    assert_ok(unsafe {
        rlx_generate(
            m.0,
            prompt.as_ptr(),
            prompt.len(),
            p,
            toks.as_mut_ptr(),
            lps.as_mut_ptr(),
            cap,
            &mut n,
        )
    });
    toks.truncate(n);
    lps.truncate(n);
    (toks, lps)
}

#[test]
fn null_arguments_are_reported() {
    let mut m = null_mut();
    let path = CString::new("x").unwrap();
    assert_fails(
        unsafe { rlx_model_load(null(), null(), &mut m) },
        rlx_status::RLX_NULL_POINTER,
    );
    assert!(m.is_null());
    assert_fails(
        unsafe { rlx_model_load(path.as_ptr(), null(), null_mut()) },
        rlx_status::RLX_NULL_POINTER,
    );

    assert_eq!(unsafe { rlx_model_vocab_size(null()) }, 0);
    assert!(last_error().contains("model"), "{}", last_error());
    assert_eq!(unsafe { rlx_model_context_length(null()) }, 0);
    assert!(!last_error().is_empty());

    let mut n = 7usize;
    let text = CString::new("hi").unwrap();
    assert_fails(
        unsafe { rlx_tokenize(null(), text.as_ptr(), true, null_mut(), 0, &mut n) },
        rlx_status::RLX_NULL_POINTER,
    );
    assert_eq!(n, 0, "n_written is reset on failure");
    assert_fails(
        unsafe { rlx_detokenize(null(), null(), 0, true, null_mut(), 0, &mut n) },
        rlx_status::RLX_NULL_POINTER,
    );
    assert_fails(
        unsafe { rlx_generate(null(), null(), 0, null(), null_mut(), null_mut(), 0, &mut n) },
        rlx_status::RLX_NULL_POINTER,
    );
    assert_fails(
        unsafe { rlx_logprobs(null(), null(), 0, 1.0, null_mut(), 0, &mut n) },
        rlx_status::RLX_NULL_POINTER,
    );
    assert_fails(
        unsafe { rlx_model_eos_token_ids(null(), null_mut(), 0, &mut n) },
        rlx_status::RLX_NULL_POINTER,
    );
}

#[test]
fn free_null_is_a_no_op() {
    unsafe { rlx_model_free(null_mut()) };
    assert_eq!(last_error(), "");
}

#[test]
fn handles_that_are_not_models_are_refused() {
    // Zeroed memory the size of a model: its magic word is wrong.
    let words = std::mem::size_of::<rlx_model>() / 8 + 1;
    let mut fake = vec![0u64; words];
    let fake = fake.as_mut_ptr().cast::<rlx_model>();
    assert_eq!(unsafe { rlx_model_vocab_size(fake) }, 0);
    assert!(
        last_error().contains("not a live rlx_model"),
        "{}",
        last_error()
    );
    unsafe { rlx_model_free(fake) };
    assert!(
        last_error().contains("not a live rlx_model"),
        "{}",
        last_error()
    );
}

#[test]
fn bad_paths_give_io_or_format_errors() {
    let mut m = null_mut();
    let missing = CString::new("/nonexistent/rlx-model").unwrap();
    assert_fails(
        unsafe { rlx_model_load(missing.as_ptr(), null(), &mut m) },
        rlx_status::RLX_IO,
    );
    assert!(
        last_error().contains("/nonexistent/rlx-model"),
        "{}",
        last_error()
    );
    assert!(m.is_null());

    // A file, not a folder.
    let file = CString::new(fixture("gpt2-f32/config.json").to_str().unwrap()).unwrap();
    assert_fails(
        unsafe { rlx_model_load(file.as_ptr(), null(), &mut m) },
        rlx_status::RLX_FORMAT,
    );

    // A folder with no config.json.
    let empty = tempfile_dir();
    let empty_c = CString::new(empty.to_str().unwrap()).unwrap();
    assert_fails(
        unsafe { rlx_model_load(empty_c.as_ptr(), null(), &mut m) },
        rlx_status::RLX_IO,
    );
    let _ = std::fs::remove_dir(&empty);
    assert!(m.is_null());
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rlx-ffi-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn model_facts() {
    let m = load("llama-f32");
    assert_eq!(unsafe { rlx_model_vocab_size(m.0) }, 384);
    assert_eq!(unsafe { rlx_model_context_length(m.0) }, 128);
    let mut n = 0usize;
    assert_fails(
        unsafe { rlx_model_eos_token_ids(m.0, null_mut(), 0, &mut n) },
        rlx_status::RLX_BUFFER_TOO_SMALL,
    );
    assert!(n >= 1);
    let mut ids = vec![0u32; n];
    assert_ok(unsafe { rlx_model_eos_token_ids(m.0, ids.as_mut_ptr(), n, &mut n) });
    assert_eq!(ids, [2]);
}

#[test]
fn tokenize_and_detokenize_with_small_buffers() {
    let m = load("llama-f32");
    let ids = tokenize(&m, "Hello world");
    assert!(ids.len() >= 2);

    // Capacity without a buffer is a NULL pointer, not a crash.
    let text = CString::new("Hello world").unwrap();
    let mut n = 0usize;
    assert_fails(
        unsafe { rlx_tokenize(m.0, text.as_ptr(), true, null_mut(), 4, &mut n) },
        rlx_status::RLX_NULL_POINTER,
    );
    assert_fails(
        unsafe { rlx_tokenize(m.0, null(), true, null_mut(), 0, &mut n) },
        rlx_status::RLX_NULL_POINTER,
    );
    // Invalid UTF-8.
    let bad = CString::new(vec![0xffu8, 0xfe]).unwrap();
    assert_fails(
        unsafe { rlx_tokenize(m.0, bad.as_ptr(), true, null_mut(), 0, &mut n) },
        rlx_status::RLX_INVALID_ARGUMENT,
    );
    assert_fails(
        unsafe { rlx_tokenize(m.0, text.as_ptr(), true, null_mut(), 0, null_mut()) },
        rlx_status::RLX_NULL_POINTER,
    );

    // Ask for the size, then decode into a buffer one byte short, then exactly right.
    assert_fails(
        unsafe { rlx_detokenize(m.0, ids.as_ptr(), ids.len(), true, null_mut(), 0, &mut n) },
        rlx_status::RLX_BUFFER_TOO_SMALL,
    );
    let need = n;
    let mut buf = vec![b'x' as std::ffi::c_char; need];
    assert_fails(
        unsafe {
            rlx_detokenize(
                m.0,
                ids.as_ptr(),
                ids.len(),
                true,
                buf.as_mut_ptr(),
                need - 1,
                &mut n,
            )
        },
        rlx_status::RLX_BUFFER_TOO_SMALL,
    );
    assert_eq!(n, need);
    assert_eq!(buf[0], 0, "a too-small buffer receives an empty string");
    assert_ok(unsafe {
        rlx_detokenize(
            m.0,
            ids.as_ptr(),
            ids.len(),
            true,
            buf.as_mut_ptr(),
            need,
            &mut n,
        )
    });
    assert_eq!(n, need - 1);
    let text_back = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_str().unwrap();
    assert_eq!(text_back.len(), n);
    assert!(text_back.contains("Hello"), "{text_back:?}");

    // Empty input decodes to an empty string; NULL is fine with length 0.
    let mut one = [b'x' as std::ffi::c_char; 1];
    assert_ok(unsafe { rlx_detokenize(m.0, null(), 0, true, one.as_mut_ptr(), 1, &mut n) });
    assert_eq!((n, one[0]), (0, 0));

    // NULL tokens with a length, and ids past the vocabulary.
    assert_fails(
        unsafe { rlx_detokenize(m.0, null(), 3, true, null_mut(), 0, &mut n) },
        rlx_status::RLX_NULL_POINTER,
    );
    let oov = [5u32, 384];
    assert_fails(
        unsafe { rlx_detokenize(m.0, oov.as_ptr(), 2, true, null_mut(), 0, &mut n) },
        rlx_status::RLX_OUT_OF_RANGE,
    );
}

#[test]
fn generate_is_deterministic_and_matches_logprobs() {
    for name in ["gpt2-f32", "llama-f32"] {
        let m = load(name);
        let prompt = tokenize(&m, "The quick brown fox");
        let p = rlx_sampling_params {
            ignore_eos: true,
            ..greedy(12)
        };
        let (toks, lps) = generate(&m, &prompt, &p);
        assert_eq!(toks.len(), 12, "{name}");
        assert_eq!(
            generate(&m, &prompt, &p),
            (toks.clone(), lps.clone()),
            "{name}"
        );

        // Scoring prompt + generated reproduces the generate log-probs bit for bit.
        let full: Vec<u32> = prompt.iter().chain(&toks).copied().collect();
        let mut out = vec![0f32; full.len() - 1];
        let mut n = 0usize;
        assert_ok(unsafe {
            rlx_logprobs(
                m.0,
                full.as_ptr(),
                full.len(),
                1.0,
                out.as_mut_ptr(),
                out.len(),
                &mut n,
            )
        });
        assert_eq!(n, full.len() - 1);
        let tail: Vec<u32> = out[prompt.len() - 1..]
            .iter()
            .map(|v| v.to_bits())
            .collect();
        let want: Vec<u32> = lps.iter().map(|v| v.to_bits()).collect();
        assert_eq!(tail, want, "{name}");

        // Sampling with a seed is reproducible too.
        let s = rlx_sampling_params {
            max_new_tokens: 8,
            seed: 42,
            top_k: 20,
            ignore_eos: true,
            ..rlx_sampling_default_params()
        };
        assert_eq!(
            generate(&m, &prompt, &s),
            generate(&m, &prompt, &s),
            "{name}"
        );
    }
}

#[test]
fn generate_checks_buffers_and_inputs() {
    let m = load("gpt2-f32");
    let prompt = tokenize(&m, "Hello");
    let mut n = 0usize;
    let mut toks = vec![0u32; 4];
    let p = greedy(8);

    // Too small: reported before any work, with the size needed.
    assert_fails(
        unsafe {
            rlx_generate(
                m.0,
                prompt.as_ptr(),
                prompt.len(),
                &p,
                toks.as_mut_ptr(),
                null_mut(),
                4,
                &mut n,
            )
        },
        rlx_status::RLX_BUFFER_TOO_SMALL,
    );
    assert_eq!(n, 8);
    // A capacity with no buffer.
    assert_fails(
        unsafe {
            rlx_generate(
                m.0,
                prompt.as_ptr(),
                prompt.len(),
                &p,
                null_mut(),
                null_mut(),
                8,
                &mut n,
            )
        },
        rlx_status::RLX_NULL_POINTER,
    );
    // No logprobs buffer is fine.
    let mut toks = vec![0u32; 8];
    assert_ok(unsafe {
        rlx_generate(
            m.0,
            prompt.as_ptr(),
            prompt.len(),
            &p,
            toks.as_mut_ptr(),
            null_mut(),
            8,
            &mut n,
        )
    });
    assert!((1..=8).contains(&n));

    let run = |prompt: &[u32], p: &rlx_sampling_params, toks: &mut [u32]| unsafe {
        let mut n = 0usize;
        rlx_generate(
            m.0,
            prompt.as_ptr(),
            prompt.len(),
            p,
            toks.as_mut_ptr(),
            null_mut(),
            toks.len(),
            &mut n,
        )
    };
    // Empty prompt, id past the vocabulary, too long, bad temperature, bad top_p.
    assert_fails(run(&[], &p, &mut toks), rlx_status::RLX_INVALID_ARGUMENT);
    assert_fails(run(&[1, 384], &p, &mut toks), rlx_status::RLX_OUT_OF_RANGE);
    assert_fails(
        run(&[1, u32::MAX], &p, &mut toks),
        rlx_status::RLX_OUT_OF_RANGE,
    );
    assert_fails(
        run(&[1; 125], &p, &mut toks),
        rlx_status::RLX_CONTEXT_OVERFLOW,
    );
    let hot = rlx_sampling_params {
        temperature: -1.0,
        ..p
    };
    assert_fails(
        run(&prompt, &hot, &mut toks),
        rlx_status::RLX_INVALID_ARGUMENT,
    );
    let nan = rlx_sampling_params {
        temperature: f32::NAN,
        ..p
    };
    assert_fails(
        run(&prompt, &nan, &mut toks),
        rlx_status::RLX_INVALID_ARGUMENT,
    );
    let top_p = rlx_sampling_params { top_p: 0.0, ..p };
    assert_fails(
        run(&prompt, &top_p, &mut toks),
        rlx_status::RLX_INVALID_ARGUMENT,
    );
    // A stop list given by length without a pointer.
    let stop = rlx_sampling_params {
        n_stop_token_ids: 2,
        ..p
    };
    assert_fails(run(&prompt, &stop, &mut toks), rlx_status::RLX_NULL_POINTER);

    // NULL params = defaults (128 new tokens): a buffer of 8 is too small.
    assert_fails(
        unsafe {
            rlx_generate(
                m.0,
                prompt.as_ptr(),
                prompt.len(),
                null(),
                toks.as_mut_ptr(),
                null_mut(),
                8,
                &mut n,
            )
        },
        rlx_status::RLX_BUFFER_TOO_SMALL,
    );
    assert_eq!(n, 128);

    // max_new_tokens = 0 needs no buffer at all.
    assert_ok(unsafe {
        rlx_generate(
            m.0,
            prompt.as_ptr(),
            prompt.len(),
            &greedy(0),
            null_mut(),
            null_mut(),
            0,
            &mut n,
        )
    });
    assert_eq!(n, 0);
}

#[test]
fn stop_tokens_end_generation() {
    let m = load("gpt2-f32");
    let prompt = tokenize(&m, "Hello");
    let free_run = rlx_sampling_params {
        ignore_eos: true,
        ..greedy(6)
    };
    let (toks, _) = generate(&m, &prompt, &free_run);
    assert_eq!(toks.len(), 6);
    // Stop at the third greedy token: it is kept and nothing follows.
    let stop = [toks[2]];
    let first = toks.iter().position(|&t| t == toks[2]).unwrap();
    let p = rlx_sampling_params {
        stop_token_ids: stop.as_ptr(),
        n_stop_token_ids: 1,
        ..greedy(6)
    };
    let (stopped, lps) = generate(&m, &prompt, &p);
    assert_eq!(stopped, toks[..=first]);
    assert_eq!(lps.len(), stopped.len());
}

#[test]
fn logprobs_checks_buffers_and_inputs() {
    let m = load("llama-f32");
    let seq = [1u32, 5, 9, 200];
    let mut out = [0f32; 3];
    let mut n = 0usize;
    assert_fails(
        unsafe { rlx_logprobs(m.0, seq.as_ptr(), 4, 1.0, out.as_mut_ptr(), 2, &mut n) },
        rlx_status::RLX_BUFFER_TOO_SMALL,
    );
    assert_eq!(n, 3);
    assert_ok(unsafe { rlx_logprobs(m.0, seq.as_ptr(), 4, 0.7, out.as_mut_ptr(), 3, &mut n) });
    assert_eq!(n, 3);
    assert!(out.iter().all(|v| v.is_finite() && *v <= 0.0), "{out:?}");
    // One token has no log-probs; NULL output is fine then.
    assert_ok(unsafe { rlx_logprobs(m.0, seq.as_ptr(), 1, 1.0, null_mut(), 0, &mut n) });
    assert_eq!(n, 0);
    assert_fails(
        unsafe { rlx_logprobs(m.0, null(), 0, 1.0, null_mut(), 0, &mut n) },
        rlx_status::RLX_INVALID_ARGUMENT,
    );
    assert_fails(
        unsafe { rlx_logprobs(m.0, seq.as_ptr(), 4, -2.0, out.as_mut_ptr(), 3, &mut n) },
        rlx_status::RLX_INVALID_ARGUMENT,
    );
    let oov = [1u32, 384];
    assert_fails(
        unsafe { rlx_logprobs(m.0, oov.as_ptr(), 2, 1.0, out.as_mut_ptr(), 3, &mut n) },
        rlx_status::RLX_OUT_OF_RANGE,
    );
    let long = vec![1u32; 129];
    let mut big = vec![0f32; 128];
    assert_fails(
        unsafe {
            rlx_logprobs(
                m.0,
                long.as_ptr(),
                long.len(),
                1.0,
                big.as_mut_ptr(),
                128,
                &mut n,
            )
        },
        rlx_status::RLX_CONTEXT_OVERFLOW,
    );
}

#[test]
fn one_model_many_threads_and_thread_local_errors() {
    let m = load("llama-f32");
    let prompt = tokenize(&m, "Once upon a time");
    let p = rlx_sampling_params {
        ignore_eos: true,
        ..greedy(10)
    };
    let want = generate(&m, &prompt, &p);
    // Raw pointers are not Send; the address is, and the model is documented as shareable.
    let addr = m.0 as usize;
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let h = std::mem::ManuallyDrop::new(Handle(addr as *mut rlx_model));
                    let p = rlx_sampling_params {
                        ignore_eos: true,
                        ..greedy(10)
                    };
                    (0..3)
                        .map(|_| generate(&h, &prompt, &p))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for w in workers {
            for got in w.join().unwrap() {
                assert_eq!(got, want);
            }
        }
    });

    // An error on one thread is not visible on another.
    assert_eq!(unsafe { rlx_model_vocab_size(null()) }, 0);
    assert!(!last_error().is_empty());
    let other = std::thread::spawn(last_error).join().unwrap();
    assert_eq!(other, "");
}

/// `int8_activations` on something with no blocks to run (an HF folder) is refused with
/// RLX_INVALID_ARGUMENT and a message naming the option; on the default model it loads.
#[test]
fn int8_activations_is_checked() {
    let mut params = rlx_model_default_params();
    assert_eq!(params.int8_activations, 0);
    params.int8_activations = 1;
    let folder = CString::new(fixture("gpt2-f32").to_str().unwrap()).unwrap();
    let mut m = null_mut();
    assert_fails(
        unsafe { rlx_model_load(folder.as_ptr(), &params, &mut m) },
        rlx_status::RLX_INVALID_ARGUMENT,
    );
    assert!(m.is_null());
    assert!(
        last_error().contains("int8_activations"),
        "{}",
        last_error()
    );
    let gguf =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !gguf.is_file() {
        eprintln!("SKIPPED the load: {} is missing", gguf.display());
        return;
    }
    let gguf = CString::new(gguf.to_str().unwrap()).unwrap();
    assert_ok(unsafe { rlx_model_load(gguf.as_ptr(), &params, &mut m) });
    let int8 = Handle(m);
    let mut exact = null_mut();
    let defaults = rlx_model_default_params();
    assert_ok(unsafe { rlx_model_load(gguf.as_ptr(), &defaults, &mut exact) });
    let exact = Handle(exact);
    let prompt = [1, 2, 3, 4, 5];
    let (tokens, logprobs) = generate(&int8, &prompt, &greedy(4));
    assert_eq!((tokens.len(), logprobs.len()), (4, 4));
    // The option took effect: the same tokens score differently on the exact kernels.
    let (_, exact_logprobs) = generate(&exact, &prompt, &greedy(4));
    assert_ne!(logprobs, exact_logprobs);
}
