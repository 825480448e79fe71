"""Streaming, chat templates, close(), Ctrl-C and PPO from Python, on the tiny fixtures."""

import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import rlx

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
LLAMA = FIXTURES / "llama-f32"


@pytest.fixture(scope="module")
def llama():
    return rlx.Model.load(LLAMA, threads=2)


def test_stream_yields_what_generate_returns(llama):
    prompt = [1, 5, 9]
    want = llama.generate([prompt], max_new_tokens=12, seed=3, stop_token_ids=[])[0]
    got = list(llama.stream(prompt, max_new_tokens=12, seed=3, stop_token_ids=[]))
    assert [t for t, _, _ in got] == want.tokens
    assert np.array_equal(np.array([lp for _, lp, _ in got], dtype=np.float32), want.logprobs)
    # The text pieces add up to the decoded answer.
    assert "".join(text for _, _, text in got) == llama.decode(want.tokens)


def test_stream_stops_when_left_early(llama):
    stream = llama.stream([1, 5], max_new_tokens=100, stop_token_ids=[])
    first = [next(stream) for _ in range(3)]
    assert len(first) == 3
    stream.close()
    assert list(stream) == []


def test_stream_checks_arguments_up_front(llama):
    with pytest.raises(rlx.InvalidArgumentError):
        llama.stream([1, 5], temperature=-1.0)
    with pytest.raises(rlx.InvalidArgumentError):
        llama.stream([10**6])
    with pytest.raises(rlx.ContextOverflowError):
        llama.stream([1, 5], max_new_tokens=10_000)


def test_do_sample_false_is_greedy(llama):
    a = llama.generate([[1, 5]], max_new_tokens=8, do_sample=False, seed=1)[0]
    b = llama.generate([[1, 5]], max_new_tokens=8, temperature=0.0, seed=2)[0]
    assert a.tokens == b.tokens


def test_chat_template(tmp_path, llama):
    with pytest.raises(rlx.TemplateError, match="chat template"):
        llama.apply_chat_template([{"role": "user", "content": "Hi"}])
    for name in ["config.json", "model.safetensors", "tokenizer.json"]:
        shutil.copy(LLAMA / name, tmp_path / name)
    (tmp_path / "tokenizer_config.json").write_text(
        '{"chat_template": "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\\n'
        '{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"}'
    )
    chat = rlx.Model.load(tmp_path)
    text = chat.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert text == "<|system|>Be brief.\n<|user|>Hi\n<|assistant|>"
    assert chat.apply_chat_template([{"role": "user", "content": "x"}], False) == "<|user|>x\n"
    with pytest.raises(rlx.InvalidArgumentError, match="content"):
        chat.apply_chat_template([{"role": "user"}])


def test_closed_objects_raise():
    m = rlx.Model.load(LLAMA)
    snapshot = m  # the same object
    m.close()
    assert m.closed and "closed" in repr(m)
    for call in (
        lambda: m.generate([[1, 2]]),
        lambda: m.logprobs([[1, 2]]),
        lambda: m.encode("hi"),
        lambda: m.vocab_size,
        lambda: m.stream([1, 2]),
    ):
        with pytest.raises(rlx.ClosedError):
            call()
    assert isinstance(rlx.ClosedError("x"), ValueError)
    snapshot.close()  # closing twice is harmless

    with rlx.Model.load(LLAMA) as m2:
        assert m2.vocab_size > 0
    assert m2.closed

    with rlx.Trainer(LLAMA) as t:
        model = t.model
        t.sft_step([[1, 5, 9]], [[False, True, True]])
    assert t.closed
    with pytest.raises(rlx.ClosedError):
        t.sft_step([[1, 5, 9]], [[False, True, True]])
    with pytest.raises(rlx.ClosedError):
        t.model
    # A snapshot taken before close() lives on.
    assert len(model.logprobs([[1, 5, 9]])[0]) == 2


def test_close_while_another_thread_generates(llama):
    m = rlx.Model.load(LLAMA, threads=1)
    result = {}

    def work():
        try:
            result["out"] = m.generate([[1, 5]], max_new_tokens=64, stop_token_ids=[])
        except rlx.ClosedError:
            result["closed"] = True

    th = threading.Thread(target=work)
    th.start()
    time.sleep(0.01)
    m.close()
    th.join()
    # Either the call had started (and finished normally, with every token) or it saw the
    # closed model and raised ClosedError — never a crash or another error.
    assert ("out" in result) != ("closed" in result), result
    if "out" in result:
        assert len(result["out"][0].tokens) == 64


def _interrupt_script(body):
    return "\n".join(
        [
            "import os, signal, threading, time",
            "import rlx",
            f"m = rlx.Model.load({str(LLAMA)!r}, threads=1)",
            "threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()",
            "t0 = time.monotonic()",
            "try:",
            textwrap.indent(body, "    "),
            "    print('finished without interrupt')",
            "except KeyboardInterrupt:",
            "    print(f'interrupted after {time.monotonic() - t0:.2f} s')",
        ]
    )


