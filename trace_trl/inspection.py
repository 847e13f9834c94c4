"""Look at what an annotator does: annotation rows, their statistics, and one self-contained HTML page of them.

[`AnnotationView`]`(rows)` shows the page inline in Jupyter (e.g. `AnnotationView(trainer.last_annotations)`);
[`annotation_statistics`] computes the numbers on its top; [`read_jsonl`] / [`load_rows`] read rollouts or annotations.
The commands built on them are `trace-trl annotate` ([`trace_trl.scripts.annotate`]) and `trace-trl render`
([`trace_trl.scripts.render`]).
"""

from __future__ import annotations

import html
import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .annotators.base import Annotation, AnnotationRequest, prompt_to_text
from .annotators.redaction import redact
from .spans import Span


Row = dict[str, Any]
_TRUE_STRINGS = frozenset({"true", "1", "yes", "y", "correct", "t"})


# --- rows ---------------------------------------------------------------------------------------------------------------


def annotation_row(request: AnnotationRequest, annotation: Annotation, **extra: Any) -> Row:
    """One output row: the rollout's fields, then its spans as `[start, end, kind, text]`, diagnosis and error."""
    return {
        **extra,
        "prompt": request.prompt,
        "completion": request.completion,
        "is_correct": bool(request.is_correct),
        "reference": request.privileged_context,
        "reward": request.reward,
        "spans": [[s.start, s.end, s.kind, request.completion[s.start : s.end]] for s in annotation.spans],
        "diagnosis": annotation.diagnosis,
        "error": annotation.error,
        "dropped_spans": annotation.dropped_spans,
        "usage": dict(annotation.usage),
    }


def _as_bool(value: Any, threshold: float = 0.5) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value >= threshold
    return str(value).strip().lower() in _TRUE_STRINGS


def rows_to_requests(
    rows: Iterable[Mapping[str, Any]],
    *,
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    correct_column: str = "is_correct",
    reference_column: str | None = "reference",
    correct_threshold: float = 0.5,
) -> list[AnnotationRequest]:
    """Build requests from dataset rows; the correctness column may hold booleans, rewards or strings."""
    requests = []
    for i, row in enumerate(rows):
        missing = [c for c in (prompt_column, completion_column, correct_column) if c not in row]
        if missing:
            raise KeyError(f"Row {i} lacks the column(s) {missing}; present: {sorted(row)}. See --help for flags.")
        correct = _as_bool(row[correct_column], correct_threshold)
        reward = row[correct_column] if isinstance(row[correct_column], (int, float)) else float(correct)
        reference = row.get(reference_column) if reference_column else None
        requests.append(
            AnnotationRequest(
                prompt=row[prompt_column],
                completion=str(row[completion_column]),
                is_correct=correct,
                reward=float(reward),
                privileged_context=str(reference) if reference not in (None, "") else None,
            )
        )
    return requests


def read_jsonl(path: str | Path) -> list[Row]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_rows(source: str, *, split: str = "train", config: str | None = None) -> list[Row]:
    """Rows of a local JSONL/JSON file, or of a Hub dataset (`datasets.load_dataset(source, config, split=split)`)."""
    from .data import check_local_dataset_path

    check_local_dataset_path(source)  # a missing file says so, instead of a Hub failure after retries
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".jsonl":
        return read_jsonl(path)
    from datasets import load_dataset

    if path.is_file():
        return list(load_dataset("json", data_files=str(path), split="train"))
    return list(load_dataset(source, config, split=split))


# --- statistics ---------------------------------------------------------------------------------------------------------


def _row_spans(row: Mapping[str, Any]) -> list[Span]:
    return [Span(int(item[0]), int(item[1]), item[2]) for item in row.get("spans") or []]


def _routed_spans(row: Mapping[str, Any]) -> list[Span]:
    """The spans the trainer keeps: none for a failure, and only those whose kind follows correctness (before the
    coverage cap and whatever the span actions are)."""
    if row.get("error") is not None:
        return []
    kind = "key" if row.get("is_correct") else "error"
    return [span for span in _row_spans(row) if span.kind == kind]


