"""What the KL channel needs from a sharded engine (FSDP2 or DeepSpeed ZeRO-3), in one place.

Under FSDP2 a parameter is a `DTensor` shard outside its FSDP unit's forward; under ZeRO-3 it is a partition
(`param.ds_tensor`, with `param` itself empty) outside its module's forward. TRACE meets them in four places:

- the teacher forward runs through the teacher's (or the policy's) wrapper, so the engine's pre-forward hooks gather
  the weights (`forward_through`, TRL's `_ForwardRedirection`);
- the teacher's LM head is gathered once per step into a plain tensor for the divergence kernel (`full_tensor`);
- a teacher copy under full fine-tuning is sharded exactly like the policy, built on the meta device so no process
  ever holds the full weights (`sharded_copy`), and synced shard by shard without communication (`local_shard`);
- checkpoints hold the teacher's full weights, gathered (every process joins) and written by the main process, and
  are scattered back on load (`gathered_state_dict`, `load_full_state_dict`);
- a ZeRO-3 copy's life cycle: its engine's settings (`zero3_inference_config`), the gathered values ZeRO-3 keeps
  between forwards, refreshed after a write (`refresh_gathered`) and counted (`held_bytes`), and its destruction
  (`destroy_engine`). The stores of `teacher_stores.py` use these primitives; nothing here holds state.

Every function here makes the same collectives on every process whatever it routes: callers must call them
unconditionally on all processes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


FSDP2 = "fsdp2"
ZERO3 = "zero3"


def sharding_engine(accelerator: Any) -> str | None:
    """`"fsdp2"`, `"zero3"` or `None` (single device, DDP, ZeRO-1/2) for an `accelerate.Accelerator`.

    Raises `NotImplementedError` for FSDP1, which the KL channel does not support (Accelerate and Transformers
    deprecate it; FSDP2 is the default).
    """
    state = getattr(accelerator, "state", None)
    fsdp_plugin = getattr(state, "fsdp_plugin", None)
    if fsdp_plugin is not None:
        if getattr(fsdp_plugin, "fsdp_version", 1) != 2:
            raise NotImplementedError(
                "TRACE's KL channel under FSDP needs FSDP2: set `fsdp_version: 2` in the accelerate config (or "
                "`fsdp_config={'version': 2}`), as in examples/accelerate/fsdp2.yaml. FSDP1 is deprecated by Accelerate "
                "and Transformers."
            )
        return FSDP2
    ds_plugin = getattr(state, "deepspeed_plugin", None)
    if ds_plugin is not None and getattr(ds_plugin, "zero_stage", None) == 3:
        return ZERO3
    return None


def is_dtensor(tensor: torch.Tensor) -> bool:
    dtensor = getattr(getattr(torch.distributed, "tensor", None), "DTensor", None)
    return dtensor is not None and isinstance(tensor, dtensor)


def is_zero3_param(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "ds_tensor")


def local_shard(param: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter: the local `DTensor` shard, the ZeRO-3 partition, or the tensor itself.

    Two parameters sharded the same way (same shape, same engine, same world size) have local shards of the same
    shape holding the same elements, so copying shard to shard copies the whole parameter without communication.
    """
    if is_dtensor(param):
        return param.to_local()
    if is_zero3_param(param):
        return param.ds_tensor
    return param


