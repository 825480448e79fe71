"""rlx.distributed on a real local Ray cluster (a head and a second node, separate processes
on 127.0.0.1): two rollout workers reproduce the single-process run bit for bit (PPO with
LoRA, GRPO with full fine-tuning), a worker that dies mid-rollout is replaced, a learner that
dies loses at most one iteration and ``resume`` finishes the run exactly, and ``rlx ppo --ray``
from the CLI gives what ``rlx ppo`` gives."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import rlx
from rlx._rlx import run_on_policy

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'rlx[ray]')")
import rlx.distributed as distributed  # noqa: E402  (needs ray only when used)

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "llama-f32"
PROMPTS = ["Say something short.", "Say something long.", "Reply.", "Count.", "Name a colour."]
# A test cluster on loopback: no usage reports, and no token authentication (a token left in
# ~/.ray by an earlier local run would make the head require it from the second node).
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """`ray start --head` plus a second node, torn down afterwards (bounded in time)."""
    if shutil.which("ray") is None:
        pytest.skip("the `ray` command is not on PATH")
    port = _free_port()
    # Short: Ray's Unix socket paths live under it and must stay under 108 bytes.
    temp = tempfile.mkdtemp(prefix="rlxray", dir="/tmp")
    address = f"127.0.0.1:{port}"
    def ray_start(*args):
        r = subprocess.run(["ray", "start", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                            "--disable-usage-stats", *args],
                           env=ENV, timeout=180, capture_output=True, text=True)
        assert r.returncode == 0, f"ray start {args}: {r.stderr[-2000:]}"

    ray_start("--head", f"--port={port}", f"--temp-dir={temp}", "--include-dashboard=false")
    try:
        ray_start(f"--address={address}")
        os.environ.update({k: ENV[k] for k in ("RAY_USAGE_STATS_ENABLED", "RAY_AUTH_MODE")})
        ray.init(address=address)
        yield address
    finally:
        ray.shutdown()
        subprocess.run(["ray", "stop", "--force"], env=ENV, timeout=120, capture_output=True)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("rl")
    rlx.Trainer(FIXTURE, head="score", seed=7).save(d / "rm")
    (d / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS))
    return d


def job(data, out, **settings):
    j = dict(
        stage="ppo", model=str(FIXTURE), data=str(data / "prompts.jsonl"),
        reward_model=str(data / "rm"), out=str(out), threads=1, chat_template=False,
        max_len=64, seed=3, save_every=1, lr=3e-3, iterations=3, prompts_per_iteration=3,
        samples_per_prompt=2, max_new_tokens=5, minibatch_size=4,
    )
    j.update(settings)
    return j


def metrics(out):
    lines = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    for l in lines:
        del l["tokens_per_second"]
    return lines


def same_run(a, b):
    assert metrics(a) == metrics(b)
    wa = (Path(a) / "model" / "model.safetensors").read_bytes()
    wb = (Path(b) / "model" / "model.safetensors").read_bytes()
    assert wa == wb, "final weights differ"


def test_ppo_lora_two_workers_equal_one_process(cluster, data, tmp_path):
    single = job(data, tmp_path / "single", lora_rank=2)
    assert run_on_policy(json.dumps(single))[0] == "finished"
    report = distributed.run(job(data, tmp_path / "dist", lora_rank=2), workers=2)
    assert report["outcome"] == "finished" and report["steps"] == 12
    same_run(tmp_path / "single", tmp_path / "dist")
    # The workers' sampling log-probs are the learner's own for the same weights: each
    # iteration's first update has ratios of exactly 1.
    assert all(m["first_approx_kl"] == 0.0 for m in metrics(tmp_path / "dist"))
    # Adapter-only sync: LoRA factors and the value head, a few KB per iteration.
    sizes = {s["state_bytes"] for s in report["sync"]}
    assert len(report["sync"]) == 3 and max(sizes) < 20_000, report["sync"]


def test_grpo_full_weights_and_a_dying_worker(cluster, data, tmp_path):
    settings = dict(stage="grpo", samples_per_prompt=3, minibatch_size=6)
    assert run_on_policy(json.dumps(job(data, tmp_path / "single", **settings)))[0] == "finished"
    # Worker 1 exits during iteration 1's rollout: replaced, its prompts re-issued.
    report = distributed.run(
        job(data, tmp_path / "dist", **settings), workers=2, worker_faults={1: 1}
    )
    assert report["replacements"] == 1
    same_run(tmp_path / "single", tmp_path / "dist")
    # Full fine-tuning sends every weight.
    assert min(s["state_bytes"] for s in report["sync"]) > 100_000


def test_learner_crash_loses_at_most_one_iteration_and_resume_is_exact(cluster, data, tmp_path):
    assert run_on_policy(json.dumps(job(data, tmp_path / "single")))[0] == "finished"
    out = tmp_path / "dist"
    with pytest.raises(ray.exceptions.RayActorError):
        distributed.run(job(data, out), workers=2, learner_fail_after_iteration=1)
    # Iteration 1's checkpoint (step 4) survived; iteration 2 was lost.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    assert not (out / "model").exists()
    # metrics.jsonl already had iteration 2's line: resume rewrites from the checkpoint on.
    report = distributed.run(job(data, out, resume=True), workers=2)
    assert report["outcome"] == "finished"
    same_run(tmp_path / "single", out)


def _cli():
    for profile in ("debug", "release"):
        p = ROOT / "target" / profile / "rlx"
        if p.exists():
            return p
    pytest.skip("the rlx CLI is not built (cargo build -p rlx-cli)")


def test_cli_ppo_on_ray_equals_cli_ppo(cluster, data, tmp_path):
    cli = _cli()
    args = [
        "--model", str(FIXTURE), "--data", str(data / "prompts.jsonl"),
        "--reward-model", str(data / "rm"), "--threads", "1", "--no-chat-template",
        "--max-len", "64", "--seed", "5", "--lr", "0.003", "--iterations", "2",
        "--prompts-per-iteration", "3", "--samples-per-prompt", "2", "--max-new-tokens", "5",
        "--minibatch-size", "3", "--lora-rank", "2",
    ]
    env = {**ENV, "RLX_PYTHON": sys.executable}
    subprocess.run([cli, "ppo", *args, "--out", tmp_path / "single"], check=True, env=env,
                   timeout=300, capture_output=True)
    r = subprocess.run(
        [cli, "ppo", *args, "--out", tmp_path / "dist", "--ray", cluster, "--workers", "2"],
        env=env, timeout=300, capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    same_run(tmp_path / "single", tmp_path / "dist")


def test_cli_ray_without_the_package_is_a_clear_error(data, tmp_path):
    cli = _cli()
    r = subprocess.run(
        [cli, "grpo", "--model", str(FIXTURE), "--data", str(data / "prompts.jsonl"),
         "--reward-model", str(data / "rm"), "--out", tmp_path / "o", "--ray", "local"],
        env={**ENV, "RLX_PYTHON": "/nonexistent/python"}, timeout=120, capture_output=True,
        text=True,
    )
    assert r.returncode != 0
    assert "rlx.distributed" in r.stderr and "RLX_PYTHON" in r.stderr
