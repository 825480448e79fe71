"""Training from Python on the tiny Llama fixture: every objective steps, log-probs of the
trained model agree with its rollouts, checkpoints resume, and bad input raises."""

import json
from pathlib import Path

import numpy as np
import pytest

import rlx

FIXTURE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "llama-f32"
SEQS = [[1, 5, 9, 2, 7, 3, 3, 8], [4, 6, 2, 9, 11]]
MASKS = [[t >= 3 for t in range(8)], [t >= 1 for t in range(5)]]


def test_sft_steps_lower_the_loss_and_lists_equal_arrays():
    t = rlx.Trainer(FIXTURE, lr=3e-3)
    first = t.sft_step(SEQS, MASKS)
    for _ in range(4):
        last = t.sft_step(SEQS, MASKS)
    assert last["loss"] < first["loss"]
    assert t.step == 5 and not last["skipped"]
    # NumPy int32 arrays give the same step as lists.
    a, b = rlx.Trainer(FIXTURE, lr=1e-3), rlx.Trainer(FIXTURE, lr=1e-3)
    sa = a.sft_step(SEQS, MASKS)
    sb = b.sft_step([np.array(s, dtype=np.int32) for s in SEQS], [np.array(m) for m in MASKS])
    assert sa == sb


def test_trained_model_logprobs_match_its_rollouts():
    t = rlx.Trainer(FIXTURE, lr=1e-3)
    t.sft_step(SEQS, MASKS)
    m = t.model
    out = m.generate([SEQS[0][:3]], max_new_tokens=6, temperature=1.0, seed=3, stop_token_ids=[])[0]
    lp = m.logprobs([SEQS[0][:3] + out.tokens])[0]
    assert np.array_equal(lp[2:], out.logprobs)


def test_reward_dpo_and_grpo_steps():
    rm = rlx.Trainer(FIXTURE, lr=3e-3, head="score")
    s = rm.rm_step([SEQS[0]], [SEQS[1]], margin=0.0)
    assert 0.0 <= s["accuracy"] <= 1.0 and np.isfinite(s["loss"])
    pol = rlx.Trainer(FIXTURE, lr=1e-3, lora=rlx.LoraConfig(r=2, lora_alpha=4))
    s = pol.dpo_step([SEQS[0]], [MASKS[0]], [SEQS[1]], [MASKS[1]], [-20.0], [-10.0], beta=0.1)
    assert np.isfinite(s["loss"]) and "margin" in s
    adv = rlx.group_advantages([1.0, 0.0, 0.5, 2.0], 2)
    assert len(adv) == 4 and adv[0] > 0 > adv[1]
    seqs = SEQS * 2
    masks = MASKS * 2
    s = pol.grpo_step(seqs, masks, adv, beta=0.0, loss_type="grpo")
    assert np.isfinite(s["loss"]) and s["clip_fraction"] == 0.0


def test_bf16_compute_trains_close_to_f32_and_resumes(tmp_path):
    f32 = rlx.Trainer(FIXTURE, lr=3e-3)
    bf16 = rlx.Trainer(FIXTURE, lr=3e-3, compute_dtype="bf16")
    a, b = f32.sft_step(SEQS, MASKS), bf16.sft_step(SEQS, MASKS)
    # bf16 products: close to the f32 loss, not equal to it.
    assert a["loss"] != b["loss"] and abs(b["loss"] - a["loss"]) < 1e-2 * a["loss"]
    bf16.save(tmp_path / "ck")
    nxt = bf16.sft_step(SEQS, MASKS)
    assert nxt["loss"] < b["loss"]
    resumed, _ = rlx.Trainer.resume(tmp_path / "ck")
    assert resumed.sft_step(SEQS, MASKS)["loss"] == nxt["loss"]
    with pytest.raises(ValueError, match="fp8"):
        rlx.Trainer(FIXTURE, compute_dtype="fp8")


def test_checkpoint_resume_continues_exactly(tmp_path):
    a = rlx.Trainer(FIXTURE, lr=1e-3)
    a.sft_step(SEQS, MASKS)
    a.save(tmp_path / "ck", extra={"epoch": 1})
    a.sft_step(SEQS, MASKS)
    b, extra = rlx.Trainer.resume(tmp_path / "ck")
    assert extra == {"epoch": 1} and b.step == 1
    b.sft_step(SEQS, MASKS)
    x = a.model.logprobs([SEQS[0]])[0]
    y = b.model.logprobs([SEQS[0]])[0]
    assert np.array_equal(x, y)
    with pytest.raises(OSError):
        a.save(tmp_path / "ck")  # never overwrites


def test_reward_model_scores(tmp_path):
    t = rlx.Trainer(FIXTURE, lr=3e-3, head="score")
    for _ in range(5):
        t.rm_step([SEQS[0]], [SEQS[1]])
    t.save(tmp_path / "rm")
    rm = rlx.RewardModel.load(tmp_path / "rm")
    r = rm.score([SEQS[0], SEQS[1]])
    assert r.dtype == np.float32 and r[0] > r[1]
    with pytest.raises(rlx.InvalidArgumentError):
        rlx.RewardModel.load(FIXTURE)


def test_bad_training_input_raises():
    with pytest.raises(rlx.InvalidArgumentError):
        rlx.Trainer(FIXTURE, head="policy")
    with pytest.raises(rlx.InvalidArgumentError):
        rlx.Trainer(FIXTURE, lora=rlx.LoraConfig(target_modules=["nope"]))
    t = rlx.Trainer(FIXTURE)
    with pytest.raises(rlx.InvalidArgumentError):
        t.sft_step(SEQS, [[False] * 8, [False] * 5])  # selects nothing
    with pytest.raises(rlx.InvalidArgumentError):
        t.sft_step(SEQS, MASKS[:1])
    with pytest.raises(rlx.InvalidArgumentError):
        rlx.group_advantages([1.0, 2.0], 1)
    with pytest.raises(rlx.InvalidArgumentError):
        t.dpo_step([SEQS[0]], [MASKS[0]], [SEQS[1]], [MASKS[1]], [0.0], [0.0], loss_type="x")
    with pytest.raises(FileNotFoundError):
        rlx.Trainer.resume("/nonexistent/checkpoint")
