"""Old import paths that keep working, with a `DeprecationWarning`, after a module or name moved (0.2 layout).

Two shapes: a module that moved whole (`trace_trl.train` is `trace_trl.scripts.train`) replaces itself in
`sys.modules` with the new module, so monkeypatching either path patches the same object; a name that moved out of a
module that stays (`trace_trl.evaluation.main`) is forwarded by that module's `__getattr__`.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from types import ModuleType
from typing import Any


REMOVED_IN = "0.3"


def moved_module(old: str, new: str) -> ModuleType:
    """Make the module `old` an alias of `new` (imported here), warning once per import of `old`."""
    warnings.warn(
        f"`{old}` moved to `{new}` in trace-trl 0.2; import it from there (the old path goes in {REMOVED_IN}).",
        DeprecationWarning,
        stacklevel=3,
    )
    module = importlib.import_module(new)
    sys.modules[old] = module
    return module


def moved_attribute(module: str, name: str, moved: dict[str, str]) -> Any:
    """The value of `module.name` when `moved` maps `name` to its new home (`"package.module:attribute"`)."""
    if name not in moved:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    target_module, _, target_name = moved[name].partition(":")
    warnings.warn(
        f"`{module}.{name}` moved to `{target_module}.{target_name}` in trace-trl 0.2; import it from there (the old "
        f"path goes in {REMOVED_IN}).",
        DeprecationWarning,
        stacklevel=3,
    )
    return getattr(importlib.import_module(target_module), target_name)
