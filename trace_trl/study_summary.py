"""The replication study's headline numbers, shipped with the package so that `trace-trl demo` can print them.

`trace-trl demo` trains GRPO and TRACE once each, on one seed: enough to show the moving parts, not to say which is
better (on its default seed GRPO can gain while TRACE loses). The evidence is the replication study
(`benchmarks/replication.py`, `docs/replication.md`): the paper's grid of arms over 5 seeds. Its documents are not in
the wheel, so the few numbers the demo prints live here; `tests/test_study_summary.py` checks them against
`docs/replication-data/results.json` and `docs/replication.md`, so they cannot drift from the study.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Estimate:
    """A mean over the study's seeds and its 95% percentile-bootstrap interval, in the unit its user prints."""

    mean: float
    low: float
    high: float

    @property
    def includes_zero(self) -> bool:
        return self.low <= 0.0 <= self.high

    def format(self, digits: int = 1, unit: str = " pp") -> str:
        """`+4.7 pp [-0.3, 11.6]`, as docs/replication.md writes it."""
        return f"{self.mean:+.{digits}f}{unit} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


# Where the numbers come from: docs/replication.md ("Results"), the run of trace-trl 0.2.0 with the token clip.
STUDY_DOC = "docs/replication.md"
STUDY_COMMAND = "python benchmarks/replication.py"
STUDY_SEEDS = 5
STUDY_ARMS = 8
STUDY_STEPS = 100

# ID greedy accuracy after training, in %: results.json "table" -> arm -> "acc_id_greedy" (fractions there).
GRPO_GREEDY_ACCURACY = Estimate(30.6, 25.9, 35.9)
TRACE_FKL_GREEDY_ACCURACY = Estimate(35.3, 28.7, 41.2)

# Paired by seed, TRACE minus GRPO, in percentage points: results.json "deltas_vs_grpo" -> arm -> "acc_id_greedy".
TRACE_FKL_MINUS_GRPO = Estimate(4.7, -0.3, 11.6)  # the default token clip: what `trace-trl demo` runs
TRACE_FKL_ELEMENT_CLIP_MINUS_GRPO = Estimate(5.9, 2.2, 10.0)  # the paper's literal per-entry clip

# The paper's mechanism measure: the one-step log-probability lift on the training batch's teacher-supported key
# tokens, in nats (results.json "table" -> arm -> "batch_lift_step1"). The paper: TRACE-FKL +0.145, GRPO +0.054.
GRPO_ONE_STEP_LIFT = Estimate(0.025, 0.008, 0.042)
TRACE_FKL_ONE_STEP_LIFT = Estimate(0.014, 0.001, 0.031)
PAPER_GRPO_ONE_STEP_LIFT = 0.054
PAPER_TRACE_FKL_ONE_STEP_LIFT = 0.145


def _zero_verdict(estimate: Estimate) -> str:
    return "interval includes 0: not detectable" if estimate.includes_zero else "interval excludes 0"


def study_comparison_lines(grpo_accuracy: float, trace_accuracy: float) -> list[str]:
    """The demo's report block after its table: this run's single-seed difference, then the study's.

    `grpo_accuracy` and `trace_accuracy` are this run's greedy accuracies after training, as fractions.
    """
    difference = 100 * (trace_accuracy - grpo_accuracy)
    lift_verdict = (
        "not reproduced" if TRACE_FKL_ONE_STEP_LIFT.mean <= GRPO_ONE_STEP_LIFT.mean else "in the paper's direction"
    )
    return [
        f"  This run (one seed): TRACE minus GRPO = {difference:+.1f} pp greedy accuracy after training "
        f"(TRACE {trace_accuracy:.1%}, GRPO {grpo_accuracy:.1%}).",
        f"  One seed of a tiny model decides nothing, either way. The replication study ({STUDY_DOC}: {STUDY_SEEDS} "
        f"seeds x {STUDY_ARMS} arms,",
        f"  {STUDY_STEPS} steps each, a tiny Qwen3 on chain arithmetic), mean over seeds [95% interval]:",
        f"    TRACE-FKL minus GRPO, greedy accuracy   {TRACE_FKL_MINUS_GRPO.format()}  "
        f"({_zero_verdict(TRACE_FKL_MINUS_GRPO)})",
        f"    the same, the paper's element clip      {TRACE_FKL_ELEMENT_CLIP_MINUS_GRPO.format()}  "
        f"({_zero_verdict(TRACE_FKL_ELEMENT_CLIP_MINUS_GRPO)})",
        f"    one-step lift on key tokens             TRACE-FKL {TRACE_FKL_ONE_STEP_LIFT.mean:+.3f} nats, GRPO "
        f"{GRPO_ONE_STEP_LIFT.mean:+.3f} (paper: {PAPER_TRACE_FKL_ONE_STEP_LIFT:+.3f} vs {PAPER_GRPO_ONE_STEP_LIFT:+.3f}; {lift_verdict})",
        "  An interval that includes 0 is not evidence of a difference; one that excludes it, among the study's many",
        "  measures, is weak evidence (with no difference at all, about one 95% interval in twenty excludes 0).",
    ]
