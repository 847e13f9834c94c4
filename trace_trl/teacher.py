"""The teacher's weights: a synced snapshot of the policy (`synced`, the paper's), the policy itself (`live`), its
initial weights (`base`), or an EMA of it (`ema`).

The teacher is always the same architecture as the student, runs under `torch.no_grad()` and without dropout. With
LoRA, the `base` teacher is the model with adapters disabled (no extra memory) and the `synced` and `ema` teachers are
a second, frozen adapter; with full fine-tuning they are a frozen copy of the weights on the policy's device and in
its dtype (the `base` teacher reuses GRPO's reference model when `beta > 0`). Copies are freed, and teacher adapters
deleted, once the KL weight is zero for good, so the rest of the run holds what a GRPO run holds.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from accelerate.utils import is_peft_model
from torch import nn

from .sharding import (
    copy_shards,
    full_tensor,
    gathered_state_dict,
    load_full_param,
    load_full_state_dict,
    local_shard,
    unwrap_engine,
)


logger = logging.getLogger(__name__)

TEACHER_STATE_FILE = "trace_teacher_state.pt"
EMA_ADAPTER_NAME = "trace_ema_teacher"
SYNCED_ADAPTER_NAME = "trace_synced_teacher"
TEACHER_ADAPTER_NAMES = (EMA_ADAPTER_NAME, SYNCED_ADAPTER_NAME)


@dataclass
class TeacherView:
    """What the KL channel needs of the teacher: its decoder stack, its LM head, and what to call to run them.

    `wrapper` is the module whose forward a sharded engine hooks (a DeepSpeed engine, an FSDP2 root, or the policy
    itself) and `root` the module inside it whose `forward` is redirected to the decoder (`sharding.forward_through`).
    """

    causal_lm: nn.Module
    wrapper: nn.Module
    root: nn.Module

    @property
    def backbone(self) -> nn.Module:
        return self.causal_lm.base_model

    def head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM head's `(weight, bias)` as registered now (FSDP2 swaps sharded and gathered parameters)."""
        head = self.causal_lm.get_output_embeddings()
        return head.weight, head.bias


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The `*ForCausalLM` module inside a (possibly PEFT-wrapped, possibly DeepSpeed-wrapped) model."""
    model = unwrap_engine(model)
    return model.get_base_model() if is_peft_model(model) else model


def view_of(model: nn.Module, wrapper: nn.Module | None = None) -> TeacherView:
    root = unwrap_engine(model)
    return TeacherView(causal_lm_of(root), wrapper if wrapper is not None else model, root)


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

    Kinds, with `N = sync_steps` and `s` the optimizer step (`trainer.state.global_step`, the number of completed
    optimizer steps):

    - `"synced"` (the paper's): the teacher used at step `s` is the policy as it was after optimizer step
      `floor(s / N) * N` (the initial weights for `s < N`): snapshots are taken at steps `0, N, 2N, ...` while the KL
      weight is above zero. Full fine-tuning: a frozen (`requires_grad=False`, eval-mode) copy in the policy's device
      and dtype, created at train begin (after `accelerator.prepare`, so DeepSpeed ZeRO-1/2 has already moved the
      policy) and overwritten in place at each sync step. LoRA: a second frozen adapter, re-copied from the trained
      adapter at each sync step.
    - `"live"`: the current policy (no extra memory).
    - `"base"`: the initial weights. LoRA: adapters disabled (no extra memory). Full fine-tuning: GRPO's reference
      model when there is one (`beta > 0`), else a frozen copy made at construction.
    - `"ema"`: `teacher <- (1 - r) * teacher + r * student` after every optimizer step, from the initial weights; a
      frozen copy (full fine-tuning) or a second frozen adapter (LoRA).

    Release: after the optimizer step at which `kl_finished(step)` first holds (the KL weight is zero and never rises
    again), the teacher is never used again, so a copy it owns is dropped (and the CUDA cache emptied) and a teacher
    adapter is deleted; nothing is re-created, also not after resuming from a later checkpoint. A `base` teacher that
    is GRPO's reference model is only forgotten, not freed: GRPO still uses it. When `kl_finished(0)` holds (e.g.
    `kl_coef=0`), nothing is ever built.

    Copies follow the policy: on each use the copy's tensors are moved to the device and dtype of the policy's tensor
    of the same name (a copy made in `__init__` on the CPU follows a policy that DeepSpeed moved later). Copies are
    independent of the policy: instance-level `forward` overrides that TRL or Accelerate installed on the policy
    (closures over the policy's own bound methods) are dropped, so `copy(...)` runs the copy's weights with the
    class's forward. Every teacher forward runs with all modules in eval mode (no dropout, whatever the kind), and
    the previous train/eval flags are restored afterwards.

    Args:
        kind (`str`): `"synced"`, `"live"`, `"base"` or `"ema"`.
        policy (`nn.Module`): the unwrapped policy (a `PreTrainedModel` or a `PeftModel`).
        ema_rate (`float`): `r` in `teacher <- (1 - r) * teacher + r * student`.
        sync_steps (`int`): `N`, optimizer steps between two snapshots of the `synced` teacher.
        reference_model (`nn.Module`, *optional*): GRPO's frozen reference model, reused as the `base` teacher of a
            full fine-tuning run.
        kl_finished (`Callable[[int], bool]`, *optional*): whether the KL channel is off at this optimizer step and
            every later one. Defaults to never.
        shard (`Callable[[nn.Module], nn.Module]`, *optional*): under FSDP2 or ZeRO-3 (full fine-tuning), builds an
            empty model sharded exactly like the prepared policy it is given (`sharding.sharded_copy`). A copy is
            then built at train begin as shards, filled shard by shard from the policy (no process holds a full
            copy), synced and EMA-updated shard by shard, and checkpointed as gathered full weights; a `base` copy
            (no reference model) is the policy at train begin and is saved in checkpoints too. Every process must
            call `begin`, `update`, `state_dict`, `save` and `load`.

    Under a sharded engine a LoRA teacher adapter is not deleted at the release (FSDP2 and ZeRO-3 hold references to
    every parameter of a unit); it is only never used again.
    """

    def __init__(
        self,
        kind: str,
        policy: nn.Module,
        *,
        ema_rate: float = 0.05,
        sync_steps: int = 10,
        reference_model: nn.Module | None = None,
        kl_finished: Callable[[int], bool] | None = None,
        shard: Callable[[nn.Module], nn.Module] | None = None,
    ) -> None:
        if kind not in ("synced", "live", "base", "ema"):
            raise ValueError(f"teacher_kind must be 'synced', 'live', 'base' or 'ema', got {kind!r}.")
        if sync_steps < 1:
            raise ValueError(f"teacher_sync_steps must be >= 1, got {sync_steps}.")
        self.kind = kind
        self.ema_rate = ema_rate
        self.sync_steps = sync_steps
        self.is_peft = is_peft_model(policy)
        self.released = False
        self._kl_finished = kl_finished or (lambda step: False)
        self._copy: nn.Module | None = None
        self._owns_copy = False
        self._adapter: str | None = None
        self._pending: dict[str, torch.Tensor] | None = None  # loaded from a checkpoint, applied on first use
        self._step = 0
        self._synced_at: int | None = None
        self._restored = False  # a checkpoint's teacher state was loaded
        self._adapter_bytes = 0
        self._shard = None if self.is_peft else shard
        self.sharded = shard is not None
        # Under a sharded engine a `base` copy is the policy at train begin (not a copy made here, before sharding).
        self._snapshot_base = kind == "base" and not self.is_peft and reference_model is None and self.sharded
        if self.is_peft and getattr(policy, "peft_type", None) is not None:
            _reject_prompt_learning(policy)
        if self._kl_finished(0):
            self.released = True  # the KL channel never runs: build nothing
            return
        if kind == "base" and not self.is_peft:
            if reference_model is not None:
                self._copy = reference_model
            elif self._shard is None:
                self._copy, self._owns_copy = _frozen_copy(policy), True
        elif kind == "ema" and not self.is_peft and self._shard is None:
            self._copy, self._owns_copy = _frozen_copy(policy), True
        elif kind in ("ema", "synced") and self.is_peft:
            self._adapter = EMA_ADAPTER_NAME if kind == "ema" else SYNCED_ADAPTER_NAME
            # Adapter creation draws random initial weights; keep the global RNG as it was so a seeded run generates
            # the same rollouts whatever the teacher kind.
            with torch.random.fork_rng(devices=[]):
                _add_teacher_adapter(policy, self._adapter)
            self._adapter_bytes = sum(p.numel() * p.element_size() for p, _ in _adapter_pairs(policy, self._adapter))
            self._synced_at = 0 if kind == "synced" else None
        # The full fine-tuning synced copy (and, under a sharded engine, every owned copy) is made in `begin` (train
        # begin), on the device training runs on and after the engine has sharded the policy.

    @property
    def needs_updates(self) -> bool:
        """Whether `begin` / `update` can still change anything (EMA step, sync, device move, release)."""
        return not self.released and self.kind != "live"

    @property
    def adapter_name(self) -> str | None:
        """Name of the teacher's PEFT adapter (LoRA `synced` / `ema`) while it exists, else `None`."""
        return None if self.released else self._adapter

    def memory_bytes(self) -> int:
        """Extra parameter memory this teacher holds beyond the policy on this process (its shards under a sharded
        engine; 0 once released)."""
        if self._copy is not None:
            return sum(_bytes(local_shard(p)) for p in self._copy.parameters())
        return self._adapter_bytes

    # ------------------------------------------------------------------------------------------------------------
    # Lifecycle
    # ------------------------------------------------------------------------------------------------------------
    def begin(self, policy: nn.Module, step: int) -> None:
        """At train begin (after `accelerator.prepare` and checkpoint loading): release, build or restore the copy."""
        self._step = step
        if self.released:
            return
        if self._kl_finished(step):
            self.release(policy)
            return
        if self.kind == "synced" or self._snapshot_base:
            if self._restored:
                self._ensure(policy)  # applies the checkpoint's snapshot of step floor(step / N) * N
                self._synced_at = step - step % self.sync_steps
            else:
                if self.kind == "base" and step:
                    logger.warning(
                        "Resuming at step %d without the base teacher's state (%s): the teacher restarts from the "
                        "current policy instead of the initial weights.",
                        step,
                        TEACHER_STATE_FILE,
                    )
                elif step % self.sync_steps:
                    logger.warning(
                        "Resuming at step %d without the synced teacher's state (%s): the teacher restarts from the "
                        "current policy instead of the snapshot of step %d.",
                        step,
                        TEACHER_STATE_FILE,
                        step - step % self.sync_steps,
                    )
                self._sync(policy, step)
        else:
            self._ensure(policy)
        if self._adapter is not None:
            _freeze_adapter(policy, self._adapter)

    @torch.no_grad()
    def update(self, policy: nn.Module, step: int | None = None) -> None:
        """After optimizer step `step`: release if the KL channel is over, else one EMA step or a sync."""
        if step is not None:
            self._step = step
        if self.released:
            return
        if step is not None and self._kl_finished(step):
            self.release(policy)
            return
        if self.kind == "ema":
            self._ensure(policy)
            for teacher_param, student_param in self._pairs(policy):
                teacher_param.lerp_(student_param.detach().to(teacher_param.dtype), self.ema_rate)
        elif self.kind == "synced" and step is not None and step % self.sync_steps == 0:
            self._sync(policy, step)

    def release(self, policy: nn.Module | None = None) -> None:
        """Free what the teacher holds for good: the copy it owns, or its adapter. A no-op for `live`."""
        if self.released:
            return
        self.released = True
        self._pending = None
        self._adapter_bytes = 0
        deletable = not self.sharded  # FSDP2 / ZeRO-3 keep references to every parameter of a unit
        if (
            deletable
            and self._adapter is not None
            and policy is not None
            and self._adapter in getattr(policy, "peft_config", {})
        ):
            trained = _trained_adapter_name(policy)
            policy.delete_adapter(self._adapter)
            policy.set_adapter(trained)
        copied = self._copy is not None and self._owns_copy
        self._copy = None
        if copied:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def activate(self, policy: nn.Module, wrapper: nn.Module | None = None) -> Iterator[TeacherView]:
        """Context in which the teacher's decoder and head are reachable, every module in eval mode; restores the
        policy (active adapter, train/eval flags) on exit. `wrapper` is what wraps `policy` (DDP, FSDP2, a DeepSpeed
        engine): the view of a teacher that is the policy (`live`, adapters) runs through it."""
        if self.released:
            raise RuntimeError(
                "The teacher was released when the KL weight reached zero for good; nothing uses it now."
            )
        self._ensure(policy)
        if self._copy is not None:
            with _eval_mode(self._copy):
                yield view_of(self._copy)
            return
        if self.kind == "live":
            with _eval_mode(policy):
                yield view_of(policy, wrapper)
            return
        from trl.trainer.utils import use_adapter

        active = policy.active_adapter
        # `set_adapter` in PEFT re-enables gradients of the active adapter; the teacher runs under no_grad and the
        # trained adapter is restored (and re-marked trainable) on exit, before the student forward.
        with use_adapter(policy, self._adapter), _eval_mode(policy):
            yield view_of(policy, wrapper)
        if self._adapter is not None:
            _freeze_adapter(policy, self._adapter)
            if not any(p.requires_grad for n, p in policy.named_parameters() if f".{active}." in n):
                raise RuntimeError(f"The trained adapter {active!r} lost its gradients after the teacher forward.")

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------------------------
    def state_dict(self, policy: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
        """The teacher's own weights, when a checkpoint needs them: `ema` always, `synced` when it differs from the
        policy (the last sync was before the current step), a sharded `base` snapshot always. `live`, other `base` and
        released teachers need nothing. A sharded copy is gathered parameter by parameter (every process joins); only
        processes with `keep` hold the gathered weights (an 8B teacher is ~33 GB in fp32: not on every process)."""
        if self.released or not (self.kind in ("ema", "synced") or self._snapshot_base):
            return {}
        if self.kind == "synced" and self._synced_at == self._step:
            return {}  # the teacher equals the policy, which the checkpoint already holds
        if self._adapter is not None:
            return {n: full_tensor(p).cpu() for n, p in policy.named_parameters() if f".{self._adapter}." in n}
        if self._copy is not None:
            if self.sharded:
                return gathered_state_dict(self._copy, keep=keep)
            return {k: v.detach().cpu() for k, v in self._copy.state_dict().items()}
        return {k: v.detach().cpu() for k, v in (self._pending or {}).items()}

    @torch.no_grad()
    def load_state_dict(self, policy: nn.Module, state: dict[str, torch.Tensor]) -> None:
        if not (self.kind in ("ema", "synced") or self._snapshot_base) or not state or self.released:
            return
        self._pending = dict(state)
        self._restored = True
        if self._copy is not None or self._adapter is not None:
            self._ensure(policy)

    def save(self, policy: nn.Module, directory: str, write: bool = True) -> None:
        """Write the teacher's state into a checkpoint folder. Every process calls it (a sharded teacher's state is
        gathered, a collective); only those with `write` write the file."""
        state = self.state_dict(policy, keep=write)
        if state and write:
            torch.save(state, os.path.join(directory, TEACHER_STATE_FILE))

    def load(self, policy: nn.Module, directory: str) -> bool:
        path = os.path.join(directory, TEACHER_STATE_FILE)
        if not (self.kind in ("ema", "synced") or self._snapshot_base) or self.released or not os.path.exists(path):
            return False
        # Memory-mapped: every process reads the full state (each keeps its shard), sharing the file's pages.
        self.load_state_dict(policy, torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        return True

    # ------------------------------------------------------------------------------------------------------------
    # Internals
    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _ensure(self, policy: nn.Module) -> None:
        """Build a missing synced copy, follow the policy's device and dtype, apply a loaded checkpoint state."""
        building = self.kind == "synced" or (self.sharded and self.kind in ("ema", "base"))
        if building and not self.is_peft and self._copy is None:
            self._copy, self._owns_copy = self._new_copy(policy), True
            self._synced_at = self._step
        if self._copy is not None and self._owns_copy and not self.sharded:
            _follow(self._copy, policy)
        if self._pending is not None:
            state, self._pending = self._pending, None
            if self._copy is not None:
                # By parameter name, so a state saved by a sharded run loads into an unsharded one and back.
                load_full_state_dict(self._copy, state)
            else:
                params = dict(policy.named_parameters())
                missing = set(state) - set(params)
                if missing:
                    raise KeyError(f"Teacher state has parameters the policy lacks: {sorted(missing)[:3]}...")
                for name, value in state.items():
                    load_full_param(params[name], value)

    def _new_copy(self, policy: nn.Module) -> nn.Module:
        """A frozen copy of the policy now: sharded like it under FSDP2 / ZeRO-3, else a deep copy."""
        if self._shard is None:
            return _frozen_copy(policy)
        copy = self._shard(policy)
        copy_shards(copy, policy)
        return copy

    @torch.no_grad()
    def _sync(self, policy: nn.Module, step: int) -> None:
        """`teacher <- policy`, in place."""
        if self.is_peft:
            for teacher_param, student_param in self._pairs(policy):
                teacher_param.copy_(student_param)
        elif self._copy is None:
            self._ensure(policy)  # a fresh copy is the policy now
        elif self.sharded:
            copy_shards(self._copy, policy)
        else:
            _follow(self._copy, policy)
            student = dict(policy.named_parameters())
            for name, p in self._copy.named_parameters():
                p.copy_(student[name])
            buffers = dict(policy.named_buffers())
            for name, b in self._copy.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
        self._synced_at = step

    def _pairs(self, policy: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`(teacher tensor, student tensor)` for every teacher parameter."""
        if self._copy is not None:
            student = dict(unwrap_engine(policy).named_parameters())
            return [
                (local_shard(p), local_shard(student[name]))
                for name, p in unwrap_engine(self._copy).named_parameters()
            ]
        return [(local_shard(t), local_shard(s)) for t, s in _adapter_pairs(policy, self._adapter)]


def remove_teacher_adapters(directory: str) -> list[str]:
    """Delete the teacher adapters PEFT saved as sub-folders of `directory`; returns the names removed.

    PEFT's `save_pretrained` writes every adapter of the model, the non-default ones in a sub-folder named after the
    adapter. A final model folder (and so `push_to_hub`) must hold only the trained adapter.
    """
    removed = []
    for name in TEACHER_ADAPTER_NAMES:
        path = os.path.join(directory, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
            removed.append(name)
    return removed


def _frozen_copy(policy: nn.Module) -> nn.Module:
    """A deep copy that shares nothing with `policy`, frozen and in eval mode.

    TRL (`add_fused_lm_head`, the fp32 LM-head cast) and Accelerate (mixed-precision output casts) install
    instance-level `forward` overrides whose closures hold the *policy's* bound methods or modules; `deepcopy` copies
    the instance attribute but not the closure, so the copy's `forward()` would run the policy. Dropping them gives
    the copy its class's own forward on its own weights.
    """
    teacher = copy.deepcopy(policy)
    for module in teacher.modules():
        for attr in ("forward", "_original_forward"):
            module.__dict__.pop(attr, None)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def _follow(teacher: nn.Module, policy: nn.Module) -> None:
    """Move each of the teacher's parameters and buffers to the device and dtype of the policy's namesake."""
    targets = dict(policy.named_parameters())
    for name, p in teacher.named_parameters():
        target = targets.get(name)
        if target is not None and (p.device != target.device or p.dtype != target.dtype):
            p.data = p.data.to(device=target.device, dtype=target.dtype)
    targets = dict(policy.named_buffers())
    for name, b in list(teacher.named_buffers()):
        target = targets.get(name)
        if target is not None and (b.device != target.device or b.dtype != target.dtype):
            owner, _, leaf = name.rpartition(".")
            module = teacher.get_submodule(owner) if owner else teacher
            module._buffers[leaf] = b.to(device=target.device, dtype=target.dtype)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module's `training` flag off (no dropout) inside, each restored on exit."""
    flags = [(m, m.training) for m in model.modules()]
    for module, _ in flags:
        module.training = False
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def _reject_prompt_learning(policy: nn.Module) -> None:
    config = policy.peft_config[policy.active_adapter]
    if getattr(config, "is_prompt_learning", False):
        raise ValueError(
            "TRACE calls the decoder directly for the teacher and the KL channel, which bypasses the virtual tokens "
            f"of prompt-learning PEFT methods ({type(config).__name__}); use LoRA or another adapter method."
        )


def _trained_adapter_name(policy: nn.Module) -> str:
    names = [n for n in policy.peft_config if n not in TEACHER_ADAPTER_NAMES]
    active = policy.active_adapter
    return active if active in names else names[0]


def _adapter_pairs(policy: nn.Module, adapter: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`(teacher adapter tensor, trained adapter tensor)` pairs, matched by name."""
    params = dict(policy.named_parameters())
    trained = _trained_adapter_name(policy)
    return [
        (p, params[name.replace(f".{adapter}.", f".{trained}.")])
        for name, p in params.items()
        if f".{adapter}." in name
    ]


def _add_teacher_adapter(policy: nn.Module, adapter: str) -> None:
    """A frozen second adapter with the trained adapter's config, starting equal to the trained adapter."""
    trained = _trained_adapter_name(policy)
    if adapter not in policy.peft_config:
        policy.add_adapter(adapter, copy.deepcopy(policy.peft_config[trained]))
    with torch.no_grad():
        for teacher_param, student_param in _adapter_pairs(policy, adapter):
            teacher_param.copy_(student_param)
    policy.set_adapter(trained)
    _freeze_adapter(policy, adapter)


def _freeze_adapter(policy: nn.Module, adapter_name: str) -> None:
    for name, p in policy.named_parameters():
        if f".{adapter_name}." in name:
            p.requires_grad_(False)


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
