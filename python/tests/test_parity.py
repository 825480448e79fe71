"""Log-probs and greedy generation from Python agree with transformers on the fixture models.

Two sources of truth:
- the reference outputs tests/gen_fixtures.py wrote with transformers (always checked);
- transformers itself, run here on random sequences when torch and transformers are installed
  (skipped, with the reason, otherwise).

Tolerance: float32 on both sides, |Δ| ≤ 1e-4 · max(1, |value|).
"""

import json
import struct
from pathlib import Path

import numpy as np
import pytest

import rlx

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
MODELS = ["gpt2-f32", "llama-f32", "qwen2-f32"]


def read_safetensors(path):
    """The f32 tensors of a safetensors file (the format is a JSON header + raw data)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", (name, info["dtype"])
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtype="<f4").reshape(info["shape"])
    return out


def close(got, want):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    tol = 1e-4 * np.maximum(1.0, np.abs(want))
    assert np.all(np.abs(got - want) <= tol), np.max(np.abs(got - want))


@pytest.mark.parametrize("name", MODELS)
def test_matches_the_committed_transformers_outputs(name):
    folder = FIXTURES / name
    if not (folder / "reference.json").is_file():
        pytest.skip(f"{folder} has no reference outputs (run tests/gen_fixtures.py)")
    ref = json.loads((folder / "reference.json").read_text())
    tensors = read_safetensors(folder / "reference.safetensors")
    model = rlx.Model.load(folder, threads=2)
    for i, case in enumerate(ref["cases"]):
        ids = case["input_ids"]
        if len(ids) > 1:
            close(model.logprobs([ids])[0], tensors[f"logprobs_{i}"])
            t = ref["temperature_case"]
            close(model.logprobs([ids], temperature=t)[0], tensors[f"logprobs_t07_{i}"])
        out = model.generate(
            [case["greedy_prompt"]], max_new_tokens=12, do_sample=False, stop_token_ids=[]
        )[0]
        assert out.tokens == case["greedy_new_tokens"]
    if "tokenized_text" in ref:
        assert model.encode(ref["tokenized_text"]) == ref["tokenized_ids"]


@pytest.mark.parametrize("name", MODELS)
def test_matches_transformers_live(name):
    try:
        import torch
        import transformers
    except ImportError as e:
        pytest.skip(f"torch/transformers not installed ({e.name}): live parity not checked")
    folder = FIXTURES / name
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        folder, torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()
    model = rlx.Model.load(folder, threads=2)
    rng = np.random.default_rng(0)
    for length in (2, 17, 60):
        ids = rng.integers(0, model.vocab_size, size=length).tolist()
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0].double()
        want = torch.log_softmax(logits, dim=-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])
        close(model.logprobs([ids])[0], want[:, 0].numpy())
