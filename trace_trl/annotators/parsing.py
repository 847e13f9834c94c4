"""From an annotator's text answer to an `Annotation`: tolerant JSON extraction, quote placement, running metrics.

Shared by `OpenAIAnnotator` and `SelfAnnotator`, so both accept exactly the same answers.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping
from typing import Any

from ..spans import locate_quote
from ._quotes import locate_quotes
from .base import Annotation, AnnotationRequest
from .prompts import DIAGNOSIS_LABELS, SPAN_KIND_ERROR, SPAN_KIND_KEY


class AnnotationParseError(ValueError):
    """The annotator's answer is not a JSON object of the expected shape."""


_CODE_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)
_TRAILING_COMMA = re.compile(r",(\s*[}\]])")
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
# A lone backslash before anything but a JSON escape letter (LaTeX: `\(`, `\sqrt`) makes the JSON invalid.
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)
# LaTeX written with single backslashes decodes into control characters: `\frac` -> form feed + "rac".
_LATEX_CONTROL_CHARS = {"\b": "\\b", "\f": "\\f", "\t": "\\t", "\r": "\\r"}
_KIND_ALIASES = {
    "key": SPAN_KIND_KEY,
    "key_step": SPAN_KIND_KEY,
    "keystep": SPAN_KIND_KEY,
    "error": SPAN_KIND_ERROR,
    "first_error": SPAN_KIND_ERROR,
    "mistake": SPAN_KIND_ERROR,
}


def extract_json(text: str) -> dict[str, Any]:
    """The first JSON object in `text`, tolerating what models wrap around it.

    Handles: a `<think>...</think>` block before the answer, Markdown code fences, prose before or after the object,
    and trailing commas. Raises `AnnotationParseError` when no object can be read.
    """
    text = _THINK_BLOCK.sub("", text or "")
    candidates = [match.group(1) for match in _CODE_FENCE.finditer(text)] + [text]
    decoder = json.JSONDecoder()
    fallback: dict[str, Any] | None = None
    for candidate in candidates:
        without_commas = _TRAILING_COMMA.sub(r"\1", candidate)
        for variant in (candidate, without_commas, _fix_invalid_escapes(without_commas)):
            for start in (i for i, char in enumerate(variant) if char == "{"):
                try:
                    value, _ = decoder.raw_decode(variant, start)
                except json.JSONDecodeError:
                    continue
                # An inner object (one span) also decodes; prefer the object that holds the answer.
                if isinstance(value, dict) and ("spans" in value or "quotes" in value):
                    return value
                if isinstance(value, dict) and fallback is None:
                    fallback = value
    if fallback is not None:
        return fallback
    preview = (text[:120] + "...") if len(text) > 120 else text
    raise AnnotationParseError(f"no JSON object in the annotator's answer: {preview!r}")


def _fix_invalid_escapes(text: str) -> str:
    # Escapes are consumed pairwise, so an escaped backslash (`\\\\`) is never split.
    return _ESCAPE.sub(lambda m: m.group(0) if m.group(1) in '"\\/bfnrtu' else "\\\\" + m.group(1), text)


def normalize_diagnosis(value: Any) -> str | None:
    """A label of `DIAGNOSIS_LABELS`, `None` for no diagnosis; unknown labels become `"other"`."""
    if value is None:
        return None
    label = re.sub(r"[\s\-]+", "_", str(value).strip().lower())
    if label in ("", "null", "none", "correct"):
        return None
    return label if label in DIAGNOSIS_LABELS else "other"


def _quote_items(payload: Mapping[str, Any], is_correct: bool) -> tuple[list[tuple[str, str]], int]:
    """The `(quote, kind)` pairs of an answer, and how many items were unusable (dropped)."""
    items = payload.get("spans", payload.get("quotes"))
    if items is None:
        raise AnnotationParseError("the annotator's JSON has no 'spans' list")
    if not isinstance(items, list):
        raise AnnotationParseError(f"'spans' must be a list, got {type(items).__name__}")
    default_kind = SPAN_KIND_KEY if is_correct else SPAN_KIND_ERROR
    quotes: list[tuple[str, str]] = []
    unusable = 0
    for item in items:
        if isinstance(item, str):  # a bare quote: its kind follows the rollout's correctness
            quote, kind = item, default_kind
        elif isinstance(item, Mapping):
            quote = item.get("quote", item.get("text"))
            kind = _KIND_ALIASES.get(str(item.get("kind", default_kind)).strip().lower())
        else:
            quote, kind = None, None
        if not isinstance(quote, str) or not quote.strip() or kind is None:
            unusable += 1
            continue
        quotes.append((quote, kind))
    return quotes, unusable


