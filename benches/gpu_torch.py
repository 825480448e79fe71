#!/usr/bin/env python3
"""The PyTorch side of `scripts/gpu-check.sh run`: the same SmolLM2-135M-shaped Llama that
`gpu_bench` (tests/examples/gpu_bench.rs) wrote and timed, run by the machine's own PyTorch,
then a table of rlx ÷ PyTorch throughput ratios (> 1: rlx is faster).

Self-contained (torch only, no transformers, no safetensors package): reads the checkpoint
with a small safetensors parser and runs a plain eager Llama forward (RMSNorm, rotate-half
RoPE, GQA through scaled_dot_product_attention, SwiGLU, tied head) with a preallocated KV
cache. The same four measurements as gpu_bench, timed the same way:

- decode tok/s, batch 1 and 32: (time of 129 greedy tokens − time of 1) per new token,
- prefill tok/s: one 512-token prompt to its first token,
- log-prob tok/s: 8 × 256 tokens → log-softmax gathered at the next token,
- training tok/s (f32 only): one SFT step on 4 × 256 tokens — forward without a cache, mean
  cross-entropy over every next token, backward, clip_grad_norm_(1.0), torch.optim.AdamW
  (lr 1e-5, no weight decay, as gpu_bench's Trainer) — the best of 3 after a warm-up step;
  the first step's loss is compared with rlx's.

In f32 (TF32 off: rlx's products are full f32) and, for context, bf16. It also checks rlx's
logits of one 64-token sequence against this forward (f32).

    python3 benches/gpu_torch.py [OUT]     # OUT: gpu_bench's folder (/tmp/rlx-gpu-bench)
"""

