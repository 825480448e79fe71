//! The stage drivers end to end on the tiny Llama fixture (plain-text formatting: the fixture
//! has no chat template): SFT lowers the loss and resumes exactly, the RM learns its pairs, DPO
//! and GRPO run, PPO's first update is exactly on-policy, and bad datasets are clear errors.

use std::path::Path;

use rlx::pipeline::data::{load, Formatter};
use rlx::pipeline::rollout::{self, LocalCollector, OnPolicy, Reward, RolloutOptions};
use rlx::pipeline::supervised::{self, DpoOptions, RmOptions};
use rlx::pipeline::{latest_checkpoint, Observer, Outcome, RunOptions, Silent};
use rlx::{DpoLoss, GrpoConfig, LoadOptions, Model, PpoConfig, TrainConfig, Trainer};
use rlx_tests::fixture;
use serde_json::Value;

fn model() -> Model {
    Model::load(fixture("llama-f32"), LoadOptions::default()).unwrap()
}

fn write(dir: &Path, name: &str, lines: &[&str]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

const SFT: &[&str] = &[
    r#"{"prompt": "Say hi.", "response": "Hi there!"}"#,
    r#"{"prompt": "Count to three.", "response": "one two three"}"#,
    r#"{"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]}"#,
    r#"{"prompt": "Add 2 and 2.", "response": "4"}"#,
];

fn train() -> TrainConfig {
    TrainConfig {
        lr: 3e-3,
        ..Default::default()
    }
}

fn metrics(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn sft_lowers_the_loss_writes_a_model_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model();
    let f = Formatter::new(&m, false, 128).unwrap();
    let (examples, bad) = load(&write(tmp.path(), "sft.jsonl", SFT), false, |v| f.sft(v)).unwrap();
    assert!(bad.is_empty());
    assert_eq!(examples.len(), 4);
    let opts = RunOptions {
        out: tmp.path().join("run"),
        epochs: 6,
        batch_size: 2,
        ..Default::default()
    };
    let mut trainer = Trainer::new(m.clone(), train()).unwrap();
    let report = supervised::sft(&mut trainer, &examples, &opts, None, &mut Silent).unwrap();
    assert_eq!(report.outcome, Outcome::Finished);
    assert_eq!(report.steps, 12);
    let lines = metrics(&opts.out);
    assert_eq!(lines.len(), 12);
    let loss = |l: &Value| l["loss"].as_f64().unwrap();
    let first: f64 = lines[..2].iter().map(loss).sum();
    let last: f64 = lines[10..].iter().map(loss).sum();
    assert!(last < 0.5 * first, "loss {first} → {last}");
    let final_dir = report.model_dir.unwrap();
    let reloaded = Model::load(&final_dir, LoadOptions::default()).unwrap();
    assert_eq!(
        reloaded.logits(&examples[0].tokens).unwrap(),
        trainer.model().logits(&examples[0].tokens).unwrap()
    );

    // Stopped after step 5 (a Ctrl-C), then resumed: the same final weights.
    struct StopAfter(usize);
    impl Observer for StopAfter {
        fn record(&mut self, _: &Value) {
            self.0 = self.0.saturating_sub(1);
        }
        fn stop_requested(&self) -> bool {
            self.0 == 0
        }
    }
    let opts2 = RunOptions {
        out: tmp.path().join("run2"),
        ..opts.clone()
    };
    let mut t2 = Trainer::new(m.clone(), train()).unwrap();
    let r = supervised::sft(&mut t2, &examples, &opts2, None, &mut StopAfter(5)).unwrap();
    assert_eq!(r.outcome, Outcome::Interrupted);
    drop(t2);
    let ck = latest_checkpoint(&opts2.out).unwrap();
    assert!(ck.ends_with("checkpoint-5"));
    let (mut t3, extra) = Trainer::resume(&ck, LoadOptions::default()).unwrap();
    let r = supervised::sft(&mut t3, &examples, &opts2, Some(&extra), &mut Silent).unwrap();
    assert_eq!(r.outcome, Outcome::Finished);
    assert_eq!(t3.step_count(), 12);
    assert_eq!(
        t3.model().logits(&examples[1].tokens).unwrap(),
        trainer.model().logits(&examples[1].tokens).unwrap()
    );
}

const PREFS: &[&str] = &[
    r#"{"prompt": "Greet me.", "chosen": "Hello, friend!", "rejected": "go away"}"#,
    r#"{"prompt": "Greet me politely.", "responses": ["Good day to you!", "hey", "whatever"]}"#,
    r#"{"prompt": "Say thanks.", "chosen": "Thank you kindly!", "rejected": "no"}"#,
];

#[test]
fn reward_model_learns_ranked_pairs() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = model();
    m.add_score_head(5);
    let f = Formatter::new(&m, false, 128).unwrap();
    let (groups, _) = load(&write(tmp.path(), "rm.jsonl", PREFS), false, |v| f.pairs(v)).unwrap();
    let pairs: Vec<_> = groups.into_iter().flatten().collect();
    assert_eq!(pairs.len(), 1 + 3 + 1, "a ranking of 3 gives 3 pairs");
    let opts = RunOptions {
        out: tmp.path().join("rm"),
        epochs: 15,
        batch_size: 5,
        ..Default::default()
    };
    let mut trainer = Trainer::new(m, train()).unwrap();
    supervised::reward_model(
        &mut trainer,
        &pairs,
        RmOptions { margin: 0.0 },
        &opts,
        None,
        &mut Silent,
    )
    .unwrap();
    assert_eq!(
        supervised::pairwise_accuracy(trainer.model(), &pairs).unwrap(),
        1.0
    );
    // The final folder is a reward model.
    let rm = Model::load(tmp.path().join("rm/model"), LoadOptions::default()).unwrap();
    assert!(rm.config().score_head);
    assert_eq!(supervised::pairwise_accuracy(&rm, &pairs).unwrap(), 1.0);
    // A model without a score head is refused.
    let mut plain = Trainer::new(model(), train()).unwrap();
    assert!(supervised::reward_model(
        &mut plain,
        &pairs,
        RmOptions { margin: 0.0 },
        &opts,
        None,
        &mut Silent
    )
    .is_err());
}

