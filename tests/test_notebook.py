"""The quickstart notebook executes top to bottom on CPU (tiny local model, no download)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "trace_quickstart.ipynb"


def _missing_notebook_tools() -> str | None:
    for module in ("nbclient", "nbformat", "ipykernel", "matplotlib"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install 'trace-trl[test]' installs the notebook tools)"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_missing_notebook_tools() is not None, reason=str(_missing_notebook_tools()))
def test_quickstart_notebook_runs_on_cpu(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    # The kernel inherits this environment: offline, the CPU path, and this checkout on the path.
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("TRACE_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    started = time.monotonic()
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    elapsed = time.monotonic() - started

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "CPU: a tiny local Qwen3" in text
    assert "## TRACE settings" in text and "`kl_coef`" in text
    html = "\n".join(o.get("data", {}).get("text/html", "") for o in outputs if o.output_type == "execute_result")
    assert "<mark" in html, "the annotated rollouts show highlighted spans"
    assert any("image/png" in o.get("data", {}) for o in outputs if o.output_type == "display_data"), "the curves"
    assert elapsed < 120, f"the notebook took {elapsed:.0f}s on CPU"


# Third-party imports of the notebook and the extra of setup.cfg that installs each.
_EXTRA_OF_MODULE = {"peft": "peft", "matplotlib": "notebook", "IPython": "notebook", "openai": "openai"}


def _setup_cfg_extras() -> dict[str, str]:
    import configparser

    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return dict(parser["options.extras_require"])


def test_install_line_installs_what_the_notebook_needs_and_works_before_pypi():
    """The notebook's own pip line installs from the repository (the package is not on PyPI yet) with every extra the
    code cells need, and each extra exists in setup.cfg."""
    import json
    import re

    cells = json.loads(NOTEBOOK.read_text())["cells"]
    intro = "".join(cells[0]["source"])
    installs = re.findall(r"^pip install (.+?)(?:\s+#.*)?$", intro, re.MULTILINE)
    assert installs, "the first cell shows how to install"
    code = "\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")
    needed = {
        extra for module, extra in _EXTRA_OF_MODULE.items() if re.search(rf"^\s*(from|import) {module}\b", code, re.M)
    }
    if re.search(r"\baccuracy_reward\b", code):
        needed.add("math")  # math-verify
    assert needed >= {"peft", "math", "notebook"}
    extras = _setup_cfg_extras()
    for line in installs:
        spec = line.strip().strip("\"'")
        # Not a bare PyPI requirement: a checkout (`-e .`, `.`) or the repository URL.
        assert spec.startswith(("-e ", ".")) or "@ git+https://" in spec, line
        listed = set(re.search(r"\[([^\]]+)\]", spec).group(1).split(","))
        assert needed <= listed, f"{line!r} misses the extras {sorted(needed - listed)}"
        assert listed <= set(extras), f"{line!r} names extras that setup.cfg lacks: {sorted(listed - set(extras))}"


# The paper's two presets, exactly as TRACEConfig documents them.
_PAPER_PRESETS = {("fkl", "grpo"): "TRACE-FKL", ("grpo", "rkl"): "TRACE-RKL"}


def test_notebook_runs_a_paper_preset_and_says_which():
    """The notebook's TRACEConfig uses one of the paper's presets (not a demo-only mix of both routed kinds) with the
    paper's KL weight, and a markdown cell names that preset and when to use the other."""
    import json
    import re

    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = "\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")
    markdown = "\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "markdown")
    key = re.findall(r'^\s*key_span_action="(\w+)"', code, re.MULTILINE)
    error = re.findall(r'^\s*error_span_action="(\w+)"', code, re.MULTILINE)
    assert len(key) == 1 and len(error) == 1, "the notebook sets both actions once"
    preset = _PAPER_PRESETS.get((key[0], error[0]))
    assert preset, f"key_span_action={key[0]!r}, error_span_action={error[0]!r} is not a paper preset"
    assert not re.search(r"^\s*kl_coef=", code, re.MULTILINE), "the paper's KL weight (the default 0.5)"
    assert f"**{preset}**" in markdown and "Which preset?" in markdown
