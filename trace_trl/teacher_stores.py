"""Where the teacher's weights live: one store per backend, each owning its copy's whole life cycle.

`Teacher` (`teacher.py`) decides *what* the teacher is (kind, sync and EMA schedule, release, checkpoint format); a
store decides *how* it is held under the engine the run uses. Every store answers the same small protocol:

| method | does |
|---|---|
| `sync(policy)` | `teacher <- policy` |
| `ema(policy, rate)` | `teacher <- (1 - rate) * teacher + rate * policy` |
| `view(policy, wrapper)` | context yielding the `TeacherView` to run, every module in eval mode |
| `state_dict(policy, keep)` / `load_state_dict(policy, state)` | full weights by parameter name (any engine's state loads into any other) |
| `release(policy)` | free what the store holds, for good |
| `memory_bytes()` | bytes the store holds beyond the policy on this process, now |

Stores: `PolicyStore` (the policy itself: `live`, and the LoRA `base` teacher through disabled adapters),
`AdapterStore` (a second, frozen LoRA adapter inside the policy), `CopyStore` (a frozen deep copy, or GRPO's
reference model), `FSDP2Store` and `ZeRO3Store` (a copy sharded exactly like the policy). Under a sharded engine
every method of a store is a collective where it gathers or scatters: every process calls it.
"""

from __future__ import annotations

import contextlib
import copy
import gc
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from accelerate.utils import is_peft_model
from torch import nn

from .sharding import (
    FSDP2,
    ZERO3,
    copy_shards,
    destroy_engine,
    full_tensor,
    gathered_state_dict,
    held_bytes,
    load_full_param,
    load_full_state_dict,
    local_shard,
    refresh_gathered,
    sharded_copy,
    unwrap_engine,
)


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


class TeacherStore(Protocol):
    """The protocol every store implements (see the module docstring)."""

    module: nn.Module | None  # the copy the store runs (None when it runs the policy)

    def sync(self, policy: nn.Module) -> None: ...

    def ema(self, policy: nn.Module, rate: float) -> None: ...

    def view(self, policy: nn.Module, wrapper: nn.Module | None) -> contextlib.AbstractContextManager[TeacherView]: ...

    def state_dict(self, policy: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, policy: nn.Module, state: dict[str, torch.Tensor]) -> None: ...

    def release(self, policy: nn.Module | None) -> None: ...

    def memory_bytes(self) -> int: ...


class PolicyStore:
    """The policy itself: `live` (as it is now), or the LoRA `base` teacher (adapters disabled). Holds nothing."""

    module = None

    def __init__(self, adapters: bool = True) -> None:
        self.adapters = adapters

    def sync(self, policy: nn.Module) -> None:
        raise TypeError("A teacher that is the policy itself has nothing to sync.")

    ema = sync

    @contextlib.contextmanager
    def view(self, policy: nn.Module, wrapper: nn.Module | None) -> Iterator[TeacherView]:
        if self.adapters:
            with _eval_mode(policy):
                yield view_of(policy, wrapper)
            return
        from trl.trainer.utils import use_adapter

        with use_adapter(policy, None), _eval_mode(policy):
            yield view_of(policy, wrapper)

    def state_dict(self, policy: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, policy: nn.Module, state: dict[str, torch.Tensor]) -> None:
        pass

    def release(self, policy: nn.Module | None) -> None:
        pass

    def memory_bytes(self) -> int:
        return 0


