"""Evaluate a model: avg@k on MATH-500, AIME 2024, AIME 2025, AMC 2023 and GPQA-Diamond, with bootstrap intervals.

Three parts, each in its own module so that it can be tested or replaced on its own, brought together here:

1. **Benchmarks** ([`trace_trl.eval_data`]): `BENCHMARKS`, the loaders, [`load_benchmarks`] and [`grade`].
2. **Generation** ([`trace_trl.generation`]): any `generate(prompts, num_samples) -> list[list[str]]`;
   [`HFGenerator`], [`VLLMGenerator`], [`make_generator`], `PAPER_SAMPLING`.
3. **Scoring** ([`trace_trl.scoring`]): [`score_samples`], [`bootstrap_ci`], [`benchmark_mean_ci`].

This module runs them ([`evaluate_benchmark`], [`evaluate`]) and reports ([`results_table`], [`write_results`]); the
command `trace-trl eval` is [`trace_trl.scripts.eval`]. Every name of the three parts is importable from here too.

GPQA-Diamond's four options are shuffled with a fixed seed per question (`random.Random(f"{seed}:{Record ID}")`), so
the gold letter is the same on every run and machine. Every avg@k (per benchmark, and the unweighted mean over the
benchmarks) comes with a percentile-bootstrap confidence interval over problems, as the paper reports.

```python
from trace_trl.evaluation import load_benchmarks, evaluate, write_results, make_generator, SamplingSettings
```
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .eval_data import (  # noqa: F401 (re-exported: the evaluation's public names)
    BENCHMARKS,
    CHOICE_INSTRUCTION,
    DISPLAY_NAMES,
    SCORERS,
    Messages,
    Problem,
    grade,
    load_aime24,
    load_aime25,
    load_amc23,
    load_benchmarks,
    load_gpqa_diamond,
    load_math500,
)
from .generation import (  # noqa: F401
    BACKENDS,
    DEFAULT_SAMPLING,
    PAPER_SAMPLING,
    Generate,
    HFGenerator,
    SamplingSettings,
    VLLMGenerator,
    make_generator,
    render_prompts,
    vllm_available,
)
from .scoring import (  # noqa: F401
    BOOTSTRAP_CONFIDENCE,
    BOOTSTRAP_RESAMPLES,
    benchmark_mean_ci,
    bootstrap_ci,
    bootstrap_means,
    per_problem_scores,
    percentile_interval,
    score_samples,
)


logger = logging.getLogger(__name__)


def evaluate_benchmark(
    problems: list[Problem],
    generate: Generate,
    num_samples: int = 1,
    *,
    scorer: str = "math_verify",
    keep_completions: bool = False,
) -> dict[str, Any]:
    """
    Generate `num_samples` completions per problem and score them.

    Returns:
        `dict`: `avg@k`, `pass@k`, `num_problems`, `num_samples`, `ids`, `correct` (per problem, per sample), and
        `completions` when `keep_completions=True`.
    """
    completions = generate([problem.prompt for problem in problems], num_samples)
    if len(completions) != len(problems) or any(len(c) != num_samples for c in completions):
        raise RuntimeError(f"The generator must return {num_samples} completions for each of {len(problems)} prompts.")
    correct = [grade(problem, samples, scorer=scorer) for problem, samples in zip(problems, completions)]
    result: dict[str, Any] = {
        **score_samples(correct),
        "num_problems": len(problems),
        "num_samples": num_samples,
        "ids": [problem.id for problem in problems],
        "correct": correct,
    }
    if keep_completions:
        result["completions"] = completions
    return result


def evaluate(
    model: str,
    benchmarks: dict[str, list[Problem]],
    generate: Generate,
    *,
    num_samples: int = 1,
    settings: dict[str, Any] | None = None,
    scorer: str = "math_verify",
    keep_completions: bool = False,
    bootstrap_resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = BOOTSTRAP_CONFIDENCE,
    bootstrap_seed: int = 0,
) -> dict[str, Any]:
    """
    Run every benchmark through `generate` and collect the results document written as `results.json`.

    Args:
        bootstrap_resamples (`int`, *optional*, defaults to `1000`):
            Resamples of the percentile bootstrap over problems ([`bootstrap_ci`]); `0` computes no interval.
        confidence (`float`, *optional*, defaults to `0.95`):
            Coverage of the intervals.
        bootstrap_seed (`int`, *optional*, defaults to `0`):
            Seed of the resampling.

    Returns:
        `dict`: `model`, `timestamp` (UTC, ISO 8601), `settings`, `benchmarks` (name -> [`evaluate_benchmark`]
        output plus its display `name` and `avg@k_ci`, the `[low, high]` interval of its avg@k), `average` (the
        unweighted mean of avg@k and pass@k over the benchmarks, and `avg@k_ci`, the stratified-bootstrap interval of
        that mean, [`benchmark_mean_ci`]) and `bootstrap` (how the intervals were made).
    """
    from . import __version__

    results: dict[str, Any] = {
        "model": model,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "trace_trl_version": __version__,
        "settings": {"num_samples": num_samples, "scorer": scorer, **(settings or {})},
        "benchmarks": {},
    }
    for name, problems in benchmarks.items():
        logger.info("Evaluating %s (%d problems x %d samples)", name, len(problems), num_samples)
        result = evaluate_benchmark(problems, generate, num_samples, scorer=scorer, keep_completions=keep_completions)
        results["benchmarks"][name] = {"name": DISPLAY_NAMES.get(name, name), **result}
    scores = list(results["benchmarks"].values())
    results["average"] = {
        metric: sum(s[metric] for s in scores) / len(scores) if scores else math.nan for metric in ("avg@k", "pass@k")
    }
    if bootstrap_resamples > 0:
        per_problem = {
            name: per_problem_scores(benchmark["correct"])
            for name, benchmark in results["benchmarks"].items()
            if benchmark["correct"]
        }
        kwargs = {"num_resamples": bootstrap_resamples, "confidence": confidence, "seed": bootstrap_seed}
        for name, values in per_problem.items():
            results["benchmarks"][name]["avg@k_ci"] = list(bootstrap_ci(values, stream=name, **kwargs))
        if per_problem and len(per_problem) == len(scores):
            results["average"]["avg@k_ci"] = list(benchmark_mean_ci(per_problem, **kwargs))
        results["bootstrap"] = {
            "method": "percentile bootstrap over problems (stratified by benchmark for the mean)",
            "num_resamples": bootstrap_resamples,
            "confidence": confidence,
            "seed": bootstrap_seed,
        }
    return results


def _ordered_benchmarks(results: Sequence[dict[str, Any]]) -> list[str]:
    present = {name for result in results for name in result["benchmarks"]}
    return [name for name in BENCHMARKS if name in present] + sorted(present - set(BENCHMARKS))


def _percent(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _with_ci(value: float | None, interval: Sequence[float] | None) -> str:
    # "75.00 [50.00, 100.00]": the estimate, then its bootstrap interval, in %.
    if interval is None or value is None or math.isnan(value):
        return _percent(value)
    return f"{_percent(value)} [{_percent(interval[0])}, {_percent(interval[1])}]"


def results_table(results: dict[str, Any], compare: Sequence[dict[str, Any]] = (), metric: str = "avg@k") -> str:
    """
    Markdown table of `metric` (in %) per benchmark and their average, one row per results document.

    Columns are always in `BENCHMARKS` order, so tables from different runs line up; `compare` adds rows from earlier
    results. A row's average is over the table's columns, and `-` when that row lacks one of them. For avg@k, a value
    with a bootstrap interval in the results reads `estimate [low, high]`; the average's interval is shown when the
    row's benchmarks are exactly the table's columns (it is the interval of that row's own mean).
    """
    rows = [results, *compare]
    names = _ordered_benchmarks(rows)
    header = ["Model", "k", *(DISPLAY_NAMES.get(n, n) for n in names), "Average"]
    lines = [f"| {' | '.join(header)} |", "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|"]
    ci_key = f"{metric}_ci"
    for row in rows:
        values = [row["benchmarks"][n][metric] if n in row["benchmarks"] else None for n in names]
        intervals = [row["benchmarks"][n].get(ci_key) if n in row["benchmarks"] else None for n in names]
        average = None if any(v is None for v in values) or not values else sum(values) / len(values)
        same_columns = set(row["benchmarks"]) == set(names)
        average_ci = row.get("average", {}).get(ci_key) if same_columns else None
        cells = [str(row["model"]), str(row["settings"].get("num_samples", ""))]
        cells += [_with_ci(v, ci) for v, ci in zip(values, intervals)]
        lines.append(f"| {' | '.join([*cells, _with_ci(average, average_ci)])} |")
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, Any], output_dir: str | Path, compare: Sequence[dict[str, Any]] = ()) -> str:
    """Write `results.json` and `results.md` (avg@k and pass@k tables) into `output_dir`; return the avg@k table."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = results_table(results, compare)
    k = results["settings"].get("num_samples", "k")
    settings = results["settings"]
    bootstrap = results.get("bootstrap")
    ci_note = (
        f" Brackets: {100 * bootstrap['confidence']:g}% percentile-bootstrap interval over problems "
        f"({bootstrap['num_resamples']} resamples, seed {bootstrap['seed']}).\n\n"
        if bootstrap
        else ""
    )
    thinking = settings.get("chat_template_kwargs", {}).get("enable_thinking", "-")
    markdown = (
        f"# Evaluation of {results['model']}\n\n{results['timestamp']}, k = {k} samples per problem, "
        f"temperature {settings.get('temperature', '-')}, top-p {settings.get('top_p', '-')}, "
        f"top-k {settings.get('top_k') or '-'}, thinking {thinking}, "
        f"max new tokens {settings.get('max_new_tokens', '-')}.\n\n"
        f"## avg@{k} (%)\n\n{ci_note}{table}\n## pass@{k} (%)\n\n{results_table(results, compare, metric='pass@k')}"
    )
    (output_dir / "results.md").write_text(markdown)
    return table


# The command line lived here in 0.1; it is `trace_trl.scripts.eval` now.
_MOVED = {
    "main": "trace_trl.scripts.eval:main",
    "resolve_sampling": "trace_trl.scripts.eval:resolve_sampling",
    "_parser": "trace_trl.scripts.eval:_parser",
}


def __getattr__(name: str) -> Any:
    from ._deprecation import moved_attribute

    return moved_attribute(__name__, name, _MOVED)
