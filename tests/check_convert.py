#!/usr/bin/env python3
"""Checks that `rlx convert` output loads in transformers with transformers' own logits.

    python3 tests/check_convert.py [models/SmolLM2-135M-Instruct.Q4_1.gguf]

Converts the GGUF with target/release/rlx (f32), loads the folder with AutoModelForCausalLM and
AutoTokenizer (whose chat template builds the prompt), and compares against transformers loading
the GGUF itself: logits must agree to 1e-4. Needs torch, transformers, gguf, accelerate. Exits
non-zero on a mismatch.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    gguf = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "hf"
        subprocess.run([str(ROOT / "target/release/rlx"), "convert", str(gguf), str(out)], check=True)
        tok = AutoTokenizer.from_pretrained(out)
        converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        reference = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        ).eval()
        messages = [{"role": "user", "content": "What is the capital of France? Answer in 12 words."}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        if not isinstance(ids, torch.Tensor):
            ids = ids["input_ids"]
        with torch.no_grad():
            diff = (converted(ids).logits - reference(ids).logits).abs().max().item()
        print(f"logits max |diff| (converted folder vs GGUF, both in transformers): {diff:.3g}")
        return 0 if diff <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
