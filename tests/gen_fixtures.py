#!/usr/bin/env python3
"""Writes the tiny random test models of tests/fixtures/ and their transformers reference outputs.

    python3 tests/gen_fixtures.py        # from the repository root; rewrites tests/fixtures/

Deterministic (fixed seeds, CPU, float32). Needs torch, transformers, tokenizers and safetensors;
nothing is downloaded. Every parameter is randomized: transformers would zero the biases and set
the norm weights to one, which would hide mistakes in those code paths. At the end every folder is
reloaded with AutoModelForCausalLM / AutoTokenizer and checked against what was written.
"""

import copy
import json
import shutil
from pathlib import Path

import safetensors
import tokenizers
import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
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
NEW_TOKENS = 12
CASE_LENGTHS = (1, 7, 23)
LOGIT_TOLERANCE = 1e-4  # what the Rust engine must meet on f32 logits (see README.md)

# Training text for the two BPE tokenizers: prose, code, digits, JSON/HTML, whitespace runs, unicode.
CORPUS = """\
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
A journey of a thousand miles begins with a single step, and the second step is usually harder.
Paris is the capital of France. Berlin is the capital of Germany. Rome is the capital of Italy.
Madrid is the capital of Spain, Lisbon of Portugal, Vienna of Austria and Warsaw of Poland.
The answer is forty-two. The answer is 42. What is the question? Nobody remembers the question.
Once upon a time there was a small robot who wanted to learn how to write poems about the sea.
It read every book in the library, counted the words, and wrote: "The sea is wide, the sea is deep."
In 1969, 3 astronauts flew about 384,400 km to the Moon; the trip took roughly 76 hours.
Prices: $19.99, $5, 3.14159, 2.71828, 1e-5, 0x1F, -273.15 C, 100%, 7/8, 12:45 pm, 2024-06-01.
Phone 555-0134 or write to 221B Baker Street, London NW1 6XE. Order #48213 shipped on 03/11.
Reinforcement learning from human feedback trains a reward model on ranked pairs of answers,
then optimizes a policy with PPO while a KL penalty keeps it close to the reference model.
A language model assigns a probability to every next token; sampling at temperature 0.7 sharpens
the distribution, and greedy decoding always picks the most likely token.

def add(a, b):
    return a + b


for i in range(10):
    print(add(i, 2 * i))  # prints 0, 3, 6, ...

class Counter:
    def __init__(self):
        self.counts = {}

    def update(self, words):
        for w in words:
            self.counts[w] = self.counts.get(w, 0) + 1

fn main() {
    let xs: Vec<u32> = (0..16).map(|x| x * x).collect();
    println!("{:?} sum={}", xs, xs.iter().sum::<u32>());
}

int main(void) { for (int i = 0; i < 8; ++i) printf("%d\\n", i << 1); return 0; }
SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name ORDER BY 2 DESC LIMIT 10;
{"prompt": "What is 2+2?", "response": "4", "score": 0.93, "tags": ["math", "easy"]}
<html><body><h1>Hello, world!</h1><p class="note">Tiny models, big tests.</p></body></html>
tabs\tand\ttabs,   runs   of   spaces,\r\nwindows line endings and trailing spaces   
Unicode: café, naïve, façade, Straße, smörgåsbord, jalapeño, Ångström, œuvre, ŁÓDŹ.
Greek αβγδε λόγος, Cyrillic Москва и Санкт-Петербург, Hebrew שלום, Arabic مرحبا.
CJK 東京 北京 서울 こんにちは 你好世界, math ∑ ∫ √2 ≈ 1.414, ≤ ≥ ≠ ∞, arrows → ← ↔.
Emoji 😀 🚀 🎉 👍🏽 ❤️ 🇫🇷, symbols © ® ™ € £ ¥ § ¶ • … — – « » „ “ ” ‘ ’.
"""

# Case 2 of every reference is this text, tokenized by transformers with add_special_tokens=True.
TOKENIZED_TEXT = "Paris is the capital of France. In 2024, 12345 robots said: naïve café 😀 東京!\n  def f(x): return x"


# ---------------------------------------------------------------------------------------------
# Tokenizers


