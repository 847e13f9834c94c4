"""Experiment trackers (`report_to`): check that every one a run logs to is installed, before anything loads.

transformers imports a tracker only when the `Trainer` is built, after the model and the dataset: a recipe with
`report_to: [wandb]` on a machine without wandb used to fail minutes in. [`check_report_to`] fails at once with the fix.

```python
from trace_trl.trackers import check_report_to

check_report_to(["wandb"])  # raises MissingTrackerError naming `pip install "trace-trl[wandb]"` if wandb is missing
```
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass

from .cli_errors import CommandLineError, did_you_mean


@dataclass(frozen=True)
class Tracker:
    """A `report_to` value: the modules transformers' integration imports, and how to install them."""

    modules: tuple[str, ...]  # all needed (dagshub also needs mlflow); empty: nothing to import
    install: str  # the pip command that provides them
    any_of: bool = False  # True: one of `modules` is enough (tensorboard or tensorboardX)


# The trace-trl extras (`pip install "trace-trl[wandb]"`) pin versions tested with the package.
EXTRA_TRACKERS = ("wandb", "trackio")

# Every integration `transformers.integrations.INTEGRATION_TO_CALLBACK` accepts, mapped to its import names (the ones
# its `is_*_available` checks).
TRACKERS: dict[str, Tracker] = {
    "wandb": Tracker(("wandb",), 'pip install "trace-trl[wandb]"'),
    "trackio": Tracker(("trackio",), 'pip install "trace-trl[trackio]"'),
    "tensorboard": Tracker(("tensorboard", "tensorboardX"), "pip install tensorboard", any_of=True),
    "mlflow": Tracker(("mlflow",), "pip install mlflow"),
    "comet_ml": Tracker(("comet_ml",), "pip install comet-ml"),
    "azure_ml": Tracker(("azureml.core.run",), "pip install azureml-core"),
    "neptune": Tracker(("neptune",), "pip install neptune"),
    "codecarbon": Tracker(("codecarbon",), "pip install codecarbon"),
    "clearml": Tracker(("clearml",), "pip install clearml"),
    "dagshub": Tracker(("dagshub", "mlflow"), "pip install dagshub mlflow"),
    "flyte": Tracker(("flytekit", "flytekitplugins.deck"), "pip install flytekit flytekitplugins-deck-standard"),
    "dvclive": Tracker(("dvclive",), "pip install dvclive"),
    "swanlab": Tracker(("swanlab",), "pip install swanlab"),
    "kubeflow": Tracker((), ""),  # configured by environment variables, no package
}


class MissingTrackerError(CommandLineError):
    """A tracker named in `report_to` is not installed (or not a tracker)."""


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a dotted name whose parent package is missing
        return False


def tracker_names(report_to: str | Sequence[str] | None) -> list[str]:
    """The trackers `report_to` names, as transformers reads it (`"none"` and `None`: none; `"all"`: what is installed)."""
    if report_to is None:
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    return [name for name in names if name not in ("none", "all")]


def check_report_to(report_to: str | Sequence[str] | None, flag: str = "--report_to") -> None:
    """Raise [`MissingTrackerError`] when a tracker of `report_to` is not installed, naming the install and the way out.

    Args:
        report_to (`str`, `list[str]` or `None`):
            `TrainingArguments.report_to`: tracker names, `"none"` or `"all"`.
        flag (`str`, *optional*, defaults to `"--report_to"`):
            How the error names the setting (`report_to=` for Python users).
    """
    for name in tracker_names(report_to):
        tracker = TRACKERS.get(name)
        if tracker is None:
            raise MissingTrackerError(
                f"`{flag} {name}`: unknown tracker.{did_you_mean(name, TRACKERS)} Trackers: {', '.join(TRACKERS)}, "
                "or `none`."
            )
        found = [_importable(module) for module in tracker.modules]
        if not tracker.modules or (any(found) if tracker.any_of else all(found)):
            continue
        raise MissingTrackerError(
            f"`{flag} {name}`: {name} is not installed. Install it with `{tracker.install}`, or log nowhere with "
            f"`{flag} none`."
        )
