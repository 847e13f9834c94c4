"""The teacher's weights: a synced snapshot of the policy (`synced`, the paper's), the policy itself (`live`), its
initial weights (`base`), or an EMA of it (`ema`).

The teacher is always the same architecture as the student, runs under `torch.no_grad()` and without dropout. With
LoRA, the `base` teacher is the model with adapters disabled (no extra memory) and the `synced` and `ema` teachers are
a second, frozen adapter; with full fine-tuning they are a frozen copy of the weights on the policy's device and in
its dtype (the `base` teacher reuses GRPO's reference model when `beta > 0`). Copies are freed, and teacher adapters
deleted, once the KL weight is zero for good, so the rest of the run holds what a GRPO run holds.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from accelerate.utils import is_peft_model
from torch import nn

from .teacher_stores import (
    EMA_ADAPTER_NAME,
    SYNCED_ADAPTER_NAME,
    TEACHER_ADAPTER_NAMES,
    AdapterStore,
    CopyStore,
    PolicyStore,
    TeacherStore,
    TeacherView,
    causal_lm_of,
    frozen_copy,
    view_of,
)


logger = logging.getLogger(__name__)

TEACHER_STATE_FILE = "trace_teacher_state.pt"
__all__ = [
    "EMA_ADAPTER_NAME",
    "SYNCED_ADAPTER_NAME",
    "TEACHER_ADAPTER_NAMES",
    "TEACHER_STATE_FILE",
    "Teacher",
    "TeacherView",
    "causal_lm_of",
    "lm_head_scaling",
    "remove_teacher_adapters",
    "view_of",
]


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
        shard (`Callable[[nn.Module], TeacherStore]`, *optional*): under FSDP2 or ZeRO-3 (full fine-tuning), builds
            the store of a copy sharded exactly like the prepared policy it is given and filled from it
            (`teacher_stores.sharded_store`: `FSDP2Store` or `ZeRO3Store`). The copy is then built at train begin as
            shards (no process holds a full copy), synced and EMA-updated shard by shard, and checkpointed as
            gathered full weights; a `base` copy (no reference model) is the policy at train begin and is saved in
            checkpoints too. Every process must call `begin`, `update`, `state_dict`, `save` and `load`.

    Where the weights live is the store's business (`trace_trl.teacher_stores`): the policy itself (`live`, LoRA
    `base`), a second LoRA adapter (LoRA `synced` / `ema`), a plain copy or GRPO's reference model, or a copy sharded
    under FSDP2 or ZeRO-3.

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
        shard: Callable[[nn.Module], TeacherStore] | None = None,
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
        self._store: TeacherStore | None = None
        self._pending: dict[str, torch.Tensor] | None = None  # loaded from a checkpoint, applied at train begin
        self._step = 0
        self._synced_at: int | None = None
        self._restored = False  # a checkpoint's teacher state was loaded
        self._shard = None if self.is_peft else shard
        self.sharded = shard is not None
        # Under a sharded engine a `base` copy is the policy at train begin (not a copy made here, before sharding).
        self._snapshot_base = kind == "base" and not self.is_peft and reference_model is None and self.sharded
        if self._kl_finished(0):
            self.released = True  # the KL channel never runs: build and check nothing, exactly GRPO
            return
        if self.is_peft and getattr(policy, "peft_type", None) is not None:
            _reject_prompt_learning(policy)
        if kind == "live":
            self._store = PolicyStore()
        elif kind == "base" and self.is_peft:
            self._store = PolicyStore(adapters=False)
        elif kind == "base" and reference_model is not None:
            self._store = CopyStore(reference_model, owned=False)
        elif kind in ("ema", "synced") and self.is_peft:
            name = EMA_ADAPTER_NAME if kind == "ema" else SYNCED_ADAPTER_NAME
            self._store = AdapterStore(policy, name, sharded=self.sharded)
            self._synced_at = 0 if kind == "synced" else None
        elif kind in ("ema", "base") and self._shard is None:
            self._store = CopyStore(frozen_copy(policy))  # the initial weights
        # The full fine-tuning synced copy (and, under a sharded engine, every owned copy) is made in `begin` (train
        # begin), on the device training runs on and after the engine has sharded the policy.

    @property
    def needs_updates(self) -> bool:
        """Whether `begin` / `update` can still change anything (EMA step, sync, device move, release)."""
        return not self.released and self.kind != "live"

    @property
    def adapter_name(self) -> str | None:
        """Name of the teacher's PEFT adapter (LoRA `synced` / `ema`) while it exists, else `None`."""
        return self._store.name if isinstance(self._store, AdapterStore) and not self.released else None

    @property
    def copy(self) -> nn.Module | None:
        """The model the teacher runs when it is not the policy: its own copy (a DeepSpeed engine under ZeRO-3) or
        GRPO's reference model; `None` for a teacher inside the policy, before the copy is built and once released."""
        return None if self._store is None else self._store.module

    @property
    def store(self) -> TeacherStore | None:
        """Where the teacher's weights live (`trace_trl.teacher_stores`); `None` before it is built and once released."""
        return self._store

    def memory_bytes(self) -> int:
        """Parameter memory this teacher holds beyond the policy on this process, now: its copy's (local shards, and
        the full values ZeRO-3 keeps gathered between forwards), or its adapter's; 0 once released."""
        return 0 if self._store is None else self._store.memory_bytes()

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
                self._build(policy)
                self._apply_pending(policy)  # the checkpoint's snapshot of step floor(step / N) * N
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
            self._build(policy)
            self._apply_pending(policy)
        if isinstance(self._store, AdapterStore):
            self._store.freeze(policy)

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
            self._build(policy)
            self._apply_pending(policy)
            self._store.ema(policy, self.ema_rate)
        elif self.kind == "synced" and step is not None and step % self.sync_steps == 0:
            self._sync(policy, step)

    def release(self, policy: nn.Module | None = None) -> None:
        """Free what the teacher holds for good (its store's copy, or its adapter). A no-op for `live`."""
        if self.released:
            return
        self.released = True
        self._pending = None
        store, self._store = self._store, None
        if store is not None:
            store.release(policy)

    # ------------------------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------------------------
    @contextmanager
    def activate(self, policy: nn.Module, wrapper: nn.Module | None = None) -> Iterator[TeacherView]:
        """Context in which the teacher's decoder and head are reachable, every module in eval mode; restores the
        policy (active adapter, train/eval flags) on exit. `wrapper` is what wraps `policy` (DDP, FSDP2, a DeepSpeed
        engine): the view of a teacher that is the policy (`live`, adapters) runs through it."""
        if self.released:
            raise RuntimeError(
                "The teacher was released when the KL weight reached zero for good; nothing uses it now."
            )
        self._build(policy)
        self._apply_pending(policy)
        with self._store.view(policy, wrapper) as view:
            yield view

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------------------------
    def state_dict(self, policy: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
        """The teacher's own weights, when a checkpoint needs them: `ema` always, `synced` when it differs from the
        policy (the last sync was before the current step), a sharded `base` snapshot always. `live`, other `base` and
        released teachers need nothing. A sharded copy is gathered parameter by parameter (every process joins); only
        processes with `keep` hold the gathered weights (an 8B teacher is ~33 GB in fp32: not on every process)."""
        if self.released or not self._saves_state:
            return {}
        if self.kind == "synced" and self._synced_at == self._step:
            return {}  # the teacher equals the policy, which the checkpoint already holds
        if self._store is None:
            return {k: v.detach().cpu() for k, v in (self._pending or {}).items()}
        return self._store.state_dict(policy, keep=keep)

    @torch.no_grad()
    def load_state_dict(self, policy: nn.Module, state: dict[str, torch.Tensor]) -> None:
        if not self._saves_state or not state or self.released:
            return
        self._pending = dict(state)
        self._restored = True
        if self._store is not None:
            self._apply_pending(policy)

    def save(self, policy: nn.Module, directory: str, write: bool = True) -> None:
        """Write the teacher's state into a checkpoint folder. Every process calls it (a sharded teacher's state is
        gathered, a collective); only those with `write` write the file."""
        state = self.state_dict(policy, keep=write)
        if state and write:
            torch.save(state, os.path.join(directory, TEACHER_STATE_FILE))

    def load(self, policy: nn.Module, directory: str) -> bool:
        path = os.path.join(directory, TEACHER_STATE_FILE)
        if not self._saves_state or self.released or not os.path.exists(path):
            return False
        # Memory-mapped: every process reads the full state (each keeps its shard), sharing the file's pages.
        self.load_state_dict(policy, torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        return True

    # ------------------------------------------------------------------------------------------------------------
    # Internals
    # ------------------------------------------------------------------------------------------------------------
    @property
    def _saves_state(self) -> bool:
        return self.kind in ("ema", "synced") or self._snapshot_base

    def _build(self, policy: nn.Module) -> None:
        """The copy made at train begin (full fine-tuning `synced`; under a sharded engine every owned copy): the
        policy now, sharded like it or deep-copied."""
        if self._store is None:
            self._store = self._shard(policy) if self._shard is not None else CopyStore(frozen_copy(policy))
            self._synced_at = self._step

    def _apply_pending(self, policy: nn.Module) -> None:
        if self._pending is not None:
            state, self._pending = self._pending, None
            self._store.load_state_dict(policy, state)

    @torch.no_grad()
    def _sync(self, policy: nn.Module, step: int) -> None:
        """`teacher <- policy`, in place (a fresh copy is the policy already)."""
        if self._store is None:
            self._build(policy)
        else:
            self._store.sync(policy)
        self._synced_at = step


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


def _reject_prompt_learning(policy: nn.Module) -> None:
    config = policy.peft_config[policy.active_adapter]
    if getattr(config, "is_prompt_learning", False):
        raise ValueError(
            "TRACE calls the decoder directly for the teacher and the KL channel, which bypasses the virtual tokens "
            f"of prompt-learning PEFT methods ({type(config).__name__}); use LoRA or another adapter method."
        )
