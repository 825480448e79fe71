# Type stubs for the compiled module rlx._rlx (python/src/).
from collections.abc import Sequence
from os import PathLike
from typing import Literal, Union, final

import numpy as np
import numpy.typing as npt

__all__ = ["Generation", "Model", "__version__"]
__version__: str

_TokenIds = Union[Sequence[int], npt.NDArray[np.integer]]

@final
class Generation:
    """One sequence's output of ``Model.generate``."""

    @property
    def tokens(self) -> list[int]:
        """New token ids (not the prompt)."""
    @property
    def logprobs(self) -> npt.NDArray[np.float32]:
        """Each new token's log-prob, as ``Model.logprobs`` computes it."""
    @property
    def finish_reason(self) -> Literal["stop", "length", "cancelled"]:
        """Why generation ended."""
    def __len__(self) -> int: ...

@final
class Model:
    """A decoder language model loaded from a Hugging Face folder or a GGUF file."""

    @staticmethod
    def load(path: Union[str, PathLike[str]], threads: int = 0) -> Model:
        """Loads a Hugging Face model folder (config.json, model.safetensors,
        tokenizer.json, ...) or a GGUF file.

        ``threads``: worker threads for this model's calls; 0 = one per CPU core.
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
    ) -> list[Generation]:
        """Generates a continuation of each prompt. ``temperature=0`` is greedy; the same
        ``seed`` gives the same tokens. ``stop_token_ids=None`` stops at ``eos_token_ids``.

        Raises InvalidArgumentError (bad id or parameter), ContextOverflowError.
        """
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
