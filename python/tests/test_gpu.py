"""The CUDA backend from Python: a model loaded with ``device="cuda"`` gives the log-probs and
greedy tokens of the same model on ``cpu``, on the tiny committed fixtures.

Marked ``gpu`` (``pytest -m gpu`` selects only these). Each test skips, with the reason, when no
CUDA device is usable: loading on ``cuda`` raises ``rlx.UnsupportedError`` when the build has no
CUDA support or the machine has no driver, device, NVRTC or cuBLAS.

Tolerance: both sides compute in float32 but sum in different orders (cuBLAS, block
reductions, f32 RoPE angles on the device), so values agree to a relative 1e-3:
|gpu − cpu| ≤ 1e-3 · max(1, |cpu|). Greedy tokens must match exactly, as in the Rust CUDA
tests (tests/tests/cuda.rs); a near-tie between the top two logits would show up there too.
"""

from pathlib import Path

import numpy as np
import pytest

import rlx

pytestmark = pytest.mark.gpu

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
# GPT-2 (learned positions, LayerNorm, GELU, tied head), Llama (RoPE, RMSNorm, SwiGLU, GQA,
# untied head), Qwen2 (q/k/v biases, tied head), and the half-precision Llama (widened to f32
# on the device as on the CPU).
MODELS = ["gpt2-f32", "llama-f32", "qwen2-f32", "llama-bf16"]
RTOL = 1e-3

# Sequences of several lengths (1 has no log-prob; 23 crosses the 4-warp split of the decode
# kernel several times), ids below every fixture's vocabulary (384).
SEQUENCES = [
    [1],
    [1, 5],
    [1, 5, 9, 200, 33, 7, 7],
    [(i * 37 + 11) % 384 for i in range(23)],
    [(i * 101 + 3) % 384 for i in range(64)],
]


def close(got, want, rtol=RTOL):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    if want.size == 0:
        return
    err = np.abs(got - want) / np.maximum(1.0, np.abs(want))
    assert np.all(np.isfinite(got)), got
    assert err.max() <= rtol, f"max relative |Δ| {err.max():.3g} > {rtol}"


_cuda_error = None


def load_cuda(path):
    """The model on cuda, or a skip saying why there is no usable device."""
    global _cuda_error
    if _cuda_error is not None:
        pytest.skip(_cuda_error)
    try:
        return rlx.Model.load(path, threads=2, device="cuda")
    except rlx.UnsupportedError as e:
        _cuda_error = f"no usable CUDA device: {e}"
        pytest.skip(_cuda_error)


@pytest.fixture(scope="module", params=MODELS)
def pair(request):
    path = FIXTURES / request.param
    gpu = load_cuda(path)
    cpu = rlx.Model.load(path, threads=2)
    return cpu, gpu


def test_logprobs_match_cpu(pair):
    cpu, gpu = pair
    for temperature in (1.0, 0.7, 0.0):
        want = cpu.logprobs(SEQUENCES, temperature=temperature)
        got = gpu.logprobs(SEQUENCES, temperature=temperature)
        assert len(got) == len(want)
        for g, w, seq in zip(got, want, SEQUENCES):
            assert len(g) == len(seq) - 1
            close(g, w)


def test_logprobs_of_a_batch_past_one_logits_chunk(pair):
    # 4 × 100 tokens: more rows than the CUDA backend's LM-head chunk (256 rows), and a
    # context of 100 positions (25 per warp of the decode attention kernel).
    cpu, gpu = pair
    seqs = [[(i * 53 + s * 17 + 1) % 384 for i in range(100)] for s in range(4)]
    for g, w in zip(gpu.logprobs(seqs, temperature=0.7), cpu.logprobs(seqs, temperature=0.7)):
        close(g, w)


def test_logprobs_do_not_depend_on_the_batch(pair):
    # Packing sequences into one forward must not mix them (a wrong cache row or sequence
    # would be off by far more than the tolerance; cuBLAS may sum in another order).
    _, gpu = pair
    together = gpu.logprobs(SEQUENCES)
    for seq, lp in zip(SEQUENCES, together):
        close(gpu.logprobs([seq])[0], lp)


def test_greedy_generation_matches_cpu(pair):
    cpu, gpu = pair
    prompts = [[1], [1, 5, 9], SEQUENCES[3]]
    kw = dict(max_new_tokens=12, do_sample=False, stop_token_ids=[])
    want = cpu.generate(prompts, **kw)
    got = gpu.generate(prompts, **kw)
    for g, w in zip(got, want):
        assert g.tokens == w.tokens
        assert g.finish_reason == w.finish_reason == "length"
        close(g.logprobs, w.logprobs)


