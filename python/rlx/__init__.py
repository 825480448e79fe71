"""rlx: run decoder language models (GPT-2, Llama family) on the CPU.

>>> import rlx
>>> model = rlx.Model.load("path/to/model")
>>> prompt = model.encode("Hello")
>>> out = model.generate([prompt], max_new_tokens=16, temperature=0.0)[0]
>>> lp = model.logprobs([prompt + out.tokens])[0]   # lp[len(prompt) - 1:] == out.logprobs
"""

from rlx._rlx import (
    Generation,
    LoraConfig,
    Model,
    RewardModel,
    SamplingParams,
    TokenStream,
    Trainer,
    __version__,
    group_advantages,
    ppo_advantages,
    set_memory_limit,
)
from rlx.errors import (
    ClosedError,
    ContextOverflowError,
    InvalidArgumentError,
    ModelFormatError,
    RlxError,
    TemplateError,
    TokenizerError,
    UnsupportedError,
)

__all__ = [
    "Model",
    "Generation",
    "Trainer",
    "RewardModel",
    "LoraConfig",
    "group_advantages",
    "ppo_advantages",
    "set_memory_limit",
    "TokenStream",
    "SamplingParams",
    "RlxError",
    "ModelFormatError",
    "UnsupportedError",
    "InvalidArgumentError",
    "ContextOverflowError",
    "TokenizerError",
    "TemplateError",
    "ClosedError",
    "__version__",
]