@pytest.mark.parametrize(
    "body",
    [
        # One call far longer than the limit below: Ctrl-C must end it from inside.
        "m.generate([[1, 5]] * 4000, max_new_tokens=120, stop_token_ids=[])\n",
        # Streams until interrupted (a fixed number of streams can finish before the signal
        # on a fast machine); the subprocess timeout fails the test if Ctrl-C never lands.
        "while True:\n"
        "    for tok in m.stream([1, 5], max_new_tokens=120, stop_token_ids=[]):\n"
        "        pass\n",
    ],
    ids=["generate", "stream"],
)
def test_ctrl_c_interrupts_promptly(body):
    out = subprocess.run(
        [sys.executable, "-c", _interrupt_script(body)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "interrupted after" in out.stdout, out.stdout + out.stderr
    seconds = float(out.stdout.split("interrupted after")[1].split()[0])
    assert seconds < 5.0, out.stdout


def test_ctrl_c_during_training_returns_after_the_current_step():
    # A training loop of many single-micro-batch steps: Ctrl-C ends it when the running step
    # returns (each step is one call), and the trainer stays usable and consistent.
    script = "\n".join(
        [
            "import os, signal, threading, time",
            "import rlx",
            f"t = rlx.Trainer({str(LLAMA)!r}, lr=1e-4, threads=1)",
            "seq = list(range(3, 60))",
            "mask = [False] * 4 + [True] * (len(seq) - 4)",
            "t.sft_step([seq] * 4, [mask] * 4)",
            "t0 = time.monotonic(); t.sft_step([seq] * 4, [mask] * 4); step = time.monotonic() - t0",
            "threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()",
            "t0 = time.monotonic()",
            "try:",
            "    for _ in range(100000):",
            "        t.sft_step([seq] * 4, [mask] * 4)",
            "    print('finished without interrupt')",
            "except KeyboardInterrupt:",
            "    late = time.monotonic() - t0 - 0.5",
            "    stats = t.sft_step([seq] * 4, [mask] * 4)",
            "    print(f'interrupted {late:.3f} s after the signal; one step takes {step:.3f} s;'",
            "          f' next step {stats[\"step\"]}')",
        ]
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "interrupted" in out.stdout, out.stdout + out.stderr
    late = float(out.stdout.split("interrupted ")[1].split()[0])
    step = float(out.stdout.split("one step takes ")[1].split()[0])
    assert late < 2 * step + 0.5, out.stdout


def test_ppo_iteration():
    t = rlx.Trainer(LLAMA, lr=1e-3, head="value", threads=2)
    reference = rlx.Model.load(LLAMA)
    policy = t.model
    prompt = [1, 5, 9]
    gens = policy.generate([prompt] * 3, max_new_tokens=5, seed=4, stop_token_ids=[])
    seqs = [prompt + g.tokens for g in gens]
    masks = [[False] * len(prompt) + [True] * len(g.tokens) for g in gens]
    old = [g.logprobs.tolist() for g in gens]
    ref = [lp[len(prompt) - 1 :].tolist() for lp in reference.logprobs(seqs)]
    values = [v.tolist() for v in t.values(seqs, masks)]
    assert [len(v) for v in values] == [len(o) for o in old]
    adv, ret, kl = rlx.ppo_advantages(old, ref, values, [1.0, -1.0, 0.5])
    assert kl == 0.0  # the policy is still the reference
    first = t.ppo_step(seqs, masks, old, values, adv, ret)
    assert first["approx_kl"] == 0.0 and first["clip_fraction"] == 0.0
    assert first["value_loss"] > 0 and first["step"] == 1
    second = t.ppo_step(seqs, masks, old, values, adv, ret)
    assert second["approx_kl"] > 0.0
    with pytest.raises(rlx.InvalidArgumentError):
        t.ppo_step(seqs, masks, [o[1:] for o in old], values, adv, ret)
    no_head = rlx.Trainer(LLAMA)
    with pytest.raises(rlx.InvalidArgumentError, match="value head"):
        no_head.values(seqs, masks)


def test_sampling_params_object(llama):
    sp = rlx.SamplingParams(max_new_tokens=7, temperature=0.8, top_p=0.9, seed=5, stop_token_ids=[])
    assert sp.max_new_tokens == 7 and sp.seed == 5 and sp.stop_token_ids == []
    assert "SamplingParams(" in repr(sp)
    a = llama.generate([[1, 5]], sampling_params=sp)[0]
    assert a.token_ids.dtype == np.int32 and a.token_ids.tolist() == a.tokens
    b = llama.generate([[1, 5]], max_new_tokens=7, temperature=0.8, top_p=0.9, seed=5,
                       stop_token_ids=[])[0]
    assert a.tokens == b.tokens and len(a.tokens) == 7
    assert [t for t, _, _ in llama.stream([1, 5], sampling_params=sp)] == a.tokens
    greedy = rlx.SamplingParams(do_sample=False)
    assert greedy.temperature == 0.0
    with pytest.raises(rlx.InvalidArgumentError):
        rlx.SamplingParams(top_p=0.0)


def test_memory_limit_raises_memory_error_and_nothing_is_lost():
    model = rlx.Model.load(str(FIXTURES / "llama-f32"))
    rlx.set_memory_limit(1024)
    try:
        with pytest.raises(MemoryError, match="not enough memory"):
            model.generate([[3, 5, 7]], max_new_tokens=4, temperature=0.0)
    finally:
        rlx.set_memory_limit(None)
    out = model.generate([[3, 5, 7]], max_new_tokens=4, temperature=0.0, stop_token_ids=[])[0]
    assert len(out.tokens) == 4


def test_nan_weights_raise_model_format_error_unless_allowed(tmp_path):
    shutil.copytree(FIXTURES / "llama-f32", tmp_path / "m")
    st = tmp_path / "m" / "model.safetensors"
    data = bytearray(st.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header : 12 + header] = np.float32(np.nan).tobytes()
    st.write_bytes(bytes(data))
    with pytest.raises(rlx.ModelFormatError, match="NaN or infinite"):
        rlx.Model.load(str(tmp_path / "m"))
    rlx.Model.load(str(tmp_path / "m"), allow_non_finite=True).close()


def test_truncated_and_garbage_model_files_raise_format_errors(tmp_path):
    # A safetensors checkpoint and a GGUF file cut at many offsets, and random bytes: each an
    # rlx exception (never a crash), and the interpreter carries on.
    folder = tmp_path / "st"
    folder.mkdir()
    for f in (FIXTURES / "llama-f32").iterdir():
        if f.is_file():
            shutil.copy(f, folder / f.name)
    weights = (FIXTURES / "llama-f32" / "model.safetensors").read_bytes()
    for i in range(20):
        (folder / "model.safetensors").write_bytes(weights[: len(weights) * i // 20])
        with pytest.raises(rlx.ModelFormatError):
            rlx.Model.load(str(folder))
    gguf = (FIXTURES / "quant" / "quants.gguf").read_bytes()
    target = tmp_path / "m.gguf"
    for i in range(20):
        target.write_bytes(gguf[: len(gguf) * i // 20])
        with pytest.raises(rlx.ModelFormatError):
            rlx.Model.load(str(target))
    rng = np.random.default_rng(0)
    for seed in range(10):
        data = bytearray(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        if seed % 2 == 0:
            data[:4] = b"GGUF"
        target.write_bytes(bytes(data))
        with pytest.raises((rlx.ModelFormatError, rlx.UnsupportedError)):
            rlx.Model.load(str(target))


def _with_header(folder, edit):
    """Rewrites model.safetensors in `folder` with its JSON header changed by `edit`."""
    import json

    path = folder / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + body)


@pytest.mark.parametrize(
    "lie",
    ["offsets_past_the_end", "overlap", "dtype", "shape", "zero_sized"],
)
def test_lying_safetensors_headers_raise_format_errors(tmp_path, lie):
    folder = tmp_path / "m"
    folder.mkdir()
    for f in (FIXTURES / "llama-f32").iterdir():
        if f.is_file():
            shutil.copy(f, folder / f.name)
    name = "model.embed_tokens.weight"

    def edit(h):
        t = h[name]
        if lie == "offsets_past_the_end":
            t["data_offsets"][1] += 10**9
        elif lie == "overlap":
            other = next(k for k in h if k not in (name, "__metadata__"))
            t["data_offsets"] = list(h[other]["data_offsets"])
        elif lie == "dtype":
            t["dtype"] = "F16"
        elif lie == "shape":
            t["shape"] = [t["shape"][0] + 1, t["shape"][1]]
        else:
            t["shape"] = [0, t["shape"][1]]
            t["data_offsets"] = [t["data_offsets"][0], t["data_offsets"][0]]

    _with_header(folder, edit)
    with pytest.raises(rlx.ModelFormatError):
        rlx.Model.load(str(folder))


def test_devices_are_checked():
    rlx.Model.load(FIXTURES / "llama-f32", device="cpu").close()
    with pytest.raises(rlx.InvalidArgumentError):
        rlx.Model.load(FIXTURES / "llama-f32", device="tpu")
    # A device no machine has: without a driver the error names the driver, with one it says
    # the device does not exist; either way a clear UnsupportedError.
    with pytest.raises(rlx.UnsupportedError, match="CUDA"):
        rlx.Model.load(FIXTURES / "llama-f32", device="cuda:99")
    # The device storage type: a typo, and bf16 on the CPU, are argument errors.
    with pytest.raises(rlx.InvalidArgumentError, match="f32 or bf16"):
        rlx.Model.load(FIXTURES / "llama-f32", device_dtype="fp8")
    with pytest.raises(rlx.InvalidArgumentError, match="CUDA"):
        rlx.Model.load(FIXTURES / "llama-f32", device_dtype="bf16")
    with pytest.raises(rlx.UnsupportedError, match="CUDA"):
        rlx.Trainer(FIXTURES / "llama-f32", device="cuda:99")
