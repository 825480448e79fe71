//! The training half of the C ABI called as a C program would: a trainer steps, saves and
//! resumes; a reward model scores; misuse gives the documented status, never a crash.
#![allow(clippy::undocumented_unsafe_blocks)] // every call below is an FFI call with test data

use std::ffi::{CStr, CString};
use std::path::PathBuf;
use std::ptr::{null, null_mut};

use rlx::*;

fn fixture(name: &str) -> CString {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name);
    CString::new(p.to_str().unwrap()).unwrap()
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(rlx_last_error()) }
        .to_string_lossy()
        .into_owned()
}

#[track_caller]
fn check(status: rlx_status, expected: rlx_status) {
    assert_eq!(status, expected, "message: {}", last_error());
}

const TOKENS: [u32; 9] = [1, 5, 9, 2, 7, 4, 6, 2, 9];
const MASK: [u8; 9] = [0, 0, 1, 1, 1, 0, 1, 1, 1];
const LENGTHS: [usize; 2] = [5, 4];

fn create(params: &rlx_trainer_params) -> *mut rlx_trainer {
    let path = fixture("llama-f32");
    let mut t = null_mut();
    check(
        unsafe { rlx_trainer_create(path.as_ptr(), params, &mut t) },
        rlx_status::RLX_OK,
    );
    t
}

fn sft(t: *const rlx_trainer) -> rlx_step_stats {
    let mut stats = rlx_step_stats::default();
    check(
        unsafe {
            rlx_trainer_sft_step(
                t,
                TOKENS.as_ptr(),
                MASK.as_ptr(),
                TOKENS.len(),
                LENGTHS.as_ptr(),
                LENGTHS.len(),
                &mut stats,
            )
        },
        rlx_status::RLX_OK,
    );
    stats
}

#[test]
fn trainer_steps_saves_and_resumes() {
    let mut p = rlx_trainer_default_params();
    p.lr = 3e-3;
    p.threads = 2;
    let t = create(&p);
    let first = sft(t);
    let second = sft(t);
    assert!(second.loss < first.loss && second.step == 2 && !second.skipped);
    let dir = tempfile::tempdir().unwrap();
    let ck = CString::new(dir.path().join("ck").to_str().unwrap()).unwrap();
    check(
        unsafe { rlx_trainer_save(t, ck.as_ptr()) },
        rlx_status::RLX_OK,
    );
    // Never over an existing checkpoint.
    check(
        unsafe { rlx_trainer_save(t, ck.as_ptr()) },
        rlx_status::RLX_IO,
    );
    let a = sft(t);
    let mut r = null_mut();
    check(
        unsafe { rlx_trainer_resume(ck.as_ptr(), 2, &mut r) },
        rlx_status::RLX_OK,
    );
    let b = sft(r);
    assert_eq!((a.loss.to_bits(), a.step), (b.loss.to_bits(), b.step));
    unsafe {
        rlx_trainer_free(t);
        rlx_trainer_free(r);
    }
}

/// `compute_dtype` "bf16": the products run in bf16 (a loss close to, but not equal to, the
/// f32 step's) and training proceeds; an unknown name is RLX_INVALID_ARGUMENT, and NULL is f32.
#[test]
fn trainer_takes_a_compute_dtype() {
    let mut p = rlx_trainer_default_params();
    p.lr = 3e-3;
    p.threads = 2;
    let f32_trainer = create(&p);
    let f32_loss = sft(f32_trainer).loss;
    let bf16 = CString::new("bf16").unwrap();
    p.compute_dtype = bf16.as_ptr();
    let t = create(&p);
    let first = sft(t);
    assert!(first.loss != f32_loss && ((first.loss - f32_loss) / f32_loss).abs() < 1e-2);
    assert!(sft(t).loss < first.loss);
    let bad = CString::new("fp8").unwrap();
    p.compute_dtype = bad.as_ptr();
    let path = fixture("llama-f32");
    let mut none = null_mut();
    check(
        unsafe { rlx_trainer_create(path.as_ptr(), &p, &mut none) },
        rlx_status::RLX_INVALID_ARGUMENT,
    );
    assert!(
        none.is_null() && last_error().contains("fp8"),
        "{}",
        last_error()
    );
    unsafe {
        rlx_trainer_free(t);
        rlx_trainer_free(f32_trainer);
    }
}