#[test]
fn dpo_raises_the_chosen_margin() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model();
    let f = Formatter::new(&m, false, 128).unwrap();
    let (groups, _) = load(&write(tmp.path(), "p.jsonl", PREFS), false, |v| f.pairs(v)).unwrap();
    let pairs: Vec<_> = groups.into_iter().flatten().collect();
    let reference = m.clone();
    let mut trainer = Trainer::new(m, train()).unwrap();
    let opts = RunOptions {
        out: tmp.path().join("dpo"),
        epochs: 4,
        batch_size: 5,
        ..Default::default()
    };
    let cfg = DpoOptions {
        beta: 0.1,
        loss: DpoLoss::Sigmoid,
    };
    supervised::dpo(
        &mut trainer,
        &reference,
        &pairs,
        cfg,
        &opts,
        None,
        &mut Silent,
    )
    .unwrap();
    let lines = metrics(&opts.out);
    let first = lines[0]["loss"].as_f64().unwrap();
    let last = lines[lines.len() - 1]["loss"].as_f64().unwrap();
    assert!(
        (first - std::f64::consts::LN_2).abs() < 1e-9,
        "starts at ln 2"
    );
    assert!(last < first, "{first} → {last}");
}

fn prompts_file(dir: &Path) -> std::path::PathBuf {
    write(
        dir,
        "prompts.jsonl",
        &[
            r#"{"prompt": "Say something short."}"#,
            r#"{"prompt": "Say something long."}"#,
            r#"{"prompt": "Reply."}"#,
        ],
    )
}

