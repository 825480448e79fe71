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

`bf16_compute` writes FOLDER/grads_bf16.safetensors: the same loss's gradients with every
linear layer (and the LM head) computing as rlx's bf16 compute does — operands rounded to
bf16 (nearest even), products and sums in f32, outputs f32; dx = bf16(dy)·bf16(W) and
dW = bf16(dy)ᵀ·bf16(x), the bias gradient summed from the unrounded dy — and its loss in
grads_bf16.json. Run alone: `python3 tests/gen_grad_fixtures.py bf16`.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def sft_loss(model, sequences, masks):
    """Mean over the masked tokens of -log p(token | prefix), each sequence on its own."""
    total, count = torch.zeros(()), 0
    for ids, mask in zip(sequences, masks):
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        for t in range(1, len(ids)):
            if mask[t]:
                total = total - logp[t - 1, ids[t]]
                count += 1
    return total / count


def main() -> None:
    for name in ["gpt2-f32", "llama-f32"]:
        folder = FIXTURES / name
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        cases = json.loads((folder / "reference.json").read_text())["cases"]
        sequences = [cases[1]["input_ids"], cases[2]["input_ids"]]
        masks = [[t >= 3 for t in range(len(sequences[0]))], [t >= 5 for t in range(len(sequences[1]))]]
        loss = sft_loss(model, sequences, masks)
        loss.backward()
        grads = {n: p.grad.detach().contiguous() for n, p in model.named_parameters()}
        save_file(grads, folder / "grads.safetensors")
        meta = {"sequences": sequences, "masks": masks, "loss": loss.item(),
                "notes": "mean cross-entropy over masked tokens; gradients in HF layout"}
        (folder / "grads.json").write_text(json.dumps(meta) + "\n")
        bf16_compute(folder, sequences, masks)
        if name == "llama-f32":
            adamw_step(model, folder)
            reward_model(folder, sequences)
            dpo(folder, sequences)
            ppo(folder, sequences)
            lora(folder, sequences, masks)
            grpo(folder, sequences)


class Bf16Product(torch.autograd.Function):
    """y = bf16(x)·bf16(w)ᵀ + b in f32, and its backward with bf16 operands."""

    @staticmethod
    def forward(ctx, x, w, b):
        xr, wr = x.to(torch.bfloat16).float(), w.to(torch.bfloat16).float()
        ctx.save_for_backward(xr, wr)
        ctx.has_bias = b is not None
        y = xr @ wr.t()
        return y + b if b is not None else y

    @staticmethod
    def backward(ctx, dy):
        xr, wr = ctx.saved_tensors
        dyr = dy.to(torch.bfloat16).float()
        dx = dyr @ wr
        dw = dyr.reshape(-1, dyr.shape[-1]).t() @ xr.reshape(-1, xr.shape[-1])
        db = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_bias else None
        return dx, dw, db


def bf16_compute(folder: Path, sequences, masks) -> None:
    from transformers.pytorch_utils import Conv1D

    linear, conv = torch.nn.Linear.forward, Conv1D.forward
    torch.nn.Linear.forward = lambda self, x: Bf16Product.apply(x, self.weight, self.bias)
    # GPT-2's Conv1D keeps its weight as (in, out).
    Conv1D.forward = lambda self, x: Bf16Product.apply(x, self.weight.t(), self.bias)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        loss = sft_loss(model, sequences, masks)
        loss.backward()
    finally:
        torch.nn.Linear.forward, Conv1D.forward = linear, conv
    grads = {n: p.grad.detach().contiguous() for n, p in model.named_parameters()}
    save_file(grads, folder / "grads_bf16.safetensors")
    meta = {"loss": loss.item(),
            "notes": "sequences and masks of grads.json; bf16 operands, f32 sums (see the script)"}
    (folder / "grads_bf16.json").write_text(json.dumps(meta) + "\n")


