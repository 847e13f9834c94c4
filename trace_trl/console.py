"""A quiet console for training: one compact line per logging step; trackers still get every metric.

transformers prints the whole log dict every logging step (`ProgressCallback.on_log`, or `PrinterCallback` with
`disable_tqdm`): under TRACE that is dozens of `trace/*` keys per step, which buries the few numbers a person watches.
[`install_console_log`] swaps that printer for one that writes a single line:

```
step 10/200 | loss 0.0213 | reward 0.625 | reward_std 0.41 | kl_weight 0.5 | routed 0.083 | fkl 0.0031 | entropy 0.71 | len 812 | lr 1e-06
```

Only the console changes: `Trainer.log` still hands every metric to `report_to` (wandb, trackio, ...) and to
`trainer_state.json`. `console_log="full"` (`--console_log full`) keeps transformers' printer.
"""

from __future__ import annotations

from typing import Any

from transformers import PrinterCallback, ProgressCallback, TrainerCallback


CONSOLE_LOG_MODES = ("compact", "full")

# (log key, short label) of a training step, in the order printed; missing keys are skipped.
COMPACT_TRAIN_KEYS: tuple[tuple[str, str], ...] = (
    ("loss", "loss"),
    ("reward", "reward"),
    ("reward_std", "reward_std"),
    ("trace/kl_weight", "kl_weight"),
    ("trace/routed_token_frac", "routed"),
    ("trace/fkl_mean", "fkl"),
    ("trace/rkl_mean", "rkl"),
    ("entropy", "entropy"),
    ("completions/mean_length", "len"),
    ("grad_norm", "grad_norm"),
    ("learning_rate", "lr"),
)
# Of an evaluation: the loss, the mean reward and each reward function's mean.
COMPACT_EVAL_KEYS: tuple[tuple[str, str], ...] = (("eval_loss", "loss"), ("eval_reward", "reward"))


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def compact_line(logs: dict[str, Any], step: int, max_steps: int | None = None) -> str:
    """One line with the numbers a person watches in `logs` (a `Trainer.log` dict)."""
    where = f"step {step}/{max_steps}" if max_steps and max_steps > 0 else f"step {step}"
    if any(key.startswith("eval_") for key in logs):
        keys = [*COMPACT_EVAL_KEYS]
        keys += [(key, key[len("eval_rewards/") : -len("/mean")]) for key in logs
                 if key.startswith("eval_rewards/") and key.endswith("/mean")]  # fmt: skip
        parts = [f"eval {where}"]
    elif any(key in logs for key, _ in COMPACT_TRAIN_KEYS):
        keys = list(COMPACT_TRAIN_KEYS)
        parts = [where]
    else:  # the end-of-training summary (train_runtime, train_loss, ...): short, printed whole, without trace/*
        keys = [(key, key) for key in logs if not key.startswith("trace/") and key != "total_flos"]
        parts = [where]
    parts += [f"{label} {_number(logs[key])}" for key, label in keys if key in logs and logs[key] is not None]
    return " | ".join(parts)


class CompactProgressCallback(ProgressCallback):
    """transformers' progress bar, with one compact line per log instead of the whole dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            line = compact_line(logs, state.global_step, state.max_steps)
            if self.training_bar is not None:
                self.training_bar.write(line)  # above the bar, which keeps drawing below
            else:
                print(line)


class CompactPrinterCallback(TrainerCallback):
    """`PrinterCallback` (`disable_tqdm=True`), with one compact line per log instead of the whole dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_local_process_zero and logs:
            print(compact_line(logs, state.global_step, state.max_steps))


def install_console_log(trainer: Any, mode: str = "compact") -> None:
    """Make `trainer` print one compact line per log (`mode="compact"`), or leave transformers' printer (`"full"`).

    The printer is replaced in place, in the callback list; a notebook's progress callback is left alone.
    """
    if mode not in CONSOLE_LOG_MODES:
        raise ValueError(f"`console_log` must be one of {', '.join(CONSOLE_LOG_MODES)}; got {mode!r}.")
    if mode == "full":
        return
    callbacks = trainer.callback_handler.callbacks
    for i, callback in enumerate(callbacks):
        if type(callback) is ProgressCallback:
            callbacks[i] = CompactProgressCallback(max_str_len=callback.max_str_len)
        elif type(callback) is PrinterCallback:
            callbacks[i] = CompactPrinterCallback()