#[test]
fn ppo_first_update_is_on_policy_and_metrics_are_logged() {
    let tmp = tempfile::tempdir().unwrap();
    let mut policy = model();
    policy.add_value_head(1);
    let reference = model();
    let f = Formatter::new(&policy, false, 128).unwrap();
    let (prompts, _) = load(&prompts_file(tmp.path()), false, |v| f.prompt(v)).unwrap();
    // Reward: longer answers score higher; the monitor is the same labeller.
    let labeller = |_: &str, answer: &str| answer.len() as f64 / 10.0;
    let job = OnPolicy {
        prompts: &prompts,
        monitor: Some(&labeller),
        options: RolloutOptions {
            out: tmp.path().join("ppo"),
            iterations: 2,
            prompts_per_iteration: 2,
            samples_per_prompt: 2,
            max_new_tokens: 6,
            epochs: 2,
            minibatch_size: 2,
            ..Default::default()
        },
    };
    let mut trainer = Trainer::new(policy, train()).unwrap();
    let mut collector = LocalCollector {
        reference: Some(&reference),
        reward: Reward::Function(&labeller),
    };
    let report = rollout::ppo(
        &mut trainer,
        &mut collector,
        &job,
        &PpoConfig::default(),
        None,
        None,
        &mut Silent,
    )
    .unwrap();
    assert_eq!(report.outcome, Outcome::Finished);
    let lines = metrics(&job.options.out);
    assert_eq!(lines.len(), 2);
    for l in &lines {
        assert_eq!(l["first_approx_kl"].as_f64(), Some(0.0), "{l}");
        for key in [
            "reward_mean",
            "kl",
            "entropy",
            "clip_fraction",
            "value_loss",
        ] {
            assert!(l[key].as_f64().unwrap().is_finite(), "{key} in {l}");
        }
        assert!(l["tokens_per_second"]["rollout"].as_f64().unwrap() > 0.0);
    }
    // The final model keeps its value head for another PPO run.
    let saved = Model::load(tmp.path().join("ppo/model"), LoadOptions::default()).unwrap();
    assert!(saved.weights().value.is_some());
}

#[test]
fn grpo_runs_with_a_reward_model_and_rejects_k_1() {
    let tmp = tempfile::tempdir().unwrap();
    let policy = model();
    let mut rm = model();
    rm.add_score_head(2);
    let f = Formatter::new(&policy, false, 128).unwrap();
    let (prompts, _) = load(&prompts_file(tmp.path()), false, |v| f.prompt(v)).unwrap();
    let mut job = OnPolicy {
        prompts: &prompts,
        monitor: None,
        options: RolloutOptions {
            out: tmp.path().join("grpo"),
            iterations: 2,
            prompts_per_iteration: 2,
            samples_per_prompt: 3,
            max_new_tokens: 5,
            epochs: 1,
            minibatch_size: 6,
            ..Default::default()
        },
    };
    let reference = policy.clone();
    let mut trainer = Trainer::new(policy, train()).unwrap();
    let cfg = GrpoConfig::default();
    let mut collector = LocalCollector {
        reference: Some(&reference),
        reward: Reward::Model(&rm),
    };
    rollout::grpo(&mut trainer, &mut collector, &job, &cfg, None, &mut Silent).unwrap();
    assert_eq!(metrics(&job.options.out).len(), 2);
    job.options.samples_per_prompt = 1;
    job.options.out = tmp.path().join("grpo-k1");
    assert!(rollout::grpo(&mut trainer, &mut collector, &job, &cfg, None, &mut Silent).is_err());
}

#[test]
fn bad_datasets_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model();
    let f = Formatter::new(&m, false, 32).unwrap();
    // Malformed JSON on line 2: named; skipped with skip_bad.
    let p = write(
        tmp.path(),
        "bad.jsonl",
        &[SFT[0], "{not json", SFT[1], r#"{"prompt": 3}"#],
    );
    let err = load(&p, false, |v| f.sft(v)).unwrap_err().to_string();
    assert!(err.contains("line 2"), "{err}");
    let (ok, bad) = load(&p, true, |v| f.sft(v)).unwrap();
    assert_eq!(ok.len(), 2);
    assert_eq!(
        bad.iter().map(|b| b.line).collect::<Vec<_>>(),
        vec![2, 4],
        "{bad:?}"
    );
    // Too long for the context, empty files, missing fields, no chat template.
    let long = format!(
        r#"{{"prompt": "{}", "response": "x"}}"#,
        "word ".repeat(200)
    );
    let p = write(tmp.path(), "long.jsonl", &[&long]);
    assert!(load(&p, false, |v| f.sft(v)).is_err());
    let p = write(tmp.path(), "empty.jsonl", &["", "  "]);
    assert!(load(&p, false, |v| f.sft(v)).is_err());
    let p = write(tmp.path(), "missing.jsonl", &[r#"{"response": "x"}"#]);
    assert!(load(&p, false, |v| f.sft(v)).is_err());
    let p = write(
        tmp.path(),
        "rank1.jsonl",
        &[r#"{"prompt": "a", "responses": ["x"]}"#],
    );
    assert!(load(&p, false, |v| f.pairs(v)).is_err());
    assert!(Formatter::new(&m, true, 32).is_err());
    assert!(load(&tmp.path().join("absent.jsonl"), false, |v| f.sft(v)).is_err());
}
