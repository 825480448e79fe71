# Type stubs for the compiled module rlx._rlx (python/src/).
from collections.abc import Iterator, Mapping, Sequence
from os import PathLike
from types import TracebackType
from typing import Any, Callable, Literal, Union, final

import numpy as np
import numpy.typing as npt

__all__ = [
    "Generation",
    "LoraConfig",
    "Model",
    "RewardModel",
    "SamplingParams",
    "TokenStream",
    "Trainer",
    "__version__",
    "group_advantages",
    "ppo_advantages",
]
__version__: str

_TokenIds = Union[Sequence[int], npt.NDArray[np.integer]]

@final
class Generation:
    """One sequence's output of ``Model.generate``."""

    @property
    def tokens(self) -> list[int]:
        """New token ids (not the prompt)."""
    @property
    def token_ids(self) -> npt.NDArray[np.int32]:
        """The same ids as an int32 array."""
    @property
    def logprobs(self) -> npt.NDArray[np.float32]:
        """Each new token's log-prob, as ``Model.logprobs`` computes it."""
    @property
    def finish_reason(self) -> Literal["stop", "length", "cancelled"]:
        """Why generation ended."""
    def __len__(self) -> int: ...

@final
class SamplingParams:
    """Sampling settings as one object; ``generate(..., sampling_params=sp)`` uses it instead
    of the keyword arguments. Raises InvalidArgumentError for values out of range.

    >>> sp = rlx.SamplingParams(max_new_tokens=64, temperature=0.7, top_p=0.9, seed=1)
    """

    def __init__(
        self,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        stop_token_ids: Union[_TokenIds, None] = None,
        seed: int = 0,
        do_sample: bool = True,
    ) -> None: ...
    @property
    def max_new_tokens(self) -> int: ...
    @property
    def temperature(self) -> float: ...
    @property
    def top_k(self) -> int: ...
    @property
    def top_p(self) -> float: ...
    @property
    def min_p(self) -> float: ...
    @property
    def repetition_penalty(self) -> float: ...
    @property
    def stop_token_ids(self) -> Union[list[int], None]: ...
    @property
    def seed(self) -> int: ...

@final
class Model:
    """A decoder language model loaded from a Hugging Face folder or a GGUF file."""

    @staticmethod
    def load(
        path: Union[str, PathLike[str]],
        threads: int = 0,
        allow_non_finite: bool = False,
        device: str = "cpu",
        device_dtype: str = "f32",
        int8_activations: bool = False,
    ) -> Model:
        """Loads a Hugging Face model folder (config.json, model.safetensors,
        tokenizer.json, ...) or a GGUF file.

        ``threads``: worker threads for this model's calls; 0 = one per CPU core.
        ``device``: "cpu", "cuda" or "cuda:N"; ``device_dtype``: on CUDA, "f32" or
        "bf16" storage of the matrices and KV cache (f32 accumulation).
        ``int8_activations``: a GGUF's Q4_0/Q4_1/Q8_0/Q4_K/Q6_K matrices run with 8-bit
        activations (faster decoding; log-probs within the activations' rounding of
        the exact ones; generate and logprobs still agree exactly). CPU and GGUF only,
        else InvalidArgumentError.
        Raises FileNotFoundError / PermissionError / OSError, ModelFormatError,
        UnsupportedError, TokenizerError.
        """
    def generate(
        self,
        prompts: Sequence[_TokenIds],
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        stop_token_ids: Union[_TokenIds, None] = None,
        seed: int = 0,
        do_sample: bool = True,
        sampling_params: Union[SamplingParams, None] = None,
    ) -> list[Generation]:
        """Generates a continuation of each prompt. ``temperature=0`` (or
        ``do_sample=False``) is greedy; the same ``seed`` gives the same tokens.
        ``stop_token_ids=None`` stops at ``eos_token_ids``. The GIL is released meanwhile;
        Ctrl-C raises KeyboardInterrupt within a token.

        >>> out = model.generate([prompt], max_new_tokens=16, do_sample=False)[0]

        Raises InvalidArgumentError (bad id or parameter), ContextOverflowError,
        ClosedError.
        """
    def stream(
        self,
        prompt: _TokenIds,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        stop_token_ids: Union[_TokenIds, None] = None,
        seed: int = 0,
        do_sample: bool = True,
        sampling_params: Union[SamplingParams, None] = None,
    ) -> TokenStream:
        """Generates a continuation of one prompt as an iterator of
        ``(token_id, logprob, text)``, produced in the background; leaving the loop early
        stops generation.

        >>> for token, logprob, text in model.stream(prompt, max_new_tokens=32):
        ...     print(text, end="", flush=True)
        """
    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Renders ``[{"role": ..., "content": ...}, ...]`` with the model's chat template
        (encode the result with ``add_special_tokens=False``). Raises TemplateError when the
        model has none."""
    def logprobs(
        self, sequences: Sequence[_TokenIds], temperature: float = 1.0
    ) -> list[npt.NDArray[np.float32]]:
        """Per-token log-probs: ``len(seq) - 1`` values per sequence, bit-for-bit those
        ``generate`` reports for the same tokens."""
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. Raises TokenizerError without a tokenizer."""
    def decode(self, ids: _TokenIds, skip_special_tokens: bool = True) -> str:
        """Text of token ids. Raises InvalidArgumentError for ids not below vocab_size."""
    @property
    def vocab_size(self) -> int: ...
    @property
    def context_length(self) -> int: ...
    @property
    def eos_token_ids(self) -> list[int]: ...
    def close(self) -> None:
        """Releases the model; later calls raise ClosedError."""
    @property
    def closed(self) -> bool: ...
    def __enter__(self) -> Model: ...
    def __exit__(
        self,
        exc_type: Union[type[BaseException], None],
        exc: Union[BaseException, None],
        tb: Union[TracebackType, None],
    ) -> bool: ...

