//! Checkpoints: resuming takes exactly the step an uninterrupted run would have taken (bitwise),
//! for full fine-tuning and LoRA; a process killed mid-save never leaves a broken checkpoint;
//! failed saves leave earlier checkpoints untouched; gradient accumulation equals one big batch.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rlx::model::LoraConfig;
use rlx::{LoadOptions, Model, Schedule, TrainConfig, Trainer};
use rlx_tests::fixture;
use serde_json::json;

/// Token sequences with their response masks.
type Batch = (Vec<Vec<u32>>, Vec<Vec<bool>>);

fn batches() -> Vec<Batch> {
    (0..3u32)
        .map(|i| {
            let a: Vec<u32> = (0..9).map(|t| (t * 7 + i * 13 + 1) % 60 + 1).collect();
            let b: Vec<u32> = (0..6).map(|t| (t * 11 + i * 5 + 3) % 60 + 1).collect();
            let ma = (0..a.len()).map(|t| t >= 3).collect();
            let mb = (0..b.len()).map(|t| t >= 2).collect();
            (vec![a, b], vec![ma, mb])
        })
        .collect()
}

fn config() -> TrainConfig {
    TrainConfig {
        lr: 1e-2,
        weight_decay: 0.1,
        schedule: Schedule::WarmupCosine {
            warmup_steps: 1,
            total_steps: 5,
        },
        ..Default::default()
    }
}

/// Every trainable value of the model, in order.
fn params(trainer: &mut Trainer) -> Vec<Vec<f32>> {
    trainer
        .model_mut()
        .weights_mut()
        .params_mut()
        .into_iter()
        .map(|(t, _)| t.as_slice().to_vec())
        .collect()
}

fn resume_matches_uninterrupted(make: impl Fn() -> Model) {
    let data = batches();
    let mut straight = Trainer::new(make(), config()).unwrap();
    for (s, m) in &data {
        straight.sft_step(s, m).unwrap();
    }
    let mut first = Trainer::new(make(), config()).unwrap();
    for (s, m) in &data[..2] {
        first.sft_step(s, m).unwrap();
    }
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("checkpoint-2");
    first
        .save_checkpoint(&dir, &json!({"next_batch": 2}))
        .unwrap();
    drop(first);
    let (mut resumed, extra) = Trainer::resume(&dir, LoadOptions::default()).unwrap();
    assert_eq!(extra["next_batch"], 2);
    assert_eq!(resumed.step_count(), 2);
    let (s, m) = &data[2];
    let stats = resumed.sft_step(s, m).unwrap();
    assert_eq!(stats.lr, straight.config().lr_at(2));
    assert_eq!(params(&mut resumed), params(&mut straight));
}

#[test]
fn resuming_full_fine_tuning_is_exact() {
    resume_matches_uninterrupted(|| {
        Model::load(fixture("llama-f32"), LoadOptions::default()).unwrap()
    });
    resume_matches_uninterrupted(|| {
        Model::load(fixture("gpt2-f32"), LoadOptions::default()).unwrap()
    });
}

#[test]
fn resuming_lora_is_exact_and_keeps_heads() {
    resume_matches_uninterrupted(|| {
        let mut m = Model::load(fixture("llama-f32"), LoadOptions::default()).unwrap();
        m.attach_lora(&LoraConfig {
            rank: 2,
            target_modules: vec!["q_proj".into(), "down_proj".into()],
            seed: 4,
            ..Default::default()
        })
        .unwrap();
        m.add_value_head(2);
        m
    });
}

#[test]
fn reward_model_checkpoint_resumes() {
    let mut rm = Model::load(fixture("llama-f32"), LoadOptions::default()).unwrap();
    rm.add_score_head(1);
    let mut trainer = Trainer::new(rm, config()).unwrap();
    let (c, r) = (vec![vec![1u32, 4, 6, 8]], vec![vec![1u32, 9, 9]]);
    trainer.rm_step(&c, &r, 0.0).unwrap();
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("rm");
    trainer.save_checkpoint(&dir, &json!(null)).unwrap();
    let (mut resumed, _) = Trainer::resume(&dir, LoadOptions::default()).unwrap();
    assert!(resumed.model().config().score_head);
    assert_eq!(
        resumed.model().reward_scores(&c).unwrap(),
        trainer.model().reward_scores(&c).unwrap()
    );
    resumed.rm_step(&c, &r, 0.0).unwrap();
    trainer.rm_step(&c, &r, 0.0).unwrap();
    assert_eq!(params(&mut resumed), params(&mut trainer));
}

#[test]
fn gradient_accumulation_equals_one_batch() {
    // ε = 1 makes AdamW's first step linear in the gradient, so the comparison is
    // well-conditioned; micro-batches are weighted by their token counts.
    let cfg = TrainConfig {
        eps: 1.0,
        lr: 1e-1,
        max_grad_norm: None,
        ..Default::default()
    };
    let load = || Model::load(fixture("llama-f32"), LoadOptions::default()).unwrap();
    let (seqs, masks) = &batches()[0];
    let mut whole = Trainer::new(load(), cfg.clone()).unwrap();
    let full = whole.sft_step(seqs, masks).unwrap();
    let mut parts = Trainer::new(load(), cfg).unwrap();
    for i in 0..2 {
        let tokens = masks[i].iter().skip(1).filter(|&&m| m).count() as f64;
        let (loss, grads) = parts
            .model()
            .sft_gradients(&seqs[i..=i], &masks[i..=i])
            .unwrap();
        parts.accumulate(loss, grads, tokens).unwrap();
    }
    assert_eq!(parts.pending_micro_batches(), 2);
    let out = tempfile::tempdir().unwrap();
    assert!(parts
        .save_checkpoint(&out.path().join("x"), &json!(null))
        .is_err());
    let acc = parts.step().unwrap();
    assert!(
        (acc.loss - full.loss).abs() < 1e-6,
        "{} vs {}",
        acc.loss,
        full.loss
    );
    for (a, b) in params(&mut parts).iter().zip(params(&mut whole)) {
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-6, "{x} vs {y}");
        }
    }
    assert!(parts.step().is_err(), "nothing accumulated");
    assert!(parts
        .accumulate(
            0.0,
            parts.model().sft_gradients(seqs, masks).unwrap().1,
            0.0
        )
        .is_err());
}

