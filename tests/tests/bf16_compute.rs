//! Training with bf16 compute (`TrainConfig::compute = ComputeDtype::Bf16`) against the f32
//! step, on the tiny fixture models. bf16 keeps 8 significant bits, so each product's operands
//! carry up to 2^-9 relative error; through a few layers the gradients stay within a few
//! percent of the f32 ones (2–5% of each tensor's largest entry on these models).
//!
//! Tolerances (max |Δ| / max |g| per tensor, the scale at least 1e-3 of the model's largest
//! gradient entry): against PyTorch running the same bf16-operand, f32-sum products
//! (`tests/gen_grad_fixtures.py`), 5e-3 and the loss 1e-5; against the f32 step, 1e-1 and the
//! losses 1e-2 relative (3e-2 after three steps of fast training). The agreement promises
//! (thread count, gradient checkpointing) hold bit for bit.

use std::collections::HashMap;

use rlx::{ComputeDtype, LoadOptions, LoraConfig, Model, TrainConfig, Trainer};
use rlx_tests::{f32_values, fixture, id_lists, read_json, transpose};

fn batch() -> (Vec<Vec<u32>>, Vec<Vec<bool>>) {
    let seqs = vec![
        vec![1u32, 17, 42, 99, 5, 63, 28, 7, 11, 90],
        vec![1u32, 8, 77, 3, 51, 19, 64],
    ];
    let masks = seqs
        .iter()
        .map(|s| (0..s.len()).map(|i| i >= 3).collect())
        .collect();
    (seqs, masks)
}

