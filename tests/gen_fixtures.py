#!/usr/bin/env python3
"""Writes the tiny random test models and their transformers reference outputs.

    python3 tests/gen_fixtures.py        # from the repository root; rewrites tests/fixtures/

Deterministic (fixed seeds). Needs torch, transformers, tokenizers and safetensors; nothing is
downloaded. Every parameter is randomized (transformers would zero the biases and set the norm
weights to one, which would hide mistakes in those paths).
"""

import copy
import json
import shutil
from pathlib import Path

import torch
import tokenizers
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

OUT = Path(__file__).resolve().parent / "fixtures"
VOCAB = 384
TEMPERATURE = 0.7
GREEDY_NEW_TOKENS = 12

CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with one step.
In 1969, 3 astronauts flew 384,400 km to the Moon; the trip took about 76 hours.
def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, 2 * i))
Reinforcement learning from human feedback trains a reward model on ranked pairs, then
optimizes a policy with PPO while a KL penalty keeps it close to the reference model.
Paris is the capital of France. Berlin is the capital of Germany. Rome is the capital of Italy.
Unicode: café, naïve, Straße, 東京, Москва, 😀 emoji, tabs\tand   spaces.
{"prompt": "What is 2+2?", "response": "4"} <html><body>Hello, world!</body></html>
"""


def train_tokenizer(special: list, bos: str | None) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    tok = train_tokenizer(["<|endoftext|>"], None)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )


def llama_tokenizer() -> PreTrainedTokenizerFast:
    tok = train_tokenizer(["<unk>", "<s>", "</s>"], "<s>")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Every weight and bias ~ N(0, 0.2²); norm weights 1 + 0.1·N(0, 1), norm biases N(0, 0.1²)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm = ("ln_" in name or "norm" in name) and p.dim() == 1
            if is_norm and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif is_norm:
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.2 * noise)


def cases(tokenizer: PreTrainedTokenizerFast, vocab: int) -> tuple[list, str, list]:
    gen = torch.Generator().manual_seed(7)
    text = "Paris is the capital of France. 12345 😀"
    tokenized = tokenizer(text)["input_ids"]
    inputs = [
        torch.randint(0, vocab, (1,), generator=gen).tolist(),
        torch.randint(0, vocab, (7,), generator=gen).tolist(),
        tokenized[:23],
    ]
    prompts = [inputs[0], inputs[1][:5], tokenized[:5]]
    return list(zip(inputs, prompts)), text, tokenized


def write_reference(model, folder: Path, tokenizer, tag_dtype: torch.dtype | None) -> None:
    """Reference outputs of the saved weights, computed in f32 (half weights upcast)."""
    ref_model = type(model).from_pretrained(folder, dtype=torch.float32).eval()
    vocab = ref_model.config.vocab_size
    pairs, text, tokenized = cases(tokenizer, vocab)
    tensors, meta_cases = {}, []
    with torch.no_grad():
        for i, (ids, prompt) in enumerate(pairs):
            x = torch.tensor([ids])
            logits = ref_model(x).logits[0].float()
            lp = torch.log_softmax(logits, dim=-1)
            lp_t = torch.log_softmax(logits / TEMPERATURE, dim=-1)
            target = x[0, 1:]
            tensors[f"logits_{i}"] = logits.contiguous()
            tensors[f"logprobs_{i}"] = lp[:-1].gather(1, target[:, None])[:, 0].contiguous()
            tensors[f"logprobs_t07_{i}"] = lp_t[:-1].gather(1, target[:, None])[:, 0].contiguous()
            p = torch.tensor([prompt])
            out = ref_model.generate(
                p,
                attention_mask=torch.ones_like(p),
                max_new_tokens=GREEDY_NEW_TOKENS,
                min_new_tokens=GREEDY_NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            meta_cases.append(
                {
                    "input_ids": ids,
                    "greedy_prompt": prompt,
                    "greedy_new_tokens": out[0, len(prompt):].tolist(),
                }
            )
    save_file(tensors, folder / "reference.safetensors")
    meta = {
        "cases": meta_cases,
        "temperature_case": TEMPERATURE,
        "tokenized_text": text,
        "tokenized_ids": tokenized,
        "notes": (
            "logits/log-probs from transformers in float32"
            + (f" on {tag_dtype} weights upcast to float32" if tag_dtype else "")
            + f"; greedy: exactly {GREEDY_NEW_TOKENS} new tokens (EOS disabled)."
        ),
    }
    (folder / "reference.json").write_text(json.dumps(meta, indent=1) + "\n")


def save(model, tokenizer, name: str, dtype=torch.float32, **kwargs) -> None:
    folder = OUT / name
    folder.mkdir(parents=True)
    # A copy, so that saving in half precision does not round the model used for later folders.
    copy.deepcopy(model).to(dtype).save_pretrained(folder, safe_serialization=True, **kwargs)
    tokenizer.save_pretrained(folder)
    write_reference(model, folder, tokenizer, None if dtype == torch.float32 else dtype)


def gpt2() -> None:
    tok = gpt2_tokenizer()
    cfg = GPT2Config(
        vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=128,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval()
    randomize_(model, 1)
    save(model, tok, "gpt2-f32")
    save(model, tok, "gpt2-bf16", torch.bfloat16)


def llama() -> None:
    tok = llama_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    randomize_(model, 2)
    save(model, tok, "llama-f32")
    save(model, tok, "llama-bf16", torch.bfloat16)
    save(model, tok, "llama-f16", torch.float16)
    save(model, tok, "llama-sharded", max_shard_size="100KB")


def qwen2() -> None:
    tok = llama_tokenizer()
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_theta=1000000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    randomize_(model, 3)
    save(model, tok, "qwen2-f32")


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    gpt2()
    llama()
    qwen2()
    manifest = {
        "folders": sorted(p.name for p in OUT.iterdir() if p.is_dir()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main()