fn trainer_after_one_step() -> Trainer {
    let model = Model::load(fixture("llama-f32"), LoadOptions::default()).unwrap();
    let mut t = Trainer::new(model, config()).unwrap();
    let (s, m) = &batches()[0];
    t.sft_step(s, m).unwrap();
    t
}

#[test]
fn failed_saves_keep_earlier_checkpoints() {
    let trainer = trainer_after_one_step();
    let out = tempfile::tempdir().unwrap();
    let first = out.path().join("checkpoint-1");
    trainer.save_checkpoint(&first, &json!(1)).unwrap();
    // An existing folder is never overwritten.
    assert!(trainer.save_checkpoint(&first, &json!(2)).is_err());
    let (_, extra) = Trainer::resume(&first, LoadOptions::default()).unwrap();
    assert_eq!(extra, json!(1));
    // A parent that is a file: an error, nothing written.
    let file = out.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    assert!(trainer
        .save_checkpoint(&file.join("checkpoint-2"), &json!(null))
        .is_err());
    // A read-only folder (root ignores permissions, so the check only runs for other users).
    let ro = out.path().join("read-only");
    std::fs::create_dir(&ro).unwrap();
    let mode = |m: u32| std::fs::Permissions::from_mode(m);
    std::fs::set_permissions(&ro, mode(0o555)).unwrap();
    if std::fs::write(ro.join("probe"), b"x").is_ok() {
        println!("skipping the read-only check: this user can write into read-only folders");
    } else {
        assert!(trainer
            .save_checkpoint(&ro.join("checkpoint-2"), &json!(null))
            .is_err());
    }
    std::fs::set_permissions(&ro, mode(0o755)).unwrap();
    let names: Vec<String> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp")), "{names:?}");
    Trainer::resume(&first, LoadOptions::default()).unwrap();
}

#[test]
fn resume_rejects_what_is_not_a_checkpoint() {
    let out = tempfile::tempdir().unwrap();
    assert!(Trainer::resume(out.path(), LoadOptions::default()).is_err());
    assert!(Trainer::resume(&fixture("llama-f32"), LoadOptions::default()).is_err());
    let trainer = trainer_after_one_step();
    let dir = out.path().join("ck");
    trainer.save_checkpoint(&dir, &json!(null)).unwrap();
    // Optimizer state from another model.
    let other = out.path().join("other");
    let gpt2 = Trainer::new(
        Model::load(fixture("gpt2-f32"), LoadOptions::default()).unwrap(),
        config(),
    )
    .unwrap();
    gpt2.save_checkpoint(&other, &json!(null)).unwrap();
    std::fs::copy(
        other.join("optimizer.safetensors"),
        dir.join("optimizer.safetensors"),
    )
    .unwrap();
    assert!(Trainer::resume(&dir, LoadOptions::default()).is_err());
    std::fs::write(dir.join("trainer_state.json"), "{\"format\": 3}").unwrap();
    assert!(Trainer::resume(&dir, LoadOptions::default()).is_err());
}

/// Every `checkpoint-*` folder under `dir` resumes.
fn all_checkpoints_load(dir: &Path) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("checkpoint-") && !name.contains(".tmp") {
            let (_, extra) = Trainer::resume(&path, LoadOptions::default())
                .unwrap_or_else(|e| panic!("{name} does not load: {e}"));
            assert_eq!(format!("checkpoint-{}", extra["n"]), name);
            n += 1;
        }
    }
    n
}

#[test]
fn killing_a_process_mid_save_never_breaks_a_checkpoint() {
    let out = tempfile::tempdir().unwrap();
    let model = fixture("llama-f32");
    // Kill times spread over the save loop; the writer spends nearly all its time saving.
    for trial in 0..10u64 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_checkpoint_writer"))
            .arg(&model)
            .arg(out.path())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(150 + (trial * 37) % 120));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    let saved = all_checkpoints_load(out.path());
    let interrupted = std::fs::read_dir(out.path())
        .unwrap()
        .filter(|e| {
            let e = e.as_ref().unwrap();
            e.file_name().to_string_lossy().contains(".tmp")
        })
        .count();
    println!("{saved} complete checkpoints; {interrupted} saves interrupted mid-write");
    assert!(saved > 0, "the writer never finished a checkpoint");
}

#[test]
fn gradients_of_another_shape_are_refused() {
    // Same number of tensors, different sizes (LoRA rank 2 vs 4): an error, not a panic.
    let lora = |rank| {
        let mut m = Model::load(fixture("llama-f32"), LoadOptions::default()).unwrap();
        m.attach_lora(&LoraConfig::new(rank, 8.0)).unwrap();
        m
    };
    let mut trainer = Trainer::new(lora(4), config()).unwrap();
    let (s, m) = &batches()[0];
    let (loss, grads) = lora(2).sft_gradients(s, m).unwrap();
    assert!(trainer.apply(loss, grads).is_err());
    assert_eq!(trainer.step_count(), 0);
}
