"""Exceptions raised by rlx.

Every failure rlx expects is one of these, or a built-in ``OSError`` subclass
(``FileNotFoundError``, ``PermissionError``) for files that cannot be read. Classes that also
derive from ``ValueError`` can be caught as such.
"""

__all__ = [
    "RlxError",
    "ModelFormatError",
    "UnsupportedError",
    "InvalidArgumentError",
    "ContextOverflowError",
    "TokenizerError",
    "TemplateError",
    "ClosedError",
]


class RlxError(Exception):
    """Base class of rlx's own exceptions."""


class ModelFormatError(RlxError, ValueError):
    """A model file is malformed: bad JSON, safetensors or GGUF, a missing or misshapen
    tensor, an invalid config."""


class UnsupportedError(RlxError):
    """The model or request uses something rlx does not implement (an architecture, a tensor
    dtype, sequences beyond a sliding attention window)."""


class InvalidArgumentError(RlxError, ValueError):
    """An argument is out of its range: a token id not below ``vocab_size``, an empty sequence,
    a negative temperature, ..."""


class ContextOverflowError(InvalidArgumentError):
    """A sequence (prompt + new tokens) is longer than the model's context length."""


class TokenizerError(RlxError):
    """The tokenizer failed, or the model was loaded without one."""


class TemplateError(TokenizerError):
    """A chat template is missing or failed to render."""


class ClosedError(RlxError, ValueError):
    """The object was closed (``close()``, or the end of its ``with`` block) and cannot be
    used any more."""
