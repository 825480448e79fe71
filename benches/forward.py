#!/usr/bin/env python3
"""Prefill and decode speed of rlx vs transformers, same model, same threads, one run.

Builds a random GPT-2-124M-shaped model (transformers' default GPT2Config) in f32, saves it as
safetensors, times transformers (eager, torch.no_grad, KV cache on) and `rlx bench` on it, and
prints the ratios (rlx tok/s ÷ transformers tok/s; > 1 means rlx is faster).

    python3 benches/forward.py [--threads 2] [--prefill 512] [--decode 64]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_model(out: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if (out / "model.safetensors").is_file():
        return
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()
    model.save_pretrained(out, safe_serialization=True)


def time_transformers(path: Path, threads: int, prefill: int, decode: int, repeats: int) -> dict:
    import torch
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(threads)
    model = GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    prompt = torch.tensor([[(i * 2654435761 >> 7) % vocab for i in range(prefill)]])
    best_prefill = float("inf")
    with torch.no_grad():
        model(prompt[:, :8])  # warm-up
        for _ in range(repeats):
            # As generation runs a prompt (and `rlx bench` times it): logits of the last
            # position only.
            t = time.perf_counter()
            model(prompt, logits_to_keep=1)
            best_prefill = min(best_prefill, time.perf_counter() - t)
        best_decode = float("inf")
        one = prompt[:, :1]
        for _ in range(repeats):
            t = time.perf_counter()
            model.generate(
                one,
                attention_mask=torch.ones_like(one),
                max_new_tokens=decode,
                min_new_tokens=decode,
                do_sample=False,
                pad_token_id=0,
            )
            best_decode = min(best_decode, time.perf_counter() - t)
    return {
        "engine": "transformers",
        "prefill_tok_per_s": prefill / best_prefill,
        "decode_tok_per_s": decode / best_decode,
    }


def time_rlx(path: Path, threads: int, prefill: int, decode: int, repeats: int) -> dict:
    subprocess.run(
        ["cargo", "build", "--release", "-q", "-p", "rlx-cli"], cwd=ROOT, check=True
    )
    out = subprocess.run(
        [
            str(ROOT / "target" / "release" / "rlx"),
            "bench",
            "--model", str(path),
            "--threads", str(threads),
            "--prefill", str(prefill),
            "--decode", str(decode),
            "--repeats", str(repeats),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model-dir", type=Path, default=ROOT / "bench-out" / "gpt2-124m-random")
    args = ap.parse_args()

    args.model_dir.mkdir(parents=True, exist_ok=True)
    make_model(args.model_dir)
    ref = time_transformers(args.model_dir, args.threads, args.prefill, args.decode, args.repeats)
    ours = time_rlx(args.model_dir, args.threads, args.prefill, args.decode, args.repeats)
    print(f"GPT-2-124M shape, f32, {args.threads} threads, CPU: {os.uname().machine}")
    print(f"{'':28}{'rlx':>12}{'transformers':>14}{'ratio':>8}")
    for key, label in [
        ("prefill_tok_per_s", f"prefill {args.prefill} tok (tok/s)"),
        ("decode_tok_per_s", f"decode batch 1 (tok/s)"),
    ]:
        r = ours[key] / ref[key]
        print(f"{label:28}{ours[key]:12.1f}{ref[key]:14.1f}{r:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