def full_tensor(param: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """A detached plain tensor holding all of `param` (a collective for a sharded one; every process must call it).

    FSDP2 shards are all-gathered with `DTensor.full_tensor()`; a ZeRO-3 partition is gathered and cloned (the
    gathered storage is released when the gather context exits); anything else is returned detached, uncopied.
    """
    if param is None:
        return None
    if is_dtensor(param):
        # Cast the local shard first: the all-gather then moves (and the result holds) the target dtype only, e.g. a
        # bf16 head instead of the fp32 master weights FSDP2 keeps under mixed precision.
        shard = param.detach()
        full = (shard if dtype is None else shard.to(dtype)).full_tensor()
    elif is_zero3_param(param):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            full = param.detach().to(dtype or param.dtype, copy=True)  # outlives the gather
    else:
        full = param.detach()
    return full if dtype is None or full.dtype == dtype else full.to(dtype)


def forward_through(wrapper: nn.Module, module: nn.Module, method: Callable[..., Any], *args: Any, **kwargs: Any):
    """Run `method(*args, **kwargs)` inside `wrapper`'s forward (TRL's `_ForwardRedirection`).

    The engine's pre-forward hooks on `wrapper` gather the weights of its root unit before `method` runs (FSDP2 root
    unshard, ZeRO-3 module hooks); inner units gather in their own forwards as usual. `module` is the module whose
    `forward` is patched for the call: `wrapper` itself under FSDP2 (which wraps in place), the engine's `.module`
    under DeepSpeed.
    """
    from trl.models.utils import _ForwardRedirection

    return _ForwardRedirection()(wrapper, module, method, *args, **kwargs)


def reshard(module: nn.Module) -> None:
    """Free an FSDP2 module's gathered root weights after a no-grad forward (FSDP2 keeps the root gathered after its
    forward when it expects a backward); a no-op elsewhere."""
    if _is_fsdp_module(module):
        module.reshard()


def sharded_copy(policy: nn.Module, accelerator: Any, engine: str) -> nn.Module:
    """A frozen, eval-mode model of `policy`'s architecture, sharded exactly like `policy`, with unspecified values.

    The caller fills it with `copy_shards`. FSDP2: the skeleton is built on the meta device and every module that is
    an FSDP unit of `policy` (same name) becomes one of the copy, children first, with the plugin's mesh, mixed
    precision, offload and reshard settings; `to_empty` then allocates only the local shards. ZeRO-3: the skeleton is
    built under `deepspeed.zero.Init` with the run's DeepSpeed config (partitioned at construction) and wrapped in an
    inference engine with the policy's ZeRO settings (`zero3_inference_config`). Parameters take the policy's
    (sharded) dtype.
    """
    config = policy.config
    model_class = _model_class(policy)
    dtype = next(p.dtype for p in policy.parameters())
    if engine == FSDP2:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        with torch.device("meta"):
            copy = model_class._from_config(config, dtype=dtype)
        plugin = accelerator.state.fsdp_plugin
        mesh = getattr(accelerator, "torch_device_mesh", None)
        options = dict(
            reshard_after_forward=True,
            offload_policy=plugin.cpu_offload,
            mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy(),
            mesh=mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)] if mesh is not None else None,
        )
        # The policy's FSDP units, as groups of module names (Accelerate shards the final norm and the LM head, and
        # with tied embeddings the input embeddings too, as one unit over several modules).
        groups: dict[int, list[str]] = {}
        for name, module in policy.named_modules():
            if _is_fsdp_module(module):
                groups.setdefault(id(module._get_fsdp_state()), []).append(name)
        root = next((names for names in groups.values() if "" in names), None)
        if root is None:
            raise RuntimeError("The policy's root module is not an FSDP2 unit; cannot shard a teacher like it.")
        # Inner units before outer ones, as FSDP2 requires; the root last.
        inner = sorted((names for names in groups.values() if names is not root), key=lambda n: -min(map(_depth, n)))
        for names in [*inner, root]:
            modules = [copy.get_submodule(name) for name in names]
            fully_shard(modules[0] if len(modules) == 1 else modules, **options)
        copy.to_empty(device=_shard_device(policy))
    elif engine == ZERO3:
        import deepspeed

        ds_config = zero3_inference_config(accelerator.state.deepspeed_plugin.deepspeed_config)
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            copy = model_class._from_config(config, dtype=dtype)
        copy, *_ = deepspeed.initialize(model=copy, config=ds_config)
    else:
        raise ValueError(f"engine must be {FSDP2!r} or {ZERO3!r}, got {engine!r}.")
    copy.requires_grad_(False)
    copy.eval()
    return copy


