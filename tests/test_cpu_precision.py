"""bf16 (TRL's default) on a machine without a bf16-capable accelerator: the Python API says which fields to set,
in the same words as the command line's flags; every configuration that trains on a CPU still constructs."""

from __future__ import annotations

import pickle

import pytest
import transformers.training_args

from trace_trl import TRACEConfig, TRACETrainer
from trace_trl.annotators import RegexAnnotator
from trace_trl.config import CPUPrecisionError, cpu_precision_hint, is_cpu_precision_refusal


@pytest.fixture
def no_bf16_device(monkeypatch):
    """transformers sees no device that supports bf16 (as on a laptop), whatever this machine has."""
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: False)
    monkeypatch.setattr(transformers.training_args, "is_torch_xla_available", lambda *a, **k: False)


@pytest.mark.parametrize("fields", [{}, {"bf16": True}], ids=["defaults", "bf16=True"])
def test_bf16_without_a_device_names_the_fields_to_set(no_bf16_device, tmp_path, fields):
    with pytest.raises(ValueError) as info:
        TRACEConfig(output_dir=str(tmp_path), **fields)
    error = info.value
    assert isinstance(error, CPUPrecisionError)
    message = str(error)
    assert "doesn't support bf16/gpu" in message  # transformers' own reason is kept
    assert "TRACEConfig(..., use_cpu=True, bf16=False)" in message and "args=" in message
    assert error.reason in message and "use_cpu=True" not in error.reason


def test_the_default_config_of_the_trainer_gives_the_same_hint(no_bf16_device, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default output_dir is relative
    with pytest.raises(CPUPrecisionError, match=r"use_cpu=True, bf16=False"):
        TRACETrainer(
            model="some-org/some-model",
            reward_funcs=lambda completions, **kw: [0.0] * len(completions),
            annotator=RegexAnnotator(key_patterns=[RegexAnnotator.BOXED]),
        )


@pytest.mark.parametrize(
    "fields",
    [
        {"use_cpu": True, "bf16": False},  # the laptop settings: float32 on the CPU
        {"bf16": False},  # no accelerator: the trainer runs on the CPU anyway
        {"use_cpu": True},  # bf16 on the CPU: transformers allows it, and it trains
        {"use_cpu": True, "bf16": True},
        {"fp16": True},  # transformers does not refuse fp16 here
    ],
)
def test_configs_that_train_on_a_cpu_still_construct(no_bf16_device, tmp_path, fields):
    config = TRACEConfig(output_dir=str(tmp_path), **fields)
    for name, value in fields.items():
        assert getattr(config, name) == value


def test_other_value_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(ValueError, match="At most one of fp16 and bf16") as info:
        TRACEConfig(output_dir=str(tmp_path), use_cpu=True, fp16=True, bf16=True)
    assert not isinstance(info.value, CPUPrecisionError)


def test_python_and_command_line_hints_come_from_one_helper():
    reason = "Your setup doesn't support bf16/gpu. You need to assign use_cpu if you want to train the model on CPU."
    assert is_cpu_precision_refusal(reason) and not is_cpu_precision_refusal("`kl_coef` must be >= 0, got -1.")
    assert "`--use_cpu true --bf16 false`" in cpu_precision_hint(cli=True) and "--tiny" in cpu_precision_hint(cli=True)
    assert "use_cpu=True, bf16=False" in cpu_precision_hint()
    error = pickle.loads(pickle.dumps(CPUPrecisionError(reason)))
    assert error.reason == reason and str(error).count(cpu_precision_hint()) == 1


def test_the_command_line_gives_flags_not_python_fields(no_bf16_device, capsys):
    from trace_trl.cli import main as cli_main

    assert cli_main(["train", "qwen3-8b-trace-fkl"]) == 2
    err = capsys.readouterr().err
    assert "--use_cpu true --bf16 false" in err and "--tiny" in err
    assert "use_cpu=True" not in err and "Traceback" not in err
