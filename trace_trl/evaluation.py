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

Example:
```bash
trace-trl eval --model Qwen/Qwen3-1.7B --num-samples 16 --temperature 0.6 --top-p 0.95 --max-new-tokens 32768 \
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
            sampling = {} if greedy else {"temperature": self.settings.temperature, "top_p": self.settings.top_p}
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
) -> dict[str, Any]:
    """
    Run every benchmark through `generate` and collect the results document written as `results.json`.

    Returns:
        `dict`: `model`, `timestamp` (UTC, ISO 8601), `settings`, `benchmarks` (name -> [`evaluate_benchmark`]
        output plus its display `name`) and `average` (mean avg@k and pass@k over the benchmarks).
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
    return results


def _ordered_benchmarks(results: Sequence[dict[str, Any]]) -> list[str]:
    present = {name for result in results for name in result["benchmarks"]}
    return [name for name in BENCHMARKS if name in present] + sorted(present - set(BENCHMARKS))


def _percent(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def results_table(results: dict[str, Any], compare: Sequence[dict[str, Any]] = (), metric: str = "avg@k") -> str:
    """
    Markdown table of `metric` (in %) per benchmark and their average, one row per results document.

    Columns are always in `BENCHMARKS` order, so tables from different runs line up; `compare` adds rows from earlier
    results. A row's average is over the table's columns, and `-` when that row lacks one of them.
    """
    rows = [results, *compare]
    names = _ordered_benchmarks(rows)
    header = ["Model", "k", *(DISPLAY_NAMES.get(n, n) for n in names), "Average"]
    lines = [f"| {' | '.join(header)} |", "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|"]
    for row in rows:
        values = [row["benchmarks"][n][metric] if n in row["benchmarks"] else None for n in names]
        average = None if any(v is None for v in values) or not values else sum(values) / len(values)
        cells = [str(row["model"]), str(row["settings"].get("num_samples", "")), *map(_percent, values)]
        lines.append(f"| {' | '.join([*cells, _percent(average)])} |")
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, Any], output_dir: str | Path, compare: Sequence[dict[str, Any]] = ()) -> str:
    """Write `results.json` and `results.md` (avg@k and pass@k tables) into `output_dir`; return the avg@k table."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = results_table(results, compare)
    k = results["settings"].get("num_samples", "k")
    markdown = (
        f"# Evaluation of {results['model']}\n\n{results['timestamp']}, k = {k} samples per problem, "
        f"temperature {results['settings'].get('temperature', '-')}, top-p {results['settings'].get('top_p', '-')}, "
        f"max new tokens {results['settings'].get('max_new_tokens', '-')}.\n\n"
        f"## avg@{k} (%)\n\n{table}\n## pass@{k} (%)\n\n{results_table(results, compare, metric='pass@k')}"
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
    parser.add_argument("--num-samples", "-k", type=int, default=1, help="Samples per problem (k of avg@k).")
    parser.add_argument("--temperature", type=float, default=0.6, help="Sampling temperature; 0 decodes greedily.")
    parser.add_argument("--top-p", type=float, default=0.95)
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
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed and GPQA option-shuffle seed.")
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
        if args.num_samples < 1:
            raise ValueError("--num-samples must be >= 1.")
        compare = [json.loads(Path(path).read_text()) for path in args.compare]
        benchmarks = load_benchmarks(
            args.benchmarks, files=files, system_prompt=args.system_prompt, limit=args.limit, seed=args.seed
        )
    except (ValueError, OSError) as exc:
        parser.print_usage(sys.stderr)
        print(f"trace-trl eval: error: {exc}", file=sys.stderr)
        return 2
    if args.enable_thinking is not None:
        chat_template_kwargs["enable_thinking"] = args.enable_thinking == "true"

    sampling = SamplingSettings(args.temperature, args.top_p, args.max_new_tokens, args.seed, chat_template_kwargs)
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
    }
    results = evaluate(
        args.model,
        benchmarks,
        generate,
        num_samples=args.num_samples,
        settings=settings,
        scorer=args.scorer,
        keep_completions=args.save_completions,
    )
    table = write_results(results, args.output_dir, compare)
    print(table)
    print(f"Results written to {Path(args.output_dir) / 'results.json'} and {Path(args.output_dir) / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