def zero3_inference_config(config: dict[str, Any]) -> dict[str, Any]:
    """The run's DeepSpeed config for a frozen ZeRO-3 model that only runs forwards: without the optimizer, scheduler
    and optimizer offload (no optimizer is given), every ZeRO-3 setting (persistence threshold, prefetch, parameter
    offload) the policy's.

    TRL's `prepare_deepspeed` adds its inference settings as dotted top-level keys
    (`"zero_optimization.stage3_param_persistence_threshold"`), which DeepSpeed's config ignores (it reads the nested
    `zero_optimization` block only), so an engine built with it silently has the run's settings anyway; this one says
    so. Keeping the policy's persistence threshold keeps the teacher forward's collectives those of the policy's
    forward; the parameters it keeps gathered are refreshed after every write (`refresh_gathered`).
    """
    config = {k: v for k, v in config.items() if k not in ("optimizer", "scheduler")}
    config["zero_optimization"] = {k: v for k, v in config["zero_optimization"].items() if k != "offload_optimizer"}
    return config


@torch.no_grad()
def refresh_gathered(params: list[torch.Tensor]) -> None:
    """Bring the full values that ZeRO-3 keeps gathered between forwards up to date with the partitions just written.

    DeepSpeed keeps a parameter with `numel <= stage3_param_persistence_threshold` gathered after its first forward
    (`ds_persist`) and refreshes it only after its own optimizer step. A write into the partitions (`ds_tensor`: a
    teacher sync, an EMA step, a checkpoint load) leaves that gathered value stale, so the next forward would run the
    old weights. The gathered parameters are freed and gathered again from the partitions, as DeepSpeed does after
    loading a checkpoint. A collective when anything is gathered: every process must call it (the same parameters are
    gathered on every process); a no-op for parameters that are not ZeRO-3 partitions or not gathered.
    """
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    gathered = [p for p in params if is_zero3_param(p) and p.ds_status == ZeroParamStatus.AVAILABLE]
    if gathered:
        gathered[0].partition(param_list=gathered)  # drops the stale full values (no communication)
        gathered[0].all_gather(param_list=gathered)


def held_bytes(param: torch.Tensor) -> int:
    """Bytes a parameter holds on this process: its local shard, plus the full value a ZeRO-3 parameter keeps
    gathered between forwards (`ds_persist`)."""
    shard = local_shard(param)
    held = shard.numel() * shard.element_size()
    if is_zero3_param(param) and param.data.numel():
        held += param.data.numel() * param.data.element_size()
    return held


def destroy_engine(model: nn.Module) -> None:
    """Undo what a DeepSpeed engine attached to its model, so that dropping the last reference to it frees it.

    `DeepSpeedEngine.destroy` removes ZeRO-3's module hooks, but two module-level references of DeepSpeed 0.18-0.19
    outlive it, each enough to keep the model, the engine (through the model's hooks) and every partition alive for
    the rest of the process: every engine's model is pushed onto `parameter_offload.FWD_MODULE_STACK` (the bottom of
    its forward-module stack) and never popped, and a class-level cache holds the modules of every forward. Both are
    dropped here. A no-op for anything that is not a DeepSpeed engine; call it outside
    any forward.
    """
    if type(model).__name__ != "DeepSpeedEngine":
        return
    module = model.module
    model.destroy()
    from deepspeed.runtime.zero import parameter_offload

    stack = getattr(parameter_offload, "FWD_MODULE_STACK", None)
    if stack is not None:
        stack[:] = [m for m in stack if m is not module]
    # ZeRO-3 memoizes which parameters each submodule releases with an unbounded `functools.lru_cache` on the class,
    # keyed by (coordinator, submodule, step): it holds every engine's modules that ever ran a forward. It is a pure
    # cache (recomputed on the next miss), so clearing it frees this engine's modules and costs the policy nothing.
    from deepspeed.runtime.zero import partitioned_param_coordinator

    coordinator = getattr(partitioned_param_coordinator, "PartitionedParameterCoordinator", None)
    cached = _lru_cache_of(getattr(coordinator, "_PartitionedParameterCoordinator__params_to_release", None))
    if cached is not None:
        cached.cache_clear()