def test_generated_logprobs_are_the_scored_logprobs(pair):
    # Sampling draws different random numbers on the device, so compare the device with
    # itself: each sampled token's reported log-prob is what scoring the sequence gives.
    _, gpu = pair
    vocab = gpu.vocab_size
    prompts = [[1, 5, 9], [1, 200]]
    for kw in (
        dict(temperature=0.7),
        dict(temperature=1.0, top_k=5),
        dict(temperature=0.9, top_p=0.8),
        dict(temperature=1.0, repetition_penalty=1.3),  # the host-sampler path
    ):
        outs = gpu.generate(prompts, max_new_tokens=10, seed=7, stop_token_ids=[], **kw)
        t = kw["temperature"]
        for prompt, out in zip(prompts, outs):
            assert len(out.tokens) == 10 and all(0 <= x < vocab for x in out.tokens)
            scored = gpu.logprobs([prompt + out.tokens], temperature=t)[0][len(prompt) - 1 :]
            close(out.logprobs, scored)
        # The same seed gives the same tokens.
        again = gpu.generate(prompts, max_new_tokens=10, seed=7, stop_token_ids=[], **kw)
        assert [o.tokens for o in again] == [o.tokens for o in outs]


def test_top_k_one_is_greedy(pair):
    cpu, gpu = pair
    kw = dict(max_new_tokens=8, stop_token_ids=[])
    want = cpu.generate([[1, 5, 9]], do_sample=False, **kw)[0]
    got = gpu.generate([[1, 5, 9]], temperature=0.8, top_k=1, seed=3, **kw)[0]
    assert got.tokens == want.tokens


def test_stop_tokens_end_a_sequence(pair):
    _, gpu = pair
    free = gpu.generate([[1, 5, 9]], max_new_tokens=6, do_sample=False, stop_token_ids=[])[0]
    stop = free.tokens[2]
    out = gpu.generate([[1, 5, 9]], max_new_tokens=6, do_sample=False, stop_token_ids=[stop])[0]
    first = free.tokens.index(stop)
    assert out.tokens == free.tokens[: first + 1]
    assert out.finish_reason == "stop"


# ---- Training, heads, LoRA and bf16 storage on the device (Rust: tests/tests/cuda.rs). ----

TRAIN_SEQS = [[(i * 53 + s * 71 + 5) % 384 for i in range(n)] for s, n in enumerate([5, 23, 40])]
TRAIN_MASKS = [[i > 0 and i % 3 != 0 for i in range(len(s))] for s in TRAIN_SEQS]


def trainers(**kw):
    """The same Trainer on cpu and on cuda (or a skip saying why there is no device)."""
    path = FIXTURES / "llama-f32"
    load_cuda(path)  # skips without a device
    cpu = rlx.Trainer(path, threads=2, **kw)
    gpu = rlx.Trainer(path, threads=2, device="cuda", **kw)
    return cpu, gpu


@pytest.mark.parametrize("lora", [None, "lora"])
def test_sft_steps_match_cpu(lora):
    kw = dict(lr=1e-3)
    if lora:
        kw["lora"] = rlx.LoraConfig(r=4, lora_alpha=8.0, target_modules=["all-linear"])
    cpu, gpu = trainers(**kw)
    for _ in range(2):
        want = cpu.sft_step(TRAIN_SEQS, TRAIN_MASKS)
        got = gpu.sft_step(TRAIN_SEQS, TRAIN_MASKS)
        close([got["loss"], got["grad_norm"]], [want["loss"], want["grad_norm"]])
    close(gpu.model.logprobs(TRAIN_SEQS), cpu.model.logprobs(TRAIN_SEQS), rtol=1e-2)


def test_reward_model_and_value_head_train_on_the_device():
    cpu, gpu = trainers(lr=1e-4, head="score")
    rejected = [list(reversed(s)) for s in TRAIN_SEQS]
    want = cpu.rm_step(TRAIN_SEQS, rejected)
    got = gpu.rm_step(TRAIN_SEQS, rejected)
    close([got["loss"], got["grad_norm"]], [want["loss"], want["grad_norm"]])
    cpu, gpu = trainers(lr=1e-4, head="value")
    for w, g in zip(cpu.values(TRAIN_SEQS, TRAIN_MASKS), gpu.values(TRAIN_SEQS, TRAIN_MASKS)):
        close(g, w)


def test_bf16_storage_is_close_to_f32():
    path = FIXTURES / "llama-f32"
    load_cuda(path)
    cpu = rlx.Model.load(path, threads=2)
    bf16 = rlx.Model.load(path, threads=2, device="cuda", device_dtype="bf16")
    # bf16 matrices and KV cache: log-probs within 5e-2 (see BF16_TOL_F32_MODEL in cuda.rs).
    close(bf16.logprobs(SEQUENCES), cpu.logprobs(SEQUENCES), rtol=5e-2)
