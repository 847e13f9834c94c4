"""See what an annotator does before training with it: `trace-trl annotate` and `trace-trl render`.

`trace-trl annotate` runs any annotator over a JSONL file or a Hub dataset of rollouts and writes annotations as JSONL;
`trace-trl render` turns them into one self-contained HTML page (inline CSS, no external assets) with key and error
spans highlighted and per-run statistics on top. In Jupyter, `AnnotationView(rows)` shows the same page inline.

    trace-trl annotate rollouts.jsonl -o annotations.jsonl --annotator openai --model gpt-4.1-mini --cache-dir .cache
    trace-trl render annotations.jsonl -o annotations.html --tokenizer Qwen/Qwen3-1.7B
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .annotator_factory import ANNOTATORS as ANNOTATOR_NAMES
from .annotator_factory import REGEX_CONSTANTS, SPAN_FORMATS, annotator_choices
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


# --- command line -------------------------------------------------------------------------------------------------------


def _annotator_defaults() -> dict[str, Any]:
    """The annotator settings' defaults: those of `trace-trl train` (`TraceScriptArguments`), so both agree."""
    from .train import TraceScriptArguments

    defaults = {}
    for f in dataclasses.fields(TraceScriptArguments):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return defaults


def _build_from_flags(args: argparse.Namespace) -> Any:
    """The annotator `--annotator` names, built by the builder `trace-trl train` uses, from the parsed flags."""
    from .annotator_factory import NEEDS_TRAINER, build_annotator, canonical_annotator_name

    name = canonical_annotator_name(args.annotator)
    if name in NEEDS_TRAINER:
        raise SystemExit(
            f"trace-trl annotate: --annotator {args.annotator} needs the policy being trained (it annotates with the "
            "trainer's model), so it runs only inside `trace-trl train`. Use openai (any OpenAI-compatible server, "
            "e.g. a local vLLM serving the same model) here."
        )
    settings = argparse.Namespace(**{**_annotator_defaults(), **vars(args), "annotator": name})
    # Repeatable flags start empty (argparse appends to a list default); unset means the shared default.
    for field_name in ("regex_key_patterns", "regex_error_patterns"):
        if getattr(args, field_name) is None:
            setattr(settings, field_name, _annotator_defaults()[field_name])
    try:
        return build_annotator(settings)
    except ValueError as exc:
        raise SystemExit(f"trace-trl annotate: {exc}") from None


