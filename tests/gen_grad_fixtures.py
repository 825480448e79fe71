#!/usr/bin/env python3
"""Writes PyTorch's SFT loss and the gradient of every parameter for the fixture models.

    python3 tests/gen_grad_fixtures.py     # after gen_fixtures.py; needs torch, transformers

For gpt2-f32 and llama-f32: a packed batch of two sequences (cases 1 and 2 of reference.json),
each with a mask that selects the response tokens; loss = mean over selected tokens of
-log p(token | prefix). Writes FOLDER/grads.json (sequences, masks, loss) and
FOLDER/grads.safetensors (gradients under transformers' parameter names and layouts).
For llama-f32 it also takes one AdamW step (clip_grad_norm_ 1.0; lr 1e-2, betas 0.9/0.95,
eps 1e-8, weight decay 0.1 on linear weights only) and writes a few parameters after it to
llama-f32/after_adamw.safetensors.
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
        if name == "llama-f32":
            adamw_step(model, folder)
            reward_model(folder, sequences)
            dpo(folder, sequences)


def reward_model(folder: Path, sequences) -> None:
    """LlamaForSequenceClassification on the fixture backbone with a random score head: rewards,
    pairwise loss −log σ(r_c − r_r − margin), and a few gradients, written to rm.json and
    rm.safetensors (which also holds the score head)."""
    from transformers import LlamaForSequenceClassification

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    cfg = base.config
    cfg.num_labels = 1
    cfg.pad_token_id = 0
    rm = LlamaForSequenceClassification(cfg).eval()
    rm.model.load_state_dict(base.model.state_dict())
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        rm.score.weight.copy_(0.5 * torch.randn(rm.score.weight.shape, generator=gen))
    a, b = sequences
    chosen, rejected, margin = [a, b[:10]], [b[:12], a[:5]], 0.5
    rewards = lambda seqs: torch.stack([rm(torch.tensor([s])).logits[0, 0] for s in seqs])
    rc, rr = rewards(chosen), rewards(rejected)
    loss = -torch.nn.functional.logsigmoid(rc - rr - margin).mean()
    loss.backward()
    keep = ["score.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.weight",
            "model.embed_tokens.weight"]
    params = dict(rm.named_parameters())
    tensors = {f"grad.{n}": params[n].grad.contiguous() for n in keep}
    tensors["score.weight"] = rm.score.weight.detach().contiguous()
    save_file(tensors, folder / "rm.safetensors")
    meta = {"chosen": chosen, "rejected": rejected, "margin": margin, "loss": loss.item(),
            "rewards_chosen": rc.tolist(), "rewards_rejected": rr.tolist()}
    (folder / "rm.json").write_text(json.dumps(meta) + "\n")


def dpo(folder: Path, sequences) -> None:
    """DPO (sigmoid) on the llama fixture with given reference log-likelihoods: loss and a few
    gradients, written to dpo.json and dpo.safetensors."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    a, b = sequences
    chosen = [(a, 3), (b[:10], 4)]
    rejected = [(b[:12], 5), (a[:6], 2)]
    ref_chosen, ref_rejected, beta = [-40.5, -20.25], [-35.0, -12.5], 0.1

    def loglik(ids, start):
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        return sum(logp[t - 1, ids[t]] for t in range(start, len(ids)))

    h = torch.stack([
        (loglik(*c) - rc) - (loglik(*r) - rr)
        for c, r, rc, rr in zip(chosen, rejected, ref_chosen, ref_rejected)
    ])
    loss = -torch.nn.functional.logsigmoid(beta * h).mean()
    loss.backward()
    keep = ["lm_head.weight", "model.norm.weight", "model.layers.1.mlp.up_proj.weight",
            "model.embed_tokens.weight"]
    params = dict(model.named_parameters())
    save_file({n: params[n].grad.contiguous() for n in keep}, folder / "dpo.safetensors")
    meta = {
        "chosen": [s for s, _ in chosen], "chosen_start": [k for _, k in chosen],
        "rejected": [s for s, _ in rejected], "rejected_start": [k for _, k in rejected],
        "ref_chosen": ref_chosen, "ref_rejected": ref_rejected, "beta": beta, "loss": loss.item(),
    }
    (folder / "dpo.json").write_text(json.dumps(meta) + "\n")


def adamw_step(model, folder: Path) -> None:
    params = dict(model.named_parameters())
    decay = [p for n, p in params.items() if n.endswith("proj.weight") or n == "lm_head.weight"]
    other = [p for n, p in params.items() if not (n.endswith("proj.weight") or n == "lm_head.weight")]
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
        lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
    )
    opt.step()
    keep = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.input_layernorm.weight", "model.layers.2.mlp.down_proj.weight",
            "lm_head.weight"]
    save_file({n: params[n].detach().contiguous() for n in keep}, folder / "after_adamw.safetensors")


if __name__ == "__main__":
    main()