@final
class TokenStream:
    """The iterator ``Model.stream`` returns."""

    def __iter__(self) -> Iterator[tuple[int, float, str]]: ...
    def __next__(self) -> tuple[int, float, str]: ...
    def close(self) -> None:
        """Stops generation; the iterator then ends."""

_Masks = Sequence[Sequence[bool]]
_StepStats = dict[str, Union[float, int, bool]]

@final
class LoraConfig:
    """LoRA settings: rank ``r``, scale ``lora_alpha / r``, adapted modules (PEFT names;
    ``["all-linear"]`` for every projection)."""

    def __init__(
        self,
        r: int = 8,
        lora_alpha: float = 16.0,
        target_modules: Union[list[str], None] = None,
        seed: int = 0,
    ) -> None: ...
    @property
    def r(self) -> int: ...
    @property
    def lora_alpha(self) -> float: ...
    @property
    def target_modules(self) -> list[str]: ...

@final
class RewardModel:
    """A decoder with a scalar score head (``*ForSequenceClassification``, num_labels = 1)."""

    @staticmethod
    def load(
        path: Union[str, PathLike[str]],
        threads: int = 0,
        device: str = "cpu",
        device_dtype: str = "f32",
    ) -> RewardModel: ...
    def score(self, sequences: Sequence[_TokenIds]) -> npt.NDArray[np.float32]:
        """The reward of each sequence, read at its last token."""
    def encode(self, text: str) -> list[int]: ...
    def close(self) -> None:
        """Releases the model; later calls raise ClosedError."""
    @property
    def closed(self) -> bool: ...
    def __enter__(self) -> RewardModel: ...
    def __exit__(
        self,
        exc_type: Union[type[BaseException], None],
        exc: Union[BaseException, None],
        tb: Union[TracebackType, None],
    ) -> bool: ...