def train_bpe(special_tokens: list[str], bos: str | None) -> Tokenizer:
    """Byte-level BPE with VOCAB entries; the special tokens take the first ids, in order."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    if bos is None:
        # What GPT-2's own tokenizer.json has: touches offsets only, never adds ids.
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    return tok


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    tok = train_bpe(["<|endoftext|>"], bos=None)
    assert tok.token_to_id("<|endoftext|>") == 0
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )


def llama_tokenizer() -> PreTrainedTokenizerFast:
    tok = train_bpe(["<unk>", "<s>", "</s>"], bos="<s>")
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


# ---------------------------------------------------------------------------------------------
# Models and references


def is_norm(name: str, p: torch.Tensor) -> bool:
    return p.dim() == 1 and ("norm" in name or "ln_" in name)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights and biases ~ N(0, 0.2²); norm weights 1 + 0.1·N(0, 1); norm biases ~ N(0, 0.1²).

    named_parameters() lists a tied head once, so it gets the embedding's values."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, dtype=torch.float32)
            if is_norm(name, p):
                p.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                p.copy_(0.2 * noise)
    model.eval()


def make_cases(tok: PreTrainedTokenizerFast, vocab: int) -> list[dict]:
    """Lengths 1 and 7: fixed random ids; length 23: TOKENIZED_TEXT via the tokenizer (+BOS)."""
    gen = torch.Generator().manual_seed(7)
    tokenized = tok(TOKENIZED_TEXT, add_special_tokens=True)["input_ids"]
    assert len(tokenized) >= CASE_LENGTHS[2], len(tokenized)
    inputs = [
        torch.randint(0, vocab, (CASE_LENGTHS[0],), generator=gen).tolist(),
        torch.randint(0, vocab, (CASE_LENGTHS[1],), generator=gen).tolist(),
        tokenized[: CASE_LENGTHS[2]],
    ]
    # Greedy prompts: one single-token prompt (the edge case), then two 5-token ones.
    return [{"input_ids": ids, "greedy_prompt": ids[:5]} for ids in inputs]


def greedy(model, prompt: list[int]) -> list[int]:
    p = torch.tensor([prompt])
    out = model.generate(
        p,
        attention_mask=torch.ones_like(p),
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,  # EOS can't end it early (eos_token_id=None alone may not do)
        eos_token_id=None,
        pad_token_id=0,
    )[0, len(prompt):].tolist()
    assert len(out) == NEW_TOKENS
    return out


@torch.no_grad()
def write_reference(model, folder: Path, cases: list[dict], tokenized_ids: list[int], note: str):
    """reference.json + reference.safetensors of `model` (float32) on `cases`."""
    tensors, meta_cases, margins = {}, [], []
    for i, case in enumerate(cases):
        ids = torch.tensor([case["input_ids"]])
        logits = model(ids).logits[0].float()
        target = ids[0, 1:, None]
        for key, scale in ((f"logprobs_{i}", 1.0), (f"logprobs_t07_{i}", 1.0 / TEMPERATURE)):
            lp = torch.log_softmax(logits * scale, dim=-1)
            tensors[key] = lp[:-1].gather(1, target)[:, 0].contiguous()
        tensors[f"logits_{i}"] = logits.contiguous()

        new = greedy(model, case["greedy_prompt"])
        # Greedy must also be the argmax of a full (cache-free) forward pass, by a clear margin,
        # so that an engine within tolerance picks the same tokens.
        full = model(torch.tensor([case["greedy_prompt"] + new])).logits[0]
        steps = full[len(case["greedy_prompt"]) - 1 : -1]
        top2 = steps.topk(2, dim=-1).values
        assert steps.argmax(-1).tolist() == new, (folder.name, i)
        margins.append(float((top2[:, 0] - top2[:, 1]).min()))
        meta_cases.append({**case, "greedy_new_tokens": new})
    assert min(margins) > 10 * LOGIT_TOLERANCE, (folder.name, margins)

    save_file(tensors, folder / "reference.safetensors")
    meta = {
        "cases": meta_cases,
        "temperature_case": TEMPERATURE,
        "tokenized_text": TOKENIZED_TEXT,
        "tokenized_ids": tokenized_ids,
        "notes": (
            f"transformers {transformers.__version__}, float32, eager attention{note}. "
            f"logits_i [T,V]: forward pass over cases[i].input_ids. logprobs_i [T-1]: "
            f"log_softmax(logits[t-1])[ids[t]] for t=1..T-1; logprobs_t07_i: same with "
            f"logits/{TEMPERATURE}. greedy_new_tokens: generate(greedy_prompt, do_sample=False, "
            f"max_new_tokens={NEW_TOKENS}, min_new_tokens={NEW_TOKENS}, eos_token_id=None, "
            f"attention_mask=ones), so exactly {NEW_TOKENS} tokens, EOS never stops it; "
            f"smallest top1-top2 logit gap along the greedy paths: {min(margins):.4f}. "
            f"Case 2 input_ids = tokenized_ids[:{CASE_LENGTHS[2]}], tokenized_ids = "
            f"tokenizer(tokenized_text, add_special_tokens=True)."
        ),
    }
    (folder / "reference.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")


def save_folder(model, tok, name: str, dtype=torch.float32, **save_kwargs) -> None:
    """Saves `model` in `dtype` plus tokenizer into fixtures/<name>, with references computed in
    float32 from the saved (rounded, then upcast) weights."""
    folder = OUT / name
    folder.mkdir(parents=True)
    # Copies, so that later folders still get the f32 original.
    copy.deepcopy(model).to(dtype).save_pretrained(folder, safe_serialization=True, **save_kwargs)
    tok.save_pretrained(folder)

    # Round the parameters only: model.to(dtype) would also round float buffers such as RoPE's
    # inv_freq, which a loader recomputes in float32 from the config.
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(dtype).to(torch.float32))
    ref.set_attn_implementation("eager")
    note = "" if dtype == torch.float32 else f", on the saved {dtype} weights upcast to float32"
    tokenized_ids = tok(TOKENIZED_TEXT, add_special_tokens=True)["input_ids"]
    write_reference(ref, folder, make_cases(tok, model.config.vocab_size), tokenized_ids, note)


def gpt2() -> None:
    tok = gpt2_tokenizer()
    cfg = GPT2Config(
        vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=128,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, bos_token_id=0, eos_token_id=0,
    )
    model = GPT2LMHeadModel(cfg)  # tied head (default)
    randomize_(model, seed=1)
    save_folder(model, tok, "gpt2-f32")
    save_folder(model, tok, "gpt2-bf16", torch.bfloat16)


def llama() -> None:
    tok = llama_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg)
    randomize_(model, seed=2)
    save_folder(model, tok, "llama-f32")
    save_folder(model, tok, "llama-bf16", torch.bfloat16)
    save_folder(model, tok, "llama-f16", torch.float16)
    save_folder(model, tok, "llama-sharded", max_shard_size="250KB")


def qwen2() -> None:
    tok = llama_tokenizer()
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_theta=1000000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )
    model = Qwen2ForCausalLM(cfg)  # q/k/v projections have biases
    randomize_(model, seed=3)
    save_folder(model, tok, "qwen2-f32")


# ---------------------------------------------------------------------------------------------
# Self-check: what a user of transformers gets back from each folder


@torch.no_grad()
def check(folder: Path) -> str:
    meta = json.loads((folder / "reference.json").read_text())
    text, want = meta["tokenized_text"], meta["tokenized_ids"]
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))  # what the Rust engine reads
    assert raw.get_vocab_size() == VOCAB and raw.encode(text).ids == want, folder.name
    # transformers 5 maps model_type qwen2 to its own Qwen2Tokenizer whatever tokenizer_config
    # says; it keeps vocab and merges but swaps in Qwen2's pre-tokenizer regex (one digit per
    # token) and adds <|endoftext|> (id 384). Real Qwen2 tokenizer.json files have that regex.
    auto = AutoTokenizer.from_pretrained(folder)
    auto_note = "" if auto(text)["input_ids"] == want else f"; {type(auto).__name__} ids differ"
    assert not auto_note or folder.name.startswith("qwen2"), folder.name
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # sdpa
    for name, p in model.named_parameters():
        assert p.std() > 0.05, name  # nothing left at transformers' constant init
    ref = load_file(folder / "reference.safetensors")
    worst = 0.0
    for i, case in enumerate(meta["cases"]):
        logits = model(torch.tensor([case["input_ids"]])).logits[0]
        worst = max(worst, float((logits - ref[f"logits_{i}"]).abs().max()))
        assert greedy(model, case["greedy_prompt"]) == case["greedy_new_tokens"], (folder, i)
    assert worst <= 1e-5, (folder.name, worst)
    return f"reload max |Δlogits| = {worst:.1e}{auto_note}"


def main() -> None:
    transformers.utils.logging.disable_progress_bar()
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    gpt2()
    llama()
    qwen2()

    folders = sorted(p.name for p in OUT.iterdir() if p.is_dir())
    for name in folders:
        print(f"{name}: {check(OUT / name)}")
    assert len(list((OUT / "llama-sharded").glob("model-*-of-*.safetensors"))) >= 2

    manifest = {
        "generator": "tests/gen_fixtures.py",
        "folders": folders,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "safetensors": safetensors.__version__,
        },
    }
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    (OUT / "README.md").write_text(README)
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")
    assert total < 5e6


README = f"""\
# Test fixtures

