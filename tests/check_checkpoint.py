#!/usr/bin/env python3
"""Checks that a training checkpoint written by rlx loads in transformers with rlx's logits.

    python3 tests/check_checkpoint.py

Builds the `checkpoint_writer` test helper, lets it take one SFT step on each tiny fixture model
(llama-f32, gpt2-f32) and write checkpoints, then loads the first checkpoint with
AutoModelForCausalLM and with the rlx Python package and compares per-token log-probs (must
agree to 1e-4, and differ from the untrained fixture's). With LoRA (llama-f32): the adapter
loaded by peft onto the fixture must give the log-probs of the merged model rlx wrote, in
transformers and in rlx. Needs torch, transformers and the rlx
wheel (python/test.sh installs it). Exits non-zero on a mismatch.
"""

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import rlx

ROOT = Path(__file__).resolve().parent.parent
IDS = [1, 7, 3, 9, 4, 12, 5, 5, 2]


def hf_logprobs(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([IDS])).logits[0], -1)
    return torch.stack([logp[t - 1, IDS[t]] for t in range(1, len(IDS))])


def main() -> int:
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "rlx-tests", "--bin",
                    "checkpoint_writer"], check=True, cwd=ROOT)
    writer = ROOT / "target/release/checkpoint_writer"
    worst = 0.0
    for name in ["llama-f32", "gpt2-f32"]:
        fixture = ROOT / "tests/fixtures" / name
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.Popen([str(writer), str(fixture), tmp])
            deadline = time.time() + 30
            while not (Path(tmp) / "checkpoint-1").exists() and time.time() < deadline:
                time.sleep(0.05)
            proc.kill()
            proc.wait()
            ck = Path(tmp) / "checkpoint-0"
            theirs = hf_logprobs(ck)
            ours = torch.tensor(rlx.Model.load(str(ck)).logprobs([IDS])[0])
            diff = (theirs - ours).abs().max().item()
            moved = (theirs - hf_logprobs(fixture)).abs().max().item()
            print(f"{name}: checkpoint log-probs, transformers vs rlx: max |diff| {diff:.3g}; "
                  f"changed by training: {moved:.3g}")
            worst = max(worst, diff)
            if moved < 1e-6:
                print(f"{name}: the checkpoint equals the untrained model")
                return 1
    worst = max(worst, check_lora(writer))
    return 0 if worst <= 1e-4 else 1


def check_lora(writer: Path) -> float:
    from peft import PeftModel

    fixture = ROOT / "tests/fixtures/llama-f32"
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen([str(writer), str(fixture), tmp, "lora"])
        deadline = time.time() + 30
        while not (Path(tmp) / "checkpoint-1").exists() and time.time() < deadline:
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        base = AutoModelForCausalLM.from_pretrained(fixture, dtype=torch.float32)
        peft = PeftModel.from_pretrained(base, Path(tmp) / "checkpoint-0").eval()
        with torch.no_grad():
            logp = torch.log_softmax(peft(torch.tensor([IDS])).logits[0], -1)
        adapted = torch.stack([logp[t - 1, IDS[t]] for t in range(1, len(IDS))])
        merged = hf_logprobs(Path(tmp) / "merged")
        ours = torch.tensor(rlx.Model.load(str(Path(tmp) / "merged")).logprobs([IDS])[0])
        diff = max((adapted - merged).abs().max().item(), (adapted - ours).abs().max().item())
        moved = (adapted - hf_logprobs(fixture)).abs().max().item()
        print(f"LoRA: peft adapter vs merged (transformers, rlx): max |diff| {diff:.3g}; "
              f"changed by training: {moved:.3g}")
        return diff if moved > 1e-6 else float("inf")


if __name__ == "__main__":
    sys.exit(main())
