"""Output tokens per annotation: the segment protocol vs the quote protocol, on a recorded set of answers.

`benchmarks/annotation_answers.json` holds hand-written math rollouts in Qwen3's non-thinking style and, for each, the
answer an annotator following each protocol would give, marking the same steps in both. The answers are synthetic
(written to the protocols' specifications), not a live model's: the numbers measure the answer formats, not a model's
verbosity. Each answer is first checked to parse (`parse_annotation`, `parse_segment_annotation`) into spans that mark
the same segments; then its tokens are counted with the real Qwen vocabulary (`trace_trl.tiny.build_qwen_tokenizer`,
offline). The prompt tokens of both protocols' requests (system + user message, no chat template) are counted too.

    python benchmarks/annotation_output_tokens.py [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trace_trl.annotators import AnnotationRequest  # noqa: E402
from trace_trl.annotators.parsing import parse_annotation, parse_segment_annotation  # noqa: E402
from trace_trl.annotators.prompts import build_messages, build_segment_messages  # noqa: E402
from trace_trl.annotators.segments import render_numbered, split_segments  # noqa: E402


RECORDS = Path(__file__).with_name("annotation_answers.json")


def check_record(record: dict) -> tuple[AnnotationRequest, list]:
    """Both answers parse without drops, and every quote lies in a segment the segment answer marks."""
    request = AnnotationRequest(
        prompt=record["problem"], completion=record["completion"], is_correct=record["is_correct"], reward=1.0
    )
    segments = split_segments(request.completion)
    quoted = parse_annotation(record["answers"]["quotes"], request)
    numbered = parse_segment_annotation(record["answers"]["segments"], request, segments)
    assert quoted.dropped_spans == 0 and numbered.dropped_spans == 0, record["problem"]
    assert numbered.diagnosis is not None, record["problem"]
    assert len(quoted.spans) == len(numbered.spans), record["problem"]
    for span in quoted.spans:
        assert any(s.start <= span.start and span.end <= s.end for s in numbered.spans), record["problem"]
    return request, segments


def measure(tokenizer) -> dict:
    records = json.loads(RECORDS.read_text())["records"]

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    rows = []
    for record in records:
        request, segments = check_record(record)
        quote_prompt = build_messages(request)
        segment_prompt = build_segment_messages(request, render_numbered(request.completion, segments))
        rows.append(
            {
                "is_correct": record["is_correct"],
                "quotes": count(record["answers"]["quotes"]),
                "segments": count(record["answers"]["segments"]),
                "quotes_prompt": sum(count(m["content"]) for m in quote_prompt),
                "segments_prompt": sum(count(m["content"]) for m in segment_prompt),
            }
        )
    summary = {"records": len(rows), "correct_rollouts": sum(r["is_correct"] for r in rows)}
    for subset, chosen in (
        ("all", rows),
        ("correct", [r for r in rows if r["is_correct"]]),
        ("incorrect", [r for r in rows if not r["is_correct"]]),
    ):
        summary[subset] = {
            key: {"mean": statistics.mean(r[key] for r in chosen), "median": statistics.median(r[key] for r in chosen)}
            for key in ("quotes", "segments", "quotes_prompt", "segments_prompt")
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    from trace_trl.tiny import build_qwen_tokenizer

    summary = measure(build_qwen_tokenizer())
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(
        f"{summary['records']} recorded annotations ({summary['correct_rollouts']} correct rollouts), Qwen tokenizer"
    )
    print(
        "| rollouts | quotes: output tokens (mean / median) | segments: output tokens (mean / median) | ratio | quotes: prompt tokens | segments: prompt tokens |"
    )
    print("|---|---|---|---|---|---|")
    for subset in ("all", "correct", "incorrect"):
        s = summary[subset]
        ratio = s["segments"]["mean"] / s["quotes"]["mean"]
        print(
            f"| {subset} | {s['quotes']['mean']:.1f} / {s['quotes']['median']:.0f} "
            f"| {s['segments']['mean']:.1f} / {s['segments']['median']:.0f} | {ratio:.2f}x "
            f"| {s['quotes_prompt']['mean']:.0f} | {s['segments_prompt']['mean']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
