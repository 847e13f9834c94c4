r"""Math training sets in TRACE's format: a conversational `prompt`, a verifiable `answer` and a privileged `solution`.

Every loader returns a [`~datasets.Dataset`] with these columns:

- `prompt` (`list[dict[str, str]]`): the student's conversation, an optional system turn and one user turn holding the
  problem followed by an instruction to put the final answer in `\boxed{}`. No think tags are added: Qwen3's thinking
  mode is switched at the trainer with `chat_template_kwargs={"enable_thinking": ...}`.
- `problem` (`str`): the raw problem text.
- `answer` (`str`): the gold final answer, read by [`~trace_trl.rewards.accuracy_reward`] and friends.
- `solution` (`str`): the reference solution, TRACE's privileged context (`TRACEConfig.privileged_context_column`).
  It is never put in `prompt`.

Supported Hub schemas (the column names are the ones each loader reads):

| `source`   | Hub id                              | problem    | answer                                  | solution                       |
| ---------- | ----------------------------------- | ---------- | --------------------------------------- | ------------------------------ |
| `"math"`   | `DigitalLearningGmbH/MATH-lighteval` | `problem`  | last `\boxed{}` of `solution`           | `solution`                     |
| `"gsm8k"`  | `openai/gsm8k` (config `main`)       | `question` | the number after `####` in `answer`     | `answer` before `####`         |
| `"numina"` | `AI-MO/NuminaMath-CoT`               | `problem`  | last `\boxed{}` of `solution`           | `solution`                     |
| `"openr1"` | `open-r1/OpenR1-Math-220k`           | `problem`  | `answer`                                | `solution`                     |
| `"openthoughts"` | `open-thoughts/OpenThoughts-114k` (config `metadata`, `domain == "math"` rows) | `problem` | last `\boxed{}` of `ground_truth_solution` (else of `deepseek_solution`) | `ground_truth_solution` (else `deepseek_solution`) |
| `"custom"` | any Hub id or local file            | `prompt_column` | `answer_column` (or `\boxed{}` of the solution) | `solution_column`    |
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict


logger = logging.getLogger(__name__)

# The instruction used by Qwen's and DeepSeek's math evaluations, so rewards and evaluation look in the same place.
DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

SOURCES: tuple[str, ...] = ("math", "gsm8k", "numina", "openr1", "openthoughts", "custom")

# The paper's training set: the math subset of OpenThoughts-114k, at most 30K problem-solution pairs.
OPENTHOUGHTS_ID = "open-thoughts/OpenThoughts-114k"
PAPER_MAX_TRAIN_SAMPLES = 30_000
DEFAULT_VALIDATION_SIZE = 500

# Hub id fragment -> source, used when `source=None`. Matched case-insensitively against `name_or_path`.
_SOURCE_HINTS: dict[str, str] = {
    "math-lighteval": "math",
    "gsm8k": "gsm8k",
    "numinamath": "numina",
    "openr1-math": "openr1",
    "openthoughts": "openthoughts",
}

# Default Hub config per source (gsm8k has "main" and "socratic"; the others have a single default config).
# OpenThoughts-114k's `default` config only has `system` and `conversations` (ShareGPT turns); the problem, the
# reference solution and the `domain` column are in its `metadata` config.
_DEFAULT_CONFIGS: dict[str, str | None] = {"gsm8k": "main", "openthoughts": "metadata"}

# Local file extension -> `datasets` builder.
_FILE_BUILDERS: dict[str, str] = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}

_BOX_COMMANDS: tuple[str, ...] = ("\\boxed", "\\fbox")
_THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)
_GSM8K_CALCULATOR = re.compile(r"<<[^<>]*>>")  # gsm8k's calculator annotations, e.g. "<<48/2=24>>"


# ---------------------------------------------------------------------------------------------------------------------
# Text helpers (no `datasets` import: the rewards use them inside the training loop)
# ---------------------------------------------------------------------------------------------------------------------


def extract_boxed(text: str | None) -> str | None:
    r"""
    Content of the last `\boxed{...}` (or `\fbox{...}`) in `text`, with nested braces; `None` when there is none.

    The brace-less form `\boxed 5` (found in a few MATH solutions) is also read, up to the next whitespace or `$`.
    An unclosed last box (a truncated completion) is skipped in favour of the previous complete one.

    Args:
        text (`str` or `None`):
            Text to search.

    Returns:
        `str` or `None`: The content of the last complete box, stripped of surrounding whitespace.

    Example:
    ```python
    >>> extract_boxed(r"so \boxed{1} or rather \boxed{\frac{1}{2}}")
    '\\frac{1}{2}'
    ```
    """
    boxes = find_boxed(text)
    return boxes[-1] if boxes else None


def find_boxed(text: str | None) -> list[str]:
    r"""Contents of every complete `\boxed{...}` / `\fbox{...}` in `text`, in order (see [`extract_boxed`])."""
    if not text:
        return []
    starts = sorted(m.start() for cmd in _BOX_COMMANDS for m in re.finditer(re.escape(cmd) + r"(?![A-Za-z])", text))
    boxes = []
    for start in starts:
        content = _read_box(text, start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox")))
        if content is not None:
            boxes.append(content.strip())
    return boxes


def _read_box(text: str, pos: int) -> str | None:
    """Read the argument of a box command whose name ends at `pos`; `None` when it is unbalanced or empty."""
    while pos < len(text) and text[pos] == " ":
        pos += 1
    if pos >= len(text):
        return None
    if text[pos] != "{":
        # `\boxed 5`: the argument runs to the next whitespace or math delimiter.
        match = re.match(r"[^\s$]+", text[pos:])
        return match.group(0) if match and pos > 0 and text[pos - 1] == " " else None
    depth = 0
    for i in range(pos, len(text)):
        if text[i] == "{" and text[i - 1] != "\\":
            depth += 1
        elif text[i] == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[pos + 1 : i]
    return None


def strip_think(text: str) -> str:
    """Remove `<think>...</think>` blocks (and an unclosed leading `<think>` up to a final `</think>`) from `text`."""
    text = _THINK_BLOCK.sub("", text)
    # A block opened by the chat template (only "</think>" is in the text) leaves everything before the close tag.
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    return text.strip()


def make_prompt(
    problem: str, system_prompt: str | None = None, instruction: str | None = DEFAULT_INSTRUCTION
) -> list[dict[str, str]]:
    r"""
    The student's conversational prompt for a math problem.

    Args:
        problem (`str`):
            The problem statement.
        system_prompt (`str` or `None`, *optional*, defaults to `None`):
            Content of a system turn; none when `None`.
        instruction (`str` or `None`, *optional*, defaults to `DEFAULT_INSTRUCTION`):
            Appended to the problem after a blank line; asks for the final answer in `\boxed{}`. `None` adds nothing.

    Returns:
        `list[dict[str, str]]`: Messages for `tokenizer.apply_chat_template`. No think tags are added here: thinking
        is switched by `chat_template_kwargs={"enable_thinking": ...}` at the trainer.

    Example:
    ```python
    >>> make_prompt("What is 1 + 1?")
    [{'role': 'user', 'content': 'What is 1 + 1?\n\nPlease reason step by step, and put your final answer within \\boxed{}.'}]
    ```
    """
    content = problem.strip() if instruction is None else f"{problem.strip()}\n\n{instruction}"
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": content})
    return messages


def split_gsm8k_answer(answer: str) -> tuple[str, str]:
    """Split a gsm8k `answer` ("reasoning ... #### 1,234") into (reasoning without calculator annotations, "1234")."""
    if "####" not in answer:
        return answer.strip(), ""
    reasoning, final = answer.rsplit("####", 1)
    return _GSM8K_CALCULATOR.sub("", reasoning).strip(), final.strip().replace(",", "")


# ---------------------------------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------------------------------


def load_math_dataset(
    name_or_path: str,
    *,
    split: str = "train",
    source: str | None = None,
    config_name: str | None = None,
    prompt_column: str = "problem",
    answer_column: str | None = "answer",
    solution_column: str = "solution",
    system_prompt: str | None = None,
    instruction: str | None = DEFAULT_INSTRUCTION,
    strip_thinking: bool = False,
    drop_empty_solutions: bool = False,
    keep_columns: Sequence[str] = (),
    num_proc: int | None = None,
    limit: int | None = None,
) -> Dataset:
    r"""
    Load a math training set from the Hub or a local file and convert it to TRACE's format.

    Args:
        name_or_path (`str`):
            A Hub dataset id (e.g. `"DigitalLearningGmbH/MATH-lighteval"`), a local `.json`/`.jsonl`/`.parquet`/`.csv`
            file, or a local dataset folder.
        split (`str`, *optional*, defaults to `"train"`):
            Split to load. Local files have a single `"train"` split.
        source (`str` or `None`, *optional*, defaults to `None`):
            Schema of the data: `"math"`, `"gsm8k"`, `"numina"`, `"openr1"`, `"openthoughts"` or `"custom"` (see the
            module docstring). `None` guesses from `name_or_path` and falls back to `"custom"`. `"openthoughts"` keeps
            the `domain == "math"` rows only (for the paper's train/validation split, use
            [`load_openthoughts_math`]).
        config_name (`str` or `None`, *optional*, defaults to `None`):
            Hub config; `None` picks the source's default (`"main"` for gsm8k, `"metadata"` for OpenThoughts).
        prompt_column (`str`, *optional*, defaults to `"problem"`):
            `"custom"` only: column with the problem text, or with a conversational prompt (a list of messages),
            which is then kept as is: no instruction is appended, and `problem` is its last user message.
        answer_column (`str` or `None`, *optional*, defaults to `"answer"`):
            `"custom"` only: column with the gold answer. `None` extracts the answer from the last `\boxed{}` of the
            solution.
        solution_column (`str`, *optional*, defaults to `"solution"`):
            `"custom"` only: column with the reference solution (the privileged context).
        system_prompt (`str` or `None`, *optional*, defaults to `None`):
            Optional system turn of every prompt.
        instruction (`str` or `None`, *optional*, defaults to `DEFAULT_INSTRUCTION`):
            Instruction appended to each problem; see [`make_prompt`].
        strip_thinking (`bool`, *optional*, defaults to `False`):
            Remove `<think>...</think>` blocks from the reference solutions (e.g. distilled reasoning traces), so the
            teacher sees the worked solution only.
        drop_empty_solutions (`bool`, *optional*, defaults to `False`):
            Drop rows whose solution is empty (with a warning) instead of raising a `ValueError`.
        keep_columns (`Sequence[str]`, *optional*, defaults to `()`):
            Source columns to keep beside the output columns (e.g. `("level", "type")` for MATH).
        num_proc (`int` or `None`, *optional*, defaults to `None`):
            Processes for `Dataset.map`.
        limit (`int` or `None`, *optional*, defaults to `None`):
            Keep only the first `limit` rows (taken before conversion, so it is cheap).

    Returns:
        [`~datasets.Dataset`]: Columns `prompt`, `problem`, `answer`, `solution` (plus `keep_columns`). Rows without a
        verifiable answer are dropped with a warning.

    Raises:
        `ValueError`: When a needed column is missing (the message lists the available columns), or when some
        solutions are empty and `drop_empty_solutions=False` (the message gives their count and indices).

    Example:
    ```python
    >>> from trace_trl.data import load_math_dataset

    >>> dataset = load_math_dataset("DigitalLearningGmbH/MATH-lighteval", split="train")
    >>> dataset = load_math_dataset("my_data.jsonl", prompt_column="question", answer_column="final",
    ...                             solution_column="worked_solution")
    ```
    """
    source = guess_source(name_or_path) if source is None else source
    if source not in SOURCES:
        raise ValueError(f"`source` must be one of {', '.join(repr(s) for s in SOURCES)} or None; got {source!r}.")
    raw = load_raw_dataset(name_or_path, split=split, config_name=config_name or _DEFAULT_CONFIGS.get(source))
    if source == "openthoughts":
        raw = _openthoughts_math_rows(raw, name_or_path=name_or_path, keep_columns=keep_columns)
    if limit is not None:
        raw = raw.select(range(min(limit, len(raw))))

    if source == "custom":
        columns = {"problem": prompt_column, "solution": solution_column}
        if answer_column is not None:
            columns["answer"] = answer_column
    else:
        columns = _SOURCE_COLUMNS[source]
    for role, column in columns.items():
        _require_column(raw, column, role=role, name_or_path=name_or_path, needed=columns)
    for column in keep_columns:
        _require_column(raw, column, role="kept", name_or_path=name_or_path)

    convert = _CONVERTERS.get(source, _convert_custom)
    dataset = raw.map(
        convert,
        fn_kwargs={
            "columns": columns,
            "system_prompt": system_prompt,
            "instruction": instruction,
            "strip_thinking": strip_thinking,
        },
        remove_columns=[c for c in raw.column_names if c not in keep_columns],
        num_proc=num_proc,
        desc=f"Formatting {name_or_path}",
    )
    dataset = check_solutions(dataset, "solution", drop_empty=drop_empty_solutions, source_column=columns["solution"])
    return _drop_unverifiable(dataset, num_proc=num_proc)


def load_openthoughts_math(
    name_or_path: str = OPENTHOUGHTS_ID,
    *,
    config_name: str | None = None,
    max_train_samples: int | None = PAPER_MAX_TRAIN_SAMPLES,
    validation_size: int = DEFAULT_VALIDATION_SIZE,
    seed: int = 42,
    system_prompt: str | None = None,
    instruction: str | None = DEFAULT_INSTRUCTION,
    drop_empty_solutions: bool = False,
    num_proc: int | None = None,
) -> DatasetDict:
    r"""
    The paper's training data: the math subset of OpenThoughts-114k, split into train and a held-out validation set.

    The rows of `open-thoughts/OpenThoughts-114k` (config `metadata`) with `domain == "math"` are converted as in
    [`load_math_dataset`] with `source="openthoughts"`: the problem is the prompt, the privileged context is
    `ground_truth_solution` (NuminaMath-CoT's reference solution; `deepseek_solution` where it is empty) and the answer
    is the last `oxed{}` of that solution. Rows without a checkable answer are dropped and counted in a log line;
    repeated problems are kept once, so no problem is in both splits. The rows are then shuffled with `seed`; the
    first `validation_size` are the validation split (for checkpoint selection), and the train split is the next
    `max_train_samples` rows. The validation split does not depend on `max_train_samples`.

    Args:
        name_or_path (`str`, *optional*, defaults to `"open-thoughts/OpenThoughts-114k"`):
            Hub id, or a local file or folder in the `metadata` schema (`problem`, `deepseek_reasoning`,
            `deepseek_solution`, `ground_truth_solution`, `domain`, `source`, ...).
        config_name (`str` or `None`, *optional*, defaults to `None`):
            Hub config; `None` reads `"metadata"`.
        max_train_samples (`int` or `None`, *optional*, defaults to `30000`):
            Most training problems (the paper's "up to 30K problem-solution pairs"); `None` keeps every other row.
        validation_size (`int`, *optional*, defaults to `500`):
            Problems held out for validation; `0` makes an empty validation split.
        seed (`int`, *optional*, defaults to `42`):
            Seed of the shuffle. The same data and seed give the same splits on every machine.
        system_prompt, instruction, drop_empty_solutions, num_proc:
            As in [`load_math_dataset`].

    Returns:
        [`~datasets.DatasetDict`]: `"train"` and `"validation"`, each with the columns `prompt`, `problem`, `answer`,
        `solution`.

    Raises:
        `ValueError`: When `validation_size` or `max_train_samples` is negative or zero where that makes no sense, or
        the math rows are too few to leave a training set beside the validation set.

    Example:
    ```python
    >>> from trace_trl.data import load_openthoughts_math

    >>> splits = load_openthoughts_math()  # at most 30,000 train problems, 500 validation problems
    >>> train, validation = splits["train"], splits["validation"]
    ```
    """
    from datasets import DatasetDict

    if validation_size < 0:
        raise ValueError(f"`validation_size` must be >= 0; got {validation_size}.")
    if max_train_samples is not None and max_train_samples < 1:
        raise ValueError(f"`max_train_samples` must be >= 1 or None; got {max_train_samples}.")
    dataset = load_math_dataset(
        name_or_path,
        source="openthoughts",
        config_name=config_name,
        system_prompt=system_prompt,
        instruction=instruction,
        drop_empty_solutions=drop_empty_solutions,
        num_proc=num_proc,
    )
    dataset = _drop_repeated_problems(dataset)
    if len(dataset) <= validation_size:
        raise ValueError(
            f"{name_or_path} has {len(dataset)} usable math problems, too few for a validation split of "
            f"{validation_size} and a training split: lower `validation_size`."
        )
    dataset = dataset.shuffle(seed=seed).flatten_indices()
    validation = dataset.select(range(validation_size))
    rest = len(dataset) - validation_size
    num_train = rest if max_train_samples is None else min(max_train_samples, rest)
    train = dataset.select(range(validation_size, validation_size + num_train))
    logger.info(
        "OpenThoughts math: %d train and %d validation problems (seed %d; %d more left unused by max_train_samples=%s).",
        len(train),
        len(validation),
        seed,
        rest - num_train,
        max_train_samples,
    )
    return DatasetDict({"train": train, "validation": validation})


def _drop_repeated_problems(dataset: Dataset) -> Dataset:
    # A problem repeated in the source must not land in both splits: the validation score would then be inflated.
    seen: set[str] = set()
    keep = []
    for i, problem in enumerate(dataset["problem"]):
        key = " ".join(problem.split()).lower()
        if key not in seen:
            seen.add(key)
            keep.append(i)
    if len(keep) < len(dataset):
        logger.warning(
            "Dropping %d of %d rows that repeat an earlier problem.", len(dataset) - len(keep), len(dataset)
        )
        dataset = dataset.select(keep)
    return dataset


def guess_source(name_or_path: str) -> str:
    """The schema a dataset id suggests (see `_SOURCE_HINTS`), or `"custom"`."""
    lowered = name_or_path.lower()
    for hint, source in _SOURCE_HINTS.items():
        if hint in lowered:
            return source
    return "custom"


# A Hub dataset id: `name` or `owner/name`, no other separator.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def looks_like_local_path(name_or_path: str) -> bool:
    """Whether `name_or_path` can only be a local path, never a Hub dataset id.

    True when it starts with `/`, `./`, `../` or `~`, ends in a data-file extension (`.jsonl`, `.parquet`, ...), or
    holds a path separator in a way no Hub id does (`owner/name` holds exactly one `/`; `a/b/c` or `data\\x` are paths).
    """
    name = str(name_or_path)
    separators = tuple(filter(None, (os.sep, os.altsep, "/")))
    if name.startswith(("~", *(prefix + sep for prefix in ("", ".", "..") for sep in separators))):
        return True
    if name in (".", "..") or os.path.splitext(name)[1].lower() in _FILE_BUILDERS:
        return True
    return any(sep in name for sep in separators) and not _HUB_ID.match(name)


def check_local_dataset_path(name_or_path: str) -> None:
    """Raise `FileNotFoundError` when `name_or_path` is a local path (see `looks_like_local_path`) that does not exist.

    Without it, `datasets` would take the missing path for a Hub id and report a Hub failure after its retries.
    """
    if looks_like_local_path(name_or_path) and not os.path.exists(os.path.expanduser(name_or_path)):
        resolved = os.path.abspath(os.path.expanduser(name_or_path))
        raise FileNotFoundError(
            f"The dataset path {name_or_path!r} does not exist (resolved to {resolved!r}). Fix the path (relative "
            "paths start from the current folder), or give a Hub dataset id such as `owner/name`."
        )


def load_raw_dataset(name_or_path: str, *, split: str = "train", config_name: str | None = None) -> Dataset:
    """Load a Hub dataset, a local data file (json/jsonl/parquet/csv) or a local dataset folder, unchanged.

    A local path that does not exist raises `FileNotFoundError` at once, without asking the Hub.
    """
    from datasets import load_dataset

    check_local_dataset_path(name_or_path)
    name_or_path = os.path.expanduser(name_or_path)
    extension = os.path.splitext(name_or_path)[1].lower()
    if os.path.isfile(name_or_path):
        if extension not in _FILE_BUILDERS:
            raise ValueError(
                f"Cannot read {name_or_path!r}: local files must end in {', '.join(_FILE_BUILDERS)}; got {extension!r}."
            )
        # A local file is a single split, which `datasets` names "train" whatever `split` says.
        return load_dataset(_FILE_BUILDERS[extension], data_files=name_or_path, split="train")
    if os.path.isdir(name_or_path):
        return load_dataset(name_or_path, config_name, split=split)
    return load_dataset(name_or_path, config_name, split=split)


def check_solutions(
    dataset: Dataset, column: str = "solution", *, drop_empty: bool = False, source_column: str | None = None
) -> Dataset:
    """
    Check that every row of `dataset` has a non-empty privileged context in `column`.

    Args:
        dataset ([`~datasets.Dataset`]):
            Dataset to check.
        column (`str`, *optional*, defaults to `"solution"`):
            The privileged-context column.
        drop_empty (`bool`, *optional*, defaults to `False`):
            Drop rows with an empty or missing value (with a warning) instead of raising.
        source_column (`str` or `None`, *optional*, defaults to `None`):
            Name of the column the values came from, for the error message.

    Returns:
        [`~datasets.Dataset`]: `dataset`, or a filtered copy when `drop_empty=True`.

    Raises:
        `ValueError`: When `column` is missing, or some rows are empty and `drop_empty=False`.
    """
    _require_column(dataset, column, role="solution", name_or_path="the dataset")
    empty = [i for i, value in enumerate(dataset[column]) if value is None or not str(value).strip()]
    if not empty:
        return dataset
    named = f"{column!r}" if source_column in (None, column) else f"{column!r} (from column {source_column!r})"
    shown = ", ".join(map(str, empty[:20])) + (", ..." if len(empty) > 20 else "")
    if not drop_empty:
        raise ValueError(
            f"The privileged context column {named} is empty in {len(empty)} of {len(dataset)} rows "
            f"(indices {shown}). TRACE's teacher needs a reference solution for every problem: fill them in, or pass "
            "`drop_empty_solutions=True` to drop these rows."
        )
    logger.warning("Dropping %d of %d rows with an empty %s (indices %s).", len(empty), len(dataset), named, shown)
    empty_set = set(empty)
    return dataset.select([i for i in range(len(dataset)) if i not in empty_set])


class MissingColumnError(ValueError):
    """A column a loader reads is not in the dataset; `trace-trl train` turns it into an error naming its flags."""

    def __init__(self, message: str, *, column: str, role: str, available: list[str], needed: dict[str, str]):
        super().__init__(message)
        self.column, self.role, self.available, self.needed = column, role, available, needed


def _require_column(
    dataset: Dataset, column: str, *, role: str, name_or_path: str, needed: dict[str, str] | None = None
) -> None:
    if column not in dataset.column_names:
        described = "the privileged context" if role == "solution" else f"the {role}"
        raise MissingColumnError(
            f"Column {column!r} ({described}) not found in {name_or_path}; available columns: {dataset.column_names}. "
            "Pass `source=` to pick a known schema or the `*_column` arguments to map your columns.",
            column=column,
            role=role,
            available=list(dataset.column_names),
            needed=dict(needed or {role: column}),
        )


def _drop_unverifiable(dataset: Dataset, *, num_proc: int | None) -> Dataset:
    # Without a gold answer the reward is undefined; such rows (e.g. proofs in NuminaMath) cannot train GRPO.
    keep = [i for i, answer in enumerate(dataset["answer"]) if answer]
    if len(keep) < len(dataset):
        logger.warning("Dropping %d of %d rows without a verifiable answer.", len(dataset) - len(keep), len(dataset))
        dataset = dataset.select(keep)
    return dataset


def _row(
    problem: Any,
    answer: Any,
    solution: Any,
    *,
    system_prompt: str | None,
    instruction: str | None,
    strip_thinking: bool,
) -> dict[str, Any]:
    solution = "" if solution is None else str(solution)
    if strip_thinking:
        solution = strip_think(solution)
    if isinstance(problem, list):
        # Already conversational: kept as is (the user wrote the instruction), a system turn added when asked.
        prompt = [dict(message) for message in problem]
        if system_prompt and not any(message.get("role") == "system" for message in prompt):
            prompt.insert(0, {"role": "system", "content": system_prompt})
        users = [message["content"] for message in prompt if message.get("role") == "user"]
        problem = users[-1] if users else ""
    else:
        problem = "" if problem is None else str(problem)
        prompt = make_prompt(problem, system_prompt, instruction)
    return {
        "prompt": prompt,
        "problem": problem,
        "answer": _answer_to_str(answer),
        "solution": solution,
    }


def _answer_to_str(answer: Any) -> str:
    # Numeric answer columns (e.g. floats like 27.0) become "27", so exact-match rewards compare like with like.
    if answer is None:
        return ""
    if isinstance(answer, float) and answer.is_integer():
        return str(int(answer))
    return str(answer).strip()


def _convert_boxed(example: dict[str, Any], columns: dict[str, str], **kwargs: Any) -> dict[str, Any]:
    solution = example[columns["solution"]]
    return _row(example[columns["problem"]], extract_boxed(solution), solution, **kwargs)


def _convert_gsm8k(example: dict[str, Any], columns: dict[str, str], **kwargs: Any) -> dict[str, Any]:
    reasoning, answer = split_gsm8k_answer(example[columns["solution"]] or "")
    return _row(example[columns["problem"]], answer, reasoning, **kwargs)


def _convert_custom(example: dict[str, Any], columns: dict[str, str], **kwargs: Any) -> dict[str, Any]:
    solution = example[columns["solution"]]
    answer = example[columns["answer"]] if "answer" in columns else extract_boxed(solution)
    return _row(example[columns["problem"]], answer, solution, **kwargs)


def _convert_openthoughts(example: dict[str, Any], columns: dict[str, str], **kwargs: Any) -> dict[str, Any]:
    # The privileged context is the dataset's own reference solution (NuminaMath-CoT's worked solution, which
    # OpenThoughts used as the gold label to verify DeepSeek-R1's answers), not R1's answer: it is the
    # "verified reference solution" the paper gives the teacher, and it is short. R1's final solution (its summary
    # after `deepseek_reasoning`, not the reasoning itself) stands in only where the reference is empty.
    reference = example[columns["solution"]]
    fallback = example[columns["fallback_solution"]]
    solution = reference if reference and str(reference).strip() else fallback
    answer = extract_boxed(reference) or extract_boxed(fallback)
    return _row(example[columns["problem"]], answer, solution, **kwargs)


def _openthoughts_math_rows(raw: Dataset, *, name_or_path: str, keep_columns: Sequence[str]) -> Dataset:
    """The `domain == "math"` rows of OpenThoughts-114k's `metadata` config, with only the columns the loader reads."""
    if "domain" not in raw.column_names and "conversations" in raw.column_names:
        raise ValueError(
            f"{name_or_path} has the columns {raw.column_names}: that is OpenThoughts-114k's `default` config, which "
            "has no problem, reference solution or domain column. Load its `metadata` config instead "
            "(`config_name='metadata'`, or `dataset_config: metadata` in a recipe)."
        )
    for role, column in _SOURCE_COLUMNS["openthoughts"].items():
        _require_column(raw, column, role=role, name_or_path=name_or_path)
    wanted = [*_SOURCE_COLUMNS["openthoughts"].values(), *keep_columns]
    # Dropping the long `deepseek_reasoning` traces before the filter keeps it cheap on the 114k-row dataset.
    raw = raw.select_columns(list(dict.fromkeys(c for c in wanted if c in raw.column_names)))
    total = len(raw)
    raw = raw.filter(lambda domain: domain == "math", input_columns="domain")
    logger.info(
        "OpenThoughts: kept %d math rows of %d (dropped %d of other domains).", len(raw), total, total - len(raw)
    )
    return raw


# Columns each known schema reads (role -> column); gsm8k's "solution" role is its combined `answer` column.
_SOURCE_COLUMNS: dict[str, dict[str, str]] = {
    "math": {"problem": "problem", "solution": "solution"},
    "gsm8k": {"problem": "question", "solution": "answer"},
    "numina": {"problem": "problem", "solution": "solution"},
    "openr1": {"problem": "problem", "answer": "answer", "solution": "solution"},
    "openthoughts": {
        "problem": "problem",
        "solution": "ground_truth_solution",
        "fallback_solution": "deepseek_solution",
        "domain": "domain",
    },
}
_CONVERTERS = {
    "math": _convert_boxed,
    "gsm8k": _convert_gsm8k,
    "numina": _convert_boxed,
    "openr1": _convert_custom,
    "openthoughts": _convert_openthoughts,
}