#[test]
fn reward_model_trains_and_scores_through_the_abi() {
    let mut p = rlx_trainer_default_params();
    p.lr = 3e-3;
    p.head = RLX_HEAD_SCORE;
    p.lora_rank = 2;
    let t = create(&p);
    let (c, r) = ([1u32, 5, 9, 2], [1u32, 7, 7]);
    let mut stats = rlx_step_stats::default();
    for _ in 0..5 {
        check(
            unsafe {
                rlx_trainer_rm_step(
                    t,
                    c.as_ptr(),
                    c.len(),
                    [c.len()].as_ptr(),
                    r.as_ptr(),
                    r.len(),
                    [r.len()].as_ptr(),
                    1,
                    0.0,
                    &mut stats,
                )
            },
            rlx_status::RLX_OK,
        );
    }
    assert_eq!(stats.accuracy, 1.0);
    unsafe { rlx_trainer_free(t) };

    // A model without a score head cannot score.
    let path = fixture("llama-f32");
    let mut m = null_mut();
    check(
        unsafe { rlx_model_load(path.as_ptr(), null(), &mut m) },
        rlx_status::RLX_OK,
    );
    let mut out = [0f32; 2];
    let mut n = 0;
    check(
        unsafe {
            rlx_reward_score(
                m,
                TOKENS.as_ptr(),
                TOKENS.len(),
                LENGTHS.as_ptr(),
                2,
                out.as_mut_ptr(),
                2,
                &mut n,
            )
        },
        rlx_status::RLX_INVALID_ARGUMENT,
    );
    unsafe { rlx_model_free(m) };
}

#[test]
fn trainer_misuse_is_reported() {
    let mut stats = rlx_step_stats::default();
    // NULL trainer, NULL buffers.
    check(
        unsafe {
            rlx_trainer_sft_step(
                null(),
                TOKENS.as_ptr(),
                MASK.as_ptr(),
                9,
                LENGTHS.as_ptr(),
                2,
                &mut stats,
            )
        },
        rlx_status::RLX_NULL_POINTER,
    );
    let t = create(&rlx_trainer_default_params());
    check(
        unsafe {
            rlx_trainer_sft_step(t, null(), MASK.as_ptr(), 9, LENGTHS.as_ptr(), 2, &mut stats)
        },
        rlx_status::RLX_NULL_POINTER,
    );
    // Lengths that do not add up; masks that select nothing.
    check(
        unsafe {
            rlx_trainer_sft_step(
                t,
                TOKENS.as_ptr(),
                MASK.as_ptr(),
                9,
                [5usize, 3].as_ptr(),
                2,
                &mut stats,
            )
        },
        rlx_status::RLX_INVALID_ARGUMENT,
    );
    check(
        unsafe {
            rlx_trainer_sft_step(
                t,
                TOKENS.as_ptr(),
                [0u8; 9].as_ptr(),
                9,
                LENGTHS.as_ptr(),
                2,
                &mut stats,
            )
        },
        rlx_status::RLX_INVALID_ARGUMENT,
    );
    // Token ids past the vocabulary.
    let bad = [1u32, 100_000, 2, 3, 4, 5, 6, 7, 8];
    check(
        unsafe {
            rlx_trainer_sft_step(
                t,
                bad.as_ptr(),
                MASK.as_ptr(),
                9,
                LENGTHS.as_ptr(),
                2,
                &mut stats,
            )
        },
        rlx_status::RLX_OUT_OF_RANGE,
    );
    unsafe { rlx_trainer_free(t) };
    // A freed handle is detected (best effort), and so is a double free.
    check(
        unsafe {
            rlx_trainer_sft_step(
                t,
                TOKENS.as_ptr(),
                MASK.as_ptr(),
                9,
                LENGTHS.as_ptr(),
                2,
                &mut stats,
            )
        },
        rlx_status::RLX_INVALID_ARGUMENT,
    );
    unsafe { rlx_trainer_free(t) };
    assert!(last_error().contains("double free"));
    // Unknown head, unknown LoRA target, missing model.
    let mut p = rlx_trainer_default_params();
    p.head = 7;
    let path = fixture("llama-f32");
    let mut out = null_mut();
    check(
        unsafe { rlx_trainer_create(path.as_ptr(), &p, &mut out) },
        rlx_status::RLX_INVALID_ARGUMENT,
    );
    assert!(out.is_null());
    let mut p = rlx_trainer_default_params();
    p.lora_rank = 4;
    let targets = CString::new("nope").unwrap();
    p.lora_targets = targets.as_ptr();
    check(
        unsafe { rlx_trainer_create(path.as_ptr(), &p, &mut out) },
        rlx_status::RLX_INVALID_ARGUMENT,
    );
    let missing = CString::new("/nonexistent/model").unwrap();
    check(
        unsafe { rlx_trainer_create(missing.as_ptr(), null(), &mut out) },
        rlx_status::RLX_IO,
    );
}