fn config(compute: ComputeDtype) -> TrainConfig {
    TrainConfig {
        lr: 1e-3,
        compute,
        ..Default::default()
    }
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

/// max |got − want| / max |want| over one tensor, with `floor` as the least scale: some
/// gradients are zero in exact arithmetic (a key bias under softmax, a LoRA factor facing a
/// zero partner) and hold only rounding noise, in f32 as in bf16.
fn relative_error(got: &[f32], want: &[f32], floor: f32) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(floor, |m, v| m.max(v.abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
    diff / scale.max(f32::MIN_POSITIVE)
}

/// The largest gradient entry of all tensors.
fn largest(tensors: &[&[f32]]) -> f32 {
    tensors
        .iter()
        .flat_map(|t| t.iter())
        .fold(0f32, |m, v| m.max(v.abs()))
}

/// The SFT gradients of `model` with bf16 compute (through a Trainer, the way its steps
/// compute them) and in f32.
fn both_gradients(name: &str) -> ((f64, rlx::model::Gradients), (f64, rlx::model::Gradients)) {
    let (seqs, masks) = batch();
    let f32_grads = load(name, 2).sft_gradients(&seqs, &masks).unwrap();
    let mut trainer = Trainer::new(load(name, 2), config(ComputeDtype::Bf16)).unwrap();
    let bf16_grads = trainer
        .gradients_with(|m| m.sft_gradients(&seqs, &masks))
        .unwrap();
    (bf16_grads, f32_grads)
}

/// `tests/gen_grad_fixtures.py`'s PyTorch gradients of the SFT loss with bf16 products (the
/// same arithmetic, in PyTorch's summation order): `(sequences, masks, loss, by name)`.
#[allow(clippy::type_complexity)]
fn bf16_reference(
    name: &str,
) -> (
    Vec<Vec<u32>>,
    Vec<Vec<bool>>,
    f64,
    HashMap<String, Vec<f32>>,
) {
    let dir = fixture(name);
    let meta = read_json(&dir.join("grads.json"));
    let masks = meta["masks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            m.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_bool().unwrap())
                .collect()
        })
        .collect();
    let loss = read_json(&dir.join("grads_bf16.json"))["loss"]
        .as_f64()
        .unwrap();
    let bytes = std::fs::read(dir.join("grads_bf16.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let grads = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, f32_values(&v)))
        .collect();
    (id_lists(&meta["sequences"]), masks, loss, grads)
}

/// Against PyTorch running the same bf16 arithmetic: what is left is the f32 summation order
/// and, rarely, an activation that lands on the other side of a bf16 rounding boundary — so
/// agreement within 5e-3 of each tensor's largest entry (1e-3 of the model's largest as the
/// least scale), and the loss within 1e-5.
#[test]
fn bf16_gradients_match_pytorch_with_bf16_products() {
    for name in ["llama-f32", "gpt2-f32"] {
        let (seqs, masks, want_loss, want) = bf16_reference(name);
        let model = load(name, 2);
        let (c, f) = (model.config().hidden_size, model.config().intermediate_size);
        let mut trainer = Trainer::new(model, config(ComputeDtype::Bf16)).unwrap();
        let (loss, g) = trainer
            .gradients_with(|m| m.sft_gradients(&seqs, &masks))
            .unwrap();
        assert!(
            ((loss - want_loss) / want_loss).abs() < 1e-5,
            "{name}: loss {loss} vs {want_loss}"
        );
        let pairs: Vec<(String, Vec<f32>)> = if name == "llama-f32" {
            g.named_llama()
                .into_iter()
                .map(|(n, v)| (n, v.to_vec()))
                .collect()
        } else {
            let mut out = vec![("transformer.wte.weight".to_string(), g.tok_emb.clone())];
            for (i, l) in g.layers.iter().enumerate() {
                let p = format!("transformer.h.{i}");
                let qkv: Vec<f32> = [&l.q, &l.k, &l.v]
                    .iter()
                    .flat_map(|x| x.w.iter().copied())
                    .collect();
                out.push((format!("{p}.attn.c_attn.weight"), transpose(&qkv, 3 * c, c)));
                out.push((format!("{p}.attn.c_proj.weight"), transpose(&l.o.w, c, c)));
                out.push((format!("{p}.mlp.c_fc.weight"), transpose(&l.mlp[0].w, f, c)));
                out.push((
                    format!("{p}.mlp.c_proj.weight"),
                    transpose(&l.mlp[1].w, c, f),
                ));
                out.push((format!("{p}.ln_1.weight"), l.attn_norm.w.clone()));
                out.push((
                    format!("{p}.mlp.c_fc.bias"),
                    l.mlp[0].b.clone().unwrap_or_default(),
                ));
            }
            out
        };
        let floor = 1e-3
            * want
                .values()
                .flat_map(|v| v.iter())
                .fold(0f32, |m, v| m.max(v.abs()));
        let mut worst = (0f32, String::new());
        for (n, got) in &pairs {
            let err = relative_error(got, &want[n], floor);
            if err > worst.0 {
                worst = (err, n.clone());
            }
        }
        println!(
            "{name}: loss {loss} vs {want_loss}; worst {:.2e} ({})",
            worst.0, worst.1
        );
        assert!(worst.0 < 5e-3, "{name}: {} off by {}", worst.1, worst.0);
    }
}

#[test]
fn bf16_gradients_are_close_to_f32_but_not_equal() {
    for name in ["llama-f32", "gpt2-f32", "qwen2-f32"] {
        let ((loss_bf, bf), (loss_f, f)) = both_gradients(name);
        assert!(
            ((loss_bf - loss_f) / loss_f).abs() < 1e-2,
            "{name}: loss {loss_bf} vs {loss_f}"
        );
        let (bf, f) = (bf.flat(), f.flat());
        assert_eq!(bf.len(), f.len());
        let floor = 1e-3 * largest(&f);
        let mut worst = 0f32;
        let mut differs = false;
        for (got, want) in bf.iter().zip(&f) {
            worst = worst.max(relative_error(got, want, floor));
            differs |= got != want;
        }
        println!("{name}: loss {loss_bf:.6} vs {loss_f:.6}, worst gradient error {worst:.2e}");
        assert!(worst < 1e-1, "{name}: gradients off by {worst}");
        // The products really ran in bf16 (equal gradients would mean the f32 path ran).
        assert!(differs, "{name}: bf16 compute gave the f32 gradients");
    }
}

#[test]
fn bf16_gradients_do_not_depend_on_threads_or_checkpointing() {
    let (seqs, masks) = batch();
    let run = |threads: usize, checkpointing: bool| {
        let mut model = load("llama-f32", threads);
        model.set_gradient_checkpointing(checkpointing);
        let mut trainer = Trainer::new(model, config(ComputeDtype::Bf16)).unwrap();
        let (loss, grads) = trainer
            .gradients_with(|m| m.sft_gradients(&seqs, &masks))
            .unwrap();
        let bits: Vec<Vec<u32>> = grads
            .flat()
            .iter()
            .map(|g| g.iter().map(|v| v.to_bits()).collect())
            .collect();
        (loss.to_bits(), bits)
    };
    let base = run(1, false);
    assert!(base == run(3, false), "thread count changed the gradients");
    assert!(base == run(2, true), "checkpointing changed the gradients");
}

#[test]
fn bf16_training_follows_the_f32_loss_curve_and_refreshes_its_copies() {
    let (seqs, masks) = batch();
    let curve = |compute| {
        let mut trainer = Trainer::new(load("llama-f32", 2), config(compute)).unwrap();
        (0..6)
            .map(|_| trainer.sft_step(&seqs, &masks).unwrap().loss)
            .collect::<Vec<f64>>()
    };
    let (bf, f) = (curve(ComputeDtype::Bf16), curve(ComputeDtype::F32));
    println!("bf16 {bf:?}\nf32  {f:?}");
    // The curves drift apart slowly as the weights do (lr 1e-3 takes the loss from 6.7 to
    // 1.3 in six steps here): within 1% for three steps, 3% after that.
    for (i, (a, b)) in bf.iter().zip(&f).enumerate() {
        let tol = if i < 3 { 1e-2 } else { 3e-2 };
        assert!(((a - b) / b).abs() < tol, "step {i}: {a} vs {b}");
    }
    // The loss falls under bf16 compute as it does in f32: the copies follow the updates (a
    // stale copy would keep computing the first step's loss).
    assert!(bf[5] < bf[0] - 0.05, "{bf:?}");
    assert!(bf.windows(2).all(|w| w[0] != w[1]), "{bf:?}");
}

#[test]
fn lora_and_reward_model_train_with_bf16_compute() {
    let (seqs, masks) = batch();
    // LoRA: the frozen base's copies are made once; adapter gradients close to f32's.
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        seed: 3,
    };
    let adapted = |compute| {
        let mut model = load("llama-f32", 2);
        model.attach_lora(&lora).unwrap();
        let mut trainer = Trainer::new(model, config(compute)).unwrap();
        // Gradients at the start (B = 0: only B's are non-zero), then the loss curve.
        let (_, grads) = trainer
            .gradients_with(|m| m.sft_gradients(&seqs, &masks))
            .unwrap();
        let flat: Vec<Vec<f32>> = grads.flat().iter().map(|g| g.to_vec()).collect();
        let losses: Vec<f64> = (0..3)
            .map(|_| trainer.sft_step(&seqs, &masks).unwrap().loss)
            .collect();
        (losses, flat)
    };
    let ((lb, gb), (lf, gf)) = (adapted(ComputeDtype::Bf16), adapted(ComputeDtype::F32));
    for (a, b) in lb.iter().zip(&lf) {
        assert!(((a - b) / b).abs() < 1e-2, "LoRA loss {a} vs {b}");
    }
    assert!(lb[2] < lb[0], "{lb:?}");
    let floor = 1e-3 * largest(&gf.iter().map(Vec::as_slice).collect::<Vec<_>>());
    for (got, want) in gb.iter().zip(&gf) {
        let err = relative_error(got, want, floor);
        assert!(err < 1e-1, "LoRA gradient off by {err}");
    }

    // Reward model: pair loss and accuracy under bf16 compute.
    let mut model = load("llama-f32", 2);
    model.add_score_head(1);
    let mut trainer = Trainer::new(model, config(ComputeDtype::Bf16)).unwrap();
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

#[test]
fn checkpoints_keep_the_compute_dtype_and_bad_names_are_errors() {
    let (seqs, masks) = batch();
    let mut trainer = Trainer::new(load("llama-f32", 2), config(ComputeDtype::Bf16)).unwrap();
    trainer.sft_step(&seqs, &masks).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let at = dir.path().join("ck");
    trainer
        .save_checkpoint(&at, &serde_json::json!({}))
        .unwrap();
    let next = trainer.sft_step(&seqs, &masks).unwrap();
    let (mut resumed, _) = Trainer::resume(&at, LoadOptions::default()).unwrap();
    assert_eq!(resumed.config().compute, ComputeDtype::Bf16);
    let again = resumed.sft_step(&seqs, &masks).unwrap();
    assert_eq!(
        again.loss.to_bits(),
        next.loss.to_bits(),
        "resume continues exactly"
    );

    assert_eq!(ComputeDtype::parse("bf16").unwrap(), ComputeDtype::Bf16);
    assert_eq!(ComputeDtype::parse("f32").unwrap(), ComputeDtype::F32);
    let err = ComputeDtype::parse("fp8").unwrap_err().to_string();
    assert!(err.contains("fp8") && err.contains("bf16"), "{err}");
}

/// A panic inside a gradient call (Python turns it into an exception and the trainer lives on)
/// leaves the model computing in f32 again: its log-probs are the f32 model's, bit for bit.
#[test]
fn a_panicking_gradient_call_leaves_no_bf16_state() {
    let (seqs, masks) = batch();
    let mut trainer = Trainer::new(load("llama-f32", 2), config(ComputeDtype::Bf16)).unwrap();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        trainer.gradients_with(|m| -> rlx::Result<()> {
            m.sft_gradients(&seqs, &masks)?;
            panic!("objective failed");
        })
    }));
    assert!(caught.is_err());
    let fresh = load("llama-f32", 2);
    let want = fresh.logprobs(&seqs, 1.0).unwrap();
    assert_eq!(trainer.model().logprobs(&seqs, 1.0).unwrap(), want);
    // A clone made while the copies are lent does not keep them either.
    let clone = trainer
        .gradients_with(|m| Ok::<_, rlx::Error>(m.clone()))
        .unwrap();
    assert_eq!(clone.logprobs(&seqs, 1.0).unwrap(), want);
    // And the trainer still trains, also after giving its buffers back.
    let before = trainer.sft_step(&seqs, &masks).unwrap().loss;
    trainer.release_buffers();
    assert!(trainer.sft_step(&seqs, &masks).unwrap().loss < before);
    trainer.set_compute(ComputeDtype::F32).unwrap();
    assert_eq!(trainer.config().compute, ComputeDtype::F32);
}
