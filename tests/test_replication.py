"""The replication study's pipeline (`benchmarks/replication.py`): its rule-based annotator, its statistics, and a
`--quick` run end to end (every arm, one seed, a few steps) producing the tables and plots. Not a result."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server_module():
    return _load("rule_annotator_server")


@pytest.fixture(scope="module")
def replication():
    return _load("replication")


REFERENCE = "7 + 5 = 12\n12 - 3 = 9\n\\boxed{9}"


def _segments(text: str) -> list[tuple[int, str]]:
    return [(i, line) for i, line in enumerate(text.split("\n"), start=1)]


@pytest.mark.parametrize(
    ("rollout", "correct", "expected"),
    [
        (REFERENCE, True, ([2, 3], "key", "computation")),
        ("7 + 5 = 13\n13 - 3 = 10\n\\boxed{10}", False, ([1], "error", "arithmetic_error")),
        ("7 + 5 = 12\n12 - 4 = 8\n\\boxed{8}", False, ([2], "error", "misread_problem")),
        ("7 + 5 = 12\n12 - 3 = 9\n\\boxed{8}", False, ([3], "error", "format_error")),
        ("7 + 5 = 12\n\\boxed{12}", False, ([2], "error", "wrong_method")),
        ("7 + 5 = 12\n12 - 3 = 9", False, ([2], "error", "incomplete")),
        ("seven and five", False, ([1], "error", "wrong_method")),
    ],
)
def test_rule_annotator_marks_decisive_steps_and_first_error(server_module, rollout, correct, expected):
    answer = server_module.grade_segments(REFERENCE, _segments(rollout), correct)
    ids, kind, label = expected
    assert [s["id"] for s in answer["segments"]] == ids
    assert {s["kind"] for s in answer["segments"]} == {kind}
    assert answer["type"] == label


def test_rule_annotator_through_openai_annotator_end_to_end(server_module):
    """The real annotation path: OpenAIAnnotator (segment protocol) -> HTTP -> rule grader -> spans on the text."""
    from trace_trl.annotators import AnnotationRequest, OpenAIAnnotator

    correct = REFERENCE
    wrong = "7 + 5 = 13\n13 - 3 = 10\n\\boxed{10}"
    requests = [
        AnnotationRequest([{"role": "user", "content": "Compute 7 + 5 - 3."}], text, ok, float(ok), REFERENCE)
        for text, ok in ((correct, True), (wrong, False))
    ]
    with server_module.RuleAnnotatorServer() as server:
        annotator = OpenAIAnnotator("rule", base_url=server.base_url, api_key="x", span_format="segments")
        key, error = annotator(requests)
        assert server.requests == 2
    assert key.error is None and error.error is None
    assert [correct[s.start : s.end] for s in key.spans] == ["12 - 3 = 9", "\\boxed{9}"]
    assert {s.kind for s in key.spans} == {"key"}
    assert key.diagnosis == "computation"
    assert [wrong[s.start : s.end] for s in error.spans] == ["7 + 5 = 13"]
    assert error.diagnosis == "arithmetic_error"


def test_task_has_a_privileged_gap_and_disjoint_held_out_set(replication):
    settings = replication.QUICK
    data = replication.seed_data(settings, 0)
    train = {p.question for p in data.train}
    assert not train & {p.question for p in data.eval_id}
    for problem in data.train[:50] + data.eval_ood[:50]:
        steps, answer = _load("rule_annotator_server").parse_steps(problem.solution)
        assert answer == problem.answer and steps[-1][3] == int(problem.answer)
        assert all(result >= 0 for *_, result in steps)
    assert all(p.solution.count("\n") == settings.id_steps for p in data.train)
    assert all(p.solution.count("\n") == settings.ood_steps for p in data.eval_ood)


def test_bootstrap_interval_contains_the_mean_and_is_seeded(replication):
    mean, low, high = replication.bootstrap_ci([0.1, 0.2, 0.3, 0.4, 0.5], resamples=500)
    assert mean == pytest.approx(0.3)
    assert 0.1 <= low < mean < high <= 0.5
    assert replication.bootstrap_ci([0.1, 0.2, 0.3, 0.4, 0.5], resamples=500) == (mean, low, high)
    one = replication.bootstrap_ci([0.7], resamples=500)
    assert one[0] == 0.7 and math.isnan(one[1]) and math.isnan(one[2])


@pytest.mark.slow
def test_quick_study_produces_tables_and_plots(tmp_path, replication):
    """`--quick` runs every arm through the real trainer and writes results.json, results.md and the PNG plots."""
    out = tmp_path / "study"
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "replication.py"), "--quick", "--output-dir", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    arms = replication.ARMS
    assert set(summary["table"]) == {*arms, "base"}
    for arm in arms:
        for key in ("acc_id_greedy", "acc_id_avgk", "acc_ood_greedy", "acc_ood_avgk", "exposure", "wall_ratio"):
            assert math.isfinite(summary["table"][arm][key]["mean"]), (arm, key)
        for key in ("acc_id_greedy", "acc_ood_avgk"):
            assert 0.0 <= summary["table"][arm][key]["mean"] <= 1.0
    assert summary["table"]["grpo"]["wall_ratio"]["mean"] == pytest.approx(1.0)
    assert summary["table"]["grpo"]["exposure"]["mean"] == 0.0
    assert summary["table"]["trace_fkl"]["exposure"]["mean"] > 0.0
    # The API arms really went through the HTTP server, and it answered every request.
    assert summary["annotator_requests"] > 0
    assert summary["annotation_failures"]["trace_fkl"] == 0.0
    runs = json.loads((out / "runs.json").read_text())
    assert {r["arm"] for r in runs} == set(arms)
    assert all(len(r["curves"]["reward"]) == replication.QUICK.steps for r in runs)
    markdown = (out / "results.md").read_text()
    for arm in arms:
        assert f"| {replication.ARM_TITLES[arm]} |" in markdown
    assert "nan" not in markdown.lower()
    for name in ("replication_curves.png", "replication_accuracy.png"):
        png = out / "images" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
