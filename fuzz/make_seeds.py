#!/usr/bin/env python3
"""Writes the committed seed corpus of the fuzz targets: fuzz/corpus/<target>/seed-*.

Run from anywhere: `python3 fuzz/make_seeds.py`. Deterministic; standard library only. Seeds are
small valid inputs built from the test fixtures (tests/fixtures/), so the fuzzer starts from
files that get through every parser and mutates from there. Multi-part inputs use the
separators of fuzz/src/lib.rs: a NUL byte between text parts, b"\\n--8<--\\n" between binary
parts.
"""

import json
import random
import shutil
import struct
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
ROOT = FUZZ.parent
FIX = ROOT / "tests" / "fixtures"
CORPUS = FUZZ / "corpus"
TEXT_SEP = b"\0"
BINARY_SEP = b"\n--8<--\n"

rng = random.Random(1234)


def out(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / f"seed-{name}").write_bytes(data)


def values(n):
    return [rng.uniform(-0.5, 0.5) for _ in range(n)]


# ---------------------------------------------------------------- GGUF

F32, F16, Q4_0, Q8_0, BF16 = 0, 1, 2, 8, 30
T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_F32, T_BOOL, T_STR, T_ARR, T_U64, T_I64, T_F64 = range(13)
SCALAR = {T_U8: "<B", T_I8: "<b", T_U16: "<H", T_I16: "<h", T_U32: "<I", T_I32: "<i",
          T_F32: "<f", T_BOOL: "<?", T_U64: "<Q", T_I64: "<q", T_F64: "<d"}


def gstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gvalue(ty, v):
    if ty == T_STR:
        return gstr(v)
    if ty == T_ARR:
        item_ty, items = v
        return struct.pack("<IQ", item_ty, len(items)) + b"".join(gvalue(item_ty, x) for x in items)
    return struct.pack(SCALAR[ty], v)


def f16_bytes(x):
    return struct.pack("<e", x)


def encode(ty, vals, row):
    """Tensor data of `vals` (rows of `row` values) in ggml type `ty`."""
    if ty == F32:
        return struct.pack(f"<{len(vals)}f", *vals)
    if ty == F16:
        return struct.pack(f"<{len(vals)}e", *vals)
    if ty == BF16:
        return b"".join(struct.pack("<f", v)[2:] for v in vals)
    assert row % 32 == 0
    data = b""
    for i in range(0, len(vals), 32):
        block = vals[i:i + 32]
        amax = max(abs(v) for v in block) or 1.0
        if ty == Q8_0:
            d = amax / 127
            data += f16_bytes(d) + bytes((round(v / d) & 0xFF) for v in block)
        elif ty == Q4_0:
            d = -amax / 8
            q = [min(15, max(0, int(v / d + 8.5))) for v in block]
            data += f16_bytes(d) + bytes(q[j] | (q[j + 16] << 4) for j in range(16))
    return data


