//! The training commands chained on the tiny Llama fixture, as InstructGPT chains them:
//! `rlx sft` → `rlx rm` (on the SFT model) → `rlx ppo` (SFT policy, RM reward), plus `rlx dpo`,
//! `rlx grpo`, a TOML config, `--resume`, and dataset errors.

use std::path::Path;
use std::process::{Command, Output};

use rlx_tests::fixture;

fn rlx(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rlx"))
        .args(args)
        .output()
        .expect("run rlx")
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn sft_then_rm_then_ppo_then_dpo_and_grpo() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let base = fixture("llama-f32");
    let sft_data = write(
        t,
        "sft.jsonl",
        "{\"prompt\": \"Say hi.\", \"response\": \"Hi there!\"}\n\
         {\"prompt\": \"Count.\", \"response\": \"one two three\"}\n",
    );
    let prefs = write(
        t,
        "prefs.jsonl",
        "{\"prompt\": \"Greet me.\", \"chosen\": \"Hello, friend!\", \"rejected\": \"go away\"}\n\
         {\"prompt\": \"Thank me.\", \"responses\": [\"Thank you kindly!\", \"thanks\", \"no\"]}\n",
    );
    let prompts = write(
        t,
        "prompts.jsonl",
        "{\"prompt\": \"Hi\"}\n{\"prompt\": \"Go\"}\n",
    );
    let config = write(t, "sft.toml", "epochs = 2\nbatch_size = 1\nlr = 0.001\n");
    let out = |n: &str| t.join(n).to_str().unwrap().to_string();

    let sft_out = out("sft");
    ok(&rlx(&[
        "sft",
        "--model",
        base.to_str().unwrap(),
        "--data",
        &sft_data,
        "--out",
        &sft_out,
        "--config",
        &config,
        "--no-chat-template",
    ]));
    let sft_model = out("sft/model");
    assert!(Path::new(&sft_model).join("model.safetensors").exists());
    let lines = std::fs::read_to_string(t.join("sft/metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 4, "2 epochs × 2 batches of 1");
    // The same --out again without --resume: refused, nothing lost.
    let again = rlx(&[
        "sft",
        "--model",
        base.to_str().unwrap(),
        "--data",
        &sft_data,
        "--out",
        &sft_out,
        "--no-chat-template",
    ]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));
    assert!(Path::new(&sft_model).join("model.safetensors").exists());

    let rm_out = out("rm");
    ok(&rlx(&[
        "rm",
        "--model",
        &sft_model,
        "--data",
        &prefs,
        "--eval",
        &prefs,
        "--out",
        &rm_out,
        "--epochs",
        "3",
        "--no-chat-template",
        "--lr",
        "0.001",
    ]));
    let rm_model = out("rm/model");

    ok(&rlx(&[
        "ppo",
        "--model",
        &sft_model,
        "--reward-model",
        &rm_model,
        "--data",
        &prompts,
        "--out",
        &out("ppo"),
        "--iterations",
        "2",
        "--prompts-per-iteration",
        "2",
        "--samples-per-prompt",
        "2",
        "--max-new-tokens",
        "4",
        "--no-chat-template",
        "--target-kl",
        "1.0",
    ]));
    let ppo = std::fs::read_to_string(t.join("ppo/metrics.jsonl")).unwrap();
    for line in ppo.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["first_approx_kl"].as_f64(), Some(0.0), "{v}");
    }
    // PPO needs a reward model with a score head.
    let bad = rlx(&[
        "ppo",
        "--model",
        &sft_model,
        "--reward-model",
        &sft_model,
        "--data",
        &prompts,
        "--out",
        &out("ppo-bad"),
        "--no-chat-template",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("score head"));

    ok(&rlx(&[
        "dpo",
        "--model",
        &sft_model,
        "--data",
        &prefs,
        "--out",
        &out("dpo"),
        "--no-chat-template",
        "--loss",
        "ipo",
    ]));
    ok(&rlx(&[
        "grpo",
        "--model",
        &sft_model,
        "--reward-model",
        &rm_model,
        "--data",
        &prompts,
        "--out",
        &out("grpo"),
        "--iterations",
        "1",
        "--samples-per-prompt",
        "2",
        "--prompts-per-iteration",
        "2",
        "--max-new-tokens",
        "4",
        "--no-chat-template",
        "--loss-type",
        "dr_grpo",
    ]));
}

