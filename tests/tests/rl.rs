//! PPO and GRPO against PyTorch (`tests/gen_grad_fixtures.py`, TRL's formulas) on the llama
//! fixture. Tolerances: advantages, returns and losses within 1e-5 absolute (f32 PyTorch vs
//! f64 sums here); gradients within 1e-4 relative to each tensor's largest entry.

use std::collections::HashMap;

use rlx::model::Linear;
use rlx::tensor::Tensor;
use rlx::{
    group_advantages, ppo_advantages, GrpoBatch, GrpoConfig, GrpoLossType, LoadOptions, Model,
    PpoConfig, PpoMinibatch,
};
use rlx_tests::{
    assert_rel_close, f32_values, f64_list, f64_rows, fixture, id_lists, masks_from_starts,
    read_json,
};

fn close(name: &str, got: f64, want: f64, tol: f64) {
    assert!(
        (got - want).abs() < tol,
        "{name}: {got} vs PyTorch {want} (tol {tol})"
    );
}

fn close_rows(name: &str, got: &[Vec<f64>], want: &[Vec<f64>], tol: f64) {
    assert_eq!(got.len(), want.len(), "{name}");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.len(), w.len(), "{name}");
        for (a, b) in g.iter().zip(w) {
            close(name, *a, *b, tol);
        }
    }
}

fn tensor(st: &safetensors::SafeTensors<'_>, name: &str) -> Tensor {
    let view = st.tensor(name).unwrap();
    Tensor::owned(f32_values(&view), view.shape().to_vec()).unwrap()
}

