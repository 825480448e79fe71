#!/usr/bin/env python3
"""SmolLM2-135M side by side: rlx vs transformers vs llama.cpp, same weights, same threads, one run.

Every row of the CPU-speed table in docs/BENCHMARKS.md: decode batch 1 on f32 / bf16 / quantized
GGUF files, prefill 512, decode batch 16, log-probs 8×256, load → first token. Ratios are
rlx ÷ reference (> 1: rlx is faster; for load → first token, < 1 is better).

    python3 benches/smollm2.py --gguf-dir DIR [--llama-cpp BIN_DIR] [--threads 2]

DIR holds SmolLM2-135M-Instruct.{F32,BF16,Q8_0,Q4_0,Q4_1}.gguf (docs/BENCHMARKS.md says how they
were made); the HF folder (f32 safetensors) for transformers is bench-out/smollm2-135m-f32
(`rlx convert` of the default model). BIN_DIR (or $RLX_LLAMA_CPP) holds llama.cpp's
llama-bench; without it the llama.cpp columns say "not run".
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RLX = ROOT / "target" / "release" / "rlx"
NAME = "SmolLM2-135M-Instruct"


def rlx_bench(model: Path, threads: int, repeats: int, **kw) -> dict:
    cmd = [str(RLX), "bench", "--model", str(model), "--threads", str(threads),
           "--repeats", str(repeats)]
    for k, v in kw.items():
        flag = f"--{k.replace('_', '-')}"
        cmd += [flag] if v is True else [flag, str(v)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def llama_bench(bin_dir: Path, model: Path, threads: int, prompt: int, gen: int) -> float:
    out = subprocess.run(
        [str(bin_dir / "llama-bench"), "-m", str(model), "-t", str(threads), "-p", str(prompt),
         "-n", str(gen), "-r", "3", "-o", "json"],
        check=True, capture_output=True, text=True)
    rows = json.loads(out.stdout)
    return float(rows[0]["avg_ts"])


def transformers_times(folder: Path, threads: int, dtype: str, repeats: int,
                       prefill: int, decode: int, batch: int, lp: tuple) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=getattr(torch, dtype)).eval()
    vocab = model.config.vocab_size
    ids = lambda n, salt=0: [((i + salt) * 2654435761 >> 7) % vocab for i in range(n)]
    res = {}
    with torch.no_grad():
        p8 = torch.tensor([ids(8)])
        model.generate(p8, attention_mask=torch.ones_like(p8), max_new_tokens=1,
                       do_sample=False, pad_token_id=0)
        res["first_token_seconds"] = time.perf_counter() - started

        def best(f):
            b = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                f()
                b = min(b, time.perf_counter() - t)
            return b

        if prefill:
            pr = torch.tensor([ids(prefill)])
            res["prefill_tok_per_s"] = prefill / best(lambda: model(pr, logits_to_keep=1))
        if decode:
            one = torch.tensor([ids(4)[i % 4:i % 4 + 1] for i in range(batch)])
            kw = dict(do_sample=False) if batch == 1 else dict(do_sample=True, temperature=1.0,
                                                              top_k=0, top_p=1.0)
            t = best(lambda: model.generate(one, attention_mask=torch.ones_like(one),
                                            max_new_tokens=decode, min_new_tokens=decode,
                                            pad_token_id=0, **kw))
            res["decode_tok_per_s"] = batch * decode / t
        if lp:
            n, length = lp
            seqs = torch.tensor([ids(length, 7919 * i) for i in range(n)])

            def score():
                logits = model(seqs).logits[:, :-1].float()
                torch.log_softmax(logits, -1).gather(-1, seqs[:, 1:, None])

            res["logprob_tok_per_s"] = n * length / best(score)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf-dir", type=Path, required=True)
    ap.add_argument("--hf-dir", type=Path, default=ROOT / "bench-out" / "smollm2-135m-f32")
    ap.add_argument("--llama-cpp", type=Path, default=os.environ.get("RLX_LLAMA_CPP"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=ROOT / "bench-out" / "smollm2.json")
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "rlx-cli"], cwd=ROOT, check=True)
    llama = args.llama_cpp if args.llama_cpp and (Path(args.llama_cpp) / "llama-bench").is_file() \
        else None
    if llama is None:
        print("llama.cpp: not run (give --llama-cpp or $RLX_LLAMA_CPP with llama-bench in it)")
    t, r = args.threads, args.repeats
    rows = []

    def row(name, ours, ref_name, ref, goal):
        ratio = ours / ref if ref else None
        rows.append({"workload": name, "rlx": ours, "reference": ref_name, "ref": ref,
                     "ratio": ratio, "goal": goal})
        rs = f"{ratio:7.2f}" if ratio else "    n/a"
        refs = f"{ref:10.1f}" if ref else "   not run"
        print(f"{name:44}{ours:10.1f} {ref_name:22}{refs}{rs}   goal {goal}", flush=True)

    gguf = lambda kind: args.gguf_dir / f"{NAME}.{kind}.gguf"
    print(f"{'workload':44}{'rlx':>10} {'reference':22}{'value':>10}{'ratio':>7}")
    tf32 = transformers_times(args.hf_dir, t, "float32", r, 512, 64, 1, (8, 256))
    tbf16 = transformers_times(args.hf_dir, t, "bfloat16", r, 0, 64, 1, None)
    tb16 = transformers_times(args.hf_dir, t, "float32", r, 0, 32, 16, None)
    f32 = rlx_bench(gguf("F32"), t, r, prefill=512, decode=64, logprob_batch=8)
    row("decode b=1, f32 (tok/s)", f32["decode_tok_per_s"], "transformers f32",
        tf32["decode_tok_per_s"], ">= 2x")
    if llama:
        row("decode b=1, f32 (tok/s)", f32["decode_tok_per_s"], "llama.cpp F32",
            llama_bench(llama, gguf("F32"), t, 0, 64), ">= 1.0x")
    bf16 = rlx_bench(gguf("BF16"), t, r, prefill=8, decode=64)
    row("decode b=1, bf16 (tok/s)", bf16["decode_tok_per_s"], "transformers bf16",
        tbf16["decode_tok_per_s"], "-")
    if llama:
        row("decode b=1, bf16 (tok/s)", bf16["decode_tok_per_s"], "llama.cpp BF16",
            llama_bench(llama, gguf("BF16"), t, 0, 64), ">= 1.0x")
    for kind in ["Q8_0", "Q4_0", "Q4_1"]:
        q = rlx_bench(gguf(kind), t, r, prefill=512, decode=64)
        ref = llama_bench(llama, gguf(kind), t, 0, 64) if llama else None
        row(f"decode b=1, {kind} blocks (tok/s)", q["decode_tok_per_s"], f"llama.cpp {kind}",
            ref, ">= 1.0x")
        # With 8-bit activations, as llama.cpp itself runs these files.
        q8 = rlx_bench(gguf(kind), t, r, prefill=512, decode=64, int8_activations=True)
        row(f"decode b=1, {kind}, int8 activations (tok/s)", q8["decode_tok_per_s"],
            f"llama.cpp {kind}", ref, ">= 1.0x")
        if kind == "Q4_1":
            ref = llama_bench(llama, gguf(kind), t, 512, 0) if llama else None
            row("prefill 512, Q4_1 blocks (tok/s)", q["prefill_tok_per_s"], "llama.cpp Q4_1",
                ref, "-")
            row("prefill 512, Q4_1, int8 activations (tok/s)", q8["prefill_tok_per_s"],
                "llama.cpp Q4_1", ref, "-")
    b16 = rlx_bench(gguf("F32"), t, r, prefill=8, decode=32, decode_batch=16)
    row("decode b=16 total, f32 (tok/s)", b16["decode_tok_per_s"], "transformers f32",
        tb16["decode_tok_per_s"], ">= 3x")
    row("prefill 512, f32 (tok/s)", f32["prefill_tok_per_s"], "transformers f32",
        tf32["prefill_tok_per_s"], ">= 1.5x")
    if llama:
        row("prefill 512, f32 (tok/s)", f32["prefill_tok_per_s"], "llama.cpp F32",
            llama_bench(llama, gguf("F32"), t, 512, 0), ">= 1.0x")
    row("log-probs 8x256, f32 (tok/s)", f32["logprobs"]["tok_per_s"], "transformers f32",
        tf32["logprob_tok_per_s"], ">= 1.5x")
    row("load -> first token, f32 (s; lower is better)", f32["first_token_seconds"],
        "transformers f32", tf32["first_token_seconds"], "<= 0.10x")
    q41 = rlx_bench(gguf("Q4_1"), t, 1, prefill=8, decode=1)
    row("load -> first token, Q4_1 file (s)", q41["first_token_seconds"], "transformers f32",
        tf32["first_token_seconds"], "<= 0.10x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "threads": t,
                                     "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
