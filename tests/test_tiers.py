"""The test tiers the README promises: `python -m pytest` is the fast default tier, `--all-tiers` runs everything,
and CI runs the README's command and then every other tier."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import TIERS


ROOT = Path(__file__).resolve().parent.parent


# The files that hold each tier's tests, and one of the default tier: collecting only these keeps the check fast.
FILES = ("tests/test_sharded.py", "tests/test_multiprocess.py", "tests/test_replication.py", "tests/test_losses.py")


def _collected(*args: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args, *FILES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return {line for line in result.stdout.splitlines() if "::" in line}


def test_the_default_tier_leaves_out_the_two_process_and_slow_tests():
    default, everything = _collected(), _collected("--all-tiers")
    other_tiers = _collected("-m", "slow or multiprocess or sharded")
    assert default and other_tiers and not default & other_tiers
    assert default | other_tiers <= everything
    # Every test that launches two processes is in another tier (the refusal checks of test_sharded.py run in-process).
    launched = {
        test for test in everything if test.startswith(("tests/test_multiprocess.py", "tests/test_sharded.py"))
    }
    assert {t for t in launched if "refused" not in t} <= other_tiers
    assert any(t.startswith("tests/test_replication.py::test_quick_study") for t in other_tiers)


def test_every_tier_is_a_declared_marker_and_ci_runs_each():
    pyproject = (ROOT / "pyproject.toml").read_text()
    for tier in TIERS:
        assert re.search(rf'"{tier}: ', pyproject), f"marker {tier} is not declared in pyproject.toml"
    ci = (ROOT / ".ci" / "run").read_text()
    lines = [line.strip() for line in ci.splitlines()]
    assert "python -m pytest" in lines, "CI must run the README's test command as written"
    assert any(line.startswith('python -m pytest -m "slow or multiprocess or sharded"') for line in lines)
    assert any("pytest -m vllm" in line for line in lines)


def test_the_readme_commands_are_the_ones_ci_runs():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)
    assert len(blocks) == 2
    demo, tests = blocks
    assert demo.rstrip().endswith("trace-trl demo") and tests.rstrip().endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^trace-trl demo\b", ci, flags=re.M)
    # The README states measured times, not placeholders.
    assert not re.search(r"[A-Z]+_IDLE", section)
