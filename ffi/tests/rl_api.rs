//! The RL half of the C ABI as a C program would drive it: a PPO iteration built from
//! rlx_generate, rlx_logprobs, rlx_trainer_values, rlx_ppo_advantages and rlx_trainer_ppo_step
//! (whose first step sees ratios of exactly 1), GRPO and DPO steps, and the chat template.
#![allow(clippy::undocumented_unsafe_blocks)] // every call below is an FFI call with test data

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::ptr::{null, null_mut};

use rlx::*;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn c_path(p: &Path) -> CString {
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

fn trainer(head: u32) -> *mut rlx_trainer {
    let mut p = rlx_trainer_default_params();
    p.lr = 1e-3;
    p.head = head;
    p.threads = 2;
    let path = c_path(&fixture("llama-f32"));
    let mut t = null_mut();
    check(
        unsafe { rlx_trainer_create(path.as_ptr(), &p, &mut t) },
        rlx_status::RLX_OK,
    );
    t
}

fn load(path: &Path) -> *mut rlx_model {
    let path = c_path(path);
    let mut m = null_mut();
    check(
        unsafe { rlx_model_load(path.as_ptr(), null(), &mut m) },
        rlx_status::RLX_OK,
    );
    m
}

/// Samples `k` completions of `prompt` from `model`: the packed batch (prompt + completion per
/// sequence, mask on the completion) and the sampling log-probs.
struct Rollout {
    tokens: Vec<u32>,
    mask: Vec<u8>,
    lengths: Vec<usize>,
    logprobs: Vec<f32>,
}

fn rollout(model: *const rlx_model, prompt: &[u32], k: usize) -> Rollout {
    let mut r = Rollout {
        tokens: Vec::new(),
        mask: Vec::new(),
        lengths: Vec::new(),
        logprobs: Vec::new(),
    };
    for i in 0..k {
        let mut sp = rlx_sampling_default_params();
        sp.max_new_tokens = 6;
        sp.seed = 11 + i as u64;
        sp.ignore_eos = true;
        let (mut out, mut lp, mut n) = (vec![0u32; 6], vec![0f32; 6], 0usize);
        check(
            unsafe {
                rlx_generate(
                    model,
                    prompt.as_ptr(),
                    prompt.len(),
                    &sp,
                    out.as_mut_ptr(),
                    lp.as_mut_ptr(),
                    6,
                    &mut n,
                )
            },
            rlx_status::RLX_OK,
        );
        r.tokens.extend_from_slice(prompt);
        r.tokens.extend_from_slice(&out[..n]);
        r.mask.extend(std::iter::repeat_n(0u8, prompt.len()));
        r.mask.extend(std::iter::repeat_n(1u8, n));
        r.lengths.push(prompt.len() + n);
        r.logprobs.extend_from_slice(&lp[..n]);
    }
    r
}

/// The per-response-token log-probs of `model` on a packed batch, through rlx_logprobs.
fn logprobs(model: *const rlx_model, r: &Rollout) -> Vec<f32> {
    let mut out = Vec::new();
    let mut at = 0;
    for &len in &r.lengths {
        let seq = &r.tokens[at..at + len];
        let mut lp = vec![0f32; len - 1];
        let mut n = 0;
        check(
            unsafe {
                rlx_logprobs(
                    model,
                    seq.as_ptr(),
                    len,
                    1.0,
                    lp.as_mut_ptr(),
                    len - 1,
                    &mut n,
                )
            },
            rlx_status::RLX_OK,
        );
        for t in 1..len {
            if r.mask[at + t] != 0 {
                out.push(lp[t - 1]);
            }
        }
        at += len;
    }
    out
}

#[test]
fn ppo_iteration_through_the_c_abi() {
    let t = trainer(RLX_HEAD_VALUE);
    let reference = load(&fixture("llama-f32"));
    let mut policy = null_mut();
    check(
        unsafe { rlx_trainer_model(t, &mut policy) },
        rlx_status::RLX_OK,
    );
    let r = rollout(policy, &[1, 5, 9], 3);
    let n_resp = r.logprobs.len();
    assert!(n_resp > 0);
    // Generation's log-probs are what the trainer's model computes for the same tokens.
    assert_eq!(logprobs(policy, &r), r.logprobs);
    let ref_lp = logprobs(reference, &r);

    let mut values = vec![0f32; n_resp];
    let mut n = 0;
    check(
        unsafe {
            rlx_trainer_values(
                t,
                r.tokens.as_ptr(),
                r.mask.as_ptr(),
                r.tokens.len(),
                r.lengths.as_ptr(),
                r.lengths.len(),
                values.as_mut_ptr(),
                n_resp - 1,
                &mut n,
            )
        },
        rlx_status::RLX_BUFFER_TOO_SMALL,
    );
    assert_eq!(n, n_resp);
    check(
        unsafe {
            rlx_trainer_values(
                t,
                r.tokens.as_ptr(),
                r.mask.as_ptr(),
                r.tokens.len(),
                r.lengths.as_ptr(),
                r.lengths.len(),
                values.as_mut_ptr(),
                n_resp,
                &mut n,
            )
        },
        rlx_status::RLX_OK,
    );
    assert!(values.iter().all(|v| v.is_finite()));

    let scores = [1.0f32, -0.5, 0.25];
    let params = rlx_ppo_default_params();
    let (mut adv, mut ret) = (vec![0f32; n_resp], vec![0f32; n_resp]);
    check(
        unsafe {
            rlx_ppo_advantages(
                r.mask.as_ptr(),
                r.mask.len(),
                r.lengths.as_ptr(),
                r.lengths.len(),
                r.logprobs.as_ptr(),
                ref_lp.as_ptr(),
                values.as_ptr(),
                n_resp,
                scores.as_ptr(),
                &params,
                adv.as_mut_ptr(),
                ret.as_mut_ptr(),
                n_resp,
                &mut n,
            )
        },
        rlx_status::RLX_OK,
    );
    assert!(adv.iter().chain(&ret).all(|v| v.is_finite()));
    assert!(adv.iter().any(|&a| a != 0.0));

    let step = |old: &[f32]| {
        let mut s = rlx_step_stats::default();
        let status = unsafe {
            rlx_trainer_ppo_step(
                t,
                r.tokens.as_ptr(),
                r.mask.as_ptr(),
                r.tokens.len(),
                r.lengths.as_ptr(),
                r.lengths.len(),
                old.as_ptr(),
                values.as_ptr(),
                adv.as_ptr(),
                ret.as_ptr(),
                old.len(),
                &params,
                &mut s,
            )
        };
        (status, s)
    };
    let (status, first) = step(&r.logprobs);
    check(status, rlx_status::RLX_OK);
    // The rollout's log-probs are the training log-probs: every ratio is exactly 1.
    assert_eq!(first.kl, 0.0);
    assert_eq!(first.clip_fraction, 0.0);
    assert!(first.loss.is_finite() && first.value_loss > 0.0 && first.step == 1);
    let (status, second) = step(&r.logprobs);
    check(status, rlx_status::RLX_OK);
    assert!(second.kl > 0.0, "the first step moved the policy");
    // One log-prob too few is an error, not a misaligned batch.
    let (status, _) = step(&r.logprobs[1..]);
    check(status, rlx_status::RLX_INVALID_ARGUMENT);
    assert!(last_error().contains("response tokens"), "{}", last_error());

    // The snapshot did not move with the trainer.
    assert_eq!(logprobs(policy, &r), r.logprobs);
    unsafe {
        rlx_model_free(policy);
        rlx_model_free(reference);
        rlx_trainer_free(t);
    }
}

#[test]
fn ppo_step_without_a_value_head_is_an_error() {
    let t = trainer(RLX_HEAD_NONE);
    let (tokens, mask, lengths) = ([1u32, 5, 9], [0u8, 1, 1], [3usize]);
    let per_token = [0f32; 2];
    let mut s = rlx_step_stats::default();
    check(
        unsafe {
            rlx_trainer_ppo_step(
                t,
                tokens.as_ptr(),
                mask.as_ptr(),
                3,
                lengths.as_ptr(),
                1,
                per_token.as_ptr(),
                per_token.as_ptr(),
                per_token.as_ptr(),
                per_token.as_ptr(),
                2,
                null(),
                &mut s,
            )
        },
        rlx_status::RLX_INVALID_ARGUMENT,
    );
    assert!(last_error().contains("value head"), "{}", last_error());
    unsafe { rlx_trainer_free(t) };
}

#[test]
fn grpo_steps_through_the_c_abi() {
    let t = trainer(RLX_HEAD_NONE);
    let reference = load(&fixture("llama-f32"));
    let mut policy = null_mut();
    check(
        unsafe { rlx_trainer_model(t, &mut policy) },
        rlx_status::RLX_OK,
    );
    let r = rollout(policy, &[2, 7], 4);
    let rewards = [1.0f32, 0.0, 0.5, 0.0];
    let mut adv = [0f32; 4];
    check(
        unsafe { rlx_group_advantages(rewards.as_ptr(), 4, 4, true, adv.as_mut_ptr(), 4) },
        rlx_status::RLX_OK,
    );
    assert!(adv.iter().sum::<f32>().abs() < 1e-5 && adv[0] > 0.0 && adv[1] < 0.0);
    check(
        unsafe { rlx_group_advantages(rewards.as_ptr(), 4, 1, true, adv.as_mut_ptr(), 4) },
        rlx_status::RLX_INVALID_ARGUMENT,
    );
    let ref_lp = logprobs(reference, &r);
    let params = rlx_grpo_default_params();
    let step = |old: *const f32, reference: *const f32| {
        let mut s = rlx_step_stats::default();
        let status = unsafe {
            rlx_trainer_grpo_step(
                t,
                r.tokens.as_ptr(),
                r.mask.as_ptr(),
                r.tokens.len(),
                r.lengths.as_ptr(),
                r.lengths.len(),
                adv.as_ptr(),
                old,
                reference,
                r.logprobs.len(),
                &params,
                &mut s,
            )
        };
        (status, s)
    };
    let (status, first) = step(r.logprobs.as_ptr(), ref_lp.as_ptr());
    check(status, rlx_status::RLX_OK);
    // Policy = reference = sampler before the first step: no KL, nothing clipped.
    assert_eq!(first.kl, 0.0);
    assert_eq!(first.clip_fraction, 0.0);
    assert!(first.entropy > 0.0 && first.step == 1);
    let (status, second) = step(null(), ref_lp.as_ptr());
    check(status, rlx_status::RLX_OK);
    assert!(second.kl > 0.0 && second.step == 2);
    // β > 0 needs the reference's log-probs.
    let (status, _) = step(null(), null());
    check(status, rlx_status::RLX_INVALID_ARGUMENT);
    unsafe {
        rlx_model_free(policy);
        rlx_model_free(reference);
        rlx_trainer_free(t);
    }
}

#[test]
fn dpo_steps_lower_the_loss() {
    let t = trainer(RLX_HEAD_NONE);
    let reference = load(&fixture("llama-f32"));
    let chosen = Rollout {
        tokens: vec![1, 5, 9, 2, 7, 3, 8, 4],
        mask: vec![0, 0, 1, 1, 0, 0, 1, 1],
        lengths: vec![4, 4],
        logprobs: Vec::new(),
    };
    let rejected = Rollout {
        tokens: vec![1, 5, 6, 6, 7, 3, 2, 2],
        mask: chosen.mask.clone(),
        lengths: chosen.lengths.clone(),
        logprobs: Vec::new(),
    };
    let sums = |r: &Rollout| -> Vec<f64> {
        let lp = logprobs(reference, r);
        lp.chunks(2)
            .map(|c| c.iter().map(|&v| v as f64).sum())
            .collect()
    };
    let (ref_c, ref_r) = (sums(&chosen), sums(&rejected));
    let mut params = rlx_dpo_default_params();
    let step = |params: &rlx_dpo_params| {
        let mut s = rlx_step_stats::default();
        let status = unsafe {
            rlx_trainer_dpo_step(
                t,
                chosen.tokens.as_ptr(),
                chosen.mask.as_ptr(),
                chosen.tokens.len(),
                chosen.lengths.as_ptr(),
                rejected.tokens.as_ptr(),
                rejected.mask.as_ptr(),
                rejected.tokens.len(),
                rejected.lengths.as_ptr(),
                2,
                ref_c.as_ptr(),
                ref_r.as_ptr(),
                params,
                &mut s,
            )
        };
        (status, s)
    };
    let (status, first) = step(&params);
    check(status, rlx_status::RLX_OK);
    // Policy = reference: h = 0, so the sigmoid loss is log 2.
    assert!(
        (first.loss - std::f64::consts::LN_2).abs() < 1e-6,
        "{}",
        first.loss
    );
    let (status, second) = step(&params);
    check(status, rlx_status::RLX_OK);
    assert!(second.loss < first.loss && second.accuracy == 1.0);
    params.loss_type = 7;
    let (status, _) = step(&params);
    check(status, rlx_status::RLX_INVALID_ARGUMENT);
    unsafe {
        rlx_model_free(reference);
        rlx_trainer_free(t);
    }
}

#[test]
fn chat_template_renders_or_says_why_not() {
    // The fixture ships no template: a clear error.
    let plain = load(&fixture("llama-f32"));
    let (role, content) = (
        CString::new("user").unwrap(),
        CString::new("Hi there").unwrap(),
    );
    let msgs = [rlx_chat_message {
        role: role.as_ptr(),
        content: content.as_ptr(),
    }];
    let mut buf = vec![0 as std::ffi::c_char; 256];
    let mut n = 0;
    check(
        unsafe {
            rlx_apply_chat_template(plain, msgs.as_ptr(), 1, true, buf.as_mut_ptr(), 256, &mut n)
        },
        rlx_status::RLX_TOKENIZER,
    );
    assert!(last_error().contains("chat template"), "{}", last_error());

    // The same model with a template in tokenizer_config.json.
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture("llama-f32").join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"chat_template": "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"}"#,
    )
    .unwrap();
    let chat = load(dir.path());
    let want = "<|user|>Hi there\n<|assistant|>";
    // Too small: the size needed, with the NUL.
    check(
        unsafe {
            rlx_apply_chat_template(chat, msgs.as_ptr(), 1, true, buf.as_mut_ptr(), 4, &mut n)
        },
        rlx_status::RLX_BUFFER_TOO_SMALL,
    );
    assert_eq!(n, want.len() + 1);
    check(
        unsafe {
            rlx_apply_chat_template(chat, msgs.as_ptr(), 1, true, buf.as_mut_ptr(), 256, &mut n)
        },
        rlx_status::RLX_OK,
    );
    assert_eq!(n, want.len());
    assert_eq!(
        unsafe { CStr::from_ptr(buf.as_ptr()) }.to_str().unwrap(),
        want
    );
    // A NULL content is an error, not a crash.
    let bad = [rlx_chat_message {
        role: role.as_ptr(),
        content: null(),
    }];
    check(
        unsafe {
            rlx_apply_chat_template(chat, bad.as_ptr(), 1, false, buf.as_mut_ptr(), 256, &mut n)
        },
        rlx_status::RLX_NULL_POINTER,
    );
    unsafe {
        rlx_model_free(plain);
        rlx_model_free(chat);
    }
}
