#!/usr/bin/env python3
"""Reference outputs of a GGUF model computed by transformers (which dequantizes GGUF itself).

    python3 tests/gguf_reference.py models/SmolLM2-135M-Instruct.Q4_1.gguf tests/fixtures/smollm2-reference

Writes OUT/reference.json, OUT/reference.safetensors (per case: the last position's full logits
`logits_last_{i}`, and every position's log-prob) and OUT/tokenizer_cases.json. Small enough to
commit, so the parity test runs wherever the model is fetched, without torch. Needs torch,
transformers, gguf and accelerate.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

GREEDY_NEW_TOKENS = 16
TEMPERATURE = 0.7

# Fixed token ids (below the vocabulary size; the first starts with <|im_start|> = 1).
CASES = [
    [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198],
    [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30],
    [28, 30, 33, 30, 34, 30, 35, 30, 36, 30, 37, 30, 38],
]


# Texts for tokenizer parity: unicode, whitespace runs, digits, code, emoji, special tokens.
TEXTS = [
    "What is the capital of France?",
    "  leading spaces, trailing spaces   ",
    "Numbers: 12345, 3.14159, 1,000,000 and 2026-11-29.",
    "def f(x):\n\treturn x ** 2  # square\n\n\nprint(f(12))",
    "Unicode: café naïve Straße 東京 Москва Ελληνικά 🤖😀👍🏽",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "Tabs\tand\nnewlines\r\n and    multiple     spaces",
    "email@example.com https://example.org/path?q=1&r=2 #hashtag @user",
    "",
]


CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Add 17 and 25."},
        {"role": "assistant", "content": "42"},
        {"role": "user", "content": "Now double it. 🙂"},
    ],
]


def tokenizer_cases(gguf: Path, out: Path) -> None:
    """Ids from transformers' GGUF tokenizer with the digit split that its conversion drops."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    backend = tok.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), backend.pre_tokenizer]
    )
    cases = [{"text": t, "ids": backend.encode(t, add_special_tokens=True).ids} for t in TEXTS]
    (out / "tokenizer_cases.json").write_text(json.dumps(cases, indent=1, ensure_ascii=False) + "\n")
    chats = []
    for messages in CHATS:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = backend.encode(text, add_special_tokens=False).ids
        chats.append({"messages": messages, "text": text, "ids": ids})
    (out / "chat_cases.json").write_text(json.dumps(chats, indent=1, ensure_ascii=False) + "\n")


def main() -> None:
    gguf, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_cases(gguf, out)
    if (out / "reference.json").is_file():
        return
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    tensors, cases = {}, []
    with torch.no_grad():
        for i, ids in enumerate(CASES):
            x = torch.tensor([ids])
            logits = model(x).logits[0].float()
            target = x[0, 1:]
            lp = torch.log_softmax(logits, -1)[:-1].gather(1, target[:, None])[:, 0]
            lp_t = torch.log_softmax(logits / TEMPERATURE, -1)[:-1].gather(1, target[:, None])[:, 0]
            tensors[f"logits_last_{i}"] = logits[-1].contiguous()
            tensors[f"logprobs_{i}"] = lp.contiguous()
            tensors[f"logprobs_t07_{i}"] = lp_t.contiguous()
            gen = model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=GREEDY_NEW_TOKENS,
                min_new_tokens=GREEDY_NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=2,
            )
            cases.append(
                {"input_ids": ids, "greedy_prompt": ids, "greedy_new_tokens": gen[0, len(ids):].tolist()}
            )
    save_file(tensors, out / "reference.safetensors")
    meta = {"cases": cases, "temperature_case": TEMPERATURE, "source": gguf.name}
    (out / "reference.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