def _covered_characters(spans: Sequence[Span]) -> int:
    covered, end = 0, 0
    for span in sorted(spans):
        start = max(span.start, end)
        if span.end > start:
            covered += span.end - start
            end = span.end
    return covered


def annotation_statistics(rows: Sequence[Mapping[str, Any]], tokenizer: Any = None) -> dict[str, Any]:
    """Per-run statistics of annotation rows (as written by `trace-trl annotate`).

    Returns `rollouts`, `annotated` (rows sent to the annotator; a row with `"annotated": false` was not, because its
    kind is not routed), `correct_fraction`, `failure_rate` (failed rows over annotated rows), `spans_per_rollout`
    (all spans, over all rollouts), `key_spans`, `error_spans`, `wrong_kind_spans` (dropped by the trainer),
    `dropped_quote_rate` (quotes that could not be placed, over all quotes), `span_char_fraction` (characters inside
    spans of the kind the rollout's correctness keeps, over all completion characters: an upper bound of what a run
    routes, before the coverage cap and whatever the span actions are), `diagnoses` (label counts) and, given a
    tokenizer, `span_token_fraction` (the same in tokens, via `token_labels` on the completion re-encoded by that
    tokenizer).
    """
    n = len(rows)
    annotated = sum(row.get("annotated", True) is not False for row in rows)
    all_spans = [_row_spans(row) for row in rows]
    placed = sum(len(spans) for spans in all_spans)
    dropped = sum(int(row.get("dropped_spans") or 0) for row in rows)
    routed = [_routed_spans(row) for row in rows]
    kinds = Counter(span.kind for spans in all_spans for span in spans)
    total_chars = sum(len(row.get("completion") or "") for row in rows)
    statistics: dict[str, Any] = {
        "rollouts": n,
        "correct_fraction": sum(bool(row.get("is_correct")) for row in rows) / n if n else 0.0,
        "annotated": annotated,
        "failure_rate": sum(row.get("error") is not None for row in rows) / annotated if annotated else 0.0,
        "spans_per_rollout": placed / n if n else 0.0,
        "key_spans": kinds.get("key", 0),
        "error_spans": kinds.get("error", 0),
        "wrong_kind_spans": placed - sum(len(spans) for spans in routed),  # failed rows carry no spans
        "dropped_quote_rate": dropped / (placed + dropped) if placed + dropped else 0.0,
        "span_char_fraction": sum(map(_covered_characters, routed)) / total_chars if total_chars else 0.0,
        "diagnoses": dict(Counter(row["diagnosis"] for row in rows if row.get("diagnosis")).most_common()),
    }
    if tokenizer is not None:
        statistics["span_token_fraction"] = _span_token_fraction(rows, routed, tokenizer)
    return statistics


def _span_token_fraction(rows: Sequence[Mapping[str, Any]], routed: Sequence[list[Span]], tokenizer: Any) -> float:
    from .spans import token_labels

    routed_tokens = total_tokens = 0
    for row, spans in zip(rows, routed):
        ids = tokenizer(row.get("completion") or "", add_special_tokens=False)["input_ids"]
        labels = token_labels(ids, spans, tokenizer)
        routed_tokens += sum(label != 0 for label in labels)
        total_tokens += len(labels)
    return routed_tokens / total_tokens if total_tokens else 0.0


# --- HTML ---------------------------------------------------------------------------------------------------------------