#[test]
fn ppo_matches_pytorch() {
    let dir = fixture("llama-f32");
    let meta = read_json(&dir.join("ppo.json"));
    let bytes = std::fs::read(dir.join("ppo.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut model = Model::load(&dir, LoadOptions::default()).unwrap();
    model.weights_mut().value = Some(Linear::new(
        tensor(&st, "v_head.summary.weight"),
        Some(tensor(&st, "v_head.summary.bias")),
    ));
    let c = &meta["config"];
    let cfg = PpoConfig {
        kl_coef: c["kl_coef"].as_f64().unwrap(),
        gamma: c["gamma"].as_f64().unwrap(),
        lam: c["lam"].as_f64().unwrap(),
        clip_range: c["clip_range"].as_f64().unwrap(),
        clip_range_value: c["clip_range_value"].as_f64().unwrap(),
        vf_coef: c["vf_coef"].as_f64().unwrap(),
        entropy_coef: c["entropy_coef"].as_f64().unwrap(),
        whiten_advantages: true,
    };
    let seqs = id_lists(&meta["sequences"]);
    let masks = masks_from_starts(&seqs, &meta["starts"]);
    let old = f64_rows(&meta["old_logprobs"]);
    let old_values = f64_rows(&meta["old_values"]);

    // The value head read at the rows that predict each response token.
    let values = model.values(&seqs).unwrap();
    let starts = f64_list(&meta["starts"]);
    let want_values = f64_rows(&meta["values"]);
    for ((v, &k), want) in values.iter().zip(&starts).zip(&want_values) {
        let got: Vec<f64> = v[k as usize - 1..v.len() - 1]
            .iter()
            .map(|&x| x as f64)
            .collect();
        close_rows("values", &[got], std::slice::from_ref(want), 1e-5);
    }

    let adv = ppo_advantages(
        &old,
        &f64_rows(&meta["ref_logprobs"]),
        &old_values,
        &f64_list(&meta["scores"]),
        &cfg,
    )
    .unwrap();
    close_rows("rewards", &adv.rewards, &f64_rows(&meta["rewards"]), 1e-5);
    close_rows(
        "advantages",
        &adv.advantages,
        &f64_rows(&meta["advantages"]),
        1e-5,
    );
    close_rows("returns", &adv.returns, &f64_rows(&meta["returns"]), 1e-5);

    let batch = PpoMinibatch {
        sequences: &seqs,
        masks: &masks,
        old_logprobs: &old,
        old_values: &old_values,
        advantages: &adv.advantages,
        returns: &adv.returns,
    };
    let (stats, grads) = model.ppo_gradients(&batch, &cfg).unwrap();
    for (name, got) in [
        ("loss", stats.loss),
        ("policy_loss", stats.policy_loss),
        ("value_loss", stats.value_loss),
        ("entropy", stats.entropy),
        ("clip_fraction", stats.clip_fraction),
        ("approx_kl", stats.approx_kl),
    ] {
        close(name, got, meta[name].as_f64().unwrap(), 1e-5);
    }
    let named: HashMap<String, &[f32]> = grads.named_llama().into_iter().collect();
    for (name, view) in st.tensors() {
        if let Some(param) = name.strip_prefix("grad.") {
            assert_rel_close(&name, named[param], &f32_values(&view), 1e-4);
        }
    }
}

#[test]
fn grpo_matches_pytorch_for_every_loss_type() {
    let dir = fixture("llama-f32");
    let meta = read_json(&dir.join("grpo.json"));
    let bytes = std::fs::read(dir.join("grpo.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let model = Model::load(&dir, LoadOptions::default()).unwrap();
    let seqs = id_lists(&meta["sequences"]);
    let masks = masks_from_starts(&seqs, &meta["starts"]);
    let k = meta["group_size"].as_u64().unwrap() as usize;
    let adv = group_advantages(&f64_list(&meta["rewards"]), k, true).unwrap();
    for (a, b) in adv.iter().zip(f64_list(&meta["advantages"])) {
        close("advantage", *a, b, 1e-5);
    }
    let (old, reference) = (
        f64_rows(&meta["old_logprobs"]),
        f64_rows(&meta["ref_logprobs"]),
    );
    let batch = GrpoBatch {
        sequences: &seqs,
        masks: &masks,
        advantages: &adv,
        old_logprobs: Some(&old),
        ref_logprobs: Some(&reference),
    };
    for (key, loss_type) in [
        ("grpo", GrpoLossType::Grpo),
        ("bnpo", GrpoLossType::Bnpo),
        ("dr_grpo", GrpoLossType::DrGrpo),
        ("dapo", GrpoLossType::Dapo),
    ] {
        let cfg = GrpoConfig {
            beta: meta["beta"].as_f64().unwrap(),
            epsilon_low: meta["epsilon"].as_f64().unwrap(),
            epsilon_high: meta["epsilon"].as_f64().unwrap(),
            loss_type,
            max_completion_length: Some(meta["max_completion_length"].as_u64().unwrap() as usize),
            ..Default::default()
        };
        let (stats, grads) = model.grpo_gradients(&batch, &cfg).unwrap();
        close(key, stats.loss, meta["loss"][key].as_f64().unwrap(), 1e-5);
        let named: HashMap<String, &[f32]> = grads.named_llama().into_iter().collect();
        for (name, view) in st.tensors() {
            if let Some(param) = name.strip_prefix(&format!("{key}.")) {
                assert_rel_close(&name, named[param], &f32_values(&view), 1e-4);
            }
        }
    }
}

#[test]
fn first_update_on_its_own_rollout_has_ratio_one() {
    // With old log-probs from the same policy, every PPO ratio is 1 and nothing is clipped.
    let mut model = Model::load(fixture("llama-f32"), LoadOptions::default()).unwrap();
    model.add_value_head(3);
    let seqs = vec![vec![1u32, 5, 9, 2, 7, 7], vec![3u32, 4, 4, 8]];
    let masks = vec![
        vec![false, false, true, true, true, true],
        vec![false, true, true, true],
    ];
    let lp = model.logprobs(&seqs, 1.0).unwrap();
    let old: Vec<Vec<f64>> = lp
        .iter()
        .zip(&masks)
        .map(|(l, m)| {
            (1..m.len())
                .filter(|&t| m[t])
                .map(|t| l[t - 1] as f64)
                .collect()
        })
        .collect();
    let zeros: Vec<Vec<f64>> = old.iter().map(|o| vec![0.0; o.len()]).collect();
    let ones: Vec<Vec<f64>> = old.iter().map(|o| vec![1.0; o.len()]).collect();
    let batch = PpoMinibatch {
        sequences: &seqs,
        masks: &masks,
        old_logprobs: &old,
        old_values: &zeros,
        advantages: &ones,
        returns: &zeros,
    };
    let (stats, _) = model.ppo_gradients(&batch, &PpoConfig::default()).unwrap();
    assert_eq!(stats.clip_fraction, 0.0);
    assert!(
        (stats.mean_ratio - 1.0).abs() < 1e-12,
        "{}",
        stats.mean_ratio
    );
    assert_eq!(stats.approx_kl, 0.0);
}

#[test]
fn rl_bad_inputs_are_errors() {
    let mut model = Model::load(fixture("llama-f32"), LoadOptions::default()).unwrap();
    let seqs = vec![vec![1u32, 5, 9, 2]];
    let masks = vec![vec![false, true, true, true]];
    let rows = vec![vec![0.0; 3]];
    let batch = PpoMinibatch {
        sequences: &seqs,
        masks: &masks,
        old_logprobs: &rows,
        old_values: &rows,
        advantages: &rows,
        returns: &rows,
    };
    // No value head yet.
    assert!(model.ppo_gradients(&batch, &PpoConfig::default()).is_err());
    model.add_value_head(1);
    assert!(model.ppo_gradients(&batch, &PpoConfig::default()).is_ok());
    let short = vec![vec![0.0; 2]];
    let bad = PpoMinibatch {
        advantages: &short,
        ..batch
    };
    assert!(model.ppo_gradients(&bad, &PpoConfig::default()).is_err());
    let nan = vec![vec![0.0, f64::NAN, 0.0]];
    let bad = PpoMinibatch {
        returns: &nan,
        ..batch
    };
    assert!(model.ppo_gradients(&bad, &PpoConfig::default()).is_err());
    let bad_cfg = PpoConfig {
        gamma: 1.5,
        ..Default::default()
    };
    assert!(model.ppo_gradients(&batch, &bad_cfg).is_err());

    // GRPO: k = 1, β > 0 without a reference, masks selecting nothing.
    assert!(group_advantages(&[1.0], 1, true).is_err());
    let grpo = GrpoBatch {
        sequences: &seqs,
        masks: &masks,
        advantages: &[0.5],
        old_logprobs: None,
        ref_logprobs: None,
    };
    assert!(model.grpo_gradients(&grpo, &GrpoConfig::default()).is_err());
    let no_kl = GrpoConfig {
        beta: 0.0,
        ..Default::default()
    };
    assert!(model.grpo_gradients(&grpo, &no_kl).is_ok());
    let empty = vec![vec![false; 4]];
    let bad = GrpoBatch {
        masks: &empty,
        ..grpo
    };
    assert!(model.grpo_gradients(&bad, &no_kl).is_err());
}

#[test]
fn entropy_gradient_matches_finite_differences() {
    use rlx::model::{Norm, TokenOutputGrads, TokenOutputs};
    let seqs = vec![vec![1u32, 5, 9, 2, 7, 7]];
    let masks = vec![vec![false, true, true, true, true, true]];
    let mean_entropy = |model: &Model| -> (f64, rlx::model::Gradients) {
        model
            .token_objective_gradients(&seqs, &masks, &mut |out: &TokenOutputs| {
                let n = out.entropy[0].len() as f64;
                Ok((
                    out.entropy[0].iter().sum::<f64>() / n,
                    TokenOutputGrads {
                        logp: vec![vec![0.0; out.logp[0].len()]],
                        entropy: Some(vec![vec![1.0 / n; out.entropy[0].len()]]),
                        value: None,
                    },
                ))
            })
            .unwrap()
    };
    let model = Model::load(fixture("llama-f32"), LoadOptions::default()).unwrap();
    let (_, grads) = mean_entropy(&model);
    for i in [0usize, 3, 17] {
        let eps = 1e-2f32;
        let at = |delta: f32| {
            let mut m = model.clone();
            if let Norm::Rms { w } = &mut m.weights_mut().final_norm {
                w.as_mut_slice()[i] += delta;
            }
            mean_entropy(&m).0
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * eps as f64);
        let got = grads.final_norm.w[i] as f64;
        assert!(
            (fd - got).abs() < 1e-3 + 1e-2 * fd.abs(),
            "∂H/∂norm[{i}]: backward {got} vs finite difference {fd}"
        );
    }
}
