"""The replication study's numbers that `trace-trl demo` prints: equal to the study's own files (so they cannot drift),
and printed beside the demo's single-seed difference with what an interval that includes 0 means."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from trace_trl import study_summary
from trace_trl.study_summary import Estimate, study_comparison_lines


DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def results() -> dict:
    return json.loads((DOCS / "replication-data" / "results.json").read_text(encoding="utf-8"))


def rounded(entry: dict, scale: float, digits: int) -> Estimate:
    return Estimate(*(round(scale * entry[key], digits) for key in ("mean", "low", "high")))


@pytest.mark.parametrize(
    "constant, section, arm, measure, scale, digits",
    [
        ("GRPO_GREEDY_ACCURACY", "table", "grpo", "acc_id_greedy", 100, 1),
        ("TRACE_FKL_GREEDY_ACCURACY", "table", "trace_fkl", "acc_id_greedy", 100, 1),
        ("TRACE_FKL_MINUS_GRPO", "deltas_vs_grpo", "trace_fkl", "acc_id_greedy", 100, 1),
        ("TRACE_FKL_ELEMENT_CLIP_MINUS_GRPO", "deltas_vs_grpo", "trace_fkl_element", "acc_id_greedy", 100, 1),
        ("GRPO_ONE_STEP_LIFT", "table", "grpo", "batch_lift_step1", 1, 3),
        ("TRACE_FKL_ONE_STEP_LIFT", "table", "trace_fkl", "batch_lift_step1", 1, 3),
    ],
)
def test_shipped_numbers_equal_the_studys_results_json(results, constant, section, arm, measure, scale, digits):
    assert getattr(study_summary, constant) == rounded(results[section][arm][measure], scale, digits)


def test_shipped_setup_equals_the_studys_settings(results):
    settings = results["settings"]
    assert study_summary.STUDY_SEEDS == len(settings["seeds"])
    assert study_summary.STUDY_ARMS == len(settings["arms"])
    assert study_summary.STUDY_STEPS == settings["steps"]


def test_shipped_numbers_are_the_ones_docs_replication_md_writes():
    text = (DOCS / "replication.md").read_text(encoding="utf-8")
    # The page's verdict table and its paired-difference table write the intervals exactly as the demo does.
    assert f"paired {study_summary.TRACE_FKL_MINUS_GRPO.format()}" in text
    assert f"| TRACE-FKL | {study_summary.TRACE_FKL_MINUS_GRPO.format(unit='').lstrip('+')} |" in text
    element = study_summary.TRACE_FKL_ELEMENT_CLIP_MINUS_GRPO.format(unit="").lstrip("+")
    assert f"| TRACE-FKL, element clip | {element} |" in text
    paper = re.search(r"the paper: \+(\d\.\d+) nats TRACE-FKL vs \+(\d\.\d+) GRPO", text)
    assert paper is not None
    assert (float(paper[1]), float(paper[2])) == (
        study_summary.PAPER_TRACE_FKL_ONE_STEP_LIFT,
        study_summary.PAPER_GRPO_ONE_STEP_LIFT,
    )
    assert study_summary.STUDY_DOC == "docs/replication.md" and (DOCS.parent / study_summary.STUDY_DOC).is_file()


def test_estimate_formats_as_the_docs_do():
    assert Estimate(4.7, -0.3, 11.6).format() == "+4.7 pp [-0.3, 11.6]"
    assert Estimate(-2.0, -5.0, 1.0).format() == "-2.0 pp [-5.0, 1.0]"
    assert Estimate(4.7, -0.3, 11.6).includes_zero and not Estimate(5.9, 2.2, 10.0).includes_zero


@pytest.mark.parametrize(
    "grpo, trace, difference", [(0.40625, 0.359375, "-4.7 pp"), (0.25, 0.3125, "+6.2 pp"), (0.5, 0.5, "+0.0 pp")]
)
def test_the_demo_block_puts_this_runs_difference_beside_the_studys(grpo, trace, difference):
    text = "\n".join(study_comparison_lines(grpo, trace))
    assert f"This run (one seed): TRACE minus GRPO = {difference} greedy accuracy" in text
    assert f"TRACE {trace:.1%}, GRPO {grpo:.1%}" in text
    # Whatever this run says, the study's result is the same, with its interval and what the interval means.
    assert (
        "TRACE-FKL minus GRPO, greedy accuracy   +4.7 pp [-0.3, 11.6]  (interval includes 0: not detectable)" in text
    )
    assert "+5.9 pp [2.2, 10.0]  (interval excludes 0)" in text
    assert "5 seeds x 8 arms" in text and "docs/replication.md" in text
    assert "An interval that includes 0 is not evidence of a difference" in text
    assert "TRACE-FKL +0.014 nats, GRPO +0.025 (paper: +0.145 vs +0.054; not reproduced)" in text
    assert all(len(line) <= 120 for line in text.splitlines())
