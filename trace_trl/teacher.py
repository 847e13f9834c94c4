"""The teacher's weights: the policy itself (`live`), its initial weights (`base`), or an EMA of it (`ema`).

The teacher is always the same architecture as the student and runs under `torch.no_grad()`. With LoRA, the `base`
teacher is the model with adapters disabled (no extra memory) and the `ema` teacher is a second, frozen adapter; with
full fine-tuning both are a frozen copy of the weights (the `base` teacher reuses GRPO's reference model when
`beta > 0`).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from accelerate.utils import is_peft_model
from torch import nn


TEACHER_STATE_FILE = "trace_teacher_state.pt"
EMA_ADAPTER_NAME = "trace_ema_teacher"


@dataclass
class TeacherView:
    """What the KL channel needs of the teacher: its decoder stack and its LM head."""

    backbone: nn.Module
    head_weight: torch.Tensor
    head_bias: torch.Tensor | None


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The `*ForCausalLM` module inside a (possibly PEFT-wrapped) model."""
    return model.get_base_model() if is_peft_model(model) else model


def view_of(causal_lm: nn.Module) -> TeacherView:
    head = causal_lm.get_output_embeddings()
    return TeacherView(causal_lm.base_model, head.weight, head.bias)


def lm_head_scaling(config) -> tuple[float, float | None]:
    """`(logit_scale, final_logit_softcapping)` of a model config, as TRL's fused LM head reads them."""
    text_config = config.get_text_config()
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if text_config.model_type == "hyperclovax" else 1 / scaling
    return (1.0 if scale is None else float(scale)), softcap


