"""The `trace-trl` command line: `trace-trl <command> [args]`.

Each command lives in its own module with a `main(argv) -> int`; this file only dispatches, so `trace-trl --help`
stays fast (no torch import).
"""

from __future__ import annotations

import importlib
import sys


COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("trace_trl.demo", "a complete TRACE run on CPU: tiny model, synthetic math, real annotator and rewards"),
    "train": ("trace_trl.train", "train from a YAML recipe with command-line overrides (TRL's parser)"),
    "eval": ("trace_trl.evaluation", "evaluate a model on MATH-500, AIME 2024/2025, AMC 2023 and GPQA-Diamond"),
    "annotate": ("trace_trl.inspection", "run an annotator over a JSONL file or Hub dataset of rollouts"),
    "render": ("trace_trl.inspection", "render annotations as a self-contained HTML page"),
}


def _usage() -> str:
    from . import __version__

    lines = [f"trace-trl {__version__}", "", "usage: trace-trl <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {summary}" for name, (_, summary) in COMMANDS.items()]
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
        print(f"trace-trl: unknown command {command!r}.\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    # `inspection` serves two commands; every other module has a single `main`.
    entry = getattr(module, f"{command}_main", None) or module.main
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