import json
import struct
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def load_safetensors(path: Path) -> dict:
    buf = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", buf[:8])
    header = json.loads(buf[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", (name, info["dtype"])
        start, end = info["data_offsets"]
        t = torch.frombuffer(buf, dtype=torch.float32, count=(end - start) // 4, offset=base + start)
        out[name] = t.reshape(info["shape"]).clone()
    return out


class Llama:
    def __init__(self, folder: Path, dtype, device):
        cfg = json.loads((folder / "config.json").read_text())
        self.c = cfg["hidden_size"]
        self.layers = cfg["num_hidden_layers"]
        self.h = cfg["num_attention_heads"]
        self.hkv = cfg["num_key_value_heads"]
        self.hd = cfg.get("head_dim", self.c // self.h)
        self.eps = cfg["rms_norm_eps"]
        self.vocab = cfg["vocab_size"]
        self.dtype, self.device = dtype, device
        w = load_safetensors(folder / "model.safetensors")
        self.w = {k: v.to(device=device, dtype=dtype) for k, v in w.items()}
        self.head = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])
        half = self.hd // 2
        theta = cfg.get("rope_theta", 10000.0)
        self.inv_freq = 1.0 / (
            theta ** (torch.arange(0, half, dtype=torch.float64, device=device) * 2 / self.hd)
        )

    def norm(self, x, w):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * w.float()).to(self.dtype)

    def rope(self, x, pos):  # x [B, T, H, D], pos [T]
        ang = pos.double()[:, None] * self.inv_freq[None, :]
        cos = ang.cos().to(x.dtype)[None, :, None, :]
        sin = ang.sin().to(x.dtype)[None, :, None, :]
        half = self.hd // 2
        a, b = x[..., :half], x[..., half:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    def cache(self, batch, cap):
        shape = (batch, self.hkv, cap, self.hd)
        return [
            (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(self.layers)
        ]

    def forward(self, ids, start, cache):
        """Hidden states [B, T, C] after the final norm; K/V written at start..start+T."""
        bsz, t = ids.shape
        x = self.w["model.embed_tokens.weight"][ids]
        pos = torch.arange(start, start + t, device=self.device)
        groups = self.h // self.hkv
        for l in range(self.layers):
            p = f"model.layers.{l}."
            h = self.norm(x, self.w[p + "input_layernorm.weight"])
            q = (h @ self.w[p + "self_attn.q_proj.weight"].T).view(bsz, t, self.h, self.hd)
            k = (h @ self.w[p + "self_attn.k_proj.weight"].T).view(bsz, t, self.hkv, self.hd)
            v = (h @ self.w[p + "self_attn.v_proj.weight"].T).view(bsz, t, self.hkv, self.hd)
            q, k = self.rope(q, pos), self.rope(k, pos)
            kc, vc = cache[l]
            kc[:, :, start : start + t] = k.transpose(1, 2)
            vc[:, :, start : start + t] = v.transpose(1, 2)
            keys = kc[:, :, : start + t].repeat_interleave(groups, dim=1)
            vals = vc[:, :, : start + t].repeat_interleave(groups, dim=1)
            att = F.scaled_dot_product_attention(
                q.transpose(1, 2), keys, vals, is_causal=(start == 0 and t > 1)
            )
            att = att.transpose(1, 2).reshape(bsz, t, self.h * self.hd)
            x = x + att @ self.w[p + "self_attn.o_proj.weight"].T
            h = self.norm(x, self.w[p + "post_attention_layernorm.weight"])
            g = h @ self.w[p + "mlp.gate_proj.weight"].T
            u = h @ self.w[p + "mlp.up_proj.weight"].T
            x = x + (F.silu(g) * u) @ self.w[p + "mlp.down_proj.weight"].T
        return self.norm(x, self.w["model.norm.weight"])

    def forward_train(self, ids):
        """Hidden states [B, T, C] after the final norm of whole sequences (no cache), with
        autograd: what a training step differentiates."""
        bsz, t = ids.shape
        x = self.w["model.embed_tokens.weight"][ids]
        pos = torch.arange(t, device=self.device)
        groups = self.h // self.hkv
        for l in range(self.layers):
            p = f"model.layers.{l}."
            h = self.norm(x, self.w[p + "input_layernorm.weight"])
            q = (h @ self.w[p + "self_attn.q_proj.weight"].T).view(bsz, t, self.h, self.hd)
            k = (h @ self.w[p + "self_attn.k_proj.weight"].T).view(bsz, t, self.hkv, self.hd)
            v = (h @ self.w[p + "self_attn.v_proj.weight"].T).view(bsz, t, self.hkv, self.hd)
            q, k = self.rope(q, pos), self.rope(k, pos)
            keys = k.transpose(1, 2).repeat_interleave(groups, dim=1)
            vals = v.transpose(1, 2).repeat_interleave(groups, dim=1)
            att = F.scaled_dot_product_attention(q.transpose(1, 2), keys, vals, is_causal=True)
            att = att.transpose(1, 2).reshape(bsz, t, self.h * self.hd)
            x = x + att @ self.w[p + "self_attn.o_proj.weight"].T
            h = self.norm(x, self.w[p + "post_attention_layernorm.weight"])
            g = h @ self.w[p + "mlp.gate_proj.weight"].T
            u = h @ self.w[p + "mlp.up_proj.weight"].T
            x = x + (F.silu(g) * u) @ self.w[p + "mlp.down_proj.weight"].T
        return self.norm(x, self.w["model.norm.weight"])

    def logits(self, hidden):
        return (hidden @ self.head.T).float()

    def generate(self, prompts, new):
        """Greedy; the tokens stay on the device (a sync at the end)."""
        bsz, t = prompts.shape
        cache = self.cache(bsz, t + new)
        hidden = self.forward(prompts, 0, cache)
        nxt = self.logits(hidden[:, -1]).argmax(-1)
        out = [nxt]
        for i in range(new - 1):
            hidden = self.forward(nxt[:, None], t + i, cache)
            nxt = self.logits(hidden[:, -1]).argmax(-1)
            out.append(nxt)
        return torch.stack(out, 1)

    def logprobs(self, seqs):
        cache = self.cache(seqs.shape[0], seqs.shape[1])
        hidden = self.forward(seqs, 0, cache)
        lp = torch.log_softmax(self.logits(hidden[:, :-1]), -1)
        return lp.gather(-1, seqs[:, 1:, None])[..., 0]


def best_of(n, f):
    best = float("inf")
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        f()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def token(i, s, vocab):
    return ((i * 2654435761 >> 7) + s * 7919) % vocab


def measure(model):
    vocab, dev = model.vocab, model.device
    new = 128
    res = {}
    with torch.inference_mode():
        for batch in (1, 32):
            prompts = torch.tensor(
                [[token(i, b, vocab) for i in range(16)] for b in range(batch)], device=dev
            )
            model.generate(prompts, 4)
            one = best_of(3, lambda: model.generate(prompts, 1))
            many = best_of(3, lambda: model.generate(prompts, new + 1))
            res[f"decode_b{batch}_tok_s"] = batch * new / max(many - one, 1e-9)
        long = torch.tensor([[token(i, 2, vocab) for i in range(512)]], device=dev)
        model.generate(long, 1)
        res["prefill512_tok_s"] = 512 / best_of(5, lambda: model.generate(long, 1))
        seqs = torch.tensor(
            [[token(i, 10 + s, vocab) for i in range(256)] for s in range(8)], device=dev
        )
        model.logprobs(seqs)
        res["logprobs_8x256_tok_s"] = 2048 / best_of(5, lambda: model.logprobs(seqs))
    return res


def measure_train(folder, tokens):
    """One SFT step as gpu_bench times it: (first step's loss, tokens/s of the best of 3)."""
    dev = torch.device("cuda:0")
    model = Llama(folder, torch.float32, dev)
    params = list(model.w.values())  # the tied head is the embedding: one tensor
    for t in params:
        t.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    seqs = torch.tensor(tokens, device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model.logits(model.forward_train(seqs)[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, model.vocab), seqs[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss

    first = step().item()
    best = best_of(3, step)
    n = seqs.shape[0] * seqs.shape[1]
    return first, n / best


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/rlx-gpu-bench")
    rlx = json.loads((out / "results.json").read_text())
    dev = torch.device("cuda:0")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}")

    f32 = Llama(out / "model", torch.float32, dev)
    with torch.inference_mode():
        ids = torch.tensor([rlx["logits_tokens"]], device=dev)
        want = f32.logits(f32.forward(ids, 0, f32.cache(1, ids.shape[1])))[0].cpu()
        got = torch.frombuffer(bytearray((out / "logits.bin").read_bytes()), dtype=torch.float32)
        got = got.reshape(want.shape)
        diff = (got - want).abs().max().item()
        scale = want.abs().max().item()
        print(
            f"logits of a 64-token sequence, rlx (cuda) vs torch (f32): max |diff| {diff:.3g} "
            f"(max |logit| {scale:.3g}, relative {diff / max(scale, 1e-30):.3g})"
        )
        prompt = torch.tensor([rlx["greedy_prompt"]], device=dev)
        ref = f32.generate(prompt, len(rlx["greedy_tokens"]))[0].tolist()
        same = 0
        while same < len(ref) and ref[same] == rlx["greedy_tokens"][same]:
            same += 1
        print(f"greedy tokens: rlx and torch agree on the first {same} of {len(ref)}")

    t32 = measure(f32)
    del f32
    torch.cuda.empty_cache()
    bf16 = measure(Llama(out / "model", torch.bfloat16, dev))
    torch.cuda.empty_cache()
    train_row = None
    if "train_sft_4x256_tok_s" in rlx:
        loss, t32["train_sft_4x256_tok_s"] = measure_train(out / "model", rlx["train_tokens"])
        print(
            f"SFT step 4 × 256, first loss: rlx {rlx['train_first_loss']:.6f}, torch {loss:.6f} "
            f"(|diff| {abs(rlx['train_first_loss'] - loss):.3g})"
        )
        train_row = ("SFT step, 4 × 256", "train_sft_4x256_tok_s")

    rows = [
        ("decode, batch 1", "decode_b1_tok_s"),
        ("decode, batch 32", "decode_b32_tok_s"),
        ("prefill, 512 tokens", "prefill512_tok_s"),
        ("log-probs, 8 × 256", "logprobs_8x256_tok_s"),
    ]
    print()
    print(
        f"{'tokens/s':<22}{'rlx f32':>10}{'torch f32':>11}{'ratio':>7}"
        f"{'rlx bf16':>10}{'torch bf16':>12}{'ratio':>7}"
    )
    for label, key in rows:
        r, a = rlx[key], t32[key]
        rb, b = rlx.get("bf16_" + key), bf16[key]
        bf = f"{rb:>10.0f}{b:>12.0f}{rb / b:>7.2f}" if rb else f"{'-':>10}{b:>12.0f}{'-':>7}"
        print(f"{label:<22}{r:>10.0f}{a:>11.0f}{r / a:>7.2f}{bf}")
    if train_row:
        label, key = train_row
        r, a = rlx[key], t32[key]
        print(f"{label:<22}{r:>10.0f}{a:>11.0f}{r / a:>7.2f}{'-':>10}{'-':>12}{'-':>7}")
        print("training: gradients, clipping and AdamW on the GPU in both; rlx also copies the")
        print("  new weights to the host after each step")
    print("ratio = rlx ÷ torch (> 1: rlx is faster); rlx bf16 = bf16 matrices and KV cache, f32 sums")


if __name__ == "__main__":
    main()
