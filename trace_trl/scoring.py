"""Scores of an evaluation: avg@k and pass@k from per-sample correctness, with percentile-bootstrap intervals.

Pure functions of the per-problem correctness, so they can be tested and reused without a model: [`score_samples`]
(avg@k, pass@k), [`bootstrap_ci`] (the interval of one benchmark's avg@k, resampling problems) and
[`benchmark_mean_ci`] (the interval of the unweighted mean over benchmarks, resampling within each benchmark), as the
paper reports.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence


BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_CONFIDENCE = 0.95


def score_samples(per_problem_correct: Sequence[Sequence[bool]]) -> dict[str, float]:
    """
    avg@k and pass@k from per-sample correctness.

    Args:
        per_problem_correct (`Sequence[Sequence[bool]]`):
            For each problem, one boolean per sample (k samples).

    Returns:
        `dict[str, float]`: `"avg@k"`, the mean over problems of the fraction of correct samples, and `"pass@k"`, the
        fraction of problems with at least one correct sample. Both are `nan` for an empty benchmark.

    Example:
    ```python
    >>> score_samples([[True, False, True, False], [False, False, False, False]])
    {'avg@k': 0.25, 'pass@k': 0.5}
    ```
    """
    scored = [samples for samples in per_problem_correct if len(samples) > 0]
    if len(scored) < len(per_problem_correct):
        raise ValueError("Every problem needs at least one sample to be scored.")
    if not scored:
        return {"avg@k": math.nan, "pass@k": math.nan}
    avg = sum(sum(map(bool, samples)) / len(samples) for samples in scored) / len(scored)
    passed = sum(any(samples) for samples in scored) / len(scored)
    return {"avg@k": avg, "pass@k": passed}


def per_problem_scores(per_problem_correct: Sequence[Sequence[bool]]) -> list[float]:
    """The fraction of correct samples of each problem: the values whose mean over problems is avg@k."""
    return [sum(map(bool, samples)) / len(samples) for samples in per_problem_correct]


def bootstrap_means(
    scores: Sequence[float], *, num_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, stream: str = ""
):
    r"""
    Means of `num_resamples` bootstrap resamples of `scores` (problems drawn with replacement, as many as there are).

    The draws come from `numpy.random.default_rng([seed, crc32(stream)])`, so one benchmark's resamples (`stream` is
    its name) are the same whichever other benchmarks run.

    Returns:
        `numpy.ndarray`: Shape `[num_resamples]`.
    """
    import numpy as np

    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("The bootstrap needs a non-empty list of per-problem scores.")
    if num_resamples < 1:
        raise ValueError(f"`num_resamples` must be >= 1; got {num_resamples}.")
    rng = np.random.default_rng([seed, zlib.crc32(stream.encode())])
    indices = rng.integers(0, values.size, size=(num_resamples, values.size))
    return values[indices].mean(axis=1)


def percentile_interval(resampled_means, confidence: float = BOOTSTRAP_CONFIDENCE) -> tuple[float, float]:
    r"""
    The percentile interval of bootstrap means: the $(1-c)/2$ and $(1+c)/2$ quantiles (linear interpolation).
    """
    import numpy as np

    if not 0.0 < confidence < 1.0:
        raise ValueError(f"`confidence` must be in (0, 1); got {confidence}.")
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(np.asarray(resampled_means), [tail, 100.0 - tail])
    return float(low), float(high)


def bootstrap_ci(
    scores: Sequence[float],
    *,
    num_resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = BOOTSTRAP_CONFIDENCE,
    seed: int = 0,
    stream: str = "",
) -> tuple[float, float]:
    r"""
    Percentile-bootstrap confidence interval of the mean of per-problem `scores` (e.g. avg@k).

    Resample the $n$ problems with replacement `num_resamples` times, take each resample's mean $\bar s^{(b)}$, and
    return the $(1-c)/2$ and $(1+c)/2$ quantiles of $\{\bar s^{(b)}\}$. The $k$ samples of a problem stay together:
    the problem, not the sample, is the unit drawn. Seeded, so the same scores give the same interval.

    Example:
    ```python
    >>> bootstrap_ci([1.0, 1.0, 1.0])  # no spread, no uncertainty
    (1.0, 1.0)
    ```
    """
    means = bootstrap_means(scores, num_resamples=num_resamples, seed=seed, stream=stream)
    return percentile_interval(means, confidence)


def benchmark_mean_ci(
    scores_by_benchmark: dict[str, Sequence[float]],
    *,
    num_resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = BOOTSTRAP_CONFIDENCE,
    seed: int = 0,
) -> tuple[float, float]:
    r"""
    Percentile-bootstrap interval of the unweighted mean over benchmarks of their avg@k.

    Each benchmark's problems are resampled on their own (a stratified bootstrap: a resample keeps every benchmark's
    size), the $b$-th resample's benchmark means are averaged with equal weights, and the interval is the percentile
    interval of those averages. The per-benchmark resamples are the ones [`bootstrap_ci`] draws for that benchmark.
    """
    if not scores_by_benchmark:
        raise ValueError("The bootstrap of the mean needs at least one benchmark.")
    resampled = [
        bootstrap_means(scores, num_resamples=num_resamples, seed=seed, stream=name)
        for name, scores in scores_by_benchmark.items()
    ]
    return percentile_interval(sum(resampled) / len(resampled), confidence)