class AdapterStore:
    """A second, frozen LoRA adapter inside the policy, starting equal to the trained adapter.

    Under ZeRO-3 its parameters are partitions of the policy's engine; the ones DeepSpeed keeps gathered between
    forwards (`ds_persist`) are refreshed after every write (the policy's optimizer step refreshes only at its next
    step). Under a sharded engine the adapter is not deleted at the release (FSDP2 and ZeRO-3 hold references to
    every parameter of a unit); it is only never used again, and no longer counted.
    """

    module = None

    def __init__(self, policy: nn.Module, name: str, sharded: bool) -> None:
        self.name = name
        self.sharded = sharded
        self.released = False
        # Adapter creation draws random initial weights; keep the global RNG as it was so a seeded run generates the
        # same rollouts whatever the teacher kind.
        with torch.random.fork_rng(devices=[]):
            _add_teacher_adapter(policy, name)
        # The policy module, not its parameters: FSDP2 replaces a unit's parameters with sharded ones when it wraps
        # the policy (in place), so the adapter's parameters are looked up on each use.
        self._policy: nn.Module | None = policy

    def _params(self) -> list[torch.Tensor]:
        if self._policy is None:
            return []
        return [p for n, p in self._policy.named_parameters() if f".{self.name}." in n]

    @torch.no_grad()
    def sync(self, policy: nn.Module) -> None:
        for teacher_param, student_param in _adapter_pairs(policy, self.name):
            local_shard(teacher_param).copy_(local_shard(student_param))
        refresh_gathered(self._params())

    @torch.no_grad()
    def ema(self, policy: nn.Module, rate: float) -> None:
        for teacher_param, student_param in _adapter_pairs(policy, self.name):
            teacher, student = local_shard(teacher_param), local_shard(student_param)
            teacher.lerp_(student.detach().to(teacher.dtype), rate)
        refresh_gathered(self._params())

    @contextlib.contextmanager
    def view(self, policy: nn.Module, wrapper: nn.Module | None) -> Iterator[TeacherView]:
        from trl.trainer.utils import use_adapter

        active = policy.active_adapter
        # `set_adapter` in PEFT re-enables gradients of the active adapter; the teacher runs under no_grad and the
        # trained adapter is restored (and re-marked trainable) on exit, before the student forward.
        with use_adapter(policy, self.name), _eval_mode(policy):
            yield view_of(policy, wrapper)
        _freeze_adapter(policy, self.name)
        if not any(p.requires_grad for n, p in policy.named_parameters() if f".{active}." in n):
            raise RuntimeError(f"The trained adapter {active!r} lost its gradients after the teacher forward.")

    def state_dict(self, policy: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
        state = {}
        for name, p in policy.named_parameters():
            if f".{self.name}." in name:
                full = full_tensor(p)
                if keep:
                    state[name] = full.cpu()
        return state

    @torch.no_grad()
    def load_state_dict(self, policy: nn.Module, state: dict[str, torch.Tensor]) -> None:
        params = dict(policy.named_parameters())
        missing = set(state) - set(params)
        if missing:
            raise KeyError(f"Teacher state has parameters the policy lacks: {sorted(missing)[:3]}...")
        for name, value in state.items():
            load_full_param(params[name], value)

    def release(self, policy: nn.Module | None) -> None:
        if self.released:
            return
        self.released = True
        self._policy = None
        if not self.sharded and policy is not None and self.name in getattr(policy, "peft_config", {}):
            trained = _trained_adapter_name(policy)
            policy.delete_adapter(self.name)
            policy.set_adapter(trained)

    def memory_bytes(self) -> int:
        return sum(held_bytes(p) for p in self._params())

    def freeze(self, policy: nn.Module) -> None:
        _freeze_adapter(policy, self.name)


class CopyStore:
    """A frozen copy on one device (no sharding engine): a deep copy of the policy (`owned`), or GRPO's reference
    model reused as the `base` teacher (not owned: only forgotten at the release, GRPO still uses it).

    An owned copy follows the policy: on each use its tensors move to the device and dtype of the policy's tensor of
    the same name (a copy made in `__init__` on the CPU follows a policy that DeepSpeed ZeRO-1/2 moved later).
    """

    def __init__(self, module: nn.Module, owned: bool = True) -> None:
        self.module: nn.Module | None = module
        self.owned = owned

    @torch.no_grad()
    def sync(self, policy: nn.Module) -> None:
        self.follow(policy)
        student = dict(policy.named_parameters())
        for name, p in self.module.named_parameters():
            p.copy_(student[name])
        buffers = dict(policy.named_buffers())
        for name, b in self.module.named_buffers():
            if name in buffers:
                b.copy_(buffers[name])

    @torch.no_grad()
    def ema(self, policy: nn.Module, rate: float) -> None:
        self.follow(policy)
        student = dict(unwrap_engine(policy).named_parameters())
        for name, p in self.module.named_parameters():
            p.lerp_(student[name].detach().to(p.dtype), rate)

    @contextlib.contextmanager
    def view(self, policy: nn.Module, wrapper: nn.Module | None) -> Iterator[TeacherView]:
        self.follow(policy)
        with _eval_mode(self.module):
            yield view_of(self.module)

    def follow(self, policy: nn.Module) -> None:
        if self.owned:
            _follow(self.module, policy)

    def state_dict(self, policy: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, policy: nn.Module, state: dict[str, torch.Tensor]) -> None:
        self.follow(policy)
        load_full_state_dict(self.module, state)  # by parameter name: a sharded run's state loads here and back

    def release(self, policy: nn.Module | None) -> None:
        owned, self.module = self.owned and self.module is not None, None
        if owned:
            _free_memory()

    def memory_bytes(self) -> int:
        return 0 if self.module is None else sum(held_bytes(p) for p in self.module.parameters())


class FSDP2Store:
    """A copy sharded exactly like the FSDP2 policy (`sharding.sharded_copy`): filled, synced and EMA-updated shard
    by shard without communication, checkpointed as gathered full weights, freed by dropping it (FSDP2 keeps no
    reference of its own)."""

    engine = FSDP2

    def __init__(self, policy: nn.Module, accelerator: Any) -> None:
        self.module: nn.Module | None = sharded_copy(policy, accelerator, self.engine)
        self.sync(policy)

    def _params(self) -> list[torch.Tensor]:
        return list(unwrap_engine(self.module).parameters())

    def _written(self) -> None:
        """After the shards were written (a hook for engines that keep gathered values)."""

    def sync(self, policy: nn.Module) -> None:
        copy_shards(self.module, policy)
        self._written()

    @torch.no_grad()
    def ema(self, policy: nn.Module, rate: float) -> None:
        student = dict(unwrap_engine(policy).named_parameters())
        for name, p in unwrap_engine(self.module).named_parameters():
            teacher = local_shard(p)
            teacher.lerp_(local_shard(student[name]).detach().to(teacher.dtype), rate)
        self._written()

    @contextlib.contextmanager
    def view(self, policy: nn.Module, wrapper: nn.Module | None) -> Iterator[TeacherView]:
        with _eval_mode(self.module):
            yield view_of(self.module)

    def state_dict(self, policy: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
        return gathered_state_dict(self.module, keep=keep)

    def load_state_dict(self, policy: nn.Module, state: dict[str, torch.Tensor]) -> None:
        load_full_state_dict(self.module, state)
        self._written()

    def release(self, policy: nn.Module | None) -> None:
        if self.module is not None:
            self.module = None
            _free_memory()

    def memory_bytes(self) -> int:
        return 0 if self.module is None else sum(held_bytes(p) for p in self._params())


class ZeRO3Store(FSDP2Store):
    """A copy partitioned exactly like the ZeRO-3 policy, in an inference engine with the policy's ZeRO settings.

    Owns what ZeRO-3 adds to a copy's life cycle: the parameters DeepSpeed keeps gathered between forwards
    (`numel <= stage3_param_persistence_threshold`, e.g. every norm with TRL's `10 x hidden_size`) are gathered again
    after every write into the partitions (a sync, an EMA step, a load), or the teacher would keep running their old
    values; the release destroys the engine and unregisters the model from ZeRO-3's module stack, so the partitions
    are freed; the byte count includes the gathered persistent parameters.
    """

    engine = ZERO3

    def _written(self) -> None:
        refresh_gathered(self._params())

    def release(self, policy: nn.Module | None) -> None:
        if self.module is not None:
            destroy_engine(self.module)
        super().release(policy)


def sharded_store(policy: nn.Module, accelerator: Any, engine: str) -> FSDP2Store:
    """A copy of `policy` now, sharded like it under `engine` (`"fsdp2"` or `"zero3"`)."""
    return (ZeRO3Store if engine == ZERO3 else FSDP2Store)(policy, accelerator)


def frozen_copy(policy: nn.Module) -> nn.Module:
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


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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


def _trained_adapter_name(policy: nn.Module) -> str:
    names = [n for n in policy.peft_config if n not in TEACHER_ADAPTER_NAMES]
    active = policy.active_adapter
    return active if active in names else names[0]


def _adapter_pairs(policy: nn.Module, adapter: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`(teacher adapter parameter, trained adapter parameter)` pairs, matched by name."""
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
