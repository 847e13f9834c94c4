"""Command-line errors a user can act on: one line that names the flag (plus at most one hint line), "did you mean".

The checks here run before anything heavy (model, tokenizer, dataset, tiny-run folders) is built, so a typo costs a
second, not a model download. They speak the command line's language: `--reward_funcs`, `--report_to`, not the
Python keyword arguments or HfArgumentParser's `return_remaining_strings` advice, which a CLI user cannot follow.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any


# How close a typo must be to a valid name for a suggestion (difflib's ratio); 0.6 is difflib's own default.
SUGGESTION_CUTOFF = 0.6


class CommandLineError(ValueError):
    """An error fixed on the command line or in the recipe; `trace-trl train` prints it as one line plus a hint.

    A `ValueError`, so code that calls the library functions raising it (and tests matching `ValueError`) keep working.
    """

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message if hint is None else f"{message} {hint}")
        self.message = message
        self.hint = hint


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The valid name closest to `word` (difflib), or `None` when nothing is close enough to suggest."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=SUGGESTION_CUTOFF)
    return matches[0] if matches else None


def did_you_mean(word: str, choices: Iterable[str], *, quote: str = "`") -> str:
    """`" Did you mean `kl_coef`?"` for the closest valid name, or `""` when none is close."""
    match = closest(word, choices)
    return f" Did you mean {quote}{match}{quote}?" if match is not None else ""


def print_error(error: BaseException, prog: str = "trace-trl train") -> None:
    """Print `error` as `prog: error: message` and, for a [`CommandLineError`] with a hint, the hint on a second line."""
    if isinstance(error, CommandLineError):
        message, hint = error.message, error.hint
    else:
        message, hint = str(error), None
    print(f"{prog}: error: {message}", file=sys.stderr)
    if hint:
        print(hint, file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------------
# Field names: command-line flags and recipe keys
# ---------------------------------------------------------------------------------------------------------------------

HELP_HINT = "Run `trace-trl train --help` for every field."


def parser_option_strings(parser: Any) -> set[str]:
    """Every option string the parser accepts (`--kl_coef`, `--no_bf16`, `-h`, ...)."""
    return {option for action in parser._actions for option in action.option_strings}


def parser_field_names(parser: Any) -> set[str]:
    """Every field name a recipe may set: the parser's destinations (the fields of its dataclasses)."""
    return {action.dest for action in parser._actions if action.dest != "help"}


def check_flags(overrides: Sequence[str], parser: Any) -> None:
    """Raise [`CommandLineError`] for the first `--flag` in `overrides` that the parser does not know, with a suggestion.

    Unique prefixes of a flag are left alone: argparse accepts them (`--learning_r` for `--learning_rate`).
    """
    options = parser_option_strings(parser)
    long_options = sorted(option for option in options if option.startswith("--"))
    for token in overrides:
        if not token.startswith("--") or token == "--":
            continue
        flag = token.split("=", 1)[0]
        if flag in options or any(option.startswith(flag) for option in long_options):
            continue
        raise CommandLineError(f"unknown flag `{flag}`.{did_you_mean(flag, long_options)}", HELP_HINT)


def check_recipe_keys(recipe: dict[str, Any], parser: Any, recipe_path: str | os.PathLike[str]) -> None:
    """Raise [`CommandLineError`] for the first key of `recipe` that is no field, with a suggestion (`env:` is allowed)."""
    fields = parser_field_names(parser)
    for key in recipe:
        if key == "env" or key in fields:
            continue
        raise CommandLineError(
            f"the recipe {os.fspath(recipe_path)!r} sets `{key}`, which is not a field.{did_you_mean(str(key), fields)}",
            HELP_HINT,
        )


# ---------------------------------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------------------------------


def check_model_path(name_or_path: str | None, flag: str = "--model_name_or_path") -> None:
    """Raise [`CommandLineError`] when `name_or_path` is a local path that does not exist (see `looks_like_local_path`).

    Without it, `from_pretrained` takes a mistyped folder for a Hub id and fails after the Hub's retries.
    """
    from .data import looks_like_local_path

    if not name_or_path:
        raise CommandLineError(f"set `{flag}` (a Hub model id such as `Qwen/Qwen3-1.7B`, or a local folder).")
    if looks_like_local_path(name_or_path) and not os.path.exists(os.path.expanduser(name_or_path)):
        resolved = os.path.abspath(os.path.expanduser(name_or_path))
        raise CommandLineError(
            f"`{flag} {name_or_path}`: no such folder ({resolved}), and it is not a Hub id (`owner/name`).",
            "Fix the path (relative paths start from the current folder), or give a Hub id such as `Qwen/Qwen3-1.7B`.",
        )


# The `trace-trl train` flag that maps each role of a `dataset_source: custom` dataset to a column.
COLUMN_FLAGS: dict[str, str] = {
    "problem": "--prompt_column",
    "answer": "--answer_column",
    "solution": "--solution_column",
}


def dataset_column_error(error: Any, dataset_name: str, dataset_source: str) -> CommandLineError:
    """A [`~trace_trl.data.MissingColumnError`] in the command line's words: found, needed, and the flag that maps it."""
    flag = COLUMN_FLAGS.get(error.role)
    role = "privileged context" if error.role == "solution" else error.role
    read_by = f"`{flag}`" if dataset_source == "custom" and flag else f"`--dataset_source {dataset_source}`"
    needed = [column for column in error.needed.values()]
    message = (
        f"`--dataset_name {dataset_name}` has no column {error.column!r} (the {role}, set by {read_by}): "
        f"found {error.available}, needed {needed}."
    )
    if flag is None:  # a column of a known schema that no flag maps (e.g. OpenThoughts' `domain`)
        return CommandLineError(message, "Check `--dataset_name` and `--dataset_config`.")
    unused = [column for column in error.available if column not in needed]
    guess = closest(error.column, unused) or (unused[0] if len(unused) == 1 else None)
    mapping = f"{flag} {guess}" if guess is not None else f"{flag} <column>"
    if dataset_source == "custom":
        return CommandLineError(message, f"Map your column: `{mapping}`.")
    return CommandLineError(
        message, f"For your own columns: `--dataset_source custom {mapping}` (and the other *_column flags)."
    )