# The annotators the command line can build (the names of `trace-trl train`, hyphens or underscores); each entry takes
# the parsed flags. The annotators that need the trainer (`self`, ...) are listed so that asking for them says why not.
ANNOTATORS: dict[str, Callable[[argparse.Namespace], Any]] = {name: _build_from_flags for name in annotator_choices()}


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default in `--help`, unless its help text already says it (`default ...`, `None: ...`)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or "(None:" in text or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def _annotate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trace-trl annotate",
        description="Run an annotator over rollouts (JSONL file or Hub dataset) and write annotations as JSONL. "
        "Input columns (renamed with the data flags): prompt (text or chat messages), completion, is_correct "
        "(booleans, rewards or strings), reference (the privileged context, optional). Like training, only rollouts "
        "whose kind the span actions route are sent (TRACE-FKL: the correct ones; TRACE-RKL: "
        "--key-span-action grpo --error-span-action rkl, the incorrect ones); --all-kinds sends every rollout.",
        epilog="Output columns: index, prompt, completion, is_correct, reference, reward, annotated (false: not sent, "
        "its kind is not routed), spans ([start, end, kind, text], character offsets into completion), diagnosis "
        "(the type label), error (redacted; null on success), dropped_spans, usage (tokens, latency). Every rollout "
        "gets a row. Exit status 1 when every annotation sent failed, with the most common error on stderr; 0 "
        "otherwise. Smoke test before a paid run: `trace-trl annotate rollouts.jsonl -o a.jsonl --limit 5 --model "
        "...` on rollouts written by a run with `--dump_rollouts rollouts.jsonl`.",
        formatter_class=_DefaultsHelpFormatter,
    )
    parser.add_argument("source", help="a .jsonl/.json file, or a Hub dataset name")
    parser.add_argument("-o", "--output", required=True, help="where to write the annotations (JSONL)")
    data = parser.add_argument_group("data")
    data.add_argument("--split", default="train", help="dataset split (Hub datasets)")
    data.add_argument("--config", default=None, help="dataset configuration (Hub datasets)")
    data.add_argument("--prompt-column", default="prompt", help="column of the problem (text or chat messages)")
    data.add_argument(
        "--completion-column", default="completion", help="column of the rollout text (what the spans index)"
    )
    data.add_argument(
        "--correct-column", default="is_correct", help="booleans, rewards (see --correct-threshold) or strings"
    )
    data.add_argument("--reference-column", default="reference", help="privileged context; '' for none")
    data.add_argument(
        "--correct-threshold", type=float, default=0.5, help="a numeric correctness column is compared to this"
    )
    data.add_argument("--limit", type=int, default=None, help="annotate only the first N rows")
    run = parser.add_argument_group(
        "annotator", "the annotators, names and defaults of `trace-trl train` (its field in brackets)"
    )
    run.add_argument(
        "--annotator",
        choices=sorted(ANNOTATORS),
        default="openai",
        metavar="NAME",
        help=f"one of {', '.join(n for n in ANNOTATOR_NAMES if n != 'none')} (hyphens work too: all-tokens)",
    )
    run.add_argument("--batch-size", type=int, default=64, help="rollouts per annotator call")
    run.add_argument(
        "--key-span-action",
        choices=["fkl", "rkl", "grpo"],
        default="fkl",
        help="the run's key_span_action: correct rollouts are sent unless it is grpo",
    )
    run.add_argument(
        "--error-span-action",
        choices=["fkl", "rkl", "grpo"],
        default="grpo",
        help="the run's error_span_action: incorrect rollouts are sent unless it is grpo",
    )
    run.add_argument(
        "--all-kinds",
        action="store_true",
        help="send every rollout, whatever the actions route (for inspection) [annotate_unrouted_kinds]",
    )
    defaults = _annotator_defaults()
    regex = parser.add_argument_group("regex annotator")
    regex.add_argument(
        "--regex-key-pattern",
        dest="regex_key_patterns",
        action="append",
        default=None,
        metavar="PATTERN",
        help=f"key-span pattern, repeatable: a regex or {', '.join(REGEX_CONSTANTS)} "
        f"(default: {' '.join(defaults['regex_key_patterns'])}) [regex_key_patterns]",
    )
    regex.add_argument(
        "--regex-error-pattern",
        dest="regex_error_patterns",
        action="append",
        default=None,
        metavar="PATTERN",
        help="error-span pattern, repeatable, as --regex-key-pattern "
        f"(default: {' '.join(defaults['regex_error_patterns'])}) [regex_error_patterns]",
    )
    rand = parser.add_argument_group("random, inverted and all-tokens annotators")
    rand.add_argument("--seed", dest="random_seed", type=int, default=defaults["random_seed"], help="[random_seed]")
    rand.add_argument(
        "--random-span-fraction",
        dest="random_span_fraction",
        type=float,
        default=defaults["random_span_fraction"],
        help="fraction of each completion covered (random, inverted-*) [random_span_fraction]",
    )
    rand.add_argument(
        "--random-num-spans",
        dest="random_num_spans",
        type=int,
        default=defaults["random_num_spans"],
        help="spans per rollout (random) [random_num_spans]",
    )
    rand.add_argument(
        "--all-tokens-incorrect",
        dest="all_tokens_incorrect",
        action="store_true",
        help="all-tokens: also mark incorrect rollouts (error spans) [all_tokens_incorrect]",
    )
    api = parser.add_argument_group("openai annotator (and random-like-openai, inverted-openai)")
    api.add_argument(
        "--model", dest="annotator_model", default=None, help="model name on the server [annotator_model]"
    )
    api.add_argument(
        "--base-url",
        dest="annotator_base_url",
        default=None,
        help="OpenAI-compatible server URL, e.g. http://localhost:8000/v1 [annotator_base_url]",
    )
    api.add_argument(
        "--api-key-env",
        dest="annotator_api_key_env",
        default=defaults["annotator_api_key_env"],
        help="environment variable holding the API key [annotator_api_key_env]",
    )
    api.add_argument(
        "--max-concurrency",
        dest="annotator_max_concurrency",
        type=int,
        default=defaults["annotator_max_concurrency"],
        help="requests in flight at once [annotator_max_concurrency]",
    )
    api.add_argument(
        "--timeout",
        dest="annotator_timeout",
        type=float,
        default=defaults["annotator_timeout"],
        help="seconds per attempt [annotator_timeout]",
    )
    api.add_argument(
        "--max-retries",
        dest="annotator_max_retries",
        type=int,
        default=defaults["annotator_max_retries"],
        help="retries on 429/5xx/timeouts/dropped connections [annotator_max_retries]",
    )
    api.add_argument(
        "--cache-dir",
        dest="annotator_cache_dir",
        default=None,
        help="persistent annotation cache (SQLite), shareable between runs [annotator_cache_dir]",
    )
    api.add_argument(
        "--temperature",
        dest="annotator_temperature",
        type=float,
        default=None,
        help="(None: 0.0) [annotator_temperature]",
    )
    api.add_argument(
        "--no-temperature",
        dest="annotator_send_temperature",
        action="store_false",
        help="send no temperature (OpenAI reasoning models reject any but their default) [annotator_send_temperature]",
    )
    api.add_argument(
        "--max-tokens",
        dest="annotator_max_tokens",
        type=int,
        default=None,
        help="answer-length limit (None: 1024; reasoning models need several thousand) [annotator_max_tokens]",
    )
    api.add_argument(
        "--token-limit-param",
        dest="annotator_token_limit_param",
        choices=["max_tokens", "max_completion_tokens", "none"],
        default=defaults["annotator_token_limit_param"],
        help="request field of the limit; max_completion_tokens for OpenAI reasoning models; none sends no limit "
        "[annotator_token_limit_param]",
    )
    api.add_argument(
        "--reask-on-malformed",
        dest="annotator_reask_on_malformed",
        action="store_true",
        help="ask once more when an answer holds no usable JSON [annotator_reask_on_malformed]",
    )
    api.add_argument(
        "--prompt-template",
        dest="annotator_prompt_template",
        default=None,
        help="user-message template, the text or a file holding it [annotator_prompt_template]",
    )
    api.add_argument(
        "--system-prompt",
        dest="annotator_system_prompt",
        default=None,
        help="system message, the text or a file holding it [annotator_system_prompt]",
    )
    api.add_argument("--max-key-spans", dest="annotator_max_key_spans", type=int, default=None, help="(default 3)")
    api.add_argument(
        "--no-json-schema",
        dest="annotator_use_json_schema",
        action="store_false",
        help="do not send response_format=json_schema [annotator_use_json_schema]",
    )
    api.add_argument(
        "--span-format",
        dest="annotator_span_format",
        choices=list(SPAN_FORMATS),
        default=defaults["annotator_span_format"],
        help="annotation protocol: numbered segments (the paper's) or verbatim quotes [annotator_span_format]",
    )
    api.add_argument(
        "--max-answer-chars",
        dest="annotator_max_answer_chars",
        type=int,
        default=None,
        help="longest annotator answer read (default 200000); longer answers fail as answer_too_long",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _annotate_batch(annotator: Any, batch: list[AnnotationRequest], secrets: list[str | None]) -> list[Annotation]:
    """The annotator's answers for `batch`; an annotator that raises fails this batch's rows, not the run."""
    try:
        annotations = list(annotator(batch))
    except Exception as exc:
        error = redact(f"annotator raised {type(exc).__name__}: {exc}", secrets)
        return [Annotation.failure(error) for _ in batch]
    if len(annotations) != len(batch):
        error = (
            f"annotator returned {len(annotations)} annotations for {len(batch)} requests (it must return one each)"
        )
        return [Annotation.failure(error) for _ in batch]
    # Every error text is redacted again here: the annotator may be any callable.
    return [dataclasses.replace(a, error=redact(a.error, secrets)) if a.error is not None else a for a in annotations]


def _kind_is_routed(is_correct: bool, args: argparse.Namespace) -> bool:
    return (args.key_span_action if is_correct else args.error_span_action) != "grpo"


def _failure_summary(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """One line on the failed rows (how many, the most common error), or `None` when none failed."""
    errors = Counter(str(row["error"]) for row in rows if row.get("error") is not None)
    failed = sum(errors.values())
    if not failed:
        return None
    error, times = errors.most_common(1)[0]
    error = error if len(error) <= 300 else error[:300] + "..."
    sent = sum(row.get("annotated", True) is not False for row in rows)
    head = f"all {failed} annotations failed" if failed == sent else f"{failed} of {sent} annotations failed"
    return f"trace-trl annotate: {head}; most common error ({times}x): {error}"


def annotate_main(argv: Sequence[str] | None = None) -> int:
    """`trace-trl annotate`: annotate rollouts and write one JSON row per rollout.

    Returns the exit status: `1` when every annotation failed (the rows are still written, each with its `error`, and
    one line on stderr says what went wrong most often), else `0` (a partial failure prints the same line).
    """
    from tqdm.auto import tqdm

    args = _annotate_parser().parse_args(argv)
    rows = load_rows(args.source, split=args.split, config=args.config)[: args.limit]
    requests = rows_to_requests(
        rows,
        prompt_column=args.prompt_column,
        completion_column=args.completion_column,
        correct_column=args.correct_column,
        reference_column=args.reference_column or None,
        correct_threshold=args.correct_threshold,
    )
    annotator = ANNOTATORS[args.annotator](args)
    secrets = [os.environ.get(args.annotator_api_key_env)]
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    written: list[Row] = []
    with (
        open(output, "w", encoding="utf-8") as handle,
        tqdm(total=len(requests), unit="rollout", desc="annotating", disable=args.quiet) as progress,
    ):
        for start in range(0, len(requests), args.batch_size):
            batch = requests[start : start + args.batch_size]
            # As in training: only rollouts whose kind is routed are sent (and paid for).
            sent = [i for i, r in enumerate(batch) if args.all_kinds or _kind_is_routed(r.is_correct, args)]
            answers = dict(zip(sent, _annotate_batch(annotator, [batch[i] for i in sent], secrets))) if sent else {}
            for offset, request in enumerate(batch):
                annotation = answers.get(offset, Annotation())
                row = annotation_row(request, annotation, index=start + offset, annotated=offset in answers)
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                written.append(row)
            handle.flush()
            progress.update(len(batch))
    statistics = annotation_statistics(written)
    metrics = getattr(annotator, "metrics", None)
    if callable(metrics):
        statistics["annotator"] = metrics()
    not_sent = sum(row["annotated"] is False for row in written)
    skipped = f"; {not_sent} not sent because their kind is not routed (--all-kinds sends them)" if not_sent else ""
    print(f"Wrote {len(written)} annotations to {output}{skipped}")
    print(json.dumps(statistics, indent=2))
    summary = _failure_summary(written)
    if summary is not None:
        print(summary, file=sys.stderr)
        if all(row.get("error") is not None for row in written if row.get("annotated", True) is not False):
            print(
                "trace-trl annotate: no rollout was annotated (exit status 1). Fix the cause above and run again; "
                "with --cache-dir, annotations that succeed are not asked for twice.",
                file=sys.stderr,
            )
            return 1
    return 0


def render_main(argv: Sequence[str] | None = None) -> int:
    """`trace-trl render`: annotations JSONL to a self-contained HTML page."""
    parser = argparse.ArgumentParser(
        prog="trace-trl render", description="Render annotations as a self-contained HTML page."
    )
    parser.add_argument("annotations", help="JSONL written by `trace-trl annotate`")
    parser.add_argument("-o", "--output", default=None, help="HTML file (default: the input with .html)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path or Hub id, adds the routed-token fraction")
    parser.add_argument("--title", default=None)
    parser.add_argument("--max-rows", type=int, default=None, help="rollouts shown (statistics cover all)")
    args = parser.parse_args(argv)
    rows = read_jsonl(args.annotations)
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    output = Path(args.output or Path(args.annotations).with_suffix(".html"))
    page = render_annotations_html(
        rows,
        title=args.title or f"TRACE annotations: {Path(args.annotations).name}",
        tokenizer=tokenizer,
        max_rows=args.max_rows,
    )
    output.write_text(page, encoding="utf-8")
    print(f"Wrote {output} ({len(rows)} rollouts)")
    return 0


if __name__ == "__main__":
    sys.exit(annotate_main())
