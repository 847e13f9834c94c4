r"""`trace-trl eval`: avg@k on MATH-500, AIME 2024, AIME 2025, AMC 2023 and GPQA-Diamond.

The evaluation has three separable parts, so each can be tested or replaced on its own:

1. **Benchmarks**: `BENCHMARKS` maps a name to a loader returning [`Problem`]s (conversational prompt, gold answer,
   grading kind). Every loader reads the Hub dataset, or a local file in the same schema.
2. **Generation**: any callable `generate(prompts, num_samples) -> list[list[str]]` ([`Generate`]).
   [`HFGenerator`] (batched, left-padded `model.generate`) and [`VLLMGenerator`] (`LLM.generate` with
   `SamplingParams(n=k)`) are provided; tests pass a scripted double.
3. **Scoring**: [`score_samples`] is a pure function of the per-sample correctness.

Benchmarks and their Hub schemas (columns read in bold):

| Name           | Hub id (config, split)                 | Columns                                                          |
| -------------- | -------------------------------------- | ---------------------------------------------------------------- |
| `math500`      | `HuggingFaceH4/MATH-500` (test)        | **problem**, solution, **answer**, subject, level, **unique_id**  |
| `aime24`       | `HuggingFaceH4/aime_2024` (train)      | **id**, **problem**, solution, **answer**, url, year              |
| `aime25`       | `yentinglin/aime_2025` (train)         | **id**, **problem**, solution, **answer**, url, year              |
| `amc23`        | `math-ai/amc23` (test)                 | **id**, **question**, **answer** (a float, e.g. `27.0`), url      |
| `gpqa_diamond` | `Idavidrein/gpqa` (gpqa_diamond, train) | **Question**, **Correct Answer**, **Incorrect Answer 1..3**, **Record ID** |

GPQA-Diamond's four options are shuffled with a fixed seed per question (`random.Random(f"{seed}:{Record ID}")`), so
the gold letter is the same on every run and machine.

Every avg@k (per benchmark, and the unweighted mean over the benchmarks) comes with a percentile-bootstrap confidence
interval over problems ([`bootstrap_ci`]), as the paper reports.

`--paper` applies the paper's evaluation settings (`PAPER_SAMPLING`): Qwen3 thinking mode, temperature 0.6, top-p
0.95, top-k 20, 8 samples per problem (avg@8); a flag given explicitly still wins.

Example:
```bash
trace-trl eval --model Qwen/Qwen3-1.7B --paper --max-new-tokens 32768 \
    --backend vllm --output-dir eval/qwen3-1.7b --compare eval/grpo/results.json
```
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .data import DEFAULT_INSTRUCTION, load_raw_dataset, make_prompt


logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]
Generate = Callable[[list[Messages], int], list[list[str]]]

CHOICE_INSTRUCTION = (
    "Please reason step by step, and put the letter of your final answer (A, B, C or D) within \\boxed{}."
)
SCORERS: tuple[str, ...] = ("math_verify", "boxed_match")
BACKENDS: tuple[str, ...] = ("auto", "hf", "vllm")

# The paper's evaluation (Qwen3's recommended thinking-mode sampling): thinking on, temperature 0.6, top-p 0.95,
# top-k 20, avg@8. `trace-trl eval --paper` applies it.
PAPER_SAMPLING: dict[str, Any] = {
    "temperature": 0.6,
    "top_p": 0.95,
    "top_k": 20,
    "num_samples": 8,
    "enable_thinking": True,
}
# Defaults without `--paper` (top-k `None`: no top-k filtering).
DEFAULT_SAMPLING: dict[str, Any] = {"temperature": 0.6, "top_p": 0.95, "top_k": None, "num_samples": 1}
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_CONFIDENCE = 0.95


@dataclass
class Problem:
    """
    One benchmark problem.

    Args:
        id (`str`):
            Stable identifier (the dataset's id column, or the row index).
        prompt (`list[dict[str, str]]`):
            The conversation given to the model.
        answer (`str`):
            Gold answer: a math expression for `kind="math"`, a letter A-D for `kind="choice"`.
        kind (`str`, *optional*, defaults to `"math"`):
            `"math"` (graded with the math scorer) or `"choice"` (graded by the chosen letter).
    """

    id: str
    prompt: Messages
    answer: str
    kind: str = "math"


# ---------------------------------------------------------------------------------------------------------------------
# Benchmarks
# ---------------------------------------------------------------------------------------------------------------------


def _records(hub_id: str, config: str | None, split: str, path: str | None, limit: int | None) -> list[dict[str, Any]]:
    dataset = (
        load_raw_dataset(path, split=split) if path else load_raw_dataset(hub_id, split=split, config_name=config)
    )
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset.to_list()


def _first(record: dict[str, Any], columns: Sequence[str], default: Any = None) -> Any:
    # Mirrors of the same benchmark disagree on capitalisation ("problem" / "question", "id" / "ID").
    for column in columns:
        if column in record and record[column] is not None:
            return record[column]
    if default is not None:
        return default
    raise ValueError(f"None of the columns {list(columns)} is in the benchmark; available: {sorted(record)}.")


def _answer_str(answer: Any) -> str:
    if isinstance(answer, float) and answer.is_integer():
        return str(int(answer))  # amc23 stores answers as floats ("27.0")
    return str(answer).strip()


def _math_problems(
    records: list[dict[str, Any]], *, problem_columns: Sequence[str], system_prompt: str | None
) -> list[Problem]:
    return [
        Problem(
            id=str(_first(record, ("unique_id", "id", "ID"), default=str(index))),
            prompt=make_prompt(str(_first(record, problem_columns)), system_prompt, DEFAULT_INSTRUCTION),
            answer=_answer_str(_first(record, ("answer",))),
        )
        for index, record in enumerate(records)
    ]


def load_math500(
    path: str | None = None, *, system_prompt: str | None = None, limit: int | None = None
) -> list[Problem]:
    """MATH-500 (`HuggingFaceH4/MATH-500`, split `test`; columns `problem`, `answer`, `unique_id`) or a local file."""
    records = _records("HuggingFaceH4/MATH-500", None, "test", path, limit)
    return _math_problems(records, problem_columns=("problem",), system_prompt=system_prompt)


def load_aime24(
    path: str | None = None, *, system_prompt: str | None = None, limit: int | None = None
) -> list[Problem]:
    """AIME 2024 (`HuggingFaceH4/aime_2024`, split `train`; columns `id`, `problem`, `answer`) or a local file."""
    records = _records("HuggingFaceH4/aime_2024", None, "train", path, limit)
    return _math_problems(records, problem_columns=("problem",), system_prompt=system_prompt)


def load_aime25(
    path: str | None = None, *, system_prompt: str | None = None, limit: int | None = None
) -> list[Problem]:
    """AIME 2025 (`yentinglin/aime_2025`, split `train`; columns `id`, `problem`, `answer`) or a local file."""
    records = _records("yentinglin/aime_2025", None, "train", path, limit)
    return _math_problems(records, problem_columns=("problem", "question"), system_prompt=system_prompt)


def load_amc23(
    path: str | None = None, *, system_prompt: str | None = None, limit: int | None = None
) -> list[Problem]:
    """AMC 2023 (`math-ai/amc23`, split `test`; columns `id`, `question`, `answer`) or a local file."""
    records = _records("math-ai/amc23", None, "test", path, limit)
    return _math_problems(records, problem_columns=("question", "problem"), system_prompt=system_prompt)


def load_gpqa_diamond(
    path: str | None = None, *, system_prompt: str | None = None, limit: int | None = None, seed: int = 0
) -> list[Problem]:
    """
    GPQA-Diamond (`Idavidrein/gpqa`, config `gpqa_diamond`, split `train`; columns `Question`, `Correct Answer`,
    `Incorrect Answer 1`..`3`, `Record ID`) or a local file. The Hub dataset is gated: accept its terms and log in.

    The options are shuffled by `random.Random(f"{seed}:{Record ID}")` (string seeds are hashed with SHA-512, not
    Python's randomized `hash`), so the gold letter is reproducible.
    """
    records = _records("Idavidrein/gpqa", "gpqa_diamond", "train", path, limit)
    problems = []
    for index, record in enumerate(records):
        record_id = str(_first(record, ("Record ID", "id"), default=str(index)))
        correct = str(record["Correct Answer"]).strip()
        options = [correct] + [str(record[f"Incorrect Answer {i}"]).strip() for i in (1, 2, 3)]
        random.Random(f"{seed}:{record_id}").shuffle(options)
        letters = "ABCD"
        question = (
            str(record["Question"]).strip()
            + "\n\n"
            + "\n".join(f"{letter}) {option}" for letter, option in zip(letters, options))
        )
        problems.append(
            Problem(
                id=record_id,
                prompt=make_prompt(question, system_prompt, CHOICE_INSTRUCTION),
                answer=letters[options.index(correct)],
                kind="choice",
            )
        )
    return problems


# Benchmark name -> loader, in the column order of every results table.
BENCHMARKS: dict[str, Callable[..., list[Problem]]] = {
    "math500": load_math500,
    "aime24": load_aime24,
    "aime25": load_aime25,
    "amc23": load_amc23,
    "gpqa_diamond": load_gpqa_diamond,
}
DISPLAY_NAMES: dict[str, str] = {
    "math500": "MATH-500",
    "aime24": "AIME 2024",
    "aime25": "AIME 2025",
    "amc23": "AMC 2023",
    "gpqa_diamond": "GPQA-Diamond",
}


# ---------------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------------


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


def grade(problem: Problem, completions: list[str], *, scorer: str = "math_verify") -> list[bool]:
    """Correctness of each completion of `problem` (an unparseable gold answer counts every sample as wrong)."""
    from .rewards import accuracy_reward, boxed_match_reward, multiple_choice_reward

    if problem.kind == "choice":
        reward = multiple_choice_reward
    elif scorer == "math_verify":
        reward = accuracy_reward
    elif scorer == "boxed_match":
        reward = boxed_match_reward
    else:
        raise ValueError(f"`scorer` must be one of {SCORERS}; got {scorer!r}.")
    rewards = reward(completions, answer=[problem.answer] * len(completions))
    if rewards and rewards[0] is None:
        logger.warning(
            "Gold answer %r of problem %s cannot be parsed; its samples count as wrong.", problem.answer, problem.id
        )
    return [reward_value == 1.0 for reward_value in rewards]


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


# ---------------------------------------------------------------------------------------------------------------------
# Generation backends
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class SamplingSettings:
    """Decoding settings shared by the backends and recorded in the results."""

    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 32768
    seed: int = 0
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    # `None`: no top-k filtering (the HF backend passes 0, vLLM -1, so a model's generation config cannot add one).
    top_k: int | None = None


def render_prompts(tokenizer: Any, prompts: list[Messages], chat_template_kwargs: dict[str, Any]) -> list[str]:
    """Apply the chat template with a generation prompt and `chat_template_kwargs` (e.g. `enable_thinking`)."""
    return [
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **chat_template_kwargs)
        for messages in prompts
    ]


class HFGenerator:
    """
    Batched `model.generate` with left padding: the backend that needs nothing but `transformers`.

    Args:
        model (`str` or `PreTrainedModel`):
            Model id or path, or a loaded model.
        settings ([`SamplingSettings`]):
            Decoding settings. `temperature=0` decodes greedily once and repeats the completion `k` times.
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            Defaults to the model's.
        batch_size (`int`, *optional*, defaults to `8`):
            Prompts per `generate` call (each expanded to `k` sequences).
        dtype (`str`, *optional*, defaults to `"auto"`):
            Passed to `from_pretrained`.
    """

    def __init__(
        self,
        model: Any,
        settings: SamplingSettings,
        *,
        tokenizer: Any = None,
        batch_size: int = 8,
        dtype: str = "auto",
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if isinstance(model, str):
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
            device = "cuda" if torch.cuda.is_available() else "cpu"
            model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device)
        self.model = model.eval()
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(model.name_or_path)
        self.tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.settings = settings
        self.batch_size = batch_size

    def __call__(self, prompts: list[Messages], num_samples: int) -> list[list[str]]:
        import torch
        from tqdm.auto import tqdm
        from transformers import set_seed

        set_seed(self.settings.seed)
        greedy = self.settings.temperature <= 0
        sequences = 1 if greedy else num_samples
        texts = render_prompts(self.tokenizer, prompts, self.settings.chat_template_kwargs)
        outputs: list[list[str]] = []
        for start in tqdm(range(0, len(texts), self.batch_size), desc="Generating", unit="batch"):
            batch = self.tokenizer(
                texts[start : start + self.batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(self.model.device)
            sampling = (
                {}
                if greedy
                else {
                    "temperature": self.settings.temperature,
                    "top_p": self.settings.top_p,
                    "top_k": self.settings.top_k or 0,
                }
            )
            with torch.no_grad():
                generated = self.model.generate(
                    **batch,
                    do_sample=not greedy,
                    max_new_tokens=self.settings.max_new_tokens,
                    num_return_sequences=sequences,
                    pad_token_id=self.tokenizer.pad_token_id,
                    **sampling,
                )
            decoded = self.tokenizer.batch_decode(
                generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
            )
            for i in range(0, len(decoded), sequences):
                samples = decoded[i : i + sequences]
                outputs.append(samples * num_samples if greedy else samples)
        return outputs


class VLLMGenerator:
    """
    vLLM backend: one `LLM.generate` call for all prompts, `SamplingParams(n=k)`.

    Args:
        model (`str`):
            Model id or path.
        settings ([`SamplingSettings`]):
            Decoding settings.
        **llm_kwargs:
            Passed to `vllm.LLM` (e.g. `tensor_parallel_size`, `gpu_memory_utilization`, `max_model_len`).
    """

    def __init__(self, model: str, settings: SamplingSettings, **llm_kwargs: Any):
        try:
            from vllm import LLM
        except ImportError as exc:
            raise ImportError("The vLLM backend needs vLLM: pip install 'trace-trl[vllm]'.") from exc
        self.llm = LLM(model=model, seed=settings.seed, **llm_kwargs)
        self.settings = settings

    def __call__(self, prompts: list[Messages], num_samples: int) -> list[list[str]]:
        from vllm import SamplingParams

        params = SamplingParams(
            n=num_samples,
            temperature=self.settings.temperature,
            top_p=self.settings.top_p if self.settings.temperature > 0 else 1.0,
            top_k=self.settings.top_k if self.settings.top_k and self.settings.temperature > 0 else -1,
            max_tokens=self.settings.max_new_tokens,
            seed=self.settings.seed,
        )
        texts = render_prompts(self.llm.get_tokenizer(), prompts, self.settings.chat_template_kwargs)
        results = self.llm.generate(texts, params, use_tqdm=True)
        return [[output.text for output in result.outputs] for result in results]


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def make_generator(model: str, settings: SamplingSettings, *, backend: str = "auto", **kwargs: Any) -> Generate:
    """`backend="auto"` picks vLLM when it is importable and a CUDA device is present, else HF `generate`."""
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}; got {backend!r}.")
    if backend == "auto":
        import torch

        backend = "vllm" if vllm_available() and torch.cuda.is_available() else "hf"
    if backend == "vllm":
        return VLLMGenerator(model, settings, **kwargs.get("llm_kwargs", {}))
    return HFGenerator(model, settings, batch_size=kwargs.get("batch_size", 8), dtype=kwargs.get("dtype", "auto"))


# ---------------------------------------------------------------------------------------------------------------------
# Running and reporting
# ---------------------------------------------------------------------------------------------------------------------


def load_benchmarks(
    names: Sequence[str],
    *,
    files: dict[str, str] | None = None,
    system_prompt: str | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> dict[str, list[Problem]]:
    """Load the named benchmarks, each from its local file in `files` when given, else from the Hub."""
    files = files or {}
    unknown = [name for name in [*names, *files] if name not in BENCHMARKS]
    if unknown:
        raise ValueError(f"Unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}.")
    problems = {}
    for name in names:
        kwargs: dict[str, Any] = {"system_prompt": system_prompt, "limit": limit}
        if name == "gpqa_diamond":
            kwargs["seed"] = seed
        problems[name] = BENCHMARKS[name](files.get(name), **kwargs)
    return problems


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


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trace-trl eval",
        description="avg@k of a model on MATH-500, AIME 2024/2025, AMC 2023 and GPQA-Diamond.",
    )
    parser.add_argument("--model", required=True, help="Model id or local path.")
    parser.add_argument(
        "--benchmarks", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS), help="Benchmarks to run."
    )
    parser.add_argument(
        "--benchmark-file",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="Read a benchmark from a local json/jsonl/parquet/csv file in the Hub schema (repeatable).",
    )
    parser.add_argument(
        "--paper",
        action="store_true",
        help="The paper's evaluation settings: thinking mode on, temperature 0.6, top-p 0.95, top-k 20, 8 samples "
        "(avg@8). Flags given explicitly still win.",
    )
    parser.add_argument(
        "--num-samples", "-k", type=int, default=None, help="Samples per problem (k of avg@k); 1, or 8 with --paper."
    )
    parser.add_argument(
        "--temperature", type=float, default=None, help="Sampling temperature (default 0.6); 0 decodes greedily."
    )
    parser.add_argument("--top-p", type=float, default=None, help="Nucleus sampling (default 0.95).")
    parser.add_argument("--top-k", type=int, default=None, help="Top-k sampling; 0 or unset: none (20 with --paper).")
    parser.add_argument("--max-new-tokens", type=int, default=32768)
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="auto: vLLM when importable and on GPU.")
    parser.add_argument("--batch-size", type=int, default=8, help="HF backend: prompts per generate call.")
    parser.add_argument("--dtype", default="auto", help="HF backend: model dtype.")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM backend.")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vLLM backend.")
    parser.add_argument("--max-model-len", type=int, default=None, help="vLLM backend.")
    parser.add_argument(
        "--enable-thinking",
        choices=("true", "false"),
        default=None,
        help="Sets chat_template_kwargs['enable_thinking'] (Qwen3); unset keeps the template's default.",
    )
    parser.add_argument("--chat-template-kwargs", default="{}", help="JSON object passed to the chat template.")
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--scorer", choices=SCORERS, default="math_verify", help="Grader of the math benchmarks.")
    parser.add_argument("--limit", type=int, default=None, help="Only the first N problems of each benchmark.")
    parser.add_argument("--seed", type=int, default=0, help="Sampling, GPQA option-shuffle and bootstrap seed.")
    parser.add_argument(
        "--bootstrap-resamples",
        type=int,
        default=BOOTSTRAP_RESAMPLES,
        help="Resamples of the percentile bootstrap over problems for the avg@k intervals; 0: no intervals.",
    )
    parser.add_argument("--confidence", type=float, default=BOOTSTRAP_CONFIDENCE, help="Coverage of the intervals.")
    parser.add_argument("--output-dir", default="eval_results", help="Where results.json and results.md go.")
    parser.add_argument("--save-completions", action="store_true", help="Keep every completion in results.json.")
    parser.add_argument(
        "--compare", action="append", default=[], metavar="RESULTS_JSON", help="Add rows from earlier results."
    )
    return parser


def _parse_files(pairs: Sequence[str]) -> dict[str, str]:
    files = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not path:
            raise ValueError(f"--benchmark-file expects NAME=PATH, got {pair!r}.")
        files[name] = path
    return files


def resolve_sampling(args: argparse.Namespace) -> dict[str, Any]:
    """
    The sampling settings of a parsed command line: explicit flags, else `PAPER_SAMPLING` with `--paper`, else
    `DEFAULT_SAMPLING`. `--paper` also turns thinking on unless `--enable-thinking false` is given.
    """
    preset = PAPER_SAMPLING if args.paper else DEFAULT_SAMPLING
    resolved = {
        name: getattr(args, name) if getattr(args, name) is not None else preset[name] for name in DEFAULT_SAMPLING
    }
    if resolved["top_k"] == 0:
        resolved["top_k"] = None
    enable_thinking = args.enable_thinking
    if enable_thinking is None and args.paper:
        enable_thinking = "true"
    resolved["enable_thinking"] = None if enable_thinking is None else enable_thinking == "true"
    return resolved


def main(argv: Sequence[str] | None = None, *, generate: Generate | None = None) -> int:
    """
    Entry point of `trace-trl eval`. `generate` replaces the backend (tests pass a scripted double).

    Returns:
        `int`: The exit status (0 on success, 2 on bad arguments).
    """
    parser = _parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        files = _parse_files(args.benchmark_file)
        chat_template_kwargs = json.loads(args.chat_template_kwargs)
        if not isinstance(chat_template_kwargs, dict):
            raise ValueError("--chat-template-kwargs must be a JSON object.")
        sampling_args = resolve_sampling(args)
        if sampling_args["num_samples"] < 1:
            raise ValueError("--num-samples must be >= 1.")
        if sampling_args["top_k"] is not None and sampling_args["top_k"] < 0:
            raise ValueError("--top-k must be >= 0 (0: no top-k).")
        if args.bootstrap_resamples < 0:
            raise ValueError("--bootstrap-resamples must be >= 0 (0: no confidence intervals).")
        if not 0.0 < args.confidence < 1.0:
            raise ValueError("--confidence must be in (0, 1), e.g. 0.95.")
        compare = [json.loads(Path(path).read_text()) for path in args.compare]
        benchmarks = load_benchmarks(
            args.benchmarks, files=files, system_prompt=args.system_prompt, limit=args.limit, seed=args.seed
        )
    except (ValueError, OSError) as exc:
        parser.print_usage(sys.stderr)
        print(f"trace-trl eval: error: {exc}", file=sys.stderr)
        return 2
    if sampling_args["enable_thinking"] is not None:
        chat_template_kwargs["enable_thinking"] = sampling_args["enable_thinking"]
    num_samples = sampling_args["num_samples"]

    sampling = SamplingSettings(
        temperature=sampling_args["temperature"],
        top_p=sampling_args["top_p"],
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        chat_template_kwargs=chat_template_kwargs,
        top_k=sampling_args["top_k"],
    )
    backend = "custom" if generate is not None else args.backend
    if generate is None:
        llm_kwargs = {
            "tensor_parallel_size": args.tensor_parallel_size,
            "gpu_memory_utilization": args.gpu_memory_utilization,
        }
        if args.max_model_len is not None:
            llm_kwargs["max_model_len"] = args.max_model_len
        generate = make_generator(
            args.model,
            sampling,
            backend=args.backend,
            batch_size=args.batch_size,
            dtype=args.dtype,
            llm_kwargs=llm_kwargs,
        )
        backend = "vllm" if isinstance(generate, VLLMGenerator) else "hf"
    settings = {
        **asdict(sampling),
        "backend": backend,
        "system_prompt": args.system_prompt,
        "limit": args.limit,
        "benchmark_files": files,
        "preset": "paper" if args.paper else None,
    }
    results = evaluate(
        args.model,
        benchmarks,
        generate,
        num_samples=num_samples,
        settings=settings,
        scorer=args.scorer,
        keep_completions=args.save_completions,
        bootstrap_resamples=args.bootstrap_resamples,
        confidence=args.confidence,
        bootstrap_seed=args.seed,
    )
    table = write_results(results, args.output_dir, compare)
    print(table)
    print(f"Results written to {Path(args.output_dir) / 'results.json'} and {Path(args.output_dir) / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