def gguf(kv, tensors, alignment=32):
    """kv: [(key, type, value)]; tensors: [(name, hf_shape, ggml_type, values)]."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    for key, ty, v in kv:
        head += gstr(key) + struct.pack("<I", ty) + gvalue(ty, v)
    blobs, offset = [], 0
    for name, shape, ty, vals in tensors:
        dims = list(reversed(shape))
        head += gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        head += struct.pack("<IQ", ty, offset)
        data = encode(ty, vals, dims[0])
        blobs.append((offset, data))
        offset = (offset + len(data) + alignment - 1) // alignment * alignment
    start = (len(head) + alignment - 1) // alignment * alignment
    body = bytearray(head.ljust(start, b"\0"))
    for off, data in blobs:
        body = body.ljust(start + off, b"\0")
        body += data
    return bytes(body)


def gpt2_tokenizer_kv(bos_eos=0):
    tok = json.loads((FIX / "gpt2-f32" / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    special = {a["id"] for a in tok["added_tokens"]}
    types = [3 if i in special else 1 for i in range(len(tokens))]
    merges = [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]
    return tokens, [
        ("tokenizer.ggml.model", T_STR, "gpt2"),
        ("tokenizer.ggml.pre", T_STR, "smollm"),
        ("tokenizer.ggml.tokens", T_ARR, (T_STR, tokens)),
        ("tokenizer.ggml.token_type", T_ARR, (T_I32, types)),
        ("tokenizer.ggml.merges", T_ARR, (T_STR, merges)),
        ("tokenizer.ggml.bos_token_id", T_U32, bos_eos),
        ("tokenizer.ggml.eos_token_id", T_U32, bos_eos),
        ("tokenizer.ggml.add_bos_token", T_BOOL, True),
    ]


SMOLLM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def llama_gguf(c, vocab, ty_matrix=F32, ty_embd=F32, extra_kv=(), tied=True, bias=False):
    kv = [
        ("general.architecture", T_STR, "llama"),
        ("llama.context_length", T_U32, c["ctx"]),
        ("llama.embedding_length", T_U32, c["hidden"]),
        ("llama.block_count", T_U32, c["layers"]),
        ("llama.feed_forward_length", T_U32, c["ff"]),
        ("llama.attention.head_count", T_U32, c["heads"]),
        ("llama.attention.head_count_kv", T_U32, c["kv"]),
        ("llama.attention.layer_norm_rms_epsilon", T_F32, 1e-5),
        ("llama.rope.freq_base", T_F32, 10000.0),
        ("llama.vocab_size", T_U32, vocab),
    ] + list(extra_kv)
    h, hd = c["hidden"], c["hidden"] // c["heads"]
    qd, kvd = c["heads"] * hd, c["kv"] * hd
    t = [("token_embd.weight", [vocab, h], ty_embd, values(vocab * h)),
         ("output_norm.weight", [h], F32, values(h))]
    if not tied:
        t.append(("output.weight", [vocab, h], ty_matrix, values(vocab * h)))
    for l in range(c["layers"]):
        p = f"blk.{l}."
        for name, shape in [("attn_q", [qd, h]), ("attn_k", [kvd, h]), ("attn_v", [kvd, h]),
                            ("attn_output", [h, qd]), ("ffn_gate", [c["ff"], h]),
                            ("ffn_up", [c["ff"], h]), ("ffn_down", [h, c["ff"]])]:
            t.append((p + name + ".weight", shape, ty_matrix, values(shape[0] * shape[1])))
            if bias and name in ("attn_q", "attn_k", "attn_v"):
                t.append((p + name + ".bias", [shape[0]], F32, values(shape[0])))
        t.append((p + "attn_norm.weight", [h], F32, values(h)))
        t.append((p + "ffn_norm.weight", [h], F32, values(h)))
    return gguf(kv, t)


def gguf_seeds():
    shutil.copy(FIX / "quant" / "quants.gguf", CORPUS / "gguf" / "seed-quants.gguf")
    tokens, tok_kv = gpt2_tokenizer_kv()
    small = dict(ctx=64, hidden=8, layers=1, ff=16, heads=2, kv=1)
    out("gguf", "llama-tokenizer.gguf", llama_gguf(
        small, len(tokens), extra_kv=tok_kv + [("tokenizer.chat_template", T_STR, SMOLLM_TEMPLATE)]))
    q = dict(ctx=32, hidden=32, layers=1, ff=32, heads=4, kv=2)
    out("gguf", "llama-q8_0.gguf", llama_gguf(q, 48, ty_matrix=Q8_0, ty_embd=Q8_0, tied=False))
    out("gguf", "llama-q4_0-bias.gguf", llama_gguf(q, 40, ty_matrix=Q4_0, ty_embd=F16, bias=True,
        extra_kv=[("llama.rope.scaling.type", T_STR, "linear"),
                  ("llama.rope.scaling.factor", T_F32, 2.0),
                  ("llama.rope.dimension_count", T_U32, 8)]))
    # GPT-2 as llama.cpp writes it, half-precision matrices.
    h, ff, v, n = 8, 32, 16, 16
    kv = [("general.architecture", T_STR, "gpt2"), ("gpt2.context_length", T_U32, n),
          ("gpt2.embedding_length", T_U32, h), ("gpt2.block_count", T_U32, 1),
          ("gpt2.feed_forward_length", T_U32, ff), ("gpt2.attention.head_count", T_U32, 2),
          ("gpt2.attention.layer_norm_epsilon", T_F32, 1e-5), ("gpt2.vocab_size", T_U32, v),
          ("tokenizer.ggml.eos_token_id", T_U32, 0), ("general.alignment", T_U32, 64)]
    t = [("token_embd.weight", [v, h], F32, values(v * h)),
         ("position_embd.weight", [n, h], F32, values(n * h)),
         ("output_norm.weight", [h], F32, values(h)), ("output_norm.bias", [h], F32, values(h))]
    for name, shape, ty in [("attn_qkv", [3 * h, h], F16), ("attn_output", [h, h], BF16),
                            ("ffn_up", [ff, h], F16), ("ffn_down", [h, ff], F32)]:
        t.append((f"blk.0.{name}.weight", shape, ty, values(shape[0] * shape[1])))
        t.append((f"blk.0.{name}.bias", [shape[0]], F32, values(shape[0])))
    for name in ("attn_norm", "ffn_norm"):
        t.append((f"blk.0.{name}.weight", [h], F32, values(h)))
        t.append((f"blk.0.{name}.bias", [h], F32, values(h)))
    out("gguf", "gpt2-f16.gguf", gguf(kv, t, alignment=64))
    # Every metadata value type, nested arrays, no tensors.
    kv = [("a.u8", T_U8, 7), ("a.i8", T_I8, -7), ("a.u16", T_U16, 700), ("a.i16", T_I16, -700),
          ("a.u32", T_U32, 70000), ("a.i32", T_I32, -70000), ("a.f32", T_F32, 0.5),
          ("a.bool", T_BOOL, False), ("a.str", T_STR, "héllo"), ("a.u64", T_U64, 1 << 40),
          ("a.i64", T_I64, -(1 << 40)), ("a.f64", T_F64, 2.5),
          ("a.arr", T_ARR, (T_ARR, [(T_U8, [1, 2, 3]), (T_STR, ["x", "yz"])])),
          ("general.architecture", T_STR, "llama"), ("tokenizer.ggml.model", T_STR, "gpt2"),
          ("tokenizer.ggml.tokens", T_ARR, (T_STR, ["a", "b", "ab", "<s>"])),
          ("tokenizer.ggml.merges", T_ARR, (T_STR, ["a b"])),
          ("tokenizer.ggml.token_type", T_ARR, (T_U8, [1, 1, 1, 3]))]
    out("gguf", "metadata.gguf", gguf(kv, []))


# ---------------------------------------------------------------- safetensors

def safetensors(tensors):
    """tensors: [(name, dtype, shape, values)] -> bytes."""
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, dtype, shape, vals in tensors:
        if dtype == "F32":
            b = struct.pack(f"<{len(vals)}f", *vals)
        elif dtype == "F16":
            b = struct.pack(f"<{len(vals)}e", *vals)
        elif dtype == "BF16":
            b = b"".join(struct.pack("<f", x)[2:] for x in vals)
        else:  # I64
            b = struct.pack(f"<{len(vals)}q", *vals)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(b)]}
        data += b
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def safetensors_seeds():
    # The tiny configs of fuzz_targets/safetensors.rs: Llama C=4, F=8, V=6, 2 heads / 1 KV head,
    # all biases; GPT-2 C=4, F=16, V=6, 4 positions, untied head.
    dtypes = ["F32", "F16", "BF16"]

    def t(name, shape):
        n = 1
        for d in shape:
            n *= d
        return (name, dtypes[len(name) % 3], shape, values(n))

    llama = [t("model.embed_tokens.weight", [6, 4]), t("model.norm.weight", [4]),
             t("lm_head.weight", [6, 4]), t("v_head.summary.weight", [1, 4]),
             t("v_head.summary.bias", [1])]
    for name, shape in [("input_layernorm", [4]), ("post_attention_layernorm", [4]),
                        ("self_attn.q_proj", [4, 4]), ("self_attn.k_proj", [2, 4]),
                        ("self_attn.v_proj", [2, 4]), ("self_attn.o_proj", [4, 4]),
                        ("mlp.gate_proj", [8, 4]), ("mlp.up_proj", [8, 4]), ("mlp.down_proj", [4, 8])]:
        llama.append(t(f"model.layers.0.{name}.weight", shape))
        if len(shape) == 2:
            llama.append(t(f"model.layers.0.{name}.bias", [shape[0]]))
    out("safetensors", "llama.safetensors", safetensors(llama))
    gpt2 = [t("transformer.wte.weight", [6, 4]), t("transformer.wpe.weight", [4, 4]),
            t("lm_head.weight", [6, 4])]
    for name, shape in [("attn.c_attn", [4, 12]), ("attn.c_proj", [4, 4]),
                        ("mlp.c_fc", [4, 16]), ("mlp.c_proj", [16, 4])]:
        gpt2.append(t(f"transformer.h.0.{name}.weight", shape))
        gpt2.append(t(f"transformer.h.0.{name}.bias", [shape[1]]))
    for name in ("h.0.ln_1", "h.0.ln_2", "ln_f"):
        gpt2.append(t(f"transformer.{name}.weight", [4]))
        gpt2.append(t(f"transformer.{name}.bias", [4]))
    out("safetensors", "gpt2.safetensors", safetensors(gpt2))
    # Odd tensors: a scalar, a zero-sized one, a dtype rlx does not read.
    odd = [("scalar", "F32", [], values(1)), ("empty", "F32", [0, 3], []),
           ("ids", "I64", [3], [1, 2, 3]), ("row", "BF16", [1, 5], values(5))]
    out("safetensors", "odd.safetensors", safetensors(odd))
    # The Llama in two shards with an index.
    half = len(llama) // 2
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = {"metadata": {"total_size": 0},
             "weight_map": {n: names[0] if i < half else names[1] for i, (n, *_r) in enumerate(llama)}}
    out("safetensors", "llama-sharded", json.dumps(index).encode() + BINARY_SEP
        + safetensors(llama[:half]) + BINARY_SEP + safetensors(llama[half:]))
    # A real fixture header without its data (fails the length check).
    real = (FIX / "gpt2-bf16" / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", real[:8])[0]
    out("safetensors", "gpt2-header-only.safetensors", real[:8 + n])


# ---------------------------------------------------------------- config.json

def config_seeds():
    for f in ("llama-f32", "qwen2-f32", "gpt2-f32"):
        parts = [(FIX / f / n).read_bytes() for n in ("config.json", "generation_config.json")]
        tok_cfg = json.loads((FIX / f / "tokenizer_config.json").read_text())
        tok_cfg["chat_template"] = SMOLLM_TEMPLATE
        parts.append(json.dumps(tok_cfg).encode())
        out("config_json", f, TEXT_SEP.join(parts))
    out("config_json", "llama-config-only.json", (FIX / "llama-f32" / "config.json").read_bytes())
    extra = {
        "architectures": ["MistralForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 384, "max_position_embeddings": 128, "sliding_window": 64,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        "eos_token_id": [2, 3], "bos_token_id": None, "head_dim": 16,
    }
    gen = {"do_sample": True, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "min_p": 0.05,
           "repetition_penalty": 1.1, "max_new_tokens": 8, "eos_token_id": [2]}
    tok = {"bos_token": {"content": "<s>"}, "eos_token": "</s>",
           "chat_template": [{"name": "default", "template": "{{ messages[0].content }}"}]}
    out("config_json", "mistral-llama3", TEXT_SEP.join(json.dumps(x).encode() for x in (extra, gen, tok)))
    cls = {"architectures": ["LlamaForSequenceClassification"], "model_type": "llama",
           "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 384,
           "max_position_embeddings": 128, "id2label": {"0": "LABEL_0"},
           "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}
    out("config_json", "classifier.json", json.dumps(cls))


# ---------------------------------------------------------------- chat templates

def chat_seeds():
    msgs = ["system", "You are terse.", "user", "Add 17 and 25.", "assistant", "42",
            "user", "Now double it. \U0001F642"]
    templates = {
        "smollm2": SMOLLM_TEMPLATE,
        "chatml-trim": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}"
                       "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        "llama2": "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
                  "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
                  "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
                  "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                  "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                  "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
                  "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
                  "{% else %}{% set content = message['content'] %}{% endif %}"
                  "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
                  "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}",
        "python-methods": "{% for m in messages %}{{ m.role.upper() }}: {{ m.content.split(' ')|join('_') }}"
                          "{{ m.content.startswith('N') }}{{ loop.index ~ '/' ~ loop.length }}{% endfor %}"
                          "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ n }}{% endif %}{% endmacro %}{{ f(3) }}"
                          "{{ messages|length }}{{ (messages|map(attribute='content')|list)[-1] }}",
        "loops": "{% for i in range(3) %}{% for m in messages %}{{ loop.index }}{{ m.content[:2] }}"
                 "{% if loop.last %}{% break %}{% endif %}{% endfor %}{% endfor %}{{ 'x' * 3 }}{{ [1,2]|tojson }}",
    }
    for name, src in templates.items():
        out("chat_template", name, TEXT_SEP.join([src.encode(), b"<s>", b"</s>"] + [m.encode() for m in msgs]))


# ---------------------------------------------------------------- JSONL

def jsonl_seeds():
    lines = {
        "sft": ['{"prompt": "Say hi.", "response": "Hi there!"}',
                '{"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]}',
                '',
                '{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}, '
                '{"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]}'],
        "pairs": ['{"prompt": "Best fruit?", "chosen": "Mango.", "rejected": "Rocks."}',
                  '{"prompt": "Rank.", "responses": ["one", "two", "three"]}',
                  '{"messages": [{"role": "user", "content": "Hi"}], "chosen": "Hello", "rejected": ""}'],
        "prompts": ['{"prompt": "Count to three."}',
                    '{"messages": [{"role": "user", "content": "Tell me a joke \\u00e9\\ud83d\\ude42"}]}'],
        "bad": ['{"prompt": 1, "response": null}', '[1, 2]', 'not json', '{"prompt": "ok", "response": "fine"}',
                '{"responses": "x", "prompt": "p"}'],
    }
    for name, ls in lines.items():
        out("jsonl", name + ".jsonl", "\n".join(ls) + "\n")


if __name__ == "__main__":
    for t in ("gguf", "safetensors", "config_json", "chat_template", "jsonl"):
        d = CORPUS / t
        if d.is_dir():
            for f in d.glob("seed-*"):
                f.unlink()
        d.mkdir(parents=True, exist_ok=True)
    gguf_seeds()
    safetensors_seeds()
    config_seeds()
    chat_seeds()
    jsonl_seeds()
    total = sum(f.stat().st_size for f in CORPUS.rglob("seed-*"))
    print(f"{sum(1 for _ in CORPUS.rglob('seed-*'))} seeds, {total} bytes")