Written by `python3 tests/gen_fixtures.py` (run from the repository root; deterministic; rewrites
this folder). Tiny transformers models with every parameter random (weights and biases
N(0, 0.2²), norm weights 1 + 0.1·N(0, 1), norm biases N(0, 0.1²)) and two byte-level BPE
tokenizers of {VOCAB} tokens trained on a text embedded in the script. `manifest.json` has the
library versions used.

| folder | model |
|---|---|
| `gpt2-f32` | GPT2LMHeadModel, 64 wide, 2 layers, 4 heads, 128 positions, gelu_new, tied head; gpt2-style tokenizer (`<|endoftext|>` = 0, no BOS added) |
| `gpt2-bf16` | the same GPT-2, weights stored in bfloat16 |
| `llama-f32` | LlamaForCausalLM, 64 wide, MLP 128, 3 layers, 4 heads / 2 KV heads (GQA), rope_theta 1e4, untied head; llama-style tokenizer (`<unk>` 0, `<s>` 1 prepended, `</s>` 2) |
| `llama-bf16`, `llama-f16` | the same Llama, weights stored in bfloat16 / float16 |
| `llama-sharded` | the same f32 Llama in several shards with `model.safetensors.index.json` |
| `qwen2-f32` | Qwen2ForCausalLM, 64 wide, MLP 128, 2 layers, 4 / 2 KV heads, q/k/v biases, rope_theta 1e6, tied head; llama-style tokenizer |

