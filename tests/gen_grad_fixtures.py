#!/usr/bin/env python3
"""Writes PyTorch's SFT loss and the gradient of every parameter for the fixture models.

    python3 tests/gen_grad_fixtures.py     # after gen_fixtures.py; needs torch, transformers

For gpt2-f32 and llama-f32: a packed batch of two sequences (cases 1 and 2 of reference.json),
each with a mask that selects the response tokens; loss = mean over selected tokens of
-log p(token | prefix). Writes FOLDER/grads.json (sequences, masks, loss) and
FOLDER/grads.safetensors (gradients under transformers' parameter names and layouts).
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def main() -> None:
    for name in ["gpt2-f32", "llama-f32"]:
        folder = FIXTURES / name
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        cases = json.loads((folder / "reference.json").read_text())["cases"]
        sequences = [cases[1]["input_ids"], cases[2]["input_ids"]]
        masks = [[t >= 3 for t in range(len(sequences[0]))], [t >= 5 for t in range(len(sequences[1]))]]
        total, count = torch.zeros(()), 0
        for ids, mask in zip(sequences, masks):
            x = torch.tensor([ids])
            logp = torch.log_softmax(model(x).logits[0].float(), -1)
            for t in range(1, len(ids)):
                if mask[t]:
                    total = total - logp[t - 1, ids[t]]
                    count += 1
        loss = total / count
        loss.backward()
        grads = {n: p.grad.detach().contiguous() for n, p in model.named_parameters()}
        save_file(grads, folder / "grads.safetensors")
        meta = {"sequences": sequences, "masks": masks, "loss": loss.item(),
                "notes": "mean cross-entropy over masked tokens; gradients in HF layout"}
        (folder / "grads.json").write_text(json.dumps(meta) + "\n")


if __name__ == "__main__":
    main()
