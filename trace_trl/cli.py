"""The `trace-trl` command line: `trace-trl <command> [args]`.

Each command lives in its own module of `trace_trl/scripts/` (`trace-trl train` is `trace_trl/scripts/train.py`) with
a `main(argv) -> int`; this file only dispatches, so `trace-trl --help` stays fast (no torch import).
"""

from __future__ import annotations

import importlib
import sys


# Command -> one-line summary; the command's module is `trace_trl.scripts.<command>`.
COMMANDS: dict[str, str] = {
    "demo": "a complete TRACE run on CPU: tiny model, synthetic math, real annotator and rewards",
    "train": "train from a YAML recipe with command-line overrides (TRL's parser)",
    "eval": "evaluate a model on MATH-500, AIME 2024/2025, AMC 2023 and GPQA-Diamond",
    "annotate": "run an annotator over a JSONL file or Hub dataset of rollouts",
    "render": "render annotations as a self-contained HTML page",
}


def _usage() -> str:
    from . import __version__

    lines = [f"trace-trl {__version__}", "", "usage: trace-trl <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {summary}" for name, summary in COMMANDS.items()]
    lines += ["", "Run `trace-trl <command> --help` for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(__version__)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        from .cli_errors import closest  # standard library only: `trace-trl --help` stays fast

        match = closest(command, COMMANDS)
        hint = f" Did you mean `trace-trl {match}`?" if match else ""
        print(f"trace-trl: unknown command {command!r}.{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    return int(importlib.import_module(f"trace_trl.scripts.{command}").main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
