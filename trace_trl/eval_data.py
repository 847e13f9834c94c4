"""The evaluation benchmarks: MATH-500, AIME 2024, AIME 2025, AMC 2023 and GPQA-Diamond, as [`Problem`]s, and grading.

`BENCHMARKS` maps a name to a loader returning [`Problem`]s (conversational prompt, gold answer, grading kind). Every
loader reads the Hub dataset, or a local file in the same schema. [`grade`] scores completions of one problem.

Benchmarks and their Hub schemas (columns read in bold):
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
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .data import DEFAULT_INSTRUCTION, load_raw_dataset, make_prompt


logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]

CHOICE_INSTRUCTION = (
    "Please reason step by step, and put the letter of your final answer (A, B, C or D) within \\boxed{}."
)
SCORERS: tuple[str, ...] = ("math_verify", "boxed_match")


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
