"""`trace-trl annotate`: run an annotator over rollouts (a JSONL file or a Hub dataset) and write its annotations.

```bash
trace-trl annotate rollouts.jsonl -o annotations.jsonl --annotator openai --model gpt-4.1-mini --cache-dir .cache
```

The annotator is built by the builder `trace-trl train` uses ([`~trace_trl.annotator_factory.build_annotator`]), from
one [`~trace_trl.annotator_factory.AnnotatorSettings`] whose defaults are the training defaults. Like training, only
rollouts whose kind the span actions route are sent. `trace-trl render` ([`trace_trl.scripts.render`]) turns the
output into an HTML page.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from trace_trl.annotator_factory import ANNOTATORS as ANNOTATOR_NAMES
from trace_trl.annotator_factory import REGEX_CONSTANTS, SPAN_FORMATS, AnnotatorSettings, annotator_choices
from trace_trl.annotators.base import Annotation, AnnotationRequest
from trace_trl.annotators.redaction import redact
from trace_trl.inspection import Row, annotation_row, annotation_statistics, load_rows, rows_to_requests


def _annotator_defaults() -> dict[str, Any]:
    """The annotator settings' defaults: those of `trace-trl train` (one `AnnotatorSettings`), so both agree."""
    return dataclasses.asdict(AnnotatorSettings())


def _build_from_flags(args: argparse.Namespace) -> Any:
    """The annotator `--annotator` names, built by the builder `trace-trl train` uses, from the parsed flags."""
    from trace_trl.annotator_factory import NEEDS_TRAINER, build_annotator, canonical_annotator_name

    name = canonical_annotator_name(args.annotator)
    if name in NEEDS_TRAINER:
        raise SystemExit(
            f"trace-trl annotate: --annotator {args.annotator} needs the policy being trained (it annotates with the "
            "trainer's model), so it runs only inside `trace-trl train`. Use openai (any OpenAI-compatible server, "
            "e.g. a local vLLM serving the same model) here."
        )
    try:
        # Flags left unset (`None`, e.g. a repeatable pattern flag never given) keep the shared default.
        return build_annotator(
            AnnotatorSettings.from_attributes(argparse.Namespace(**{**vars(args), "annotator": name}))
        )
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


def main(argv: Sequence[str] | None = None) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
