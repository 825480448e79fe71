"""Distributed PPO on the default model: rollout throughput with one process, one Ray worker
and two Ray workers, and the bytes and seconds of each iteration's weight sync (LoRA
adapters vs full fine-tuning). One run, same machine, same job; prints a Markdown table.

    python3 benches/distributed.py [--model models/SmolLM2-135M-Instruct.Q4_1.gguf]

Needs the rlx package and Ray (pip install 'rlx[ray]'). Rollout tokens per second are the
learner's own measure (sampling + rewards + reference log-probs + weight sync, per generated
token), averaged over the iterations after the first (which includes the workers' start).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import rlx
from rlx._rlx import run_on_policy

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Give me three tips for sleeping well.",
    "Explain recursion to a child.",
    "Name a famous painter.",
    "How do plants make food?",
    "Tell me a joke about cats.",
    "What is 12 times 12?",
]


def job(tmp, model, rm, out, **kw):
    j = dict(
        stage="ppo", model=str(model), data=str(tmp / "prompts.jsonl"), reward_model=str(rm),
        out=str(out), seed=1, lr=1e-5, iterations=3, prompts_per_iteration=8,
        samples_per_prompt=2, max_new_tokens=32, ppo_epochs=1, minibatch_size=16,
        lora_rank=8,
    )
    j.update(kw)
    return j


def rollout_rate(out):
    lines = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return statistics.mean(l["tokens_per_second"]["rollout"] for l in lines[1:])


def same_run(a, b):
    """Metrics (but timings) and final weights equal byte for byte."""

    def lines(out):
        rows = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        for r in rows:
            r.pop("tokens_per_second")
        return rows

    weights = [(Path(o) / "model" / "model.safetensors").read_bytes() for o in (a, b)]
    return lines(a) == lines(b) and weights[0] == weights[1]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    a = p.parse_args()
    import ray

    import rlx.distributed as distributed

    tmp = Path(tempfile.mkdtemp(prefix="rlx-dist-bench"))
    (tmp / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": q}) for q in PROMPTS))
    rm = tmp / "rm"
    rlx.Trainer(a.model, head="score", seed=3).save(rm)
    cpus = os.cpu_count() or 1
    ray.init(num_cpus=max(cpus, 3), include_dashboard=False, log_to_driver=False)
    rows = []

    t = time.perf_counter()
    run_on_policy(json.dumps(job(tmp, a.model, rm, tmp / "single", threads=cpus)))
    rows.append(("one process", cpus, rollout_rate(tmp / "single"), None, time.perf_counter() - t))
    for workers, threads in ((1, cpus), (2, max(cpus // 2, 1))):
        out = tmp / f"ray{workers}"
        t = time.perf_counter()
        r = distributed.run(
            job(tmp, a.model, rm, out, threads=threads), workers=workers,
            worker_options={"num_cpus": 0},
        )
        rows.append((f"Ray, {workers} worker(s)", threads, rollout_rate(out), r["sync"],
                     time.perf_counter() - t))
    full = distributed.run(
        job(tmp, a.model, rm, tmp / "full", threads=cpus, lora_rank=0, iterations=2),
        workers=1, worker_options={"num_cpus": 0},
    )

    print(f"rlx {rlx.__version__}, Ray {ray.__version__}, {cpus} CPUs, model {Path(a.model).name}")
    print("| run | threads per worker | rollout tok/s | vs one process | wall s |")
    print("|---|---|---|---|---|")
    base = rows[0][2]
    for name, threads, rate, _, wall in rows:
        print(f"| {name} | {threads} | {rate:.1f} | {rate / base:.2f} | {wall:.1f} |")
    equal = all(same_run(tmp / "single", tmp / f"ray{w}") for w in (1, 2))
    print(f"\nthe Ray runs equal the one-process run bit for bit: {'yes' if equal else 'NO'}")
    print()
    print("| weight sync per iteration | bytes | seconds (max over workers) |")
    print("|---|---|---|")
    lora = rows[-1][3][1:]
    print(f"| LoRA r=8 (q,v) + value head | {lora[0]['state_bytes']:,} | "
          f"{statistics.mean(s['sync_seconds'] for s in lora):.4f} |")
    fs = full["sync"][1:]
    print(f"| full fine-tuning | {fs[0]['state_bytes']:,} | "
          f"{statistics.mean(s['sync_seconds'] for s in fs):.3f} |")


if __name__ == "__main__":
    sys.exit(main())
