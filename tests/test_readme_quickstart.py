"""The README's "Laptop quickstart (CPU, offline)" runs as written: the code block is read from README.md and
executed in an empty folder, so the example cannot rot."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path


README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- laptop-quickstart:"


def laptop_quickstart_code() -> str:
    text = README.read_text(encoding="utf-8")
    heading = text.index("### Laptop quickstart (CPU, offline)")
    marker = text.index(MARKER, heading)  # the marker belongs to that section
    match = re.compile(r"```python\n(.*?)```", re.DOTALL).search(text, marker)
    assert match is not None, "no ```python block after the laptop-quickstart marker"
    assert text.find("\n## ", heading, match.start()) == -1, "the code block is not in the laptop-quickstart section"
    return match.group(1)


def test_the_block_is_a_cpu_run_with_nothing_downloaded():
    code = laptop_quickstart_code()
    assert "use_cpu=True," in code and "bf16=False," in code
    assert "trace_trl.tiny" in code and 'load_math_dataset("sums.jsonl")' in code
    assert "OPENAI" not in code and "Qwen/" not in code  # no API key, no Hub model


def test_the_laptop_quickstart_trains_as_written(tmp_path, monkeypatch):
    # conftest sets HF_HUB_OFFLINE=1 & co. before anything imports: a download would fail here, not pass silently.
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(laptop_quickstart_code(), "README.md (laptop quickstart)", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.args.use_cpu and not trainer.args.bf16
    assert trainer.state.global_step == trainer.args.max_steps > 0
    routed = [row["trace/routed_token_frac"] for row in trainer.state.log_history if "trace/routed_token_frac" in row]
    assert len(routed) == trainer.args.max_steps and max(routed) > 0, "the KL channel never ran"
    assert f"{trainer.args.max_steps} steps; share of tokens routed to the KL channel" in stdout.getvalue()
    # Everything it wrote is in the folder it ran in.
    assert {"sums.jsonl", "tiny-qwen3"} <= {p.name for p in tmp_path.iterdir()}
