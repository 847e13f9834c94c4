"""Helpers for the real-vLLM tier (`pytest -m vllm`): the size of a tiny Qwen3 vLLM's CPU build accepts, and the
comparison of vLLM's weights with the policy's.

vLLM's CPU attention needs a head size of at least 32 (head size 16 is refused), so the model is the suite's tiny
Qwen3 at hidden size 128 (4 heads of 32).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


VLLM_HIDDEN_SIZE = 128  # head size 32: the smallest vLLM's CPU attention accepts


def vllm_parameters(llm) -> dict[str, torch.Tensor]:
    """The colocated engine's parameters by vLLM name (TRL's colocate mode runs the model in this process)."""
    model = llm.llm_engine.model_executor.driver_worker.model_runner.model
    return dict(model.named_parameters())


# vLLM fuses some projections; each fused tensor is its parts concatenated along the output dimension.
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def expected_vllm_tensor(name: str, policy: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """What vLLM's parameter `name` must hold given the policy's weights (Hugging Face names), or None if the policy
    has no counterpart."""
    for fused, parts in _FUSED.items():
        if f".{fused}." in name:
            pieces = [policy.get(name.replace(fused, part)) for part in parts]
            return None if any(p is None for p in pieces) else torch.cat(pieces, dim=0)
    return policy.get(name)


def max_weight_difference(llm, policy: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between vLLM's weights and the policy's (vocabulary padding rows ignored).

    Raises if vLLM holds an empty (repacked and dropped) linear weight: it can then neither receive nor use a sync.
    """
    worst = 0.0
    compared = 0
    for name, value in vllm_parameters(llm).items():
        expected = expected_vllm_tensor(name, policy)
        if expected is None:
            continue
        if value.numel() == 0:
            raise AssertionError(f"vLLM dropped {name} (repacked for its CPU kernels): weight syncs cannot reach it")
        rows = expected.shape[0]
        worst = max(worst, float((value[:rows].detach().float() - expected.detach().float()).abs().max()))
        compared += 1
    assert compared > 0, "no vLLM parameter matched a policy parameter"
    return worst


def logged(history: Iterable[dict], key: str) -> list[float]:
    """Every value of `key` in the trainer's log history (NaN where nothing was measured, logged as None)."""
    return [float("nan") if entry[key] is None else float(entry[key]) for entry in history if key in entry]