Every folder holds what `save_pretrained` writes (config.json as transformers
{transformers.__version__} writes it, e.g. `rope_parameters`; not edited by hand) plus:

- `reference.json`: 3 cases (`input_ids` of lengths {", ".join(map(str, CASE_LENGTHS))}; the last
  is `tokenized_text` tokenized with special tokens), each with `greedy_prompt` and the
  {NEW_TOKENS} `greedy_new_tokens` transformers generates from it (EOS disabled);
  `temperature_case` = {TEMPERATURE}; `tokenized_ids` for tokenizer tests.
- `reference.safetensors`: per case i, `logits_i` [T, V], `logprobs_i` [T-1] (log-prob of each
  next input id) and `logprobs_t07_i` (same at temperature {TEMPERATURE}), all float32.

References are computed in float32; for the bf16/f16 folders, from the stored half-precision
weights upcast to float32 (what the engine does). Tolerances: f32 logits max |Δ| ≤
{LOGIT_TOLERANCE:g}; log-probs likewise; greedy tokens must match exactly.

`tokenized_ids` follow `tokenizer.json`. Note: transformers 5's AutoTokenizer loads
`qwen2-f32` as Qwen2Tokenizer, which replaces the pre-tokenizer with Qwen2's regex (digits split
one by one) and adds `<|endoftext|>`, so its ids differ there; the other folders agree.
"""


if __name__ == "__main__":
    main()
