"""The docs cannot rot: metric names, commands and versions they cite exist in the code they describe."""

from __future__ import annotations

import re
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "trace_trl"
WORKFLOW = ROOT / "docs" / "workflow.md"

# A metric name as the docs cite it: `trace/fkl_token_frac`, `annotator/requests`, or a bare TRL name in a table cell.
_TRACE_METRIC = re.compile(r"`((?:trace|annotator)/[A-Za-z0-9_/]+)`")
# A string literal (f-string or not) in our sources that names a metric; `{kind}` placeholders are kept.
_SOURCE_METRIC = re.compile(r"""f?["']((?:trace|annotator)/[^"'\s]*)["']""")


def _section(path: Path, heading: str) -> str:
    """The text under `heading` up to the next heading of the same or a higher level (outside code blocks, where a
    line may start with a `#` comment)."""
    lines = path.read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.rstrip("\n") == heading)
    level = len(heading) - len(heading.lstrip("#"))
    in_code = False
    for end in range(start + 1, len(lines)):
        line = lines[end]
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif not in_code and re.match(rf"#{{1,{level}}} ", line):
            return "".join(lines[start:end])
    return "".join(lines[start:])


def _metric_patterns() -> list[re.Pattern[str]]:
    """One full-match pattern per metric-name literal in `trace_trl/`; an f-string placeholder (`trace/{kind}_mean`)
    matches one lowercase word, so `trace/fkl_mean` is found but a misspelt `trace/fkl_means` is not."""
    patterns = []
    for path in PACKAGE.rglob("*.py"):
        for literal in _SOURCE_METRIC.findall(path.read_text()):
            pieces = re.split(r"\{[^}]*\}", literal)
            patterns.append(re.compile("[a-z]+".join(re.escape(piece) for piece in pieces)))
    return patterns


def _exists_in_code(name: str, patterns: list[re.Pattern[str]]) -> bool:
    return any(pattern.fullmatch(name) for pattern in patterns)


def _trl_metric_names() -> set[str]:
    """The metric names TRL's GRPOTrainer logs (`self._metrics[mode]["name"]`), from its source."""
    import trl.trainer.grpo_trainer as grpo

    return set(re.findall(r"""_metrics\[mode\]\[["']([^"'{}]+)["']\]""", Path(grpo.__file__).read_text()))


def test_metric_matcher_tells_real_names_from_invented_ones():
    patterns = _metric_patterns()
    for real in ("trace/routed_token_frac", "trace/fkl_token_frac", "trace/rkl_mean", "trace/correct_frac"):
        assert _exists_in_code(real, patterns), real
    for invented in ("trace/routed_tokens_frac", "trace/fkl_token_fraction", "trace/nothing_routed"):
        assert not _exists_in_code(invented, patterns), invented
    assert {"reward", "frac_reward_zero_std"} <= _trl_metric_names()


def test_which_preset_section_cites_only_metrics_that_exist():
    """Every metric of docs/workflow.md's "Which preset?" is logged by trace_trl (its name is a literal, or an
    f-string template, in our sources) or, for the bare names in its metric table, by TRL's GRPOTrainer."""
    section = _section(WORKFLOW, "### Which preset?")
    patterns = _metric_patterns()
    cited = set(_TRACE_METRIC.findall(section))
    assert {"trace/correct_frac", "trace/fkl_token_frac", "trace/rkl_token_frac", "trace/routed_token_frac"} <= cited
    missing = sorted(name for name in cited if not _exists_in_code(name, patterns))
    assert not missing, f"docs/workflow.md cites metrics that trace_trl never logs: {missing}"

    # The first cell of each row of the metric table: bare names there are TRL's.
    table = section[section.index("| metric |") :]
    first_cells = re.findall(r"^\| ([^|]+) \|", table, re.MULTILINE)
    bare = {name for cell in first_cells for name in re.findall(r"`([^`]+)`", cell) if "/" not in name}
    assert "reward" in bare
    unknown = sorted(bare - _trl_metric_names())
    assert not unknown, f"docs/workflow.md cites metrics that TRL's GRPOTrainer never logs: {unknown}"


def test_metric_tables_of_the_docs_cite_only_metrics_that_exist():
    """The same check over every `trace/...` name of the README and docs/*.md (`trace/...` only: `annotator/*` names
    come from annotators' own `metrics()` dicts)."""
    patterns = _metric_patterns()
    missing = {}
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        names = {n for n in _TRACE_METRIC.findall(path.read_text()) if n.startswith("trace/") and "*" not in n}
        bad = sorted(n for n in names if not _exists_in_code(n, patterns))
        if bad:
            missing[path.name] = bad
    assert not missing, f"metrics cited in the docs that trace_trl never logs: {missing}"


def _user_facing_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").rglob("*.md")]
    files += [*(ROOT / "notebooks").glob("*.ipynb"), *PACKAGE.rglob("*.py"), *PACKAGE.rglob("*.md")]
    files += [*PACKAGE.rglob("*.yaml")]
    return files


def test_no_deprecated_huggingface_cli():
    """`huggingface-cli login` is deprecated in huggingface_hub; the docs and messages say `hf auth login`."""
    deprecated = "huggingface" + "-cli"  # split, so this file does not match itself
    offenders = [
        str(path.relative_to(ROOT))
        for path in _user_facing_files()
        if path.name != "CHANGELOG.md" and deprecated in path.read_text(errors="replace")
    ]
    assert not offenders, f"{deprecated} (deprecated; use `hf auth login`) in {offenders}"


