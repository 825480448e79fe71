//! Reward model: scores and the pairwise loss's gradients against transformers'
//! `LlamaForSequenceClassification` (`tests/gen_grad_fixtures.py`). Tolerances: rewards and loss
//! 1e-5; gradients 1e-4 relative to each tensor's largest entry.

use std::collections::HashMap;
use std::path::Path;

use rlx::{Error, LoadOptions, Model};
use rlx_tests::{assert_rel_close, f32_values, fixture, id_lists};
use safetensors::tensor::{Dtype, TensorView};

/// The llama fixture as a `LlamaForSequenceClassification` checkpoint with the reference's score
/// head (and no LM head).
fn write_reward_model(dir: &Path, score: &[f32]) {
    let src = fixture("llama-f32");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!(["LlamaForSequenceClassification"]);
    cfg["id2label"] = serde_json::json!({"0": "LABEL_0"});
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let score_bytes: Vec<u8> = score.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut views: Vec<(String, TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != "lm_head.weight")
        .collect();
    views.push((
        "score.weight".into(),
        TensorView::new(Dtype::F32, vec![1, score.len()], &score_bytes).unwrap(),
    ));
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
}

#[test]
fn reward_scores_and_pair_gradients_match_transformers() {
    let src = fixture("llama-f32");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("rm.json")).unwrap()).unwrap();
    let bytes = std::fs::read(src.join("rm.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let reference: HashMap<String, Vec<f32>> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, f32_values(&v)))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    write_reward_model(dir.path(), &reference["score.weight"]);
    let rm = Model::load(dir.path(), LoadOptions::default()).unwrap();
    assert!(rm.config().score_head);

    let (chosen, rejected) = (id_lists(&meta["chosen"]), id_lists(&meta["rejected"]));
    let rc = rm.reward_scores(&chosen).unwrap();
    let rr = rm.reward_scores(&rejected).unwrap();
    for (got, want) in rc.iter().chain(&rr).zip(
        meta["rewards_chosen"]
            .as_array()
            .unwrap()
            .iter()
            .chain(meta["rewards_rejected"].as_array().unwrap()),
    ) {
        assert!(
            (*got as f64 - want.as_f64().unwrap()).abs() < 1e-5,
            "reward {got} vs {want}"
        );
    }

    let margin = meta["margin"].as_f64().unwrap() as f32;
    let (stats, grads) = rm
        .reward_pair_gradients(&chosen, &rejected, margin)
        .unwrap();
    let want_loss = meta["loss"].as_f64().unwrap();
    assert!(
        (stats.loss - want_loss).abs() < 1e-5,
        "loss {} vs {want_loss}",
        stats.loss
    );
    let named: HashMap<String, &[f32]> = grads.named_llama().into_iter().collect();
    for (name, want) in reference
        .iter()
        .filter_map(|(n, v)| n.strip_prefix("grad.").map(|n| (n, v)))
    {
        assert_rel_close(name, named[name], want, 1e-4);
    }
}

#[test]
fn reward_model_bad_input() {
    let lm = Model::load(fixture("llama-f32"), LoadOptions::default()).unwrap();
    assert!(matches!(
        lm.reward_scores(&[vec![1u32, 2]]),
        Err(Error::InvalidArgument(_))
    ));
    let mut fresh = Model::load(fixture("llama-f32"), LoadOptions::default()).unwrap();
    fresh.add_score_head(3);
    assert_eq!(fresh.reward_scores(&[vec![1u32, 2]]).unwrap().len(), 1);
    let a = [vec![1u32, 2, 3]];
    assert!(fresh.reward_pair_gradients(&a, &[], 0.0).is_err());
    assert!(fresh
        .reward_pair_gradients::<Vec<u32>>(&[], &[], 0.0)
        .is_err());
    assert!(fresh.reward_pair_gradients(&a, &a, f32::NAN).is_err());
    // A classifier with several labels is not a reward model.
    let dir = tempfile::tempdir().unwrap();
    write_reward_model(dir.path(), &[0.0; 64]);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    cfg["id2label"] = serde_json::json!({"0": "a", "1": "b"});
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let err = Model::load(dir.path(), LoadOptions::default()).unwrap_err();
    assert!(err.to_string().contains("2 labels"), "{err}");
}

#[test]
fn reward_model_training_separates_the_pairs() {
    let mut model = Model::load(fixture("llama-f32"), LoadOptions::default()).unwrap();
    model.add_score_head(1);
    let config = rlx::TrainConfig {
        lr: 1e-3,
        ..Default::default()
    };
    let mut trainer = rlx::Trainer::new(model, config).unwrap();
    let chosen = [vec![1u32, 10, 20, 30], vec![1, 40, 50, 60, 70]];
    let rejected = [vec![1u32, 11, 21, 31], vec![1, 41, 51]];
    let first = trainer.rm_step(&chosen, &rejected, 0.0).unwrap();
    let mut last = first.clone();
    for _ in 0..10 {
        last = trainer.rm_step(&chosen, &rejected, 0.0).unwrap();
    }
    assert!(last.1.loss < first.1.loss, "{:?} -> {:?}", first.1, last.1);
    assert_eq!(last.1.accuracy, 1.0);
}
