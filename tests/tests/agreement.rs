//! The engine's main promise: the log-prob `generate` reports for a token equals, bit for bit,
//! what `logprobs` returns for the finished sequence — whatever the batch size, the other
//! sequences in the batch, or the thread count.

use rlx::{LoadOptions, Model, SamplingParams};
use rlx_tests::fixture;

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn load(name: &str, threads: usize) -> Model {
    Model::load(
        fixture(name),
        LoadOptions {
            threads,
            ..Default::default()
        },
    )
    .unwrap()
}

fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![5, 17, 42, 8],
        vec![3],
        vec![9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 11],
        vec![100, 7, 64],
        vec![12, 13, 14, 15, 16, 17, 18],
    ]
}

fn sampling() -> SamplingParams {
    SamplingParams {
        max_new_tokens: 20,
        temperature: 0.8,
        top_p: 0.95,
        top_k: 50,
        stop_token_ids: Some(Vec::new()),
        seed: 1234,
        ..SamplingParams::default()
    }
}

fn check_model(name: &str) {
    let m2 = load(name, 2);
    let m1 = load(name, 1);
    let params = sampling();
    let ps = prompts();
    let batch = m2.generate(&ps, &params, None).unwrap();
    let batch_1thread = m1.generate(&ps, &params, None).unwrap();
    assert_eq!(
        batch, batch_1thread,
        "{name}: thread count changed the output"
    );

    // Sequence 0 alone vs inside the batch of 5: same tokens and the same log-prob bits.
    let alone = m2.generate(&ps[..1], &params, None).unwrap();
    assert_eq!(alone[0].tokens, batch[0].tokens, "{name}");
    assert_eq!(bits(&alone[0].logprobs), bits(&batch[0].logprobs), "{name}");

    // Other sequences sharing the batch do not matter, only this sequence's index.
    let mut swapped = ps.clone();
    swapped[1] = vec![77, 78, 79, 80, 81, 82];
    let other = m2.generate(&swapped, &params, None).unwrap();
    assert_eq!(other[0], batch[0], "{name}");
    assert_eq!(other[2], batch[2], "{name}");

    // Rescoring the finished sequences: generate's log-probs are exactly the training forward's.
    let full: Vec<Vec<u32>> = ps
        .iter()
        .zip(&batch)
        .map(|(p, g)| p.iter().chain(&g.tokens).copied().collect())
        .collect();
    for model in [&m1, &m2] {
        let all = model.logprobs(&full, params.temperature).unwrap();
        for (i, (lp, g)) in all.iter().zip(&batch).enumerate() {
            let p = ps[i].len();
            assert_eq!(bits(&lp[p - 1..]), bits(&g.logprobs), "{name} sequence {i}");
        }
        // One at a time as well.
        let single = model.logprobs(&full[2..3], params.temperature).unwrap();
        assert_eq!(bits(&single[0]), bits(&all[2]), "{name}");
    }

    // Greedy agrees too, with log-probs at temperature 1.
    let greedy = SamplingParams {
        stop_token_ids: Some(Vec::new()),
        ..SamplingParams::greedy(12)
    };
    let g = m2.generate(&ps, &greedy, None).unwrap();
    let g_alone = m1.generate(&ps[3..4], &greedy, None).unwrap();
    assert_eq!(g_alone[0], g[3], "{name}");
    let seq: Vec<u32> = ps[3].iter().chain(&g[3].tokens).copied().collect();
    let lp = m1.logprobs(&[seq], 0.0).unwrap();
    assert_eq!(
        bits(&lp[0][ps[3].len() - 1..]),
        bits(&g[3].logprobs),
        "{name}"
    );
}

#[test]
fn gpt2_generate_and_logprobs_agree_bitwise() {
    check_model("gpt2-f32");
}

#[test]
fn llama_generate_and_logprobs_agree_bitwise() {
    check_model("llama-f32");
}

#[test]
fn qwen2_generate_and_logprobs_agree_bitwise() {
    check_model("qwen2-f32");
}

#[test]
fn same_seed_same_tokens_different_seed_different_tokens() {
    let m = load("llama-f32", 0);
    let ps = prompts();
    let a = m.generate(&ps, &sampling(), None).unwrap();
    let b = m.generate(&ps, &sampling(), None).unwrap();
    assert_eq!(a, b);
    let c = m
        .generate(
            &ps,
            &SamplingParams {
                seed: 99,
                ..sampling()
            },
            None,
        )
        .unwrap();
    assert_ne!(a, c);
}

#[test]
fn streaming_callback_sees_every_token_and_can_stop() {
    let m = load("gpt2-f32", 0);
    let mut seen: Vec<(usize, u32, f32)> = Vec::new();
    let mut cb = |seq: usize, tok: u32, lp: f32| {
        seen.push((seq, tok, lp));
        true
    };
    let out = m
        .generate(&prompts()[..2], &sampling(), Some(&mut cb))
        .unwrap();
    for (i, g) in out.iter().enumerate() {
        let mine: Vec<u32> = seen.iter().filter(|s| s.0 == i).map(|s| s.1).collect();
        assert_eq!(mine, g.tokens);
    }
    let mut count = 0;
    let mut stop_after_3 = |_: usize, _: u32, _: f32| {
        count += 1;
        count < 3
    };
    let out = m
        .generate(&prompts()[..1], &sampling(), Some(&mut stop_after_3))
        .unwrap();
    assert_eq!(out[0].tokens.len(), 3);
    assert_eq!(out[0].finish_reason, rlx::FinishReason::Cancelled);
}

#[test]
fn eos_stops_a_sequence() {
    let m = load("llama-f32", 0);
    // Stop on whatever greedy produces first: the sequence must end right there.
    let g = m
        .generate(
            &[vec![5u32, 6]],
            &SamplingParams {
                stop_token_ids: Some(Vec::new()),
                ..SamplingParams::greedy(4)
            },
            None,
        )
        .unwrap();
    let first = g[0].tokens[0];
    let stopped = m
        .generate(
            &[vec![5u32, 6]],
            &SamplingParams {
                stop_token_ids: Some(vec![first]),
                ..SamplingParams::greedy(4)
            },
            None,
        )
        .unwrap();
    assert_eq!(stopped[0].tokens, vec![first]);
    assert_eq!(stopped[0].finish_reason, rlx::FinishReason::Stop);
    assert_eq!(m.eos_token_ids(), &[2]);
}

#[test]
fn repeated_prompts_fork_one_prefill_and_still_agree() {
    // k samples of one prompt share its prefill (the cache is forked); their log-probs are
    // still bitwise what the training-side forward computes, and the samples differ.
    let model = load("llama-f32", 2);
    let p = prompts()[1].clone();
    let batch = vec![p.clone(), prompts()[0].clone(), p.clone(), p.clone()];
    let outs = model.generate(&batch, &sampling(), None).unwrap();
    for (prompt, out) in batch.iter().zip(&outs) {
        let mut full = prompt.clone();
        full.extend(&out.tokens);
        let lp = model.logprobs(&[full], sampling().temperature).unwrap();
        let tail = &lp[0][prompt.len() - 1..];
        assert_eq!(bits(tail), bits(&out.logprobs));
    }
    assert!(outs[0].tokens != outs[2].tokens || outs[2].tokens != outs[3].tokens);
}