def reward_model(folder: Path, sequences) -> None:
    """LlamaForSequenceClassification on the fixture backbone with a random score head: rewards,
    pairwise loss −log σ(r_c − r_r − margin), and every gradient, written to rm.json and
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
    params = dict(rm.named_parameters())
    tensors = {f"grad.{n}": p.grad.contiguous() for n, p in params.items()}
    tensors["score.weight"] = rm.score.weight.detach().contiguous()
    save_file(tensors, folder / "rm.safetensors")
    meta = {"chosen": chosen, "rejected": rejected, "margin": margin, "loss": loss.item(),
            "rewards_chosen": rc.tolist(), "rewards_rejected": rr.tolist()}
    (folder / "rm.json").write_text(json.dumps(meta) + "\n")


def dpo(folder: Path, sequences) -> None:
    """DPO (sigmoid) on the llama fixture with given reference log-likelihoods: loss and every
    gradient, written to dpo.json and dpo.safetensors."""
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
    save_file({n: p.grad.contiguous() for n, p in model.named_parameters()},
              folder / "dpo.safetensors")
    meta = {
        "chosen": [s for s, _ in chosen], "chosen_start": [k for _, k in chosen],
        "rejected": [s for s, _ in rejected], "rejected_start": [k for _, k in rejected],
        "ref_chosen": ref_chosen, "ref_rejected": ref_rejected, "beta": beta, "loss": loss.item(),
    }
    (folder / "dpo.json").write_text(json.dumps(meta) + "\n")


def selected_outputs(model, ids, start, v_head=None):
    """Log-probs, entropies (and values) at the rows predicting tokens start.., as TRL reads
    them: row t − 1 predicts token t; the value is read at that same row."""
    hidden = model.model(torch.tensor([ids])).last_hidden_state[0]
    logits = model.lm_head(hidden).float()
    logp_all = torch.log_softmax(logits, -1)
    rows = list(range(start - 1, len(ids) - 1))
    logp = torch.stack([logp_all[r, ids[r + 1]] for r in rows])
    probs = logp_all.exp()
    entropy = torch.stack([-(probs[r] * logp_all[r]).sum() for r in rows])
    values = None
    if v_head is not None:
        w, b = v_head
        values = torch.stack([hidden[r] @ w[0] + b[0] for r in rows])
    return logp, entropy, values


def ppo(folder: Path, sequences) -> None:
    """PPO (TRL's formulas) on the llama fixture with a random value head: KL-penalised
    rewards, GAE, whitened advantages, clipped surrogate + clipped value loss + entropy bonus.
    Writes ppo.json (inputs, advantages, returns, loss parts) and ppo.safetensors (the value
    head and gradients)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    c = model.config.hidden_size
    gen = torch.Generator().manual_seed(5)
    vw = (0.3 * torch.randn(1, c, generator=gen)).requires_grad_()
    vb = torch.tensor([0.1]).requires_grad_()
    a, b = sequences
    seqs, starts = [a, b[:12]], [3, 5]
    scores = [1.5, -0.7]
    kl_coef, gamma, lam, clip, clip_v, vf_coef, ent_coef = 0.05, 1.0, 0.95, 0.2, 0.2, 0.1, 0.01
    outs = [selected_outputs(model, s, k, (vw, vb)) for s, k in zip(seqs, starts)]
    with torch.no_grad():
        old = [lp + 0.3 * torch.randn(lp.shape, generator=gen) for lp, _, _ in outs]
        ref = [lp + 0.2 * torch.randn(lp.shape, generator=gen) for lp, _, _ in outs]
        old_v = [v + 0.3 * torch.randn(v.shape, generator=gen) for _, _, v in outs]
        rewards, advs = [], []
        for o, r, v, score in zip(old, ref, old_v, scores):
            rw = -kl_coef * (o - r)
            rw[-1] += score
            adv, last = torch.zeros_like(rw), 0.0
            for t in reversed(range(len(rw))):
                nxt = v[t + 1] if t + 1 < len(rw) else 0.0
                delta = rw[t] + gamma * nxt - v[t]
                last = delta + gamma * lam * last
                adv[t] = last
            rewards.append(rw)
            advs.append(adv)
        returns = [ad + v for ad, v in zip(advs, old_v)]
        flat = torch.cat(advs)
        mean, var = flat.mean(), flat.var(unbiased=True)
        white = [(ad - mean) * torch.rsqrt(var + 1e-8) for ad in advs]
    logp = torch.cat([lp for lp, _, _ in outs])
    ent = torch.cat([e for _, e, _ in outs])
    vpred = torch.cat([v for _, _, v in outs])
    o, ov, ad, ret = torch.cat(old), torch.cat(old_v), torch.cat(white), torch.cat(returns)
    ratio = torch.exp(logp - o)
    pg1, pg2 = -ad * ratio, -ad * torch.clamp(ratio, 1 - clip, 1 + clip)
    pg_loss = torch.max(pg1, pg2).mean()
    vclip = ov + torch.clamp(vpred - ov, -clip_v, clip_v)
    vf_loss = 0.5 * torch.max((vpred - ret) ** 2, (vclip - ret) ** 2).mean()
    entropy = ent.mean()
    loss = pg_loss + vf_coef * vf_loss - ent_coef * entropy
    loss.backward()
    tensors = {f"grad.{n}": p.grad.contiguous() for n, p in model.named_parameters()}
    tensors["grad.v_head.summary.weight"] = vw.grad.contiguous()
    tensors["grad.v_head.summary.bias"] = vb.grad.contiguous()
    tensors["v_head.summary.weight"] = vw.detach().contiguous()
    tensors["v_head.summary.bias"] = vb.detach().contiguous()
    save_file(tensors, folder / "ppo.safetensors")
    rows = lambda xs: [x.tolist() for x in xs]
    meta = {
        "sequences": seqs, "starts": starts, "scores": scores,
        "config": {"kl_coef": kl_coef, "gamma": gamma, "lam": lam, "clip_range": clip,
                   "clip_range_value": clip_v, "vf_coef": vf_coef, "entropy_coef": ent_coef},
        "old_logprobs": rows(old), "ref_logprobs": rows(ref), "old_values": rows(old_v),
        "rewards": rows(rewards), "advantages": rows(white), "returns": rows(returns),
        "values": rows([v for _, _, v in outs]), "entropy_rows": rows([e for _, e, _ in outs]),
        "loss": loss.item(), "policy_loss": pg_loss.item(), "value_loss": vf_loss.item(),
        "entropy": entropy.item(),
        "clip_fraction": (pg2 > pg1).float().mean().item(),
        "approx_kl": (0.5 * ((logp - o) ** 2).mean()).item(),
    }
    (folder / "ppo.json").write_text(json.dumps(meta) + "\n")


def grpo(folder: Path, sequences) -> None:
    """GRPO (TRL's formulas): 2 prompts × 2 completions, group-normalised advantages, clipped
    ratio, k3 KL (β = 0.04). Losses for every loss_type; gradients for grpo and dr_grpo.
    Writes grpo.json and grpo.safetensors."""
    a, b = sequences
    seqs, starts = [a, a[:9], b[:12], b[:8]], [3, 3, 5, 5]
    rewards, k, beta, eps, max_len = [1.0, 0.0, 0.5, 2.0], 2, 0.04, 0.2, 16
    r = torch.tensor(rewards).view(-1, k)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)
    gen = torch.Generator().manual_seed(9)
    meta = {"sequences": seqs, "starts": starts, "rewards": rewards, "group_size": k,
            "beta": beta, "epsilon": eps, "max_completion_length": max_len,
            "advantages": adv.tolist(), "loss": {}}
    tensors = {}
    keep = ["lm_head.weight", "model.layers.1.self_attn.v_proj.weight", "model.embed_tokens.weight"]
    for loss_type in ["grpo", "bnpo", "dr_grpo", "dapo"]:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        logps = [selected_outputs(model, s, st)[0] for s, st in zip(seqs, starts)]
        if "old_logprobs" not in meta:
            with torch.no_grad():
                meta["old_logprobs"] = [(l + 0.3 * torch.randn(l.shape, generator=gen)).tolist() for l in logps]
                meta["ref_logprobs"] = [(l + 0.2 * torch.randn(l.shape, generator=gen)).tolist() for l in logps]
        per_seq = []
        for i, lp in enumerate(logps):
            old, ref = torch.tensor(meta["old_logprobs"][i]), torch.tensor(meta["ref_logprobs"][i])
            coef1 = torch.exp(lp - old)
            coef2 = torch.clamp(coef1, 1 - eps, 1 + eps)
            tok = -torch.min(coef1 * adv[i], coef2 * adv[i])
            tok = tok + beta * (torch.exp(ref - lp) - (ref - lp) - 1)
            per_seq.append(tok)
        total = sum(len(t) for t in per_seq)
        if loss_type == "grpo":
            loss = torch.stack([t.mean() for t in per_seq]).mean()
        elif loss_type in ("bnpo", "dapo"):
            loss = torch.cat(per_seq).sum() / total
        else:
            loss = torch.cat(per_seq).sum() / (len(per_seq) * max_len)
        meta["loss"][loss_type] = loss.item()
        if loss_type in ("grpo", "dr_grpo"):
            loss.backward()
            params = dict(model.named_parameters())
            names = params if loss_type == "grpo" else keep
            for n in names:
                tensors[f"{loss_type}.{n}"] = params[n].grad.contiguous()
    save_file(tensors, folder / "grpo.safetensors")
    (folder / "grpo.json").write_text(json.dumps(meta) + "\n")


