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


class AnswerTooLongError(AnnotationParseError):
    """The answer is longer than the parser accepts (`MAX_ANSWER_CHARS`); it is refused without being read."""


# Longest answer the parser reads, in characters. An annotation is a few quotes (a few KB at most); anything much longer
# is a runaway generation, and refusing it bounds the time one answer can take while other requests wait.
MAX_ANSWER_CHARS = 200_000
# Candidate objects decoded per piece of the answer (each fenced block, and the whole answer): bounds the work on an
# answer made of thousands of small objects.
MAX_JSON_CANDIDATES = 64

_TRAILING_COMMA = re.compile(r",(\s*[}\]])")
# A lone backslash before anything but a JSON escape letter (LaTeX: `\(`, `\sqrt`) makes the JSON invalid.
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)
# The characters the object scanner stops at; everything else is skipped by the regex engine.
_STRUCTURE = re.compile(r'[{}"\\]')
# An object that can be the answer starts with a key (or is empty).
_OBJECT_START = re.compile(r"\{\s*[\"}]")
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


def extract_json(text: str, *, max_chars: int | None = MAX_ANSWER_CHARS) -> dict[str, Any]:
    """The JSON object of an annotator's answer, tolerating what models wrap around it.

    Handles: `<think>...</think>` blocks, Markdown code fences, prose before or after the object, trailing commas and
    LaTeX backslashes that are not JSON escapes. An object holding `spans` (or `quotes`) is preferred, also when it is
    nested in another object; otherwise the first object found is returned.

    Time is linear in the length of the answer: one scan finds the outermost balanced `{...}` pieces (aware of JSON
    strings and escapes), and only those are decoded, at most `MAX_JSON_CANDIDATES` per fenced block and for the whole
    answer; when none decodes, at most as many more starts (`{` followed by `"`) are tried. An object nested deeper than
    Python's recursion limit is a parse failure, never a `RecursionError`.

    Args:
        text (`str`):
            The answer.
        max_chars (`int` or `None`, *optional*, defaults to `MAX_ANSWER_CHARS`):
            Longer answers raise `AnswerTooLongError` without being read; `None` for no limit.

    Raises:
        `AnnotationParseError`: when no object can be read (`AnswerTooLongError` when the answer is too long).
    """
    text = text or ""
    if max_chars is not None and len(text) > max_chars:
        raise AnswerTooLongError(
            f"answer_too_long: the annotator's answer has {len(text)} characters, more than the {max_chars} the parser "
            "accepts (max_answer_chars); lower the annotator's max_tokens, or raise max_answer_chars if such answers "
            "are genuine"
        )
    text = strip_think_blocks(text)
    fallback: dict[str, Any] | None = None
    for piece in [*_fenced_blocks(text), text]:
        found, first = _find_answer(piece)
        if found is not None:
            return found
        if fallback is None:
            fallback = first
    if fallback is not None:
        return fallback
    preview = (text[:120] + "...") if len(text) > 120 else text
    raise AnnotationParseError(f"no JSON object in the annotator's answer: {preview!r}")


def strip_think_blocks(text: str) -> str:
    """`text` without its `<think>...</think>` blocks; an unclosed `<think>` stays. Linear, unlike a lazy regex."""
    pieces, position = [], 0
    while True:
        opening = text.find("<think>", position)
        if opening < 0:
            break
        closing = text.find("</think>", opening + 7)
        if closing < 0:
            break
        pieces.append(text[position:opening])
        position = closing + 8
    pieces.append(text[position:])
    return "".join(pieces)


def _fenced_blocks(text: str) -> list[str]:
    """The contents of Markdown code fences (an optional `json` tag dropped), in order. Linear."""
    blocks, position = [], 0
    while True:
        opening = text.find("```", position)
        if opening < 0:
            return blocks
        closing = text.find("```", opening + 3)
        if closing < 0:
            return blocks
        block = text[opening + 3 : closing]
        if block[:4] in ("json", "JSON"):
            block = block[4:]
        blocks.append(block.lstrip())
        position = closing + 3


def _object_pieces(text: str) -> list[tuple[int, int]]:
    """The outermost balanced `{...}` pieces of `text`, as `(start, end)`, in order; one linear scan.

    Braces inside JSON strings do not count (strings are tracked inside braces only, so a stray `"` in prose does not
    matter). A `{` that never closes (LaTeX, a set in prose, a truncated answer) does not hide the objects after it:
    the balanced pieces inside an unclosed brace are outermost too.
    """
    # `stack` holds the positions of the open braces; `levels[d]` the balanced pieces closed at depth `d` since the
    # brace enclosing them opened (they are dropped when it closes: they are then inside a bigger piece).
    stack: list[int] = []
    levels: list[list[tuple[int, int]]] = [[]]
    in_string = False
    skip = -1  # the position of an escaped character
    for match in _STRUCTURE.finditer(text):
        index = match.start()
        char = text[index]
        if in_string:
            if index == skip:
                continue
            if char == "\\":
                skip = index + 1
            elif char == '"':
                in_string = False
        elif char == "{":
            stack.append(index)
        elif char == "}":
            if stack:
                start = stack.pop()
                depth = len(stack)
                if len(levels) > depth + 1:
                    levels[depth + 1].clear()
                while len(levels) <= depth:
                    levels.append([])
                levels[depth].append((start, index + 1))
        elif char == '"' and stack:
            in_string = True
    # What an unclosed brace holds is outermost too (levels past the open depth are empty: cleared on closing).
    pieces = [piece for level in levels[: len(stack) + 1] for piece in level]
    pieces.sort()
    return pieces