#[test]
fn reward_model_handle_scores_and_refuses_plain_models() {
    // A reward model written by a trainer with a score head.
    let mut p = rlx_trainer_default_params();
    p.head = RLX_HEAD_SCORE;
    let t = create(&p);
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("rm");
    let ck_c = CString::new(ck.to_str().unwrap()).unwrap();
    check(
        unsafe { rlx_trainer_save(t, ck_c.as_ptr()) },
        rlx_status::RLX_OK,
    );
    // A checkpoint folder is itself a loadable model folder.
    let model_dir = CString::new(ck.to_str().unwrap()).unwrap();
    let mut rm = null_mut();
    check(
        unsafe { rlx_reward_model_load(model_dir.as_ptr(), null(), &mut rm) },
        rlx_status::RLX_OK,
    );
    let (mut out, mut n) = ([0f32; 2], 0usize);
    check(
        unsafe {
            rlx_reward_model_score(
                rm,
                TOKENS.as_ptr(),
                TOKENS.len(),
                LENGTHS.as_ptr(),
                2,
                out.as_mut_ptr(),
                2,
                &mut n,
            )
        },
        rlx_status::RLX_OK,
    );
    assert_eq!(n, 2);
    assert!(out.iter().all(|r| r.is_finite()));
    // The same numbers as rlx_reward_score on the trainer's snapshot.
    let mut snap = null_mut();
    check(
        unsafe { rlx_trainer_model(t, &mut snap) },
        rlx_status::RLX_OK,
    );
    let mut again = [0f32; 2];
    check(
        unsafe {
            rlx_reward_score(
                snap,
                TOKENS.as_ptr(),
                TOKENS.len(),
                LENGTHS.as_ptr(),
                2,
                again.as_mut_ptr(),
                2,
                &mut n,
            )
        },
        rlx_status::RLX_OK,
    );
    assert_eq!(out, again);
    check(
        unsafe {
            rlx_reward_model_score(
                rm,
                TOKENS.as_ptr(),
                TOKENS.len(),
                LENGTHS.as_ptr(),
                2,
                out.as_mut_ptr(),
                1,
                &mut n,
            )
        },
        rlx_status::RLX_BUFFER_TOO_SMALL,
    );
    assert_eq!(n, 2);
    // A plain language model is not a reward model.
    let plain = fixture("llama-f32");
    let mut none = null_mut();
    check(
        unsafe { rlx_reward_model_load(plain.as_ptr(), null(), &mut none) },
        rlx_status::RLX_INVALID_ARGUMENT,
    );
    assert!(none.is_null() && last_error().contains("score head"));
    check(
        unsafe {
            rlx_reward_model_score(
                null(),
                TOKENS.as_ptr(),
                9,
                LENGTHS.as_ptr(),
                2,
                out.as_mut_ptr(),
                2,
                &mut n,
            )
        },
        rlx_status::RLX_NULL_POINTER,
    );
    unsafe {
        rlx_reward_model_free(rm);
        rlx_model_free(snap);
        rlx_trainer_free(t);
    }
}