class Teacher:
    """Resolves `teacher_kind` for a policy and yields a `TeacherView` for each teacher forward.

    Args:
        kind (`str`): `"live"`, `"base"` or `"ema"`.
        policy (`nn.Module`): the unwrapped policy (a `PreTrainedModel` or a `PeftModel`).
        ema_rate (`float`): `r` in `teacher <- (1 - r) * teacher + r * student`.
        reference_model (`nn.Module`, *optional*): GRPO's frozen reference model, reused as the `base` teacher of a
            full fine-tuning run.
    """

    def __init__(
        self, kind: str, policy: nn.Module, *, ema_rate: float = 0.05, reference_model: nn.Module | None = None
    ) -> None:
        # Interim until the synced teacher lands (issue 8): behaves as the live teacher.
        kind = "live" if kind == "synced" else kind
        self.kind = kind
        self.ema_rate = ema_rate
        self.is_peft = is_peft_model(policy)
        self._copy: nn.Module | None = None
        if self.is_peft and getattr(policy, "peft_type", None) is not None:
            _reject_prompt_learning(policy)
        if kind == "base" and not self.is_peft:
            self._copy = reference_model if reference_model is not None else _frozen_copy(policy)
        elif kind == "ema" and not self.is_peft:
            self._copy = _frozen_copy(policy)
        elif kind == "ema" and self.is_peft:
            # Adapter creation draws random initial weights; keep the global RNG as it was so a seeded run generates
            # the same rollouts whatever the teacher kind.
            with torch.random.fork_rng(devices=[]):
                _add_ema_adapter(policy)

    @property
    def needs_updates(self) -> bool:
        return self.kind == "ema"

    def memory_bytes(self) -> int:
        """Extra parameter memory this teacher holds beyond the policy."""
        if self._copy is not None:
            return sum(p.numel() * p.element_size() for p in self._copy.parameters())
        return 0

    @contextlib.contextmanager
    def activate(self, policy: nn.Module) -> Iterator[TeacherView]:
        """Context in which the teacher's decoder and head are reachable; restores the policy on exit."""
        if self._copy is not None:
            yield view_of(causal_lm_of(self._copy))
            return
        if self.kind == "live":
            yield view_of(causal_lm_of(policy))
            return
        from trl.trainer.utils import use_adapter

        adapter = None if self.kind == "base" else EMA_ADAPTER_NAME
        active = policy.active_adapter
        # `set_adapter` in PEFT re-enables gradients of the active adapter; the teacher runs under no_grad and the
        # trained adapter is restored (and re-marked trainable) on exit, before the student forward.
        with use_adapter(policy, adapter):
            yield view_of(causal_lm_of(policy))
        if self.kind == "ema":
            _freeze_adapter(policy, EMA_ADAPTER_NAME)
            if not any(p.requires_grad for n, p in policy.named_parameters() if f".{active}." in n):
                raise RuntimeError(f"The trained adapter {active!r} lost its gradients after the teacher forward.")

    @torch.no_grad()
    def update(self, policy: nn.Module) -> None:
        """One EMA step, `teacher <- (1 - r) * teacher + r * student`, after an optimizer step."""
        if self.kind != "ema":
            return
        for teacher_param, student_param in self._ema_pairs(policy):
            teacher_param.lerp_(student_param.detach().to(teacher_param.dtype), self.ema_rate)

    def _ema_pairs(self, policy: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._copy is not None:
            student = dict(policy.named_parameters())
            return [(p, student[name]) for name, p in self._copy.named_parameters()]
        params = dict(policy.named_parameters())
        active = _trained_adapter_name(policy)
        pairs = []
        for name, p in params.items():
            if f".{EMA_ADAPTER_NAME}." in name:
                pairs.append((p, params[name.replace(f".{EMA_ADAPTER_NAME}.", f".{active}.")]))
        return pairs

    def state_dict(self, policy: nn.Module) -> dict[str, torch.Tensor]:
        """The teacher's own weights (EMA only; `live` and `base` are rebuilt from the policy and its path)."""
        if self.kind != "ema":
            return {}
        if self._copy is not None:
            return {k: v.detach().cpu() for k, v in self._copy.state_dict().items()}
        return {n: p.detach().cpu() for n, p in policy.named_parameters() if f".{EMA_ADAPTER_NAME}." in n}

    @torch.no_grad()
    def load_state_dict(self, policy: nn.Module, state: dict[str, torch.Tensor]) -> None:
        if self.kind != "ema" or not state:
            return
        if self._copy is not None:
            self._copy.load_state_dict(state)
            return
        params = dict(policy.named_parameters())
        missing = set(state) - set(params)
        if missing:
            raise KeyError(f"EMA teacher state has parameters the policy lacks: {sorted(missing)[:3]}...")
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))

    def save(self, policy: nn.Module, directory: str) -> None:
        state = self.state_dict(policy)
        if state:
            torch.save(state, os.path.join(directory, TEACHER_STATE_FILE))

    def load(self, policy: nn.Module, directory: str) -> bool:
        path = os.path.join(directory, TEACHER_STATE_FILE)
        if self.kind != "ema" or not os.path.exists(path):
            return False
        self.load_state_dict(policy, torch.load(path, map_location="cpu", weights_only=True))
        return True


def _frozen_copy(policy: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(policy)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _reject_prompt_learning(policy: nn.Module) -> None:
    config = policy.peft_config[policy.active_adapter]
    if getattr(config, "is_prompt_learning", False):
        raise ValueError(
            "TRACE calls the decoder directly for the teacher and the KL channel, which bypasses the virtual tokens "
            f"of prompt-learning PEFT methods ({type(config).__name__}); use LoRA or another adapter method."
        )


def _trained_adapter_name(policy: nn.Module) -> str:
    names = [n for n in policy.peft_config if n != EMA_ADAPTER_NAME]
    active = policy.active_adapter
    return active if active in names else names[0]


def _add_ema_adapter(policy: nn.Module) -> None:
    trained = _trained_adapter_name(policy)
    if EMA_ADAPTER_NAME not in policy.peft_config:
        policy.add_adapter(EMA_ADAPTER_NAME, copy.deepcopy(policy.peft_config[trained]))
    params = dict(policy.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            if f".{EMA_ADAPTER_NAME}." in name:
                # Start from the trained adapter, not from zeros: the EMA teacher begins equal to the student.
                p.copy_(params[name.replace(f".{EMA_ADAPTER_NAME}.", f".{trained}.")])
    policy.set_adapter(trained)
    _freeze_adapter(policy, EMA_ADAPTER_NAME)


def _freeze_adapter(policy: nn.Module, adapter_name: str) -> None:
    for name, p in policy.named_parameters():
        if f".{adapter_name}." in name:
            p.requires_grad_(False)