def _lru_cache_of(function: Any, depth: int = 4) -> Any:
    """The `functools.lru_cache` wrapper inside `function`, seen through decorators that close over what they wrap
    (DeepSpeed's `instrument_w_nvtx` keeps it in a closure cell, without `__wrapped__`); `None` if there is none."""
    if function is None or depth < 0:
        return None
    if hasattr(function, "cache_clear"):
        return function
    inner = [getattr(function, "__wrapped__", None)]
    for cell in getattr(function, "__closure__", None) or ():
        try:
            inner.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    for candidate in inner:
        if callable(candidate):
            found = _lru_cache_of(candidate, depth - 1)
            if found is not None:
                return found
    return None


def unwrap_engine(model: nn.Module) -> nn.Module:
    """The model inside a DeepSpeed engine (an FSDP2 model is its own wrapper)."""
    return getattr(model, "module", model) if type(model).__name__ == "DeepSpeedEngine" else model


@torch.no_grad()
def copy_shards(target: nn.Module, source: nn.Module) -> None:
    """`target <- source`, parameter by parameter (matched by name) and buffer by buffer, shard to shard.

    Both must be sharded the same way (`sharded_copy`); a shape mismatch between local shards is an error rather
    than a silent partial copy.
    """
    sources = dict(unwrap_engine(source).named_parameters())
    for name, param in unwrap_engine(target).named_parameters():
        if name not in sources:
            raise KeyError(f"The teacher has a parameter the policy lacks: {name}.")
        dst, src = local_shard(param), local_shard(sources[name])
        if dst.shape != src.shape:
            raise RuntimeError(
                f"Teacher and policy shards of {name} differ ({tuple(dst.shape)} vs {tuple(src.shape)}): they are "
                "not sharded the same way."
            )
        dst.copy_(src)
    buffers = dict(unwrap_engine(source).named_buffers())
    for name, buffer in unwrap_engine(target).named_buffers():
        if name in buffers:
            buffer.copy_(buffers[name])


def gathered_state_dict(model: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The full weights of a (possibly sharded) model on the CPU, gathered one parameter at a time.

    Every process must call it (each gather is a collective); a process with `keep=False` joins the gathers and drops
    each full tensor at once, so only the processes that write a checkpoint ever hold the whole model.
    """
    state = {}
    for name, param in unwrap_engine(model).named_parameters():
        full = full_tensor(param)
        if keep:
            state[name] = full.cpu()
    if keep:
        for name, buffer in unwrap_engine(model).named_buffers():
            state[name] = buffer.detach().cpu()
    return state


@torch.no_grad()
def load_full_param(param: torch.Tensor, value: torch.Tensor) -> None:
    """`param <- value` for a full `value` present on every process: each process writes only its own shard."""
    if is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        # Every process holds `value`: each takes its own shard, without communication (`src_data_rank=None`).
        shard = distribute_tensor(
            value.to(param.device, param.dtype), param.device_mesh, param.placements, src_data_rank=None
        )
        param.to_local().copy_(shard.to_local())
    elif is_zero3_param(param):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if torch.distributed.get_rank() == 0:
                param.copy_(value.to(param.device, param.dtype))
    else:
        param.copy_(value.to(param.device, param.dtype))


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full weights (present on every process) into a possibly sharded model, parameter by parameter."""
    params = dict(unwrap_engine(model).named_parameters())
    missing = set(params) - set(state)
    if missing:
        raise KeyError(f"The teacher state lacks parameters: {sorted(missing)[:3]}...")
    for name, param in params.items():
        load_full_param(param, state[name])
    for name, buffer in unwrap_engine(model).named_buffers():
        if name in state:
            buffer.copy_(state[name].to(buffer.device, buffer.dtype))


def _is_fsdp_module(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(module, FSDPModule)


def _depth(name: str) -> int:
    return name.count(".") + 1 if name else 0


def _model_class(model: nn.Module) -> type:
    """The model's own class: FSDP2 swaps in a subclass `FSDP<Class>(FSDPModule, Class)`."""
    cls = type(unwrap_engine(model))
    if _is_fsdp_module(model):
        from torch.distributed.fsdp import FSDPModule

        return next(base for base in cls.__mro__[1:] if not issubclass(base, FSDPModule))
    return cls


def _shard_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return local_shard(param).device
    return torch.device("cpu")
