"""The type-label taxonomy: the coarse label an annotator gives each rollout it marks, which the teacher sees.

TRACE shows the teacher the problem, the privileged reference solution and one coarse **type label** of the rollout,
never the span text or its position (DESIGN §2.8). A label comes from the taxonomy of the rollout's own kind:

- `KEY_STEP_TYPES` for a correct rollout: what kind of step made the solution work;
- `ERROR_TYPES` for an incorrect rollout: what kind of mistake sank it.

An error label on a correct rollout, or a key label on an incorrect one, is invalid: `check_type_label` returns
`None` for it, and the annotator or trainer drops it and counts it. The taxonomy is ours (the paper names the idea and
gives "missed case analysis" as an example, not the list). `ERROR_TYPES` contains every label of the quote protocol's
`prompts.DIAGNOSIS_LABELS`, so quote-format diagnoses pass the same check. `Annotation.diagnosis` carries the label.
"""

from __future__ import annotations

import re
from typing import Any


# What made a correct rollout work. Coarse on purpose: the label is a hint to the teacher, not a location.
KEY_STEP_TYPES: dict[str, str] = {
    "problem_setup": "translating the problem into the right equations, variables, diagram or model",
    "key_insight": "the idea that unlocks the problem: a substitution, a symmetry, an invariant, a reformulation",
    "case_analysis": "splitting the problem into cases and handling each of them",
    "theorem_application": "applying the right theorem, formula or known result",
    "algebraic_manipulation": "a decisive symbolic step: solving, factoring, simplifying, using an identity",
    "computation": "a decisive numerical calculation",
    "verification": "checking the result, or ruling out extraneous or invalid solutions",
    "final_answer": "the step that obtains and states the final answer",
}

# What sank an incorrect rollout. Every label of the quote protocol's `DIAGNOSIS_LABELS` is here under the same name
# (so its answers stay valid); `missed_case_analysis` is new, split out of `logical_gap`.
ERROR_TYPES: dict[str, str] = {
    "arithmetic_error": "a numerical calculation is wrong (addition, multiplication, a power, a fraction, ...)",
    "algebraic_error": "a symbolic manipulation is wrong (expanding, factoring, solving, simplifying, a sign)",
    "misread_problem": "the rollout solves a different problem: a misread quantity, condition or question",
    "wrong_method": "the approach cannot reach the answer (wrong formula, theorem, model or strategy)",
    "missed_case_analysis": "a case, a constraint or a boundary condition is overlooked (a sign, zero, an edge case)",
    "logical_gap": "a step does not follow: an unjustified claim, circular or otherwise invalid reasoning",
    "incomplete": "the rollout stops before an answer: truncated, gives up, or loops",
    "format_error": "the reasoning is right but the final answer is missing or badly formatted",
    "other": "any other kind of mistake",
}

# Words for the teacher prompt where the label with spaces would read badly.
_WORDS: dict[str, str] = {
    "problem_setup": "setting up the problem",
    "theorem_application": "applying a theorem or formula",
    "final_answer": "obtaining the final answer",
    "incomplete": "an incomplete solution",
    "format_error": "a badly formatted final answer",
    "other": "another kind of mistake",
}

# Common spellings of the same label by models that were shown the taxonomy (after normalization).
_ALIASES: dict[str, str] = {
    "setup": "problem_setup",
    "modeling": "problem_setup",
    "insight": "key_insight",
    "cases": "case_analysis",
    "computation_step": "computation",
    "calculation": "computation",
    "check": "verification",
    "answer": "final_answer",
    "calculation_error": "arithmetic_error",
    "computation_error": "arithmetic_error",
    "sign_error": "algebraic_error",
    "missed_case": "missed_case_analysis",
    "unjustified_step": "logical_gap",
    "logic_error": "logical_gap",
    "logical_error": "logical_gap",
    "incomplete_answer": "incomplete",
    "incomplete_solution": "incomplete",
}

_NO_LABEL = frozenset({"", "null", "none", "n/a", "na"})
_SEPARATORS = re.compile(r"[\s\-]+")


def normalize_type_label(label: Any) -> str | None:
    """Lower-case, spaces and hyphens to `_`, aliases resolved; `None` for no label (`None`, `""`, `"null"`, ...).

    The result is not checked against a taxonomy: see `check_type_label`.
    """
    if label is None:
        return None
    text = _SEPARATORS.sub("_", str(label).strip().lower()).strip("_")
    if text in _NO_LABEL:
        return None
    return _ALIASES.get(text, text)


def type_taxonomy(is_correct: bool) -> dict[str, str]:
    """The taxonomy of a rollout's own kind: `KEY_STEP_TYPES` for a correct rollout, `ERROR_TYPES` otherwise."""
    return KEY_STEP_TYPES if is_correct else ERROR_TYPES


def check_type_label(label: Any, is_correct: bool) -> str | None:
    """The normalized `label` when it belongs to the taxonomy of the rollout's own kind, else `None`.

    A pure function: `check_type_label("Missed case analysis", False) == "missed_case_analysis"`, while
    `check_type_label("arithmetic_error", True) is None` (an error label on a correct rollout) and so is any label
    outside both taxonomies. A label counts as *dropped* when `label` is not `None` but the result is (see
    `type_label_dropped`).
    """
    normalized = normalize_type_label(label)
    return normalized if normalized in type_taxonomy(is_correct) else None


def type_label_dropped(label: Any, is_correct: bool) -> bool:
    """Whether an annotator gave a label (not `None`, `""` or `"null"`) that `check_type_label` rejects."""
    return normalize_type_label(label) is not None and check_type_label(label, is_correct) is None


def describe_type_label(label: str) -> str:
    """Human-readable words for a taxonomy label, for the teacher prompt: `"missed_case_analysis"` -> `"missed case
    analysis"`, `"other"` -> `"another kind of mistake"`.

    Raises:
        `ValueError`: when `label` is in neither taxonomy (check it with `check_type_label` first).
    """
    normalized = normalize_type_label(label)
    if normalized not in KEY_STEP_TYPES and normalized not in ERROR_TYPES:
        raise ValueError(
            f"{label!r} is not a type label of the taxonomy; expected one of {sorted(KEY_STEP_TYPES)} (correct "
            f"rollouts) or {sorted(ERROR_TYPES)} (incorrect rollouts). Check labels with `check_type_label` first."
        )
    return _WORDS.get(normalized, normalized.replace("_", " "))


def taxonomy_lines(is_correct: bool) -> str:
    """The taxonomy of a rollout's kind as prompt lines: `- label: description`."""
    return "\n".join(f"- {label}: {meaning}" for label, meaning in type_taxonomy(is_correct).items())
