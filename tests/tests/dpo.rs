//! DPO against PyTorch (`tests/gen_grad_fixtures.py`, sigmoid loss, β = 0.1): loss within 1e-6,
//! gradients within 1e-4 relative to each tensor's largest entry.

use std::collections::HashMap;

use rlx::{DpoLoss, LoadOptions, Model};
use rlx_tests::{
    assert_rel_close, f32_values, f64_list, fixture, id_lists, masks_from_starts, read_json,
};

#[test]
fn sigmoid_dpo_matches_pytorch() {
    let dir = fixture("llama-f32");
    let meta = read_json(&dir.join("dpo.json"));
    let (chosen, rejected) = (id_lists(&meta["chosen"]), id_lists(&meta["rejected"]));
    let (cm, rm) = (
        masks_from_starts(&chosen, &meta["chosen_start"]),
        masks_from_starts(&rejected, &meta["rejected_start"]),
    );
    let model = Model::load(&dir, LoadOptions::default()).unwrap();
    let (stats, grads) = model
        .dpo_gradients(
            &chosen,
            &cm,
            &rejected,
            &rm,
            &f64_list(&meta["ref_chosen"]),
            &f64_list(&meta["ref_rejected"]),
            meta["beta"].as_f64().unwrap(),
            DpoLoss::Sigmoid,
        )
        .unwrap();
    let want = meta["loss"].as_f64().unwrap();
    assert!(
        (stats.loss - want).abs() < 1e-6,
        "loss {} vs {want}",
        stats.loss
    );
    let bytes = std::fs::read(dir.join("dpo.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let named: HashMap<String, &[f32]> = grads.named_llama().into_iter().collect();
    for (name, view) in st.tensors() {
        assert_rel_close(&name, named[&name], &f32_values(&view), 1e-4);
    }
}

#[test]
fn dpo_variants_run_and_bad_input_is_rejected() {
    let model = Model::load(fixture("llama-f32"), LoadOptions::default()).unwrap();
    let c = vec![vec![1u32, 5, 6, 7]];
    let r = vec![vec![1u32, 8, 9]];
    let (cm, rm) = (
        vec![vec![false, true, true, true]],
        vec![vec![false, true, true]],
    );
    for kind in [DpoLoss::Sigmoid, DpoLoss::Ipo, DpoLoss::Hinge] {
        let (stats, _) = model
            .dpo_gradients(&c, &cm, &r, &rm, &[-5.0], &[-4.0], 0.1, kind)
            .unwrap();
        assert!(stats.loss.is_finite(), "{kind:?}");
    }
    assert!(model
        .dpo_gradients(&c, &cm, &r, &rm, &[-5.0], &[], 0.1, DpoLoss::Sigmoid)
        .is_err());
    assert!(model
        .dpo_gradients(&c, &cm, &r, &rm, &[-5.0], &[-4.0], 0.0, DpoLoss::Sigmoid)
        .is_err());
    assert!(model
        .dpo_gradients(
            &c,
            &cm,
            &r,
            &rm,
            &[f64::NAN],
            &[-4.0],
            0.1,
            DpoLoss::Sigmoid
        )
        .is_err());
    assert!(model
        .dpo_gradients(
            &c,
            &[vec![false; 4]],
            &r,
            &rm,
            &[-5.0],
            &[-4.0],
            0.1,
            DpoLoss::Sigmoid
        )
        .is_err());
}
