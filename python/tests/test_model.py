"""rlx's Python API on the tiny fixture models in tests/fixtures/."""

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

import rlx

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
MODELS = ["gpt2-f32", "llama-f32"]


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    path = FIXTURES / request.param
    if not path.is_dir():
        pytest.skip(f"fixture {path} is missing (run tests/gen_fixtures.py)")
    return rlx.Model.load(str(path), threads=2)


@pytest.fixture(scope="module")
def llama():
    return rlx.Model.load(FIXTURES / "llama-f32")


def test_facts(model):
    assert model.vocab_size > 0
    assert model.context_length == 128
    assert all(0 <= t < model.vocab_size for t in model.eos_token_ids)
    assert "Model(" in repr(model)
    assert rlx.__version__.count(".") == 2


def test_encode_decode_round_trip(model):
    ids = model.encode("Hello world")
    assert ids and all(isinstance(i, int) for i in ids)
    assert "Hello" in model.decode(ids)
    assert model.decode(np.array(ids, dtype=np.int32)) == model.decode(ids)


def test_greedy_generate_is_deterministic(model):
    prompt = model.encode("The quick brown fox")
    a = model.generate([prompt], max_new_tokens=12, temperature=0.0, stop_token_ids=[])
    b = model.generate([prompt], max_new_tokens=12, temperature=0.0, stop_token_ids=[])
    assert len(a) == len(b) == 1
    assert a[0].tokens == b[0].tokens
    assert len(a[0].tokens) == 12
    assert a[0].finish_reason == "length"
    assert a[0].logprobs.dtype == np.float32
    assert np.array_equal(a[0].logprobs, b[0].logprobs)


def test_seeded_sampling_is_reproducible(model):
    prompt = model.encode("Once upon a time")
    kw = dict(max_new_tokens=10, temperature=0.8, top_k=20, top_p=0.9, seed=7, stop_token_ids=[])
    assert model.generate([prompt], **kw)[0].tokens == model.generate([prompt], **kw)[0].tokens


def test_logprobs_equal_generate_logprobs(model):
    prompts = [model.encode("Hello world"), model.encode("A different, longer prompt here")]
    outs = model.generate(prompts, max_new_tokens=10, temperature=0.0, stop_token_ids=[])
    seqs = [p + g.tokens for p, g in zip(prompts, outs)]
    for lists_or_arrays in (seqs, [np.array(s, dtype=np.int64) for s in seqs]):
        lps = model.logprobs(lists_or_arrays)
        for p, g, lp in zip(prompts, outs, lps):
            assert lp.dtype == np.float32
            assert lp.shape == (len(p) + len(g.tokens) - 1,)
            assert np.array_equal(lp[len(p) - 1 :], g.logprobs)


def test_sampled_logprobs_use_the_temperature(model):
    prompt = model.encode("Hello")
    g = model.generate([prompt], max_new_tokens=6, temperature=0.7, seed=3, stop_token_ids=[])[0]
    lp = model.logprobs([prompt + g.tokens], temperature=0.7)[0]
    assert np.array_equal(lp[len(prompt) - 1 :], g.logprobs)


def test_stop_tokens(model):
    prompt = model.encode("Hello")
    free = model.generate([prompt], max_new_tokens=6, temperature=0.0, stop_token_ids=[])[0]
    stop = free.tokens[2]
    out = model.generate([prompt], max_new_tokens=6, temperature=0.0, stop_token_ids=[stop])[0]
    assert out.finish_reason == "stop"
    assert out.tokens == free.tokens[: free.tokens.index(stop) + 1]


def test_batch_and_empty_inputs(model):
    assert model.generate([]) == []
    assert model.logprobs([]) == []
    out = model.generate([[1, 2]], max_new_tokens=0)
    assert out[0].tokens == [] and out[0].logprobs.shape == (0,)
    assert model.logprobs([[5]])[0].shape == (0,)
    # A 2-D array is a batch of rows.
    rows = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint16)
    assert [lp.shape for lp in model.logprobs(rows)] == [(2,), (2,)]


# --- errors -------------------------------------------------------------------------------


def test_missing_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        rlx.Model.load(tmp_path / "nope")
    assert "nope" in str(e.value)


def test_folder_without_config_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        rlx.Model.load(str(tmp_path))


def test_file_instead_of_folder_is_a_format_error():
    with pytest.raises(rlx.ModelFormatError) as e:
        rlx.Model.load(FIXTURES / "gpt2-f32" / "config.json")
    assert isinstance(e.value, ValueError) and isinstance(e.value, rlx.RlxError)