def _repair_latex(quote: str, completion: str) -> str:
    """Undo JSON's reading of single-backslash LaTeX (`\\frac` -> form feed) when that makes the quote placeable."""
    if not any(char in quote for char in _LATEX_CONTROL_CHARS):
        return quote
    repaired = quote
    for char, escaped in _LATEX_CONTROL_CHARS.items():
        repaired = repaired.replace(char, escaped)
    # The repaired quote first: the whitespace-tolerant match would place the broken one without its `\t`.
    return repaired if locate_quote(completion, repaired) is not None else quote


def parse_annotation(text: str, request: AnnotationRequest, usage: Mapping[str, float] | None = None) -> Annotation:
    """Turn an annotator's answer into an `Annotation` of `request.completion`.

    Quotes are placed with `locate_quotes` (exact, then whitespace-normalized; repeated quotes take the next
    occurrence); unplaceable or malformed items are dropped and counted in `dropped_spans`. Spans whose kind does
    not match the rollout's correctness are kept as returned: the trainer drops and counts them.

    Raises:
        `AnnotationParseError`: when the answer holds no JSON object with a `spans` list.
    """
    payload = extract_json(text)
    quotes, unusable = _quote_items(payload, request.is_correct)
    quotes = [(_repair_latex(quote, request.completion), kind) for quote, kind in quotes]
    spans, not_found = locate_quotes(request.completion, quotes)
    return Annotation(
        spans=tuple(spans),
        diagnosis=normalize_diagnosis(payload.get("diagnosis")),
        dropped_spans=unusable + not_found,
        usage=dict(usage or {}),
    )


class AnnotatorStats:
    """Thread-safe running totals behind an annotator's `metrics()`.

    Counters: `requests` (rollouts asked for), `cache_hits`, `api_calls` (attempts sent), `retries`, `failures`,
    `spans`, `dropped_spans`, `prompt_tokens`, `completion_tokens`, `json_schema_fallbacks`; plus the summed latency
    of the annotations that were not served from the cache.
    """

    COUNTERS = (
        "requests",
        "cache_hits",
        "api_calls",
        "retries",
        "failures",
        "spans",
        "dropped_spans",
        "prompt_tokens",
        "completion_tokens",
        "json_schema_fallbacks",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._totals = dict.fromkeys(self.COUNTERS, 0)
            self._latency_sum = 0.0
            self._latency_count = 0

    def add(self, **counts: float) -> None:
        with self._lock:
            for name, value in counts.items():
                self._totals[name] += value

    def record(self, annotation: Annotation, count_usage: bool = True) -> None:
        """Count one finished annotation (success or failure) and, unless `count_usage=False`, its usage."""
        usage = annotation.usage or {}
        with self._lock:
            self._totals["failures"] += int(annotation.failed)
            self._totals["spans"] += len(annotation.spans)
            self._totals["dropped_spans"] += annotation.dropped_spans
            if usage.get("cached"):
                self._totals["cache_hits"] += 1
                return
            if not count_usage:
                return
            self._totals["prompt_tokens"] += int(usage.get("prompt_tokens", 0))
            self._totals["completion_tokens"] += int(usage.get("completion_tokens", 0))
            if "latency_s" in usage:
                self._latency_sum += float(usage["latency_s"])
                self._latency_count += 1

    def as_dict(self, prefix: str = "annotator/") -> dict[str, float]:
        with self._lock:
            metrics: dict[str, float] = {f"{prefix}{name}": value for name, value in self._totals.items()}
            mean = self._latency_sum / self._latency_count if self._latency_count else 0.0
        metrics[f"{prefix}latency_s_mean"] = mean
        return metrics

    # A lock cannot be pickled; annotators are pickled (and deep-copied) along with the trainer.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
