"""trace-trl: TRACE (token-routed self on-policy distillation over GRPO) as a Hugging Face TRL trainer.

Paper: "Distilling Where It Matters via Token-Routed Self On-Policy Alignment", https://huggingface.co/papers/2605.10194
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any


__version__ = "0.2.0"

# Heavy modules (torch, transformers, trl) load on first use, so `import trace_trl` and `trace-trl --help` are fast.
_LAZY_ATTRIBUTES = {
    "TRACEConfig": "trace_trl.config",
    "TRACETrainer": "trace_trl.trainer",
    "Span": "trace_trl.spans",
    "token_labels": "trace_trl.spans",
    "token_divergence": "trace_trl.losses",
    "kl_weight": "trace_trl.schedule",
}

__all__ = ["__version__", *_LAZY_ATTRIBUTES]

if TYPE_CHECKING:
    from .config import TRACEConfig  # noqa: F401
    from .losses import token_divergence  # noqa: F401
    from .schedule import kl_weight  # noqa: F401
    from .spans import Span, token_labels  # noqa: F401
    from .trainer import TRACETrainer  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY_ATTRIBUTES:
        return getattr(importlib.import_module(_LAZY_ATTRIBUTES[name]), name)
    raise AttributeError(f"module 'trace_trl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
