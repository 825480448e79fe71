#!/usr/bin/env python3
"""One SFT training step, rlx vs PyTorch eager: same model, batch, threads, one run.

Full fine-tune, AdamW (lr 1e-5, betas 0.9/0.999, eps 1e-8, no weight decay), gradient norm
clipped to 1.0, mean cross-entropy over the scored tokens. Each sequence is `--len`
pseudo-random tokens (the same ids in both engines) whose first `--prompt` tokens are left out
of the loss. Dropout is off on both sides. Each engine runs in its own process, takes one
untimed warm-up step and then `--steps` timed ones; the best timed step is reported, together
with the peak RSS of the training (VmHWM, reset just after the model is loaded, so it holds
the weights, the optimizer state and the steps, not load-time buffers).

Models:
  gpt2     random weights from transformers' default GPT2Config (124M), f32 safetensors
  smollm2  SmolLM2-135M-Instruct, converted from models/SmolLM2-135M-Instruct.Q4_1.gguf to an
           f32 HF folder with `rlx convert` (scripts/fetch_model.sh fetches the GGUF)

Ratios: time = PyTorch s/step ÷ rlx s/step (> 1 means rlx is faster); memory = rlx peak RSS ÷
PyTorch peak RSS (< 1 means rlx uses less).

    python3 benches/train_step.py [--threads 2] [--batch 4] [--len 256] [--prompt 32]
                                  [--steps 3] [--models gpt2,smollm2] [--compute f32|bf16]
                                  [--json OUT]

`--compute bf16`: rlx trains with `--train-compute bf16` (bf16 operands, f32 sums, f32 master
weights); PyTorch runs the forward and loss under `torch.autocast("cpu", dtype=torch.bfloat16)`
(f32 master weights and AdamW), the usual mixed-precision recipe. The loss of every step is
printed side by side, so the two curves can be compared.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RLX = ROOT / "target" / "release" / "rlx"
GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def bench_tokens(batch: int, length: int, vocab: int) -> list:
    """The ids `rlx bench --train-batch` uses (u32 wrapping multiply, as in cli/src/main.rs)."""
    return [
        [((((b * length + i) * 2654435761) & 0xFFFFFFFF) >> 7) % vocab for i in range(length)]
        for b in range(batch)
    ]


def proc_status_bytes(key: str):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_and_wait_seconds():
    """Seconds this process's live threads have run on a CPU and waited in the run queue
    (/proc/self/task/*/schedstat); waiting means another process competed for the cores."""
    run = wait = 0
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/schedstat") as f:
                fields = f.read().split()
            run += int(fields[0])
            wait += int(fields[1])
    except (OSError, IndexError, ValueError):
        return None
    return run * 1e-9, wait * 1e-9


def torch_worker(args) -> int:
    """Runs in its own process: prints one JSON object like `rlx bench --train-batch`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    config = AutoConfig.from_pretrained(args.model_dir)
    for key in ("embd_pdrop", "resid_pdrop", "attn_pdrop", "attention_dropout",
                "hidden_dropout", "summary_first_dropout"):
        if hasattr(config, key):
            setattr(config, key, 0.0)
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, config=config, dtype=torch.float32
    )
    model.train()
    live_dropout = [n for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Dropout) and m.p > 0]
    if live_dropout:
        raise SystemExit(f"dropout still on in {live_dropout[:3]}")
    ids = torch.tensor(bench_tokens(args.batch, args.len, model.config.vocab_size))
    labels = ids.clone()
    prompt = max(args.prompt, 1)
    labels[:, :prompt] = -100  # HF shifts labels: tokens prompt..len-1 are scored
    rss_after_load = proc_status_bytes("VmRSS:")
    peak_after_load = proc_status_bytes("VmHWM:")
    peak_reset = reset_peak_rss()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0)
    seconds, losses, grad_norms, cpu_seconds, wait_seconds = [], [], [], [], []
    import contextlib
    mixed = (torch.autocast("cpu", dtype=torch.bfloat16) if args.compute == "bf16"
             else contextlib.nullcontext())
    for _ in range(args.steps + 1):
        before = cpu_and_wait_seconds()
        t = time.perf_counter()
        with mixed:
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t)
        after = cpu_and_wait_seconds()
        if before and after:
            cpu_seconds.append(after[0] - before[0])
            wait_seconds.append(after[1] - before[1])
        losses.append(loss.item())
        grad_norms.append(norm.item())
    peak = proc_status_bytes("VmHWM:")
    timed = seconds[1:]
    best = min(timed)
    print(json.dumps({
        "engine": "pytorch",
        "mode": "sft_step",
        "threads": args.threads,
        "model": str(args.model_dir),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "batch": args.batch,
        "seq_len": args.len,
        "prompt_tokens": args.prompt,
        "loss_tokens": args.batch * (args.len - prompt),
        "lr": args.lr,
        "compute": args.compute,
        "warmup_seconds": seconds[0],
        "step_seconds": timed,
        "step_cpu_seconds": cpu_seconds[1:] or None,
        "step_runqueue_wait_seconds": wait_seconds[1:] or None,
        "step_seconds_best": best,
        "step_seconds_mean": sum(timed) / len(timed),
        "tok_per_s": args.batch * args.len / best,
        "losses": losses,
        "grad_norms": grad_norms,
        "rss_after_load_bytes": rss_after_load,
        "peak_rss_load_bytes": peak_after_load,
        "peak_rss_reset_after_load": peak_reset,
        "peak_rss_bytes": peak,
        "torch": torch.__version__,
    }))
    return 0


def make_gpt2(out: Path) -> None:
    if (out / "model.safetensors").is_file():
        return
    out.mkdir(parents=True, exist_ok=True)
    code = (
        "import sys, torch\n"
        "from transformers import GPT2Config, GPT2LMHeadModel\n"
        "torch.manual_seed(0)\n"
        "GPT2LMHeadModel(GPT2Config()).eval().save_pretrained(sys.argv[1], safe_serialization=True)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(out)], check=True)


def make_smollm2(out: Path, rlx: Path) -> None:
    if (out / "model.safetensors").is_file():
        return
    if not GGUF.is_file():
        subprocess.run(["bash", str(ROOT / "scripts" / "fetch_model.sh")], cwd=ROOT, check=True)
    if out.exists():
        raise SystemExit(f"{out} exists without model.safetensors; remove it")
    subprocess.run([str(rlx), "convert", str(GGUF), str(out)], check=True)


def run_json(cmd: list, threads: int) -> dict:
    """Runs one engine in its own process; adds its wall and CPU time and the load average
    (a 1-minute load well above `threads` means something else competed for the cores)."""
    import resource

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_wall_seconds"] = wall
    result["process_cpu_seconds"] = (after.ru_utime - before.ru_utime) + (
        after.ru_stime - before.ru_stime)
    result["loadavg_1m_at_end"] = os.getloadavg()[0]
    if result["loadavg_1m_at_end"] > threads + 0.75:
        print(f"warning: load average {result['loadavg_1m_at_end']:.2f} after {cmd[0]} "
              f"exceeds {threads} threads; other work may have skewed the timing",
              file=sys.stderr)
    return result


def time_rlx(path: Path, args) -> dict:
    return run_json([
        str(args.rlx), "bench",
        "--model", str(path),
        "--threads", str(args.threads),
        "--train-batch", str(args.batch),
        "--train-len", str(args.len),
        "--train-prompt", str(args.prompt),
        "--steps", str(args.steps),
        "--lr", str(args.lr),
        "--train-compute", args.compute,
    ], args.threads)


def time_torch(path: Path, args) -> dict:
    return run_json([
        sys.executable, str(Path(__file__).resolve()), "--worker",
        "--model-dir", str(path),
        "--threads", str(args.threads),
        "--batch", str(args.batch),
        "--len", str(args.len),
        "--prompt", str(args.prompt),
        "--steps", str(args.steps),
        "--lr", str(args.lr),
        "--compute", args.compute,
    ], args.threads)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--len", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--compute", choices=["f32", "bf16"], default="f32",
                    help="precision of the matrix products (bf16: rlx --train-compute bf16 "
                         "vs PyTorch bf16 autocast)")
    ap.add_argument("--models", default="gpt2,smollm2")
    ap.add_argument("--gpt2-dir", type=Path, default=ROOT / "bench-out" / "gpt2-124m-random")
    ap.add_argument("--smollm2-dir", type=Path, default=ROOT / "bench-out" / "smollm2-135m-f32")
    ap.add_argument("--engines", default="rlx,pytorch")
    ap.add_argument("--json", type=Path, help="also write all results here")
    ap.add_argument("--rlx", type=Path, default=RLX,
                    help="the rlx binary (default: build target/release/rlx first)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return torch_worker(args)
    if args.steps < 1 or args.batch < 1 or not 0 <= args.prompt < args.len:
        ap.error("need --steps >= 1, --batch >= 1 and 0 <= --prompt < --len")

    timers = {"rlx": time_rlx, "pytorch": time_torch}
    engines = args.engines.split(",")
    if any(e not in timers for e in engines):
        ap.error(f"--engines takes a comma-separated subset of {', '.join(timers)}")
    if args.rlx == RLX and "rlx" in engines:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "rlx-cli"], cwd=ROOT,
                       check=True)
    makers = {"gpt2": (make_gpt2, args.gpt2_dir, f"GPT-2-124M shape (random), {args.compute}"),
              "smollm2": (lambda p: make_smollm2(p, args.rlx), args.smollm2_dir,
                          f"SmolLM2-135M, {args.compute}")}
    results = {}
    for name in args.models.split(","):
        if name not in makers:
            ap.error(f"unknown model {name!r}; choose from {', '.join(makers)}")
        make, path, _ = makers[name]
        make(path)
        results[name] = {e: timers[e](path, args) for e in engines}

    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    gib = 1024 ** 3
    print(f"SFT step: batch {args.batch} x {args.len} tokens ({args.prompt} prompt tokens unscored), "
          f"full fine-tune, AdamW, {args.compute} compute, {args.threads} threads, "
          f"{platform.machine()}; "
          f"best of {args.steps} timed steps after 1 warm-up")
    print(f"{'':34}{'rlx':>10}{'PyTorch':>10}{'ratio':>8}")
    for name, r in results.items():
        for engine, res in r.items():
            waits = res.get("step_runqueue_wait_seconds")
            if waits:
                i = res["step_seconds"].index(res["step_seconds_best"])
                share = waits[i] / res["step_seconds_best"]
                if share > 0.02:
                    print(f"warning: {name} {engine}: the best step waited {share:.0%} of its "
                          "time for a CPU (other work on the machine)", file=sys.stderr)
        if len(r) < 2:
            for engine, res in r.items():
                print(f"{makers[name][2]} {engine}: {res['step_seconds_best']:.2f} s/step, "
                      f"peak RSS {res['peak_rss_bytes'] / gib:.2f} GiB")
            continue
        ours, ref = r["rlx"], r["pytorch"]
        label = makers[name][2]
        s_ours, s_ref = ours["step_seconds_best"], ref["step_seconds_best"]
        print(f"{label + ' s/step':34}{s_ours:10.2f}{s_ref:10.2f}{s_ref / s_ours:8.2f}")
        m_ours, m_ref = ours["peak_rss_bytes"], ref["peak_rss_bytes"]
        if m_ours and m_ref:
            print(f"{'  peak RSS (GiB)':34}{m_ours / gib:10.2f}{m_ref / gib:10.2f}"
                  f"{m_ours / m_ref:8.2f}")
        for i, (a, b) in enumerate(zip(ours["losses"], ref["losses"])):
            print(f"{f'  loss, step {i}':34}{a:10.4f}{b:10.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