#[test]
fn resume_continues_a_stopped_run_and_bad_lines_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let base = fixture("llama-f32");
    let data = write(
        t,
        "d.jsonl",
        "{\"prompt\": \"a\", \"response\": \"b c\"}\n{\"prompt\": \"d\", \"response\": \"e\"}\n",
    );
    let out = t.join("run").to_str().unwrap().to_string();
    // Stop after 1 step (as a Ctrl-C would), then resume to the end.
    ok(&rlx(&[
        "sft",
        "--model",
        base.to_str().unwrap(),
        "--data",
        &data,
        "--out",
        &out,
        "--batch-size",
        "1",
        "--epochs",
        "2",
        "--max-steps",
        "1",
        "--no-chat-template",
    ]));
    ok(&rlx(&[
        "sft",
        "--model",
        base.to_str().unwrap(),
        "--data",
        &data,
        "--out",
        &out,
        "--batch-size",
        "1",
        "--epochs",
        "2",
        "--no-chat-template",
        "--resume",
    ]));
    let lines = std::fs::read_to_string(t.join("run/metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 4);
    assert!(t.join("run/checkpoint-4").exists());

    let bad = write(
        t,
        "bad.jsonl",
        "{\"prompt\": \"a\", \"response\": \"b\"}\n{oops\n{\"prompt\": \"c\", \"response\": \"d\"}\n",
    );
    let o = rlx(&[
        "sft",
        "--model",
        base.to_str().unwrap(),
        "--data",
        &bad,
        "--out",
        &out_dir(t, "x"),
        "--no-chat-template",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("line 2") && !err.contains("panicked"), "{err}");
    ok(&rlx(&[
        "sft",
        "--model",
        base.to_str().unwrap(),
        "--data",
        &bad,
        "--out",
        &out_dir(t, "y"),
        "--no-chat-template",
        "--skip-bad-lines",
    ]));
}

fn out_dir(t: &Path, name: &str) -> String {
    t.join(name).to_str().unwrap().to_string()
}

/// The demo's whole chain (data, SFT, RM, PPO, DPO, GRPO, evaluation, RESULTS.md) on the tiny
/// fixture: the numbers mean nothing on a random model, but every stage must run and report.
#[test]
fn demo_runs_every_stage_on_a_tiny_model() {
    let tmp = tempfile::tempdir().unwrap();
    // The fixture's 128 positions are too few for the demo's byte-level-long answers; Llama
    // has no learned positions, so the same weights take a longer context.
    let base = tmp.path().join("model");
    std::fs::create_dir(&base).unwrap();
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(fixture("llama-f32").join(f), base.join(f)).unwrap();
    }
    let config = std::fs::read_to_string(fixture("llama-f32").join("config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&config).unwrap();
    config["max_position_embeddings"] = 1024.into();
    std::fs::write(base.join("config.json"), config.to_string()).unwrap();
    for (short, name) in [(true, "short"), (false, "full")] {
        let out_dir = tmp.path().join(name);
        let mut args = vec![
            "demo",
            "--model",
            base.to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
            "--iterations",
            "1",
            "--threads",
            "2",
        ];
        if short {
            args.push("--short");
        }
        let out = rlx(&args);
        ok(&out);
        let results = std::fs::read_to_string(out_dir.join("RESULTS.md")).unwrap();
        let rows: Vec<&str> = results.lines().filter(|l| l.starts_with("| ")).collect();
        let names: Vec<&str> = rows
            .iter()
            .skip(1)
            .map(|r| r.split('|').nth(1).unwrap().trim())
            .collect();
        let want: &[&str] = if short {
            &["base", "SFT", "PPO"]
        } else {
            &["base", "SFT", "PPO", "DPO", "GRPO"]
        };
        assert_eq!(names, want, "{results}");
        assert!(out_dir.join("ppo/model/config.json").is_file());
        assert_eq!(out_dir.join("grpo").exists(), !short);
        // A finished demo is never overwritten.
        let again = rlx(&args);
        assert!(!again.status.success());
        assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a finished demo"));
    }
}

/// SIGKILL in the middle of a training run (checkpoints every step), then `--resume`: the final
/// weights are bit for bit those of the same run never interrupted.
#[test]
fn a_killed_run_resumes_to_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let base = fixture("llama-f32");
    let lines: String = (0..40)
        .map(|i| format!("{{\"prompt\": \"q{i} a\", \"response\": \"b {i} c d\"}}\n"))
        .collect();
    let data = write(t, "d.jsonl", &lines);
    let args = |out: &str| -> Vec<String> {
        [
            "sft",
            "--model",
            base.to_str().unwrap(),
            "--data",
            &data,
            "--out",
            out,
            "--batch-size",
            "2",
            "--epochs",
            "2",
            "--save-every",
            "1",
            "--seed",
            "5",
            "--threads",
            "2",
            "--no-chat-template",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let whole = out_dir(t, "whole");
    let run = |a: Vec<String>| rlx(&a.iter().map(String::as_str).collect::<Vec<_>>());
    ok(&run(args(&whole)));

    let killed = out_dir(t, "killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_rlx"))
        .args(args(&killed))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill once a few checkpoints exist (the run makes 40).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !Path::new(&killed).join("checkpoint-5").exists() && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !Path::new(&killed).join("model").exists(),
        "the run finished before the kill; the test needs a slower run"
    );
    let mut resumed = args(&killed);
    resumed.push("--resume".into());
    ok(&run(resumed));
    let weights =
        |dir: &str| std::fs::read(Path::new(dir).join("model/model.safetensors")).unwrap();
    assert!(
        weights(&whole) == weights(&killed),
        "resumed weights differ from the uninterrupted run"
    );
}

/// A write failure while saving (the file-size limit stands in for a full disk: writes past
/// it fail with EFBIG, as ENOSPC would): a clear error and a non-zero exit, no panic, no
/// half-written checkpoint, and the earlier checkpoint still resumes.
#[test]
fn a_failing_disk_keeps_the_earlier_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let base = fixture("llama-f32");
    let data = write(
        t,
        "d.jsonl",
        "{\"prompt\": \"a\", \"response\": \"b c\"}\n{\"prompt\": \"d\", \"response\": \"e\"}\n",
    );
    let out = out_dir(t, "run");
    let base = base.to_str().unwrap();
    let common = [
        "sft",
        "--model",
        base,
        "--data",
        &data,
        "--out",
        &out,
        "--batch-size",
        "1",
        "--epochs",
        "3",
        "--save-every",
        "1",
        "--no-chat-template",
    ];
    let mut first = common.to_vec();
    first.extend(["--max-steps", "1"]);
    ok(&rlx(&first));
    assert!(Path::new(&out).join("checkpoint-1").exists());
    // Resume under a 64 KiB file-size limit (the checkpoint's weights are larger); SIGXFSZ is
    // ignored so the write fails with an error instead of killing the process.
    let mut resumed = common.to_vec();
    resumed.push("--resume");
    let script = format!(
        "ulimit -f 64 && trap '' XFSZ && exec \"$0\" {}",
        resumed
            .iter()
            .map(|a| format!("'{a}'"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let o = Command::new("sh")
        .args(["-c", &script, env!("CARGO_BIN_EXE_rlx")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the save should have failed: {err}");
    assert!(err.contains("rlx: ") && !err.contains("panicked"), "{err}");
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp")), "{names:?}");
    assert!(err.contains("checkpoint-2"), "{err}");
    // Without the limit, the run resumes from checkpoint-1 and finishes (3 epochs × 2 steps).
    ok(&rlx(&resumed));
    assert!(Path::new(&out).join("checkpoint-6").exists());
}

/// A real full disk (ENOSPC) and a read-only file system, on a small tmpfs mounted in a user
/// namespace (`unshare -rm`; skipped with a message where user namespaces are not allowed):
/// the save fails with a clear error, no half checkpoint is left, the earlier checkpoint stays,
/// and once there is room the run resumes from it to the end.
#[test]
fn a_full_or_read_only_disk_keeps_the_earlier_checkpoint() {
    let probe = Command::new("unshare").args(["-rm", "true"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: cannot make a user + mount namespace (unshare -rm)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let data = write(
        t,
        "d.jsonl",
        "{\"prompt\": \"a\", \"response\": \"b c\"}\n{\"prompt\": \"d\", \"response\": \"e\"}\n",
    );
    let mnt = t.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let run = mnt.join("run");
    let sft = format!(
        "'{}' sft --model '{}' --data '{}' --out '{}' --batch-size 1 --epochs 3 --save-every 1 \
         --no-chat-template",
        env!("CARGO_BIN_EXE_rlx"),
        fixture("llama-f32").display(),
        data,
        run.display()
    );
    // One checkpoint (weights + two moment files, ~2 MB) fits in 3 MB; the second does not.
    let log = |name: &str| t.join(name).display().to_string();
    let script = format!(
        "set -u
         mount -t tmpfs -o size=3m tmpfs '{mnt}' || exit 90
         {sft} --max-steps 1 >/dev/null 2>'{first}' || exit 91
         {sft} --resume >/dev/null 2>'{full}' && exit 92
         ls '{run}' > '{listing}'
         mount -o remount,ro '{mnt}' || exit 93
         {sft} --resume >/dev/null 2>'{ro}' && exit 94
         mount -o remount,rw,size=64m '{mnt}' || exit 95
         {sft} --resume >/dev/null 2>'{last}' || exit 96
         ls '{run}' > '{listing2}'
         exit 0",
        mnt = mnt.display(),
        run = run.display(),
        first = log("first.err"),
        full = log("full.err"),
        listing = log("listing"),
        ro = log("ro.err"),
        last = log("last.err"),
        listing2 = log("listing2"),
    );
    let out = Command::new("unshare")
        .args(["-rm", "sh", "-c", &script])
        .output()
        .unwrap();
    let read = |name: &str| std::fs::read_to_string(t.join(name)).unwrap_or_default();
    assert!(
        out.status.success(),
        "step {:?} failed; first: {} full: {} ro: {} last: {}",
        out.status.code(),
        read("first.err"),
        read("full.err"),
        read("ro.err"),
        read("last.err")
    );
    let full = read("full.err");
    assert!(
        full.contains("No space left on device") && !full.contains("panicked"),
        "{full}"
    );
    let listing = read("listing");
    assert!(
        listing.contains("checkpoint-1") && !listing.contains(".tmp"),
        "{listing}"
    );
    let ro = read("ro.err");
    assert!(
        ro.contains("Read-only file system") && !ro.contains("panicked"),
        "{ro}"
    );
    assert!(
        read("listing2").contains("checkpoint-6"),
        "{}",
        read("listing2")
    );
}