# Every rule is scoped to `.trace-annotations` so the page can be embedded in a notebook without restyling it.
_CSS = """
.trace-annotations { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328; max-width: 1100px; }
.trace-annotations h1 { font-size: 1.4em; margin: 0.3em 0; }
.trace-annotations table.stats { border-collapse: collapse; margin: 0.5em 0 1em 0; }
.trace-annotations table.stats td { border: 1px solid #d0d7de; padding: 3px 10px; font-size: 0.9em; }
.trace-annotations .legend span { margin-right: 1em; }
.trace-annotations .rollout { border: 1px solid #d0d7de; border-radius: 6px; margin: 0.8em 0; padding: 0.5em 0.8em; }
.trace-annotations .meta { font-size: 0.9em; margin-bottom: 0.4em; }
.trace-annotations .badge { border-radius: 4px; padding: 1px 6px; font-weight: 600; margin-right: 0.5em; }
.trace-annotations .badge.correct { background: #dafbe1; color: #116329; }
.trace-annotations .badge.incorrect { background: #ffebe9; color: #a40e26; }
.trace-annotations .badge.failed { background: #fff8c5; color: #7d4e00; }
.trace-annotations pre { white-space: pre-wrap; word-wrap: break-word; background: #f6f8fa; padding: 0.6em; margin: 0.3em 0;
  border-radius: 4px; font-size: 0.88em; line-height: 1.45; }
.trace-annotations mark { padding: 0 1px; border-radius: 2px; }
.trace-annotations mark.span-key { background: #aceebb; }
.trace-annotations mark.span-error { background: #ffb3b3; }
.trace-annotations mark.span-ignored { background: transparent; outline: 1px dashed #8c959f; }
.trace-annotations details { font-size: 0.9em; }
"""


def _highlight(text: str, spans: Sequence[Span], is_correct: bool) -> str:
    """`text` HTML-escaped, with each span wrapped in `<mark>`; overlapping spans are split at their boundaries."""
    routed_kind = "key" if is_correct else "error"
    bounds = sorted({0, len(text), *(p for s in spans for p in (s.start, s.end) if 0 <= p <= len(text))})
    pieces = []
    for start, end in zip(bounds, bounds[1:]):
        segment = html.escape(text[start:end])
        kinds = {s.kind for s in spans if s.start <= start and end <= s.end}
        if not kinds:
            pieces.append(segment)
            continue
        if routed_kind in kinds:
            css, title = f"span-{routed_kind}", f"{routed_kind} span"
        else:  # a span of the other kind: the trainer drops it
            css, title = "span-ignored", f"{'/'.join(sorted(kinds))} span of the wrong kind (ignored by the trainer)"
        pieces.append(f'<mark class="{css}" title="{title}">{segment}</mark>')
    return "".join(pieces)


