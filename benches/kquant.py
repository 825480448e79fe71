#!/usr/bin/env python3
"""K-quant decode side by side: rlx vs llama.cpp on the same Q4_K / Q6_K GGUF files.

SmolLM2-135M cannot be stored as K-quants (its width, 576, is not a multiple of the 256-value
super-block, so llama-quantize falls back to other types), so this builds a Llama of about the
same size whose widths are: hidden 768, MLP 2048, 24 layers, 12 heads of 64 (4 KV heads),
SmolLM2's tokenizer and vocabulary — random weights (speed does not depend on the values). Then
llama.cpp's own tools write it as an F32 GGUF and quantize it with `--pure` (every matrix in the
one type), and both engines decode from the same files: rlx with its exact kernels (bit for bit
the dequantized model) and with `--int8-activations` (as llama.cpp runs these files).

    RLX_LLAMA_CPP=<llama.cpp>/build/bin python3 benches/kquant.py [--threads 2]

Needs torch + transformers (to make the model), the SmolLM2 HF folder for the tokenizer
(bench-out/smollm2-135m-f32, written by `rlx convert` — see benches/smollm2.py), and a llama.cpp
checkout with its build: the converter is <bin>/../../convert_hf_to_gguf.py (or --llama-src).
Ratios are rlx ÷ llama.cpp (> 1: rlx faster). Writes bench-out/kquant/kquant.json.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2 import ROOT, llama_bench, rlx_bench  # noqa: E402

OUT = ROOT / "bench-out" / "kquant"


def make_model(folder: Path, tokenizer_from: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=768, intermediate_size=2048, num_hidden_layers=24, num_attention_heads=12,
        num_key_value_heads=4, head_dim=64, vocab_size=49152, max_position_embeddings=2048,
        rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(tokenizer_from / name, folder / name)


def run_tool(cmd: list, out: Path) -> None:
    """Runs a converter that writes `out`, through a temporary name, so an interrupted run
    leaves no half-written file to be reused; its output is shown if it fails."""
    partial = out.with_suffix(".partial")
    done = subprocess.run([str(c) if c != out else str(partial) for c in cmd],
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"{cmd[0]} failed with status {done.returncode}")
    partial.rename(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-cpp", type=Path, default=os.environ.get("RLX_LLAMA_CPP"))
    ap.add_argument("--llama-src", type=Path, help="llama.cpp checkout (convert_hf_to_gguf.py)")
    ap.add_argument("--tokenizer-dir", type=Path,
                    default=ROOT / "bench-out" / "smollm2-135m-f32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not args.llama_cpp or not (args.llama_cpp / "llama-bench").is_file():
        print("llama.cpp: not run (give --llama-cpp or $RLX_LLAMA_CPP with llama-bench in it)")
        return 1
    src = args.llama_src or args.llama_cpp.resolve().parent.parent
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "rlx-cli"], cwd=ROOT, check=True)
    hf = OUT / "hf-f32"
    if not (hf / "tokenizer.json").is_file():  # copied last: the folder is whole
        make_model(hf, args.tokenizer_dir)
    f32 = OUT / "kquant-768.F32.gguf"
    if not f32.is_file():
        run_tool([sys.executable, src / "convert_hf_to_gguf.py", hf, "--outtype", "f32",
                  "--outfile", f32], f32)
    t, r = args.threads, args.repeats
    rows = []
    print(f"{'workload':46}{'rlx':>10}{'llama.cpp':>11}{'ratio':>8}")
    for kind in ["Q4_K", "Q6_K"]:
        path = OUT / f"kquant-768.{kind}.gguf"
        if not path.is_file():
            run_tool([args.llama_cpp / "llama-quantize", "--pure", f32, path, kind], path)
        exact = rlx_bench(path, t, r, prefill=512, decode=64)
        # With 8-bit activations, as llama.cpp itself runs these files.
        int8 = rlx_bench(path, t, r, prefill=512, decode=64, int8_activations=True)
        decode = llama_bench(args.llama_cpp, path, t, 0, 64)
        prefill = llama_bench(args.llama_cpp, path, t, 512, 0)
        for name, value, ref in [
            (f"decode b=1, {kind} blocks, exact (tok/s)", exact["decode_tok_per_s"], decode),
            (f"decode b=1, {kind}, int8 activations (tok/s)", int8["decode_tok_per_s"], decode),
            (f"prefill 512, {kind} blocks, exact (tok/s)", exact["prefill_tok_per_s"], prefill),
            (f"prefill 512, {kind}, int8 activations (tok/s)", int8["prefill_tok_per_s"],
             prefill),
        ]:
            rows.append({"workload": name, "rlx": value, "llama_cpp": ref, "ratio": value / ref})
            print(f"{name:46}{value:10.1f}{ref:11.1f}{value / ref:8.2f}", flush=True)
    (OUT / "kquant.json").write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": t,
         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
