"""From an annotator's text answer to an `Annotation`: tolerant JSON extraction, quote placement, running metrics.

Shared by `OpenAIAnnotator` and `SelfAnnotator`, so both accept exactly the same answers.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from collections.abc import Mapping
from typing import Any

from ..spans import Span, locate_quote
from ._quotes import locate_quotes
from .base import Annotation, AnnotationRequest
from .prompts import DIAGNOSIS_LABELS, SPAN_KIND_ERROR, SPAN_KIND_KEY
from .segments import Segment
from .taxonomy import check_type_label, type_label_dropped


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
    `spans`, `dropped_spans`, `prompt_tokens`, `completion_tokens`, `json_schema_fallbacks`, `dropped_labels` (type
    labels outside the taxonomy of the rollout's kind, from `usage["dropped_labels"]`); plus the summed latency of the
    annotations that were not served from the cache.
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
        "dropped_labels",
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
            self._totals["dropped_labels"] += int(usage.get("dropped_labels", 0))
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


# --- the segment protocol ---------------------------------------------------------------------------------------------

_SEGMENT_TRAILING_COMMA = re.compile(r",(\s*[}\]])")
# A segment number as models write it: 3, "3", "[3]".
_SEGMENT_NUMBER = re.compile(r"\s*\[?\s*(\d{1,9})\s*\]?\s*")


def _segment_number(value: Any) -> int | None:
    if isinstance(value, bool):  # JSON true/false are not numbers
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = _SEGMENT_NUMBER.fullmatch(value)
        return int(match.group(1)) if match else None
    return None


def _segment_payload(text: str) -> dict[str, Any]:
    """The JSON object of a segment answer.

    `extract_json` prefers objects with a quote-protocol key; when it returns another object (an example item in
    prose, or one item of an answer with a trailing comma), the object that opens just before one of the first few
    `"segments"` keys is decoded instead (bounded, so hostile text stays linear).
    """
    payload = extract_json(text)
    if "segments" in payload:
        return payload
    text = (text or "").rpartition("</think>")[2]  # never an example from the reasoning
    decoder = json.JSONDecoder()
    key = text.find('"segments"')
    for _attempt in range(3):
        if key < 0:
            break
        start = text.rfind("{", 0, key)
        if start >= 0:
            try:
                value, _ = decoder.raw_decode(_SEGMENT_TRAILING_COMMA.sub(r"\1", text[start:]))
            except json.JSONDecodeError:
                value = None
            if isinstance(value, dict) and "segments" in value:
                return value
        key = text.find('"segments"', key + 1)
    return payload


def parse_segment_annotation(
    text: str,
    request: AnnotationRequest,
    segments: list[Segment] | tuple[Segment, ...],
    usage: Mapping[str, float] | None = None,
) -> Annotation:
    """Turn a segment-protocol answer into an `Annotation` of `request.completion`.

    Each item of `"segments"` (`{"id": n, "kind": ...}`, or a bare number, which takes the rollout's own kind) maps to
    the exact span of segment `n`: `Span(segment.start, segment.end, kind)`. The model's order is kept (it is the order
    of importance, which the trainer's coverage cap follows); nothing is merged. Dropped and counted in
    `dropped_spans`: a number that is not an integer (`3`, `"3"` and `"[3]"` are read; `3.0`, `true`, `"three"` are
    not), out of range, a repeat of an earlier number, an unknown kind, or the other kind than the rollout's (an
    `"error"` segment of a correct rollout, a `"key"` segment of an incorrect one). The `"type"` label is checked
    with `taxonomy.check_type_label` against the rollout's own taxonomy; an invalid label becomes `None` and is
    counted in `usage["dropped_labels"]`.

    Raises:
        `AnnotationParseError`: when the answer holds no JSON object with a `segments` list.
    """
    payload = _segment_payload(text)
    items = payload.get("segments")
    if items is None:
        raise AnnotationParseError("the annotator's JSON has no 'segments' list")
    if not isinstance(items, list):
        raise AnnotationParseError(f"'segments' must be a list, got {type(items).__name__}")
    own_kind = SPAN_KIND_KEY if request.is_correct else SPAN_KIND_ERROR
    by_number = {segment.index: segment for segment in segments}
    spans: list[Span] = []
    seen: set[int] = set()
    dropped = 0
    for item in items:
        if isinstance(item, Mapping):
            number = _segment_number(item.get("id", item.get("segment")))
            kind = _KIND_ALIASES.get(str(item.get("kind", own_kind)).strip().lower())
        else:
            number, kind = _segment_number(item), own_kind
        if number is None or kind != own_kind or number not in by_number or number in seen:
            dropped += 1
            continue
        seen.add(number)
        segment = by_number[number]
        spans.append(Span(segment.start, segment.end, kind))  # type: ignore[arg-type]
    raw_label = payload.get("type", payload.get("diagnosis"))
    usage = dict(usage or {})
    if type_label_dropped(raw_label, request.is_correct):
        usage["dropped_labels"] = usage.get("dropped_labels", 0) + 1
    return Annotation(
        spans=tuple(spans),
        diagnosis=check_type_label(raw_label, request.is_correct),
        dropped_spans=dropped,
        usage=usage,
    )


def enforce_type_label(annotation: Annotation, is_correct: bool) -> Annotation:
    """`annotation` with a type label outside the taxonomy of the rollout's kind removed and counted.

    Applied to the quote protocol's answers (whose parsing is unchanged): an error label on a correct rollout
    becomes `None` and `usage["dropped_labels"]` counts it. Valid labels and failures pass through unchanged.
    """
    if annotation.failed or not type_label_dropped(annotation.diagnosis, is_correct):
        return annotation
    usage = {**annotation.usage, "dropped_labels": annotation.usage.get("dropped_labels", 0) + 1}
    return dataclasses.replace(annotation, diagnosis=None, usage=usage)
