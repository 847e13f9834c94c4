"""Annotators that need no model: the all-token baseline, regular expressions, and the random and inverted controls.

All of them are deterministic and cheap, which makes them the baselines of the paper's comparisons (all-token self-OPD,
random 25% of the tokens, the inverted 25% outside the key spans) and handy for tests and smoke runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..spans import SPAN_KINDS, Span
from .base import Annotation, AnnotationRequest, bind_annotator
from .taxonomy import ERROR_TYPES, KEY_STEP_TYPES, check_type_label, normalize_type_label, type_label_dropped


Diagnosis = str | Callable[[AnnotationRequest], "str | None"] | None


def _check_kind(name: str, kind: str | None) -> None:
    if kind is not None and kind not in SPAN_KINDS:
        raise ValueError(f"`{name}` must be one of {SPAN_KINDS} or None, got {kind!r}.")


def _diagnosis_for(diagnosis: Diagnosis, request: AnnotationRequest) -> tuple[str | None, int]:
    """The type label for `request` (checked against its kind's taxonomy) and 1 when a computed label was invalid."""
    label = diagnosis(request) if callable(diagnosis) else diagnosis
    return check_type_label(label, request.is_correct), int(
        callable(diagnosis) and type_label_dropped(label, request.is_correct)
    )


def _check_diagnosis(diagnosis: Any) -> None:
    if diagnosis is not None and not isinstance(diagnosis, str) and not callable(diagnosis):
        raise ValueError(
            f"`diagnosis` must be a string, a callable(request) -> str | None, or None, got {diagnosis!r}."
        )
    if isinstance(diagnosis, str):
        label = normalize_type_label(diagnosis)
        if label not in KEY_STEP_TYPES and label not in ERROR_TYPES:
            raise ValueError(
                f"`diagnosis` must be a type label of the taxonomy (trace_trl.annotators.taxonomy): one of "
                f"{sorted(KEY_STEP_TYPES)} for correct rollouts or {sorted(ERROR_TYPES)} for incorrect ones; got "
                f"{diagnosis!r}."
            )


class AllTokensAnnotator:
    """One span over the whole completion: the all-token baselines.

    Every token of a correct rollout is distilled (forward KL by default) only with the coverage cap off
    (`max_routed_fraction=None`): under a cap the trainer would keep a prefix of each rollout, so `TRACETrainer`
    refuses this annotator with a cap. With `kl_decay="none"` and `routed_token_grpo="additive"` it is the dense
    all-token self-OPD baseline TRACE is compared against; with TRACE's schedule, the routing ablation's all-token arm.

    Args:
        kind_for_correct (`str` or `None`, *optional*, defaults to `"key"`):
            Kind of the span given to correct rollouts; `None` gives them no span.
        kind_for_incorrect (`str` or `None`, *optional*, defaults to `"error"`):
            Kind of the span given to incorrect rollouts; `None` gives them no span (pure GRPO).

    Example:

    ```python
    >>> annotator = AllTokensAnnotator(kind_for_incorrect=None)
    >>> annotator([AnnotationRequest(prompt="1+1?", completion="2", is_correct=True, reward=1.0)])
    [Annotation(spans=(Span(start=0, end=1, kind='key'),), ...)]
    ```
    """

    def __init__(self, kind_for_correct: str | None = "key", kind_for_incorrect: str | None = "error") -> None:
        _check_kind("kind_for_correct", kind_for_correct)
        _check_kind("kind_for_incorrect", kind_for_incorrect)
        self.kind_for_correct = kind_for_correct
        self.kind_for_incorrect = kind_for_incorrect

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(kind_for_correct={self.kind_for_correct!r}, "
            f"kind_for_incorrect={self.kind_for_incorrect!r})"
        )

    def __call__(self, requests: Sequence[AnnotationRequest]) -> list[Annotation]:
        annotations = []
        for request in requests:
            kind = self.kind_for_correct if request.is_correct else self.kind_for_incorrect
            length = len(request.completion)
            spans = (Span(0, length, kind),) if kind is not None and length > 0 else ()
            annotations.append(Annotation(spans=spans))
        return annotations


def _compile_patterns(name: str, patterns: Any, flags: int) -> tuple[re.Pattern[str], ...]:
    if patterns is None:
        return ()
    if isinstance(patterns, (str, re.Pattern)):  # a lone pattern, not an iterable of one-character patterns
        patterns = (patterns,)
    compiled = []
    for pattern in patterns:
        if isinstance(pattern, re.Pattern):
            if not isinstance(pattern.pattern, str):
                raise ValueError(f"`{name}` needs text patterns, got the bytes pattern {pattern.pattern!r}.")
            # Keep the pattern's own flags and add the annotator's.
            source, pattern_flags = pattern.pattern, pattern.flags & ~re.UNICODE
        elif isinstance(pattern, str):
            source, pattern_flags = pattern, 0
        else:
            raise ValueError(f"`{name}` must hold strings or compiled regexes, got {pattern!r}.")
        try:
            compiled.append(re.compile(source, pattern_flags | flags))
        except re.error as exc:
            raise ValueError(f"Invalid regular expression in `{name}`: {source!r} ({exc}).") from exc
    return tuple(compiled)


class RegexAnnotator:
    """Spans from regular expressions: key patterns in correct rollouts, error patterns in incorrect ones.

    Every non-overlapping match of a pattern (as `re.finditer` finds them) becomes a span; a pattern with a capture
    group marks group 1 instead of the whole match (a match where group 1 did not take part, or any empty match,
    is skipped).
    Spans of different patterns may overlap; token labelling takes their union.

    Class constants hold common patterns:

    - `BOXED`: a whole `\\boxed{...}` whose content may nest braces two levels deep (`\\boxed{\\frac{\\sqrt{2}}{2}}`);
    - `BOXED_CONTENT`: the same, marking only the content (group 1);
    - `EQUATION`: an arithmetic equation `a op b [op c ...] = d` between (decimal, possibly negative) numbers;
    - `EQUALS_LINE`: any line containing `=`, without its surrounding spaces;
    - `ANSWER_LINE`: the rest of a line after "final answer" / "the answer is" (case-insensitive, group 1).

    Args:
        key_patterns (`str`, `re.Pattern`, or an iterable of them, *optional*, defaults to `()`):
            Patterns that mark key spans of correct rollouts.
        error_patterns (`str`, `re.Pattern`, or an iterable of them, *optional*, defaults to `()`):
            Patterns that mark error spans of incorrect rollouts.
        flags (`int`, *optional*, defaults to `0`):
            `re` flags added to every pattern (compiled patterns keep their own flags too).
        diagnosis (`str` or `Callable[[AnnotationRequest], str | None]`, *optional*):
            Type label (`annotators.taxonomy`) to attach, or a function computing it per request. A label goes only to
            rollouts of its taxonomy's kind (a key-step label to correct rollouts, an error label to incorrect ones);
            a fixed label outside both taxonomies is a `ValueError`, and a computed one that does not fit the
            rollout's kind becomes `None`, counted in `usage["dropped_labels"]`.

    Example:

    ```python
    >>> annotator = RegexAnnotator(key_patterns=[RegexAnnotator.BOXED, RegexAnnotator.EQUATION])
    >>> completion = "6 * 7 = 42, so \\\\boxed{42}"
    >>> request = AnnotationRequest(prompt="6*7?", completion=completion, is_correct=True, reward=1.0)
    >>> [request.completion[s.start : s.end] for s in annotator([request])[0].spans]
    ['6 * 7 = 42', '\\\\boxed{42}']
    ```
    """

    # Content: any non-brace character, or a {...} group that may itself hold one more level of {...}. Single-character
    # alternatives (no `+` inside the starred group) keep matching linear even on unbalanced input.
    _BRACED_2 = r"(?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*"
    BOXED: str = r"\\boxed\s*\{" + _BRACED_2 + r"\}"
    BOXED_CONTENT: str = r"\\boxed\s*\{(" + _BRACED_2 + r")\}"
    _NUMBER = r"-?\d+(?:\.\d+)?"
    EQUATION: str = _NUMBER + r"(?:\s*[-+*/×÷^]\s*" + _NUMBER + r")+\s*=\s*" + _NUMBER
    EQUALS_LINE: str = r"(?m)^[ \t]*([^\n]*?=[^\n]*?)[ \t]*$"
    ANSWER_LINE: str = r"(?i)(?:final answer|the answer is)\s*(?:is)?\s*[:：]?\s*([^\n]*\S)"

    def __init__(
        self,
        key_patterns: str | re.Pattern[str] | Iterable[str | re.Pattern[str]] = (),
        error_patterns: str | re.Pattern[str] | Iterable[str | re.Pattern[str]] = (),
        flags: int = 0,
        diagnosis: Diagnosis = None,
    ) -> None:
        if not isinstance(flags, int):
            raise ValueError(f"`flags` must be an int of `re` flags, got {flags!r}.")
        _check_diagnosis(diagnosis)
        self.key_patterns = _compile_patterns("key_patterns", key_patterns, flags)
        self.error_patterns = _compile_patterns("error_patterns", error_patterns, flags)
        if not self.key_patterns and not self.error_patterns:
            raise ValueError("RegexAnnotator needs at least one pattern in `key_patterns` or `error_patterns`.")
        self.flags = flags
        self.diagnosis = diagnosis

    def __repr__(self) -> str:
        keys = [p.pattern for p in self.key_patterns]
        errors = [p.pattern for p in self.error_patterns]
        return f"{type(self).__name__}(key_patterns={keys!r}, error_patterns={errors!r}, flags={self.flags!r})"

    @staticmethod
    def _find(patterns: Sequence[re.Pattern[str]], text: str, kind: str) -> list[Span]:
        spans = []
        for pattern in patterns:
            for match in pattern.finditer(text):
                start, end = match.span(1) if pattern.groups >= 1 else match.span()
                if 0 <= start < end:  # group 1 absent (-1, -1) or empty: nothing to mark
                    spans.append(Span(start, end, kind))
        return sorted(set(spans))

    def __call__(self, requests: Sequence[AnnotationRequest]) -> list[Annotation]:
        annotations = []
        for request in requests:
            if request.is_correct:
                spans = self._find(self.key_patterns, request.completion, "key")
            else:
                spans = self._find(self.error_patterns, request.completion, "error")
            label, dropped = _diagnosis_for(self.diagnosis, request)
            usage = {"dropped_labels": dropped} if dropped else {}
            annotations.append(Annotation(spans=spans, diagnosis=label, usage=usage))
        return annotations


def _request_seed(seed: int, request: AnnotationRequest) -> int:
    # A stable digest (not Python's salted `hash`), so spans are the same across processes, ranks and runs.
    digest = hashlib.blake2b(digest_size=8, person=b"trace-rand-span")
    for part in (str(seed), request.problem_text, request.completion, str(bool(request.is_correct))):
        encoded = part.encode("utf-8", errors="surrogatepass")
        digest.update(len(encoded).to_bytes(8, "little"))  # length-prefixed: no ambiguity between fields
        digest.update(encoded)
    return int.from_bytes(digest.digest(), "little")


def _place(rng: random.Random, text_length: int, pieces: list[tuple[int, str]]) -> list[Span]:
    """Put `(length, kind)` pieces at random positions of `[0, text_length)`, non-overlapping when they fit.

    Non-overlapping placement: the `text_length - total` free characters are split into `len(pieces) + 1` gaps by
    sorted uniform cut points, and the pieces (in random order) sit between the gaps. When the pieces do not fit side
    by side, each is placed independently (they may then overlap).
    """
    pieces = [(min(max(length, 0), text_length), kind) for length, kind in pieces]
    rng.shuffle(pieces)
    free = text_length - sum(length for length, _ in pieces)
    spans = []
    if free >= 0:
        cuts = sorted(rng.randint(0, free) for _ in pieces)
        position, previous_cut = 0, 0
        for cut, (length, kind) in zip(cuts, pieces):
            position += cut - previous_cut
            previous_cut = cut
            spans.append(Span(position, position + length, kind))
            position += length
    else:
        for length, kind in pieces:
            start = rng.randint(0, text_length - length)
            spans.append(Span(start, start + length, kind))
    return sorted(spans)


class RandomSpanAnnotator:
    """Seeded random spans: the random-span control.

    Two modes:

    - alone (the paper's random-25% control with the defaults): each rollout gets `num_spans` non-overlapping spans
      (key in correct rollouts, error in incorrect ones) covering about `span_fraction` of its characters in total: `round(span_fraction * len(completion))` characters,
      split as evenly as possible (fewer spans when there are fewer characters than spans);
    - `like=annotator`: the other annotator is called first, and each rollout gets the **same number of spans with the
      same lengths and kinds** at random positions (non-overlapping when their total length fits), so that only the
      placement differs ("random spans of matched length"). The diagnosis and bookkeeping of the other annotation are
      kept; its failures pass through unchanged.

    Randomness is drawn from a `random.Random` seeded with a BLAKE2 digest of `(seed, problem, completion,
    correctness)`: the same request always gets the same spans, in any process, batch order or run, and different
    seeds give different spans. Lengths are in characters (spans are character ranges); tokens touched by a span are
    labelled, as for any annotator.

    Args:
        seed (`int`, *optional*, defaults to `0`):
            Seed of the control.
        span_fraction (`float`, *optional*, defaults to `0.25`):
            Fraction of the completion's characters to cover, in `[0, 1]` (ignored with `like`).
        num_spans (`int`, *optional*, defaults to `1`):
            Number of spans per rollout, at least 1 (ignored with `like`).
        like (`Callable[[list[AnnotationRequest]], list[Annotation]]`, *optional*):
            An annotator whose span counts, lengths and kinds to match.
    """

    def __init__(
        self,
        seed: int = 0,
        span_fraction: float = 0.25,
        num_spans: int = 1,
        like: Callable[[Sequence[AnnotationRequest]], list[Annotation]] | None = None,
    ) -> None:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"`seed` must be an int, got {seed!r}.")
        is_number = isinstance(span_fraction, (int, float)) and not isinstance(span_fraction, bool)
        if not is_number or not 0 <= span_fraction <= 1:
            raise ValueError(f"`span_fraction` must be a number in [0, 1], got {span_fraction!r}.")
        if not isinstance(num_spans, int) or isinstance(num_spans, bool) or num_spans < 1:
            raise ValueError(f"`num_spans` must be an int >= 1, got {num_spans!r}.")
        if like is not None and not callable(like):
            raise ValueError(f"`like` must be an annotator (a callable on a list of requests), got {like!r}.")
        self.seed = seed
        self.span_fraction = float(span_fraction)
        self.num_spans = num_spans
        self.like = like

    def __repr__(self) -> str:
        if self.like is not None:
            return f"{type(self).__name__}(seed={self.seed}, like={self.like!r})"
        name = type(self).__name__
        return f"{name}(seed={self.seed}, span_fraction={self.span_fraction}, num_spans={self.num_spans})"

    def bind(self, trainer: Any) -> None:
        """Forward the trainer to the matched annotator, which may need the policy (e.g. `SelfAnnotator`)."""
        if self.like is not None:
            bind_annotator(self.like, trainer)

    def _own_pieces(self, request: AnnotationRequest) -> list[tuple[int, str]]:
        total = round(self.span_fraction * len(request.completion))
        count = min(self.num_spans, total)
        if count == 0:
            return []
        kind = "key" if request.is_correct else "error"
        base, extra = divmod(total, count)
        return [(base + (1 if i < extra else 0), kind) for i in range(count)]

    def __call__(self, requests: Sequence[AnnotationRequest]) -> list[Annotation]:
        requests = list(requests)
        if self.like is not None:
            matched = list(self.like(requests))
            if len(matched) != len(requests):
                raise ValueError(
                    f"The `like` annotator returned {len(matched)} annotations for {len(requests)} requests."
                )
        annotations = []
        for index, request in enumerate(requests):
            rng = random.Random(_request_seed(self.seed, request))
            length = len(request.completion)
            if self.like is None:
                spans = _place(rng, length, self._own_pieces(request)) if length > 0 else []
                annotations.append(Annotation(spans=spans))
                continue
            reference = matched[index]
            if reference.failed:
                annotations.append(reference)
                continue
            pieces = [(len(span), span.kind) for span in reference.spans]
            spans = _place(rng, length, pieces) if length > 0 else []
            annotations.append(dataclasses.replace(reference, spans=tuple(spans)))
        return annotations