class Trainer:
    """Trains a model with AdamW. Each ``*_step`` returns ``{"loss", "grad_norm", "lr",
    "skipped", "step", ...}``; a non-finite step changes nothing and reports
    ``skipped=True``.

    >>> t = rlx.Trainer("path/to/model", lr=1e-5, lora=rlx.LoraConfig(r=8))
    >>> t.sft_step([[1, 5, 9, 2]], [[False, True, True, True]])["loss"]
    """

    def __init__(
        self,
        path: Union[str, PathLike[str]],
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        max_grad_norm: Union[float, None] = 1.0,
        warmup_steps: int = 0,
        total_steps: int = 0,
        lora: Union[LoraConfig, None] = None,
        gradient_checkpointing: bool = False,
        head: Union[Literal["score", "value"], None] = None,
        seed: int = 0,
        threads: int = 0,
        device: str = "cpu",
        compute_dtype: Literal["f32", "bf16"] = "f32",
    ) -> None:
        """``compute_dtype="bf16"``: the linear layers and the LM head multiply bf16 operands
        with f32 sums (f32 master weights, gradients and AdamW); about twice the product
        speed on CPUs with AVX-512-BF16. CPU only."""
    @staticmethod
    def resume(
        path: Union[str, PathLike[str]], threads: int = 0, device: str = "cpu"
    ) -> tuple[Trainer, object]:
        """Continues from a checkpoint; returns the trainer and the saved ``extra``."""
    def save(self, path: Union[str, PathLike[str]], extra: object = None) -> None:
        """Writes a checkpoint folder (never over an existing one)."""
    @property
    def model(self) -> Model:
        """A snapshot of the current model (shares the weights)."""
    @property
    def step(self) -> int: ...
    def sft_step(self, sequences: Sequence[_TokenIds], masks: _Masks) -> _StepStats: ...
    def rm_step(
        self, chosen: Sequence[_TokenIds], rejected: Sequence[_TokenIds], margin: float = 0.0
    ) -> _StepStats: ...
    def dpo_step(
        self,
        chosen: Sequence[_TokenIds],
        chosen_masks: _Masks,
        rejected: Sequence[_TokenIds],
        rejected_masks: _Masks,
        ref_chosen: Sequence[float],
        ref_rejected: Sequence[float],
        beta: float = 0.1,
        loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid",
    ) -> _StepStats: ...
    def grpo_step(
        self,
        sequences: Sequence[_TokenIds],
        masks: _Masks,
        advantages: Sequence[float],
        old_logprobs: Union[Sequence[Sequence[float]], None] = None,
        ref_logprobs: Union[Sequence[Sequence[float]], None] = None,
        beta: float = 0.04,
        epsilon: float = 0.2,
        loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo",
    ) -> _StepStats: ...
    def values(
        self, sequences: Sequence[_TokenIds], masks: _Masks
    ) -> list[npt.NDArray[np.float32]]:
        """The value head's estimate for each response token (needs ``head="value"``)."""
    def ppo_step(
        self,
        sequences: Sequence[_TokenIds],
        masks: _Masks,
        old_logprobs: Sequence[Sequence[float]],
        old_values: Sequence[Sequence[float]],
        advantages: Sequence[Sequence[float]],
        returns: Sequence[Sequence[float]],
        clip_range: float = 0.2,
        clip_range_value: float = 0.2,
        vf_coef: float = 0.1,
        entropy_coef: float = 0.0,
    ) -> _StepStats:
        """One PPO minibatch step; adds ``policy_loss``, ``value_loss``, ``entropy``,
        ``approx_kl``, ``clip_fraction`` and ``value_clip_fraction`` to the stats.

        >>> adv, ret, kl = rlx.ppo_advantages(old_lp, ref_lp, values, scores)
        >>> t.ppo_step(seqs, masks, old_lp, values, adv, ret)["approx_kl"]  # 0.0 at first
        """
    def close(self) -> None:
        """Releases the model and optimizer state; later calls raise ClosedError."""
    @property
    def closed(self) -> bool: ...
    def __enter__(self) -> Trainer: ...
    def __exit__(
        self,
        exc_type: Union[type[BaseException], None],
        exc: Union[BaseException, None],
        tb: Union[TracebackType, None],
    ) -> bool: ...

def group_advantages(
    rewards: Sequence[float], group_size: int, scale_rewards: bool = True
) -> list[float]:
    """Group-normalised GRPO advantages (consecutive groups of ``group_size``)."""

def ppo_advantages(
    old_logprobs: Sequence[Sequence[float]],
    ref_logprobs: Sequence[Sequence[float]],
    old_values: Sequence[Sequence[float]],
    scores: Sequence[float],
    kl_coef: float = 0.05,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten_advantages: bool = True,
) -> tuple[list[list[float]], list[list[float]], float]:
    """PPO's KL-penalised rewards → GAE ``(advantages, returns, kl)`` per response token."""

def set_memory_limit(limit_bytes: Union[int, None]) -> None:
    """Cap the bytes one request may plan to allocate (``None`` removes it); over it, or over
    what the system reports available, a request raises ``MemoryError`` before allocating."""

def run_on_policy(
    job: str,
    collector: Union[Any, None] = None,
    on_metrics: Union[Callable[[str], None], None] = None,
    on_message: Union[Callable[[str], None], None] = None,
) -> tuple[str, int, str, Union[str, None]]:
    """Run a PPO/GRPO job (``rlx ppo``'s settings as JSON) in this process; with ``collector``
    (an object with ``collect(state: bytes, request: str) -> str``) rollouts are asked of it.
    Returns ``(outcome, steps, last_metrics_json, model_dir)``."""

class _RolloutWorkerModels:
    """A rollout worker's policy, reference and reward model, built from a job (JSON)."""

    def __init__(self, job: str) -> None: ...
    def load_policy_state(self, state: bytes) -> None: ...
    def collect(self, request: str) -> str: ...
