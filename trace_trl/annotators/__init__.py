"""Annotators mark the critical spans of each rollout; see `Annotator` for the protocol."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..spans import Span
from .base import Annotation, AnnotationRequest, Annotator, bind_annotator, prompt_to_text
from .taxonomy import ERROR_TYPES, KEY_STEP_TYPES, check_type_label, describe_type_label, type_label_dropped


# Annotators that need optional dependencies (openai) or the trainer load on first use.
_LAZY_ATTRIBUTES = {
    "AllTokensAnnotator": "trace_trl.annotators.heuristic",
    "InvertedSpanAnnotator": "trace_trl.annotators.heuristic",
    "RandomSpanAnnotator": "trace_trl.annotators.heuristic",
    "RegexAnnotator": "trace_trl.annotators.heuristic",
    "OpenAIAnnotator": "trace_trl.annotators.openai_api",
    "SelfAnnotator": "trace_trl.annotators.self_annotator",
}

# `Span` too, so that a custom annotator needs one import: `from trace_trl.annotators import Annotation, Span`.
__all__ = [
    "ERROR_TYPES",
    "KEY_STEP_TYPES",
    "Annotation",
    "AnnotationRequest",
    "Annotator",
    "Span",
    "bind_annotator",
    "check_type_label",
    "describe_type_label",
    "prompt_to_text",
    "type_label_dropped",
    *_LAZY_ATTRIBUTES,
]

if TYPE_CHECKING:
    from .heuristic import AllTokensAnnotator, InvertedSpanAnnotator, RandomSpanAnnotator, RegexAnnotator  # noqa: F401
    from .openai_api import OpenAIAnnotator  # noqa: F401
    from .self_annotator import SelfAnnotator  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY_ATTRIBUTES:
        return getattr(importlib.import_module(_LAZY_ATTRIBUTES[name]), name)
    raise AttributeError(f"module 'trace_trl.annotators' has no attribute {name!r}")