def _format_statistic(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
    return str(value)


def _rollout_html(index: int, row: Mapping[str, Any]) -> str:
    correct = bool(row.get("is_correct"))
    badges = [
        f'<span class="badge {"correct" if correct else "incorrect"}">{"correct" if correct else "incorrect"}</span>'
    ]
    if row.get("annotated") is False:
        badges.append('<span class="badge failed">not annotated (its kind is not routed)</span>')
    if row.get("error") is not None:
        # Rows may come from anywhere: strip any credential an error text still carries before showing it.
        error = redact(str(row["error"]), [os.environ.get("OPENAI_API_KEY")])
        badges.append(f'<span class="badge failed">annotation failed: {html.escape(error)}</span>')
    meta = [f"#{html.escape(str(row.get('index', index)))}"]
    if row.get("diagnosis"):
        meta.append(f"diagnosis: <b>{html.escape(str(row['diagnosis']))}</b>")
    meta.append(f"spans: {len(row.get('spans') or [])}")
    if row.get("dropped_spans"):
        meta.append(f"dropped quotes: {int(row['dropped_spans'])}")
    problem = html.escape(prompt_to_text(row.get("prompt") or ""))
    parts = [
        '<div class="rollout">',
        f'<div class="meta">{"".join(badges)}{" &middot; ".join(meta)}</div>',
        f"<details><summary>problem</summary><pre>{problem}</pre></details>",
    ]
    if row.get("reference"):
        parts.append(f"<details><summary>reference</summary><pre>{html.escape(str(row['reference']))}</pre></details>")
    completion = str(row.get("completion") or "")
    parts.append(f"<pre>{_highlight(completion, _row_spans(row), correct)}</pre></div>")
    return "\n".join(parts)


def render_annotations_html(
    rows: Sequence[Mapping[str, Any]],
    *,
    title: str = "TRACE annotations",
    tokenizer: Any = None,
    max_rows: int | None = None,
    full_page: bool = True,
) -> str:
    """HTML of annotation rows: a statistics header, then every rollout with its spans highlighted.

    Key spans are green, error spans red; spans whose kind contradicts the rollout's correctness (the trainer drops
    them) are outlined. All text is HTML-escaped. With `full_page=False` it returns a fragment for notebooks.
    """
    statistics = annotation_statistics(rows, tokenizer=tokenizer)
    shown = rows if max_rows is None else rows[:max_rows]
    stat_rows = "".join(
        f"<tr><td>{html.escape(name.replace('_', ' '))}</td><td>{html.escape(_format_statistic(value))}</td></tr>"
        for name, value in statistics.items()
    )
    body = [
        '<div class="trace-annotations">',
        f"<h1>{html.escape(title)}</h1>",
        f'<table class="stats">{stat_rows}</table>',
        '<div class="legend"><span><mark class="span-key">key span</mark></span>'
        '<span><mark class="span-error">error span</mark></span>'
        '<span><mark class="span-ignored">wrong-kind span (ignored)</mark></span></div>',
        *(_rollout_html(i, row) for i, row in enumerate(shown)),
    ]
    if len(shown) < len(rows):
        body.append(f"<p>{len(rows) - len(shown)} more rollouts not shown.</p>")
    body.append("</div>")
    fragment = f"<style>{_CSS}</style>\n" + "\n".join(body)
    if not full_page:
        return fragment
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n</head>\n<body>\n{fragment}\n</body>\n</html>\n"
    )


class AnnotationView:
    """Inline display of annotation rows in Jupyter (`AnnotationView(rows)` as the last expression of a cell).

    Args:
        rows (`list[dict]`):
            Annotation rows, as written by `trace-trl annotate` or built with `annotation_row`.
        tokenizer (*optional*):
            Adds the routed-token fraction to the statistics.
        max_rows (`int`, *optional*, defaults to `50`):
            Rollouts shown (statistics cover all of them).
    """

    def __init__(self, rows: Sequence[Mapping[str, Any]], *, tokenizer: Any = None, max_rows: int | None = 50) -> None:
        self.rows = list(rows)
        self.tokenizer = tokenizer
        self.max_rows = max_rows

    @classmethod
    def from_annotations(
        cls, requests: Sequence[AnnotationRequest], annotations: Sequence[Annotation], **kwargs: Any
    ) -> AnnotationView:
        return cls([annotation_row(r, a, index=i) for i, (r, a) in enumerate(zip(requests, annotations))], **kwargs)

    def statistics(self) -> dict[str, Any]:
        return annotation_statistics(self.rows, tokenizer=self.tokenizer)

    def _repr_html_(self) -> str:
        return render_annotations_html(self.rows, tokenizer=self.tokenizer, max_rows=self.max_rows, full_page=False)


# `annotate_main` and `render_main` lived here in 0.1; they are the commands `trace_trl.scripts.annotate` and
# `trace_trl.scripts.render` now.
_MOVED = {
    "annotate_main": "trace_trl.scripts.annotate:main",
    "render_main": "trace_trl.scripts.render:main",
    "ANNOTATORS": "trace_trl.scripts.annotate:ANNOTATORS",
    "_annotate_parser": "trace_trl.scripts.annotate:_annotate_parser",
    "_build_from_flags": "trace_trl.scripts.annotate:_build_from_flags",
}


def __getattr__(name: str) -> Any:
    from ._deprecation import moved_attribute

    return moved_attribute(__name__, name, _MOVED)