def test_docs_show_the_current_version_or_none():
    """A sample output that shows trace-trl's version shows the current one (else it reads as stale)."""
    from trace_trl import __version__

    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for shown in re.findall(r'"trace_trl_version": "([^"]+)"', path.read_text()):
            assert shown == __version__, f"{path.name} shows trace_trl_version {shown}, the package is {__version__}"


def _setup_cfg_extras() -> set[str]:
    import configparser

    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return set(parser["options.extras_require"])


def test_readme_quickstart_says_which_extras_it_needs():
    """The Quickstart's install line names every extra its code needs (the vLLM line needs `vllm`), and they exist."""
    section = _section(ROOT / "README.md", "## Quickstart")
    section = section[: section.index("### ")]  # the Quickstart itself, not its subsections
    code = "\n".join(re.findall(r"```python\n(.*?)```", section, re.DOTALL))
    needed = set()
    if "OpenAIAnnotator" in code:
        needed.add("openai")
    if "accuracy_reward" in code:
        needed.add("math")
    if re.search(r"use_vllm\s*=\s*True", code):
        needed.add("vllm")
    assert needed == {"openai", "math", "vllm"}, "the test's view of the Quickstart is out of date"
    installs = re.findall(r'^pip install "\.\[([^\]]+)\]"', section, re.MULTILINE)
    assert installs, "the Quickstart shows its install line"
    for group in installs:
        listed = set(group.split(","))
        assert needed <= listed, f"the Quickstart's install line misses {sorted(needed - listed)}"
        assert listed <= _setup_cfg_extras(), f"unknown extras {sorted(listed - _setup_cfg_extras())}"


def test_every_extra_the_docs_install_exists():
    """Every extra a `pip install ".[...]"` line of the README or docs names exists in setup.cfg."""
    extras = _setup_cfg_extras()
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for group in re.findall(r"""pip install ["']\.\[([^\]]+)\]["']""", path.read_text()):
            assert set(group.split(",")) <= extras, f"{path.name}: unknown extra in .[{group}]"


# ---------------------------------------------------------------------------------------------------------------------
# `trace-trl <command> --flag` in the docs: the command exists and so does every flag
# ---------------------------------------------------------------------------------------------------------------------

_FLAG = re.compile(r"(?<![\w-])(--[A-Za-z][\w-]*)")


def _doc_invocations() -> list[tuple[str, str, str]]:
    """`(file, command, text)` for every `trace-trl <command> ...` of a bash block or an inline code span of the README
    and docs/*.md; continuation lines are joined, comments and what follows `&&`, `|` or `;` dropped."""
    invocations = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        snippets = []
        for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.DOTALL):
            snippets += re.sub(r"\\\n\s*", " ", block).splitlines()
        snippets += re.findall(r"(?<!`)`(trace-trl [^`\n]+)`(?!`)", text)
        for snippet in snippets:
            snippet = re.sub(r"(^|\s)#.*$", "", snippet)
            for part in re.split(r"&&|\||;", snippet):
                match = re.search(r"(?:^|\s)trace-trl\s+([a-z]+)(.*)$", part)
                if match:
                    invocations.append((path.name, match.group(1), match.group(2)))
    return invocations


def _help_text(command: str) -> str:
    """`trace-trl <command> --help`, run in this process."""
    import contextlib
    import io

    from trace_trl.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), contextlib.suppress(SystemExit):
        main([command, "--help"])
    return out.getvalue()


def _source_literals() -> str:
    return "\n".join(path.read_text() for path in PACKAGE.rglob("*.py"))


def test_doc_invocations_are_found():
    found = {(command, flag) for _, command, rest in _doc_invocations() for flag in _FLAG.findall(rest)}
    # A few the docs certainly show; if these are not found, the parser above is broken, not the docs.
    assert {("eval", "--paper"), ("train", "--tiny"), ("annotate", "--limit")} <= found


def test_doc_commands_and_flags_exist():
    """Every `trace-trl <command> --flag` the README and docs show names a command of `trace-trl` and a flag of its
    `--help` (or, for flags a command reads before its parser, such as `train --tiny`, a `"--flag"` literal of the
    package's sources)."""
    from trace_trl.cli import COMMANDS

    invocations = _doc_invocations()
    unknown_commands = sorted({(name, command) for name, command, _ in invocations if command not in COMMANDS})
    assert not unknown_commands, f"the docs run commands that trace-trl lacks: {unknown_commands}"
    sources = _source_literals()
    helps: dict[str, str] = {}
    missing = set()
    for name, command, rest in invocations:
        for flag in _FLAG.findall(rest):
            if command not in helps:
                helps[command] = _help_text(command)
            in_help = re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helps[command])
            if not in_help and f'"{flag}"' not in sources:
                missing.add((name, command, flag))
    assert not missing, f"flags the docs show that the commands do not accept: {sorted(missing)}"


def test_bash_blocks_install_from_a_checkout():
    """trace-trl is not on PyPI yet: a shell block that installs it does so from a checkout (`.`, `-e .`) or the
    repository URL, never as a bare `trace-trl` requirement that pip would look up on PyPI."""
    offenders = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", path.read_text(), re.DOTALL):
            for line in block.splitlines():
                for part in re.split(r"&&|;|\|", re.sub(r"(^|\s)#.*$", "", line)):
                    installs = re.match(r"\s*(python -m )?pip install\b", part)
                    if installs and re.search(r"(?<![\w/.@-])[\"']?trace-trl\b", part) and "git+" not in part:
                        offenders.append(f"{path.name}: {line.strip()}")
    assert not offenders, f"installs from PyPI, where trace-trl is not yet: {offenders}"
