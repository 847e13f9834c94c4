"""The package layout a TRL user expects: commands in `trace_trl/scripts/`, the library at the top, old paths kept.

Each check here fails on the 0.1 layout (commands spread over `train.py`, `evaluation.py`, `inspection.py`, `demo.py`)
or when someone puts a command back among the library modules.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import trace_trl
from trace_trl.cli import COMMANDS


PACKAGE = Path(trace_trl.__file__).parent


def test_every_command_lives_in_scripts_under_its_own_name():
    scripts = {path.stem for path in (PACKAGE / "scripts").glob("*.py")} - {"__init__"}
    # The folder listing alone names where each command lives; `tiny_recipe` is `trace-trl train --tiny`'s rewrite.
    assert scripts == {*COMMANDS, "tiny_recipe"}
    for command in COMMANDS:
        module = importlib.import_module(f"trace_trl.scripts.{command}")
        assert callable(module.main) and list(inspect.signature(module.main).parameters)[0] == "argv"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_cli_dispatches_each_command_to_its_script(command, monkeypatch):
    from trace_trl import cli

    module = importlib.import_module(f"trace_trl.scripts.{command}")
    seen = []
    monkeypatch.setattr(module, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main([command, "--x"]) == 0 and seen == [["--x"]]


def test_a_mistyped_command_gets_a_suggestion(capsys):
    from trace_trl import cli

    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'. Did you mean `trace-trl train`?" in capsys.readouterr().err
    assert cli.main(["zzz"]) == 2
    assert "Did you mean" not in capsys.readouterr().err


def test_library_modules_hold_no_command_line():
    """No module at the top of `trace_trl/` parses a command line (except the dispatcher and the deprecated aliases)."""
    aliases = {"train", "demo", "tiny_recipe"}
    offenders = []
    for path in PACKAGE.glob("*.py"):
        if path.stem in {"cli", *aliases}:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "ArgumentParser":
                offenders.append(path.name)
            if isinstance(node, ast.FunctionDef) and node.name in ("main", "annotate_main", "render_main"):
                offenders.append(f"{path.name}:{node.name}")
    assert not offenders


@pytest.mark.parametrize(
    "old, new",
    [("trace_trl.train", "trace_trl.scripts.train"), ("trace_trl.demo", "trace_trl.scripts.demo")]
    + [("trace_trl.tiny_recipe", "trace_trl.scripts.tiny_recipe")],
)
def test_moved_modules_keep_working_with_a_deprecation_warning(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        module = importlib.import_module(old)
    # The same module object: monkeypatching either path patches both.
    assert module is importlib.import_module(new) and sys.modules[old] is module


@pytest.mark.parametrize(
    "module, name, target",
    [
        ("trace_trl.evaluation", "main", "trace_trl.scripts.eval:main"),
        ("trace_trl.evaluation", "resolve_sampling", "trace_trl.scripts.eval:resolve_sampling"),
        ("trace_trl.inspection", "annotate_main", "trace_trl.scripts.annotate:main"),
        ("trace_trl.inspection", "render_main", "trace_trl.scripts.render:main"),
    ],
)
def test_moved_names_keep_working_with_a_deprecation_warning(module, name, target):
    target_module, _, target_name = target.partition(":")
    with pytest.warns(DeprecationWarning, match="moved to"):
        value = getattr(importlib.import_module(module), name)
    assert value is getattr(importlib.import_module(target_module), target_name)
    with pytest.raises(AttributeError):
        importlib.import_module(module).no_such_name  # noqa: B018


def test_evaluation_keeps_its_public_names_without_warnings():
    """`from trace_trl.evaluation import ...` of the library names (docs/rlvr.md) is not deprecated."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from trace_trl.evaluation import (  # noqa: F401
            BENCHMARKS,
            PAPER_SAMPLING,
            SamplingSettings,
            bootstrap_ci,
            evaluate,
            load_benchmarks,
            make_generator,
            write_results,
        )


def test_old_accelerate_launch_spelling_still_runs_the_train_command():
    """`accelerate launch ... -m trace_trl.train <recipe>` (0.1's docs) still reaches `trace-trl train`."""
    result = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-m", "trace_trl.train", "--list"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "qwen3-8b-trace-fkl" in result.stdout.split()


def test_one_annotator_settings_object_for_train_and_annotate():
    import dataclasses

    from trace_trl.annotator_factory import AnnotatorSettings, build_annotator
    from trace_trl.scripts.annotate import _annotate_parser
    from trace_trl.scripts.train import TraceScriptArguments

    assert issubclass(TraceScriptArguments, AnnotatorSettings)
    names = {f.name for f in dataclasses.fields(AnnotatorSettings)}
    script_only = {f.name for f in dataclasses.fields(TraceScriptArguments)} - names
    # Every annotator setting is in the one object, none is left among the dataset/reward fields.
    assert not {n for n in script_only if n.startswith(("annotator", "regex_", "random_", "self_annotator"))}
    # `trace-trl annotate`'s flags land on the same fields, with the same defaults.
    args = _annotate_parser().parse_args(["in.jsonl", "-o", "out.jsonl", "--annotator", "regex"])
    settings = AnnotatorSettings.from_attributes(args)
    assert settings == AnnotatorSettings(annotator="regex")
    annotator = build_annotator(settings)
    assert type(annotator).__name__ == "RegexAnnotator"
    with pytest.raises(ValueError, match="`annotator`: Unknown annotator 'regexx'"):
        AnnotatorSettings(annotator="regexx")


def test_trainer_module_holds_overrides_and_a_few_thin_helpers():
    """`trace_trl/trainer.py` is GRPOTrainer's overrides; the work lives in the library modules it calls."""
    from trl import GRPOTrainer

    from trace_trl.trainer import TRACETrainer

    # Trainer-only helpers that are not GRPOTrainer methods; anything new belongs in a library module.
    helpers = {
        "current_kl_weight",
        "kl_weight_sq_sum",
        "normalize_like_grpo",
        "last_annotations",
        "last_routed_divergences",
        "_schedule",
        "_kl_channel_off",
        "_kl_channel_active",
        "_tokenize_teacher_prompts",
        "_routed_batch",
        "_rollout_rewards",
        "_log_completion_spans",
        "_dump_rollouts",
        "_preflight_annotator",
    }
    own = {name for name in vars(TRACETrainer) if not name.startswith("__")} - {"_paper", "_tag_names", "_name"}
    not_overrides = {name for name in own if not hasattr(GRPOTrainer, name)}
    assert not_overrides <= helpers, sorted(not_overrides - helpers)
    for name in not_overrides:
        member = vars(TRACETrainer)[name]
        function = member.fget if isinstance(member, property) else member
        lines = inspect.getsource(function).splitlines()
        assert len(lines) <= 30, f"TRACETrainer.{name} is {len(lines)} lines: move its work to a library module"