def _merge(intervals: Iterable[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """The union of `intervals`, clipped to `[0, length)`, as sorted disjoint non-empty intervals."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted((max(0, s), min(length, e)) for s, e in intervals):
        if start >= end:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _complement(covered: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    gaps, position = [], 0
    for start, end in covered:
        if start > position:
            gaps.append((position, start))
        position = end
    if position < length:
        gaps.append((position, length))
    return gaps


def _window(gaps: list[tuple[int, int]], offset: int, size: int) -> list[tuple[int, int]]:
    """Characters `offset .. offset + size` of the text formed by the `gaps` laid end to end, as real intervals."""
    pieces = []
    for start, end in gaps:
        if size <= 0:
            break
        width = end - start
        if offset >= width:
            offset -= width
            continue
        take = min(width - offset, size)
        pieces.append((start + offset, start + offset + take))
        size -= take
        offset = 0
    return pieces


def _widen_to_tokens(
    intervals: list[tuple[int, int]], offsets: Sequence[tuple[int, int]], length: int
) -> list[tuple[int, int]]:
    """Merged `intervals` grown by the whole character range of every token that overlaps one of them."""
    widened = list(intervals)
    for start, end in offsets:
        if end > start and any(start < b and a < end for a, b in intervals):
            widened.append((start, end))
    return _merge(widened, length)


class InvertedSpanAnnotator:
    """The paper's inverted control: as many characters as `fraction` of the rollout, outside the base's spans.

    The base annotator is called first. For each rollout, its spans of the rollout's own kind (key spans of a correct
    rollout, error spans of an incorrect one) are the *inside*; the characters of the completion outside them, laid
    end to end, form the *outside*. The control marks a window of `round(fraction * len(completion))` consecutive
    outside characters at a random offset: one or more spans of the same kind (one per stretch of text between base
    spans it crosses), none overlapping a base span. When the outside is shorter than the target, all of it is marked
    and the shortfall is counted (`usage["inverted_shortfall_chars"]`, `metrics()`).

    Lengths are in characters, a proxy for tokens (spans are character ranges; the trainer labels every token a span
    touches, and its coverage cap counts tokens). The base's type label and bookkeeping (`dropped_spans`, usage) are
    kept; its spans are replaced; its failures pass through unchanged. Randomness is seeded per request as in
    `RandomSpanAnnotator` (same request and seed, same spans, in any process or batch order).

    Args:
        base (`Callable[[list[AnnotationRequest]], list[Annotation]]`):
            The annotator whose spans to avoid (e.g. `OpenAIAnnotator`); `bind` is forwarded to it.
        fraction (`float`, *optional*, defaults to `0.25`):
            Fraction of each completion's characters to mark, in `[0, 1]`.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the control.
    """

    def __init__(
        self,
        base: Callable[[Sequence[AnnotationRequest]], list[Annotation]],
        fraction: float = 0.25,
        seed: int = 0,
    ) -> None:
        if not callable(base):
            raise ValueError(f"`base` must be an annotator (a callable on a list of requests), got {base!r}.")
        is_number = isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
        if not is_number or not 0 <= fraction <= 1:
            raise ValueError(f"`fraction` must be a number in [0, 1], got {fraction!r}.")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"`seed` must be an int, got {seed!r}.")
        self.base = base
        self.fraction = float(fraction)
        self.seed = seed
        self._short_rollouts = 0
        self._shortfall_chars = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base={self.base!r}, fraction={self.fraction}, seed={self.seed})"

    def bind(self, trainer: Any) -> None:
        """Forward the trainer to the base annotator, which may need the policy (e.g. `SelfAnnotator`)."""
        bind_annotator(self.base, trainer)

    def metrics(self) -> dict[str, float]:
        """The base annotator's metrics plus `annotator/inverted_short_rollouts` (rollouts whose outside was smaller
        than the target) and `annotator/inverted_shortfall_chars` (characters missing from the target in total)."""
        base_metrics = getattr(self.base, "metrics", None)
        metrics = dict(base_metrics()) if callable(base_metrics) else {}
        metrics["annotator/inverted_short_rollouts"] = self._short_rollouts
        metrics["annotator/inverted_shortfall_chars"] = self._shortfall_chars
        return metrics

    def reset_metrics(self) -> None:
        reset = getattr(self.base, "reset_metrics", None)
        if callable(reset):
            reset()
        self._short_rollouts = self._shortfall_chars = 0

    def invert(self, request: AnnotationRequest, reference: Annotation) -> Annotation:
        """The control's annotation of one rollout, given the base's annotation of it."""
        if reference.failed:
            return reference
        length = len(request.completion)
        kind = "key" if request.is_correct else "error"
        inside = _merge(((span.start, span.end) for span in reference.spans if span.kind == kind), length)
        if request.token_offsets is not None:
            inside = _widen_to_tokens(inside, request.token_offsets, length)
        gaps = _complement(inside, length)
        outside = sum(end - start for start, end in gaps)
        target = round(self.fraction * length)
        size = min(target, outside)
        shortfall = target - size
        rng = random.Random(_request_seed(self.seed, request))
        offset = rng.randint(0, outside - size)
        spans = tuple(Span(start, end, kind) for start, end in _window(gaps, offset, size))
        usage = dict(reference.usage)
        if shortfall:
            usage["inverted_shortfall_chars"] = shortfall
            self._short_rollouts += 1
            self._shortfall_chars += shortfall
        return dataclasses.replace(reference, spans=spans, usage=usage)

    def __call__(self, requests: Sequence[AnnotationRequest]) -> list[Annotation]:
        requests = list(requests)
        references = list(self.base(requests))
        if len(references) != len(requests):
            raise ValueError(
                f"The base annotator returned {len(references)} annotations for {len(requests)} requests."
            )
        return [self.invert(request, reference) for request, reference in zip(requests, references)]