def _decode(piece: str) -> Any:
    """`piece` as JSON, trying it as is, without trailing commas, then with invalid escapes fixed; `None` if none."""
    without_commas = _TRAILING_COMMA.sub(r"\1", piece)
    for variant in (piece, without_commas, _fix_invalid_escapes(without_commas)):
        try:
            return json.loads(variant)
        except (json.JSONDecodeError, RecursionError):  # RecursionError: nested deeper than Python allows
            continue
    return None


def _answer_in(value: Any) -> dict[str, Any] | None:
    """The first object holding `spans`/`quotes`/`segments` in `value` (itself, or nested), breadth first, without
    recursion."""
    queue = [value]
    for item in queue:  # the list grows while we walk it
        if isinstance(item, dict):
            if "spans" in item or "quotes" in item or "segments" in item:
                return item
            queue.extend(item.values())
        elif isinstance(item, list):
            queue.extend(item)
    return None


def _find_answer(text: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """`(answer, first_object)` of one piece of an answer: the object holding spans, and the first object at all."""
    first: dict[str, Any] | None = None
    tried: set[int] = set()
    candidates = [(s, e) for s, e in _object_pieces(text) if _OBJECT_START.match(text, s)]
    for start, end in candidates[:MAX_JSON_CANDIDATES]:
        tried.add(start)
        value = _decode(text[start:end])
        if isinstance(value, dict):
            answer = _answer_in(value)
            if answer is not None:
                return answer, value
            first = value if first is None else first
    if first is not None:
        return None, first
    # The scan can be misled (an unbalanced quote inside a stray brace); decode from a bounded number of likely starts.
    decoder = json.JSONDecoder()
    attempts = 0
    for match in _OBJECT_START.finditer(text):
        if match.start() in tried:
            continue
        attempts += 1
        if attempts > MAX_JSON_CANDIDATES:
            break
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(value, dict):
            answer = _answer_in(value)
            if answer is not None:
                return answer, value
            first = value if first is None else first
    return None, first


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


def parse_annotation(
    text: str,
    request: AnnotationRequest,
    usage: Mapping[str, float] | None = None,
    *,
    max_chars: int | None = MAX_ANSWER_CHARS,
) -> Annotation:
    """Turn an annotator's answer into an `Annotation` of `request.completion`.

    Quotes are placed with `locate_quotes` (exact, then whitespace-normalized; repeated quotes take the next
    occurrence); unplaceable or malformed items are dropped and counted in `dropped_spans`. Spans whose kind does
    not match the rollout's correctness are kept as returned: the trainer drops and counts them.

    Raises:
        `AnnotationParseError`: when the answer holds no JSON object with a `spans` list (`AnswerTooLongError` when
        it is longer than `max_chars` characters, see `extract_json`).
    """
    payload = extract_json(text, max_chars=max_chars)
    quotes, unusable = _quote_items(payload, request.is_correct)
    quotes = [(_repair_latex(quote, request.completion), kind) for quote, kind in quotes]
    spans, not_found = locate_quotes(request.completion, quotes)
    return Annotation(
        spans=tuple(spans),
        diagnosis=normalize_diagnosis(payload.get("diagnosis")),
        dropped_spans=unusable + not_found,
        usage=dict(usage or {}),
    )


# Kinds of failure an annotator flags in a failed annotation's `usage` (`usage[kind] = 1`), counted by `AnnotatorStats`.
FAILURE_KINDS = ("invalid_responses", "format_failures", "answers_too_long")


class AnnotatorStats:
    """Thread-safe running totals behind an annotator's `metrics()`.

    Counters: `requests` (rollouts asked for), `cache_hits`, `api_calls` (attempts sent), `retries`, `failures`,
    `spans`, `dropped_spans`, `prompt_tokens`, `completion_tokens`, `json_schema_fallbacks`, `dropped_labels` (type
    labels outside the taxonomy of the rollout's kind, from `usage["dropped_labels"]`), and among the failures
    `invalid_responses` (an HTTP 200 whose body is not a chat completion), `format_failures` (an answer with no
    usable JSON annotation) and `answers_too_long` (refused unread, see `MAX_ANSWER_CHARS`); plus the summed latency
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
        "dropped_labels",
        "invalid_responses",
        "format_failures",
        "answers_too_long",
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
            if annotation.failed:  # the kind of failure, flagged in `usage` by the annotator
                for name in FAILURE_KINDS:
                    self._totals[name] += int(bool(usage.get(name)))
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


def _segment_payload(text: str, max_chars: int | None = MAX_ANSWER_CHARS) -> dict[str, Any]:
    """The JSON object of a segment answer.

    `extract_json` prefers objects with a quote-protocol key; when it returns another object (an example item in
    prose, or one item of an answer with a trailing comma), the object that opens just before one of the first few
    `"segments"` keys is decoded instead (bounded, so hostile text stays linear).
    """
    payload = extract_json(text, max_chars=max_chars)
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
            except (json.JSONDecodeError, RecursionError):  # RecursionError: nested deeper than Python allows
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
    *,
    max_chars: int | None = MAX_ANSWER_CHARS,
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
    payload = _segment_payload(text, max_chars)
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