def lora(folder: Path, sequences, masks) -> None:
    """PEFT LoRA (r 4, alpha 8 on q_proj, v_proj, down_proj) with random A and B: the adapter as
    PEFT saves it (lora/), the SFT loss and adapter gradients, the adapters after one AdamW
    step (lr 1e-2, betas 0.9/0.95, weight decay 0.1, clip 1.0), and the last-row logits of the
    merged model. Writes lora/, lora.json and lora.safetensors."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     lora_dropout=0.0)
    model = get_peft_model(base, cfg).eval()
    gen = torch.Generator().manual_seed(21)
    lora_params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for n, p in lora_params.items():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    model.peft_config["default"].base_model_name_or_path = "llama-f32"
    model.save_pretrained(folder / "lora")
    (folder / "lora" / "README.md").unlink(missing_ok=True)  # PEFT's model-card template
    loss = sft_loss(model, sequences, masks)
    loss.backward()
    strip = lambda n: n.replace(".default", "")
    tensors = {f"grad.{strip(n)}": p.grad.clone() for n, p in lora_params.items()}
    torch.nn.utils.clip_grad_norm_(list(lora_params.values()), 1.0)
    opt = torch.optim.AdamW(list(lora_params.values()), lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.1)
    opt.step()
    tensors.update({f"after.{strip(n)}": p.detach().contiguous() for n, p in lora_params.items()})
    merged = model.merge_and_unload().eval()
    with torch.no_grad():
        last = merged(torch.tensor([sequences[0]])).logits[0, -1]
    save_file(tensors, folder / "lora.safetensors")
    meta = {"loss": loss.item(), "merged_logits_last": last.tolist(),
            "notes": "sequences and masks of grads.json; logits after the AdamW step, merged"}
    (folder / "lora.json").write_text(json.dumps(meta) + "\n")


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


def bf16_only() -> None:
    for name in ["gpt2-f32", "llama-f32"]:
        folder = FIXTURES / name
        meta = json.loads((folder / "grads.json").read_text())
        bf16_compute(folder, meta["sequences"], meta["masks"])


if __name__ == "__main__":
    if sys.argv[1:] == ["bf16"]:
        bf16_only()
    else:
        main()
