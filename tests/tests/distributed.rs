//! The pieces `rlx.distributed` is built from, checked in one process: a rollout split over
//! workers (each with its own models, synced through `policy_state` bytes) gives the same
//! metrics and final weights, bit for bit, as the single-process run of the same job.

use std::path::{Path, PathBuf};

use rlx::convert::{save_hf_folder, SaveDtype};
use rlx::pipeline::job::{
    load_policy_state, policy_state, OnPolicyJob, OnPolicyStage, WorkerModels,
};
use rlx::pipeline::rollout::{Collector, RolloutRequest, Sample};
use rlx::pipeline::{Outcome, Silent};
use rlx::{LoadOptions, Model, Result};
use rlx_tests::fixture;
use serde_json::Value;

/// Two "workers" in this process; prompts are dealt round-robin, answers returned out of order.
struct SplitCollector {
    workers: Vec<WorkerModels>,
    synced_bytes: usize,
    /// Drop one sample (a broken worker) to check that the learner notices.
    drop_one: bool,
}

impl Collector for SplitCollector {
    fn collect(&mut self, policy: &mut Model, request: &RolloutRequest) -> Result<Vec<Sample>> {
        let state = policy_state(policy)?;
        self.synced_bytes = state.len();
        let n = self.workers.len();
        let mut out = Vec::new();
        for (w, worker) in self.workers.iter_mut().enumerate().rev() {
            worker.load_policy_state(&state)?;
            let share = request
                .prompts
                .iter()
                .filter(|p| p.position % n == w)
                .cloned()
                .collect();
            // Through JSON, as between processes: numbers must survive exactly.
            let request = serde_json::to_string(&request.subset(share)).unwrap();
            let samples = worker.collect(&serde_json::from_str(&request).unwrap())?;
            let text = serde_json::to_string(&samples).unwrap();
            out.extend(serde_json::from_str::<Vec<Sample>>(&text).unwrap());
        }
        if self.drop_one {
            out.pop();
        }
        Ok(out)
    }
}

fn prepare(dir: &Path) -> (PathBuf, PathBuf) {
    let prompts = dir.join("prompts.jsonl");
    std::fs::write(
        &prompts,
        [
            r#"{"prompt": "Say something short."}"#,
            r#"{"prompt": "Say something long."}"#,
            r#"{"prompt": "Reply."}"#,
            r#"{"prompt": "Count."}"#,
            r#"{"prompt": "Name a colour."}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let mut rm = Model::load(fixture("llama-f32"), LoadOptions::default()).unwrap();
    rm.add_score_head(7);
    let rm_dir = dir.join("rm");
    save_hf_folder(&rm, &rm_dir, SaveDtype::F32).unwrap();
    (prompts, rm_dir)
}

fn job(dir: &Path, stage: OnPolicyStage, lora_rank: usize) -> OnPolicyJob {
    let (data, reward_model) = prepare(dir);
    OnPolicyJob {
        stage,
        model: fixture("llama-f32"),
        data,
        reward_model,
        threads: 1,
        chat_template: false,
        max_len: 64,
        seed: 3,
        save_every: 1,
        lr: 3e-3,
        lora_rank,
        iterations: 3,
        prompts_per_iteration: 3,
        samples_per_prompt: Some(2),
        max_new_tokens: 5,
        ppo_epochs: 2,
        minibatch_size: 4,
        ..OnPolicyJob::default()
    }
}

/// Metrics without the timings, which differ between runs.
fn metrics(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("tokens_per_second");
            v
        })
        .collect()
}

fn weights(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("model/model.safetensors")).unwrap()
}

fn split_equals_single(stage: OnPolicyStage, lora_rank: usize) -> usize {
    let tmp = tempfile::tempdir().unwrap();
    let mut single = job(tmp.path(), stage, lora_rank);
    single.out = tmp.path().join("single");
    let r = single.run(None, &mut Silent).unwrap();
    assert_eq!(r.outcome, Outcome::Finished);

    let mut split = single.clone();
    split.out = tmp.path().join("split");
    let mut collector = SplitCollector {
        workers: vec![
            split.worker_models().unwrap(),
            split.worker_models().unwrap(),
        ],
        synced_bytes: 0,
        drop_one: false,
    };
    split.run(Some(&mut collector), &mut Silent).unwrap();
    let (a, b) = (metrics(&single.out), metrics(&split.out));
    assert_eq!(a.len(), 3);
    assert_eq!(a, b);
    assert!(
        weights(&single.out) == weights(&split.out),
        "final weights differ"
    );
    collector.synced_bytes
}

#[test]
fn ppo_split_over_two_workers_equals_one_process() {
    let full = split_equals_single(OnPolicyStage::Ppo, 0);
    let lora = split_equals_single(OnPolicyStage::Ppo, 2);
    // Adapter-only sync is a small fraction of the full state.
    assert!(lora * 10 < full, "lora {lora} vs full {full} bytes");
}

#[test]
fn grpo_split_over_two_workers_equals_one_process() {
    split_equals_single(OnPolicyStage::Grpo, 2);
}

#[test]
fn a_missing_sample_and_a_foreign_state_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let mut j = job(tmp.path(), OnPolicyStage::Ppo, 0);
    j.out = tmp.path().join("out");
    let mut collector = SplitCollector {
        workers: vec![j.worker_models().unwrap()],
        synced_bytes: 0,
        drop_one: true,
    };
    let e = j.run(Some(&mut collector), &mut Silent).unwrap_err();
    assert!(e.to_string().contains("samples came back"), "{e}");

    // A LoRA state does not fit a fully trained policy (and nothing changes).
    let mut lora_job = j.clone();
    lora_job.lora_rank = 2;
    let mut lora_policy = lora_job.worker_models().unwrap().policy;
    let state = policy_state(&mut lora_policy).unwrap();
    let mut full = j.worker_models().unwrap().policy;
    let before = policy_state(&mut full).unwrap();
    assert!(load_policy_state(&mut full, &state).is_err());
    assert!(load_policy_state(&mut full, b"not a state").is_err());
    assert!(policy_state(&mut full).unwrap() == before);
}

#[test]
fn jobs_round_trip_through_json_and_reject_unknown_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let j = job(tmp.path(), OnPolicyStage::Grpo, 4);
    assert_eq!(OnPolicyJob::from_json(&j.to_json().unwrap()).unwrap(), j);
    let e = OnPolicyJob::from_json(r#"{"stage": "ppo", "learning_rate": 1}"#).unwrap_err();
    assert!(e.to_string().contains("learning_rate"), "{e}");
    let mut bad = j.clone();
    bad.loss_type = "nope".into();
    bad.out = tmp.path().join("bad");
    assert!(bad.run(None, &mut Silent).is_err());
}
