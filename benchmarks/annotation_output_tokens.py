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
                "rollout": count(request.completion),
                "problem": count(request.problem_text),
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
            for key in ("quotes", "segments", "quotes_prompt", "segments_prompt", "rollout", "problem")
        }
        # What a request costs beyond the rollout and the problem (system prompt, instructions, fences, segment
        # numbers): the fixed part of the cost formula in docs/real-api.md.
        summary[subset]["segments_overhead"] = {
            "mean": statistics.mean(r["segments_prompt"] - r["rollout"] - r["problem"] for r in chosen)
        }
    return summary


# The worked example of docs/real-api.md: the paper recipes' batch (256 rollouts per optimizer step: 8 GPUs x 4 x 8
# accumulation for Qwen3-8B, 4 x 8 x 8 for Qwen3-1.7B), the KL phase of the paper schedule (40 steps with a weight above
# zero), and stated assumptions for what the benchmark cannot measure (rollout and reference lengths of a thinking
# model, the correct fraction, the prices).
WORKED_EXAMPLE = {
    "kl_steps": 40,
    "rollouts_per_step": 256,
    "correct_fraction": 0.6,
    "rollout_tokens": 2027,  # the paper's mean response length of Qwen3-8B under GRPO
    "problem_tokens": 100,
    "reference_tokens": 1000,
    "segment_chars": 300,  # `max_segment_chars`: a segment per line or per 300 characters
    "chars_per_token": 4.0,
    "input_price_per_m": 0.40,  # example prices (US$ per million tokens); check your provider's
    "output_price_per_m": 1.60,
}


def worked_example(summary: dict, example: dict = WORKED_EXAMPLE) -> dict:
    """Requests, tokens and cost of annotation under both paper presets, before and after only routed kinds are sent.

    requests = kl_steps * rollouts_per_step * (fraction of the routed kind)
    input tokens per request = overhead + problem + reference + rollout + 2 * segments (the `[n] ` markers)
    output tokens per request = the benchmark's mean segment answer for that kind
    cost = requests * (input * input_price + output * output_price) / 1e6
    """
    overhead = {kind: summary[kind]["segments_overhead"]["mean"] for kind in ("correct", "incorrect")}
    output = {kind: summary[kind]["segments"]["mean"] for kind in ("correct", "incorrect")}
    segments = example["rollout_tokens"] * example["chars_per_token"] / example["segment_chars"]
    body = example["problem_tokens"] + example["reference_tokens"] + example["rollout_tokens"] + 2 * segments
    rollouts = example["kl_steps"] * example["rollouts_per_step"]
    counts = {
        "correct": rollouts * example["correct_fraction"],
        "incorrect": rollouts * (1 - example["correct_fraction"]),
    }
    per_request = {}
    for kind in ("correct", "incorrect"):
        tokens_in = overhead[kind] + body
        dollars = (tokens_in * example["input_price_per_m"] + output[kind] * example["output_price_per_m"]) / 1e6
        per_request[kind] = {"input_tokens": tokens_in, "output_tokens": output[kind], "dollars": dollars}

    def cost(kinds: tuple[str, ...]) -> dict:
        requests = sum(counts[k] for k in kinds)
        return {
            "requests": requests,
            "input_tokens": sum(counts[k] * per_request[k]["input_tokens"] for k in kinds),
            "output_tokens": sum(counts[k] * per_request[k]["output_tokens"] for k in kinds),
            "dollars": sum(counts[k] * per_request[k]["dollars"] for k in kinds),
        }

    return {
        "segments_per_rollout": segments,
        "per_request": per_request,
        "every_rollout": cost(("correct", "incorrect")),
        "trace_fkl": cost(("correct",)),
        "trace_rkl": cost(("incorrect",)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--cost", action="store_true", help="print the worked cost example of docs/real-api.md")
    args = parser.parse_args(argv)
    from trace_trl.tiny import build_qwen_tokenizer

    summary = measure(build_qwen_tokenizer())
    if args.json:
        print(json.dumps({**summary, "worked_example": worked_example(summary)}, indent=2))
        return 0
    if args.cost:
        example = worked_example(summary)
        print(f"segments per rollout: {example['segments_per_rollout']:.0f}")
        for kind, row in example["per_request"].items():
            print(
                f"{kind}: {row['input_tokens']:.0f} input + {row['output_tokens']:.1f} output tokens, "
                f"${row['dollars']:.5f} per request"
            )
        print("| preset | requests | input tokens | output tokens | cost |")
        print("|---|---:|---:|---:|---:|")
        for name in ("every_rollout", "trace_fkl", "trace_rkl"):
            row = example[name]
            print(
                f"| {name} | {row['requests']:,.0f} | {row['input_tokens'] / 1e6:.2f}M | "
                f"{row['output_tokens'] / 1e3:.0f}k | ${row['dollars']:.2f} |"
            )
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
    print()
    print("| rollouts | rollout tokens (mean) | problem tokens (mean) | segments prompt - rollout - problem (mean) |")
    print("|---|---|---|---|")
    for subset in ("all", "correct", "incorrect"):
        s = summary[subset]
        print(
            f"| {subset} | {s['rollout']['mean']:.0f} | {s['problem']['mean']:.0f} "
            f"| {s['segments_overhead']['mean']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