def test_malformed_config_is_a_format_error(tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(FIXTURES / "gpt2-f32", dst)
    (dst / "config.json").write_text("{not json")
    with pytest.raises(rlx.ModelFormatError):
        rlx.Model.load(dst)


def test_no_tokenizer_is_a_tokenizer_error(tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(FIXTURES / "gpt2-f32", dst)
    (dst / "tokenizer.json").unlink()
    m = rlx.Model.load(dst)
    with pytest.raises(rlx.TokenizerError):
        m.encode("hi")
    with pytest.raises(rlx.TokenizerError):
        m.decode([1, 2])
    # Token-level calls still work.
    assert m.logprobs([[1, 2, 3]])[0].shape == (2,)


def test_no_constructor():
    with pytest.raises(TypeError):
        rlx.Model()


def test_negative_threads(tmp_path):
    with pytest.raises(rlx.InvalidArgumentError):
        rlx.Model.load(FIXTURES / "gpt2-f32", threads=-1)


@pytest.mark.parametrize(
    "bad_id", [384, 10**6, 2**32, -1, 2**70], ids=["vocab", "big", "u32", "negative", "huge"]
)
def test_token_id_out_of_range(llama, bad_id):
    with pytest.raises(rlx.InvalidArgumentError):
        llama.generate([[1, bad_id]], max_new_tokens=2)
    with pytest.raises(rlx.InvalidArgumentError):
        llama.logprobs([[1, bad_id]])
    with pytest.raises(rlx.InvalidArgumentError):
        llama.decode([1, bad_id])


def test_stop_token_ids_must_be_token_ids(llama):
    with pytest.raises(rlx.InvalidArgumentError):
        llama.generate([[1, 2]], max_new_tokens=2, stop_token_ids=[-1])
    with pytest.raises(TypeError):
        llama.generate([[1, 2]], max_new_tokens=2, stop_token_ids="2")


def test_out_of_range_in_arrays(llama):
    with pytest.raises(rlx.InvalidArgumentError):
        llama.logprobs([np.array([1, -5], dtype=np.int8)])
    with pytest.raises(rlx.InvalidArgumentError):
        llama.logprobs([np.array([1, 2**40], dtype=np.uint64)])


def test_too_long_is_context_overflow(llama):
    with pytest.raises(rlx.ContextOverflowError) as e:
        llama.logprobs([[1] * 129])
    assert isinstance(e.value, rlx.InvalidArgumentError) and isinstance(e.value, ValueError)
    with pytest.raises(rlx.ContextOverflowError):
        llama.generate([[1] * 100], max_new_tokens=29)
    # Default max_new_tokens (128) + any prompt overflows this 128-position model.
    with pytest.raises(rlx.ContextOverflowError):
        llama.generate([[1]])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-1.0),
        dict(temperature=float("nan")),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(min_p=2.0),
        dict(repetition_penalty=0.0),
        dict(max_new_tokens=-1),
        dict(top_k=-3),
        dict(temperature=1e300),
    ],
)
def test_bad_sampling_parameters(llama, kwargs):
    with pytest.raises(rlx.InvalidArgumentError):
        llama.generate([[1, 2]], **{"max_new_tokens": 2, **kwargs})


def test_bad_shapes_and_types(llama):
    with pytest.raises(rlx.InvalidArgumentError):
        llama.generate([[]], max_new_tokens=2)
    with pytest.raises(rlx.InvalidArgumentError):
        llama.logprobs([[]])
    with pytest.raises(rlx.InvalidArgumentError):
        llama.logprobs([[1, 2]], temperature=-0.5)
    with pytest.raises(TypeError):
        llama.logprobs([[1.5, 2]])
    with pytest.raises(TypeError):
        llama.logprobs(["abc"])
    with pytest.raises(TypeError):
        llama.logprobs("abc")
    with pytest.raises(TypeError):
        llama.logprobs([np.array([1.0, 2.0])])
    with pytest.raises(TypeError):
        llama.logprobs([np.zeros((2, 2), dtype=np.int64)])
    with pytest.raises(TypeError):
        llama.generate(5)


# --- threads ------------------------------------------------------------------------------


def test_two_python_threads_share_a_model(llama):
    prompts = [llama.encode("Hello world"), llama.encode("Once upon a time")]
    want = [
        g.tokens for g in llama.generate(prompts, max_new_tokens=16, temperature=0.0, stop_token_ids=[])
    ]
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(5):
                out = llama.generate([prompts[i]], max_new_tokens=16, temperature=0.0, stop_token_ids=[])
                lp = llama.logprobs([prompts[i] + out[0].tokens])[0]
                assert np.array_equal(lp[len(prompts[i]) - 1 :], out[0].logprobs)
                results.setdefault(i, []).append(out[0].tokens)
        except BaseException as e:  # surface failures (even panics) in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        assert results[i] == [want[i]] * 5


def test_exception_hierarchy():
    assert issubclass(rlx.RlxError, Exception)
    for cls in (rlx.ModelFormatError, rlx.InvalidArgumentError, rlx.ContextOverflowError):
        assert issubclass(cls, rlx.RlxError) and issubclass(cls, ValueError)
    assert issubclass(rlx.ContextOverflowError, rlx.InvalidArgumentError)
    assert issubclass(rlx.TemplateError, rlx.TokenizerError)
    assert issubclass(rlx.UnsupportedError, rlx.RlxError)


def test_int8_activations():
    # An HF folder has no blocks to run with 8-bit activations: a clear error, not a no-op.
    with pytest.raises(rlx.InvalidArgumentError, match="int8_activations"):
        rlx.Model.load(FIXTURES / "gpt2-f32", int8_activations=True)
    gguf = Path(__file__).resolve().parents[2] / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        pytest.skip(f"{gguf} is missing (scripts/fetch_model.sh)")
    exact = rlx.Model.load(gguf, threads=2)
    fast = rlx.Model.load(gguf, threads=2, int8_activations=True)
    ids = exact.encode("The reward model ranks two answers to the same question.")
    want = exact.logprobs([ids])[0]
    got = fast.logprobs([ids])[0]
    change = np.abs(np.asarray(got) - np.asarray(want))
    assert 0 < change.mean() <= 0.15
    # generate's log-probs still equal logprobs' exactly.
    out = fast.generate([ids[:5]], max_new_tokens=6, temperature=0.0)[0]
    rescored = fast.logprobs([ids[:5] + list(out.tokens)])[0][4:]
    assert np.array_equal(np.asarray(rescored, dtype=np.float32), np.asarray(out.logprobs, dtype=np.float32))
