r"""Verifiable rewards for math and multiple-choice RLVR, as plain TRL reward functions.

Each function has TRL's reward signature `(completions, **kwargs) -> list[float | None]`: `completions` are strings or
conversational completions (`[{"role": "assistant", "content": ...}]`), and dataset columns arrive as keyword
arguments (the gold answers as `answer`, the column written by [`~trace_trl.data.load_math_dataset`]). `None` tells
TRL to skip the example for that reward (only when the gold answer itself cannot be read).

Only the *answer region* of a completion is graded: the text after the last `</think>`. A completion that opened a
think block and never closed it (typically truncated) has an empty answer region, so a `\boxed{}` written while
thinking never counts. When several boxes are in the answer region, the last one is the answer.

| Function                 | Needs         | 1.0 when                                                                  |
| ------------------------ | ------------- | ------------------------------------------------------------------------- |
| `accuracy_reward`        | `math-verify` | the last `\boxed{}` is mathematically equivalent to `answer`              |
| `boxed_match_reward`     | nothing       | the last `\boxed{}` equals `answer` after light normalization             |
| `format_reward`          | nothing       | exactly one `\boxed{}` in the answer region, and an opened think is closed |
| `multiple_choice_reward` | nothing       | the chosen letter (A-D) equals `answer`                                   |
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from .data import extract_boxed, find_boxed


Completion = str | list[dict[str, str]]

CHOICE_LETTERS = "ABCD"

# Multiple-choice patterns, strongest first; within a pattern the last match wins.
# The letter itself is case-sensitive, so "the answer is a bit unclear" does not read as A.
_ANSWER_STATEMENT = re.compile(r"(?i:answer)\s*(?:(?i:is)|:)?\s*[:：]?\s*[*(\[]*\s*([A-D])(?![A-Za-z])")
_PARENTHESIZED = re.compile(r"\(([A-D])\)")
_TRAILING_LETTER = re.compile(r"(?:^|[\s:*(\[])([A-D])[\s.)*\]]*$")
_LATEX_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")


# ---------------------------------------------------------------------------------------------------------------------
# Completion helpers
# ---------------------------------------------------------------------------------------------------------------------


def completion_text(completion: Completion) -> str:
    """The text of a completion: the string itself, or the content of the last message of a conversational one."""
    if isinstance(completion, str):
        return completion
    if not completion:
        return ""
    content = completion[-1].get("content")
    if isinstance(content, list):  # multimodal content parts: keep the text ones
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def answer_region(text: str) -> str:
    """
    The part of a completion that holds the final answer: the text after the last `</think>`.

    When a `<think>` was opened and never closed (a truncated reasoning trace), there is no answer region and the
    result is `""`. Without think tags the whole text is the answer region.
    """
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        return ""
    return text


# ---------------------------------------------------------------------------------------------------------------------
# Math accuracy with math-verify
# ---------------------------------------------------------------------------------------------------------------------


def _math_verify() -> Any:
    try:
        import math_verify
        from latex2sympy2_extended import NormalizationConfig
    except ImportError as exc:
        raise ImportError(
            "`accuracy_reward` needs the `math-verify` package: pip install 'trace-trl[math]'. "
            "`boxed_match_reward` is a dependency-free alternative (exact match after normalization)."
        ) from exc
    return math_verify, NormalizationConfig


def _timeouts() -> tuple[int | None, int | None]:
    # math-verify times out with signal.alarm, which only works in the main thread; elsewhere (e.g. TRL's async
    # reward workers) the timeouts are switched off and its warnings silenced.
    if threading.current_thread() is threading.main_thread():
        return 10, 5
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return None, None


@lru_cache(maxsize=8192)
def _parse_gold(answer: str, parsing_timeout: int | None) -> tuple:
    math_verify, _ = _math_verify()
    configs = [math_verify.LatexExtractionConfig(boxed_match_priority=0), math_verify.ExprExtractionConfig()]
    # Gold answers are bare ("\frac{1}{2}", "5\text{ cm}"); boxing them gives math-verify an unambiguous anchor.
    # "no_fallback": a gold answer math-verify cannot turn into an expression gives nothing (TRL then skips the
    # example) instead of a raw string that no prediction would ever match.
    for text in (f"\\boxed{{{answer}}}", answer):
        parsed = math_verify.parse(
            text, extraction_config=configs, fallback_mode="no_fallback", parsing_timeout=parsing_timeout
        )
        if parsed:
            return tuple(parsed)
    return ()


def _parse_prediction(boxed: str, parsing_timeout: int | None) -> list:
    math_verify, NormalizationConfig = _math_verify()
    config = math_verify.LatexExtractionConfig(
        normalization_config=NormalizationConfig(units=True), boxed_match_priority=0, try_extract_without_anchor=False
    )
    # Only the last box is parsed: math-verify would otherwise merge several boxes into a set.
    return math_verify.parse(
        f"\\boxed{{{boxed}}}",
        extraction_config=[config],
        extraction_mode="first_match",
        parsing_timeout=parsing_timeout,
    )


def accuracy_reward(
    completions: list[Completion],
    answer: list[str],
    log_extra: Callable[[str, list], None] | None = None,
    **kwargs: Any,
) -> list[float | None]:
    r"""
    1.0 when the last `\boxed{}` of the answer region is mathematically equivalent to the gold answer, else 0.0.

    Equivalence is decided by [math-verify](https://github.com/huggingface/Math-Verify): `0.5`, `1/2`, `\frac12` and
    `\dfrac{1}{2}` match, `\left( 1, 2 \right)` matches `(1,2)`, `5\text{ cm}` matches `5`. A box inside the think
    block does not count, and a completion with no box scores 0.0.

    Args:
        completions (`list[str]` or `list[list[dict[str, str]]]`):
            Completions as strings or as conversational messages (the last message's content is graded).
        answer (`list[str]`):
            Gold answers, one per completion (the `answer` column).
        log_extra (`Callable[[str, list], None]`, *optional*):
            Provided by TRL's trainer to add columns to the completions table; `None` outside a trainer.
        **kwargs:
            Other dataset columns, unused.

    Returns:
        `list[float | None]`: 1.0 or 0.0 per completion; `None` when the gold answer cannot be parsed, so TRL skips it.

    Example:
    ```python
    >>> accuracy_reward([r"<think>\boxed{3}</think> so \boxed{0.5}", [{"role": "assistant", "content": "1/2"}]],
    ...                 answer=[r"\frac{1}{2}", r"\frac{1}{2}"])
    [1.0, 0.0]
    ```
    """
    math_verify, _ = _math_verify()
    parsing_timeout, verify_timeout = _timeouts()
    rewards: list[float | None] = []
    predictions: list[str] = []
    for completion, gold in zip(completions, answer, strict=True):
        gold_parsed = _parse_gold(str(gold), parsing_timeout) if gold is not None and str(gold).strip() else ()
        if not gold_parsed:
            rewards.append(None)
            predictions.append("[gold unparseable]")
            continue
        boxed = extract_boxed(answer_region(completion_text(completion)))
        if not boxed:
            rewards.append(0.0)
            predictions.append("[no box]")
            continue
        predicted = _parse_prediction(boxed, parsing_timeout)
        correct = bool(predicted) and math_verify.verify(list(gold_parsed), predicted, timeout_seconds=verify_timeout)
        rewards.append(1.0 if correct else 0.0)
        predictions.append(str(predicted[-1]) if predicted else f"[unparseable] {boxed}")
    if log_extra is not None:
        log_extra("answer_parsed", predictions)
    return rewards


# ---------------------------------------------------------------------------------------------------------------------
# Dependency-free rewards
# ---------------------------------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    r"""
    Light normalization for exact matching: drop `$`, spaces, `\left`/`\right`, `\!`/`\,` spacing, `\text{...}`
    wrappers (keeping their content), a trailing period, thousands separators; `\dfrac`/`\tfrac` become `\frac`;
    integral numbers lose a trailing `.0`.
    """
    text = text.strip().rstrip(".").strip("$")
    text = _LATEX_WRAPPER.sub(r"\1", text)
    for old, new in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", "")):
        text = text.replace(old, new)
    text = re.sub(r"\\[!,;: ]", "", text)
    text = re.sub(r"\s+", "", text)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", text):
        text = text.replace(",", "")
    if re.fullmatch(r"-?\d+\.0+", text):
        text = text.split(".")[0]
    return text


def boxed_match_reward(completions: list[Completion], answer: list[str], **kwargs: Any) -> list[float | None]:
    r"""
    1.0 when the last `\boxed{}` of the answer region equals the gold answer after [`normalize_answer`], else 0.0.

    No `math-verify` needed (so the CPU demo runs on a bare install), at the price of missing equivalent forms like
    `0.5` vs `\frac{1}{2}`. Returns `None` for an empty gold answer.

    Example:
    ```python
    >>> boxed_match_reward([r"so $\boxed{\dfrac{1}{2}}$.", r"\boxed{0.5}"], answer=[r"\frac{1}{2}", r"\frac{1}{2}"])
    [1.0, 0.0]
    ```
    """
    rewards: list[float | None] = []
    for completion, gold in zip(completions, answer, strict=True):
        gold_text = "" if gold is None else str(gold)
        if not gold_text.strip():
            rewards.append(None)
            continue
        boxed = extract_boxed(answer_region(completion_text(completion)))
        rewards.append(1.0 if boxed is not None and normalize_answer(boxed) == normalize_answer(gold_text) else 0.0)
    return rewards


def format_reward(completions: list[Completion], **kwargs: Any) -> list[float]:
    r"""
    1.0 when the answer region holds exactly one complete `\boxed{...}` and an opened `<think>` was closed, else 0.0.

    Example:
    ```python
    >>> format_reward([r"<think>try \boxed{1}</think> \boxed{2}", r"\boxed{1} \boxed{2}", r"<think> \boxed{2}"])
    [1.0, 0.0, 0.0]
    ```
    """
    rewards = []
    for completion in completions:
        text = completion_text(completion)
        region = answer_region(text)
        thinking_closed = "<think>" not in text or "</think>" in text
        rewards.append(1.0 if thinking_closed and len(find_boxed(region)) == 1 else 0.0)
    return rewards


def extract_choice(text: str) -> str | None:
    r"""
    The option letter (A-D) a multiple-choice answer region commits to, or `None`.

    Read in order of strength, the last match winning within each: `\boxed{C}` (also `\boxed{\text{(C)}}`), an answer
    statement (`Answer: C`, `the answer is (C)`), a parenthesized letter `(C)`, and finally a bare letter at the very
    end (`... so C.`).
    """
    boxed = extract_boxed(text)
    if boxed is not None:
        letter = re.sub(r"[\s$().*\[\]]", "", _LATEX_WRAPPER.sub(r"\1", boxed))
        if len(letter) == 1 and letter.upper() in CHOICE_LETTERS:
            return letter.upper()
    for pattern in (_ANSWER_STATEMENT, _PARENTHESIZED):
        matches = pattern.findall(text)
        if matches:
            return matches[-1].upper()
    match = _TRAILING_LETTER.search(text.strip())
    return match.group(1) if match else None


def multiple_choice_reward(completions: list[Completion], answer: list[str], **kwargs: Any) -> list[float | None]:
    r"""
    1.0 when the letter chosen in the answer region (see [`extract_choice`]) equals the gold letter, else 0.0.

    For GPQA-style questions whose `answer` column holds a letter A-D (optionally as `(C)`). `None` when the gold
    answer is not such a letter.

    Example:
    ```python
    >>> multiple_choice_reward([r"\boxed{C}", "Answer: B", "<think>\\boxed{C}</think> (A)"], answer=["C", "C", "C"])
    [1.0, 0.0, 0.0]
    ```
    """
    rewards: list[float | None] = []
    for completion, gold in zip(completions, answer, strict=True):
        gold_letter = re.sub(r"[\s()]", "", "" if gold is None else str(gold)).upper()
        if len(gold_letter) != 1 or gold_letter not in CHOICE_LETTERS:
            rewards.append(None)
            continue
        rewards.append(1.0 if extract_choice(answer_region(completion_text(completion))) == gold_letter else 0.0)
    return rewards


# Name -> reward function, for recipes that pick rewards by name (`reward_funcs: [accuracy_reward, format_reward]`).
REWARD_FUNCTIONS: dict[str, Callable[..., list[float | None]]] = {
    "accuracy_reward": accuracy_reward,
    "boxed_match_reward": boxed_match_reward,
    "format_reward": format_reward,
    "multiple_choice_reward": multiple_choice_reward,
}
# Reward functions that need the optional `math-verify` package (`pip install 'trace-trl[math]'`).
NEEDS_MATH_VERIFY: frozenset[str] = frozenset({"accuracy_reward"})


def check_reward_dependencies(reward_funcs: list[Callable[..., Any]]) -> None:
    """Raise `ImportError` now, naming the fix, when a reward function's optional dependency is missing.

    Without this check the first call fails, after the model has loaded and the first rollouts were generated.
    """
    for func in reward_funcs:
        if getattr(func, "__name__", None) in NEEDS_MATH_VERIFY and getattr(func, "__module__", None) == __name__:
            _math_verify()
