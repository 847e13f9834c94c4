"""Issue 18, the first hour: command-line errors in one line with the CLI's own flag names and a "did you mean",
trackers checked before anything loads, `--tiny` that validates before building, reward functions that forget their
`return`, and a compact console."""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path

import pytest
import yaml

from trace_trl.cli import main as cli_main
from trace_trl.cli_errors import closest, did_you_mean
from trace_trl.scripts.train import resolve_recipe


CPU = ["--use_cpu", "true", "--bf16", "false"]
RECIPE = "qwen3-1.7b-trace-rkl"


@pytest.fixture
def nothing_heavy(monkeypatch, tmp_path):
    """Fail the test if the dataset, the tokenizer, the tiny model or a tiny-run folder is built; temp files go to a
    folder of the test's own, so a left-over `trace-trl-tiny-*` folder is seen."""
    from transformers import AutoTokenizer

    from trace_trl import tiny_recipe, train

    def too_late(*args, **kwargs):
        raise AssertionError("something heavy was built before the arguments were checked")

    monkeypatch.setattr(train, "load_datasets", too_late)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", too_late)
    monkeypatch.setattr(tiny_recipe, "build_tiny_assets", too_late)
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    return temp


@pytest.fixture
def no_wandb(monkeypatch):
    """`wandb` is not installed (whatever this machine has)."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))


def _error(capsys) -> list[str]:
    """The lines the command printed to stderr, warnings of other libraries left out."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("trace-trl train: error:"))
    assert len(lines) - start <= 2, lines[start:]  # one line, plus at most one hint, and nothing after
    return lines[start:]


# --- did you mean -----------------------------------------------------------------------------------------------------


def test_did_you_mean():
    assert did_you_mean("kl_coeff", ["kl_coef", "kl_decay", "learning_rate"]) == " Did you mean `kl_coef`?"
    assert did_you_mean("zzz", ["kl_coef"]) == ""
    assert closest("acuracy_reward", ["accuracy_reward", "format_reward"]) == "accuracy_reward"


# --- unknown names: rewards, flags, recipe keys, recipes ---------------------------------------------------------------


@pytest.mark.parametrize("tiny", [[], ["--tiny"]])
def test_unknown_reward_name_names_the_flag_and_suggests(tiny, nothing_heavy, capsys):
    argv = ["train", RECIPE, *tiny, *CPU, "--report_to", "none", "--reward_funcs", "acuracy_reward", "format_reward"]
    assert cli_main(argv) == 2
    lines = _error(capsys)
    assert "`--reward_funcs acuracy_reward`" in lines[0] and "Did you mean `accuracy_reward`?" in lines[0]
    assert "boxed_match_reward" in lines[1] and "dotted import path" in lines[1]
    assert not list(nothing_heavy.iterdir())


def test_unimportable_dotted_reward_names_the_flag(nothing_heavy, capsys):
    argv = ["train", RECIPE, *CPU, "--report_to", "none", "--reward_funcs", "no_such_module_xyz.reward"]
    assert cli_main(argv) == 2
    assert "`--reward_funcs no_such_module_xyz.reward`" in _error(capsys)[0]


@pytest.mark.parametrize("tiny", [[], ["--tiny"]])
def test_flag_typo_on_the_command_line_suggests_the_flag(tiny, nothing_heavy, capsys):
    assert cli_main(["train", RECIPE, *tiny, *CPU, "--kl_coeff", "0.1"]) == 2
    lines = _error(capsys)
    assert "unknown flag `--kl_coeff`. Did you mean `--kl_coef`?" in lines[0]
    assert "return_remaining_strings" not in "\n".join(lines) and "--help" in lines[1]
    assert not list(nothing_heavy.iterdir())


def test_flag_typo_with_equals_and_unique_prefixes(nothing_heavy, capsys):
    assert cli_main(["train", RECIPE, *CPU, "--learnig_rate=1e-6"]) == 2
    assert "Did you mean `--learning_rate`?" in _error(capsys)[0]
    # argparse's unique prefixes still work: `--report_t` is `--report_to`.
    from trace_trl.scripts.train import parse_args

    _, args, _ = parse_args([RECIPE, *CPU, "--report_t", "none"])
    assert args.report_to == [] or args.report_to == "none"


@pytest.mark.parametrize("tiny", [[], ["--tiny"]])
def test_recipe_key_typo_suggests_the_field(tiny, nothing_heavy, tmp_path, capsys):
    recipe = yaml.safe_load(Path(resolve_recipe(RECIPE)).read_text())
    recipe["kl_coeff"] = recipe.pop("kl_coef")
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert cli_main(["train", str(path), *tiny, *CPU]) == 2
    lines = _error(capsys)
    assert "sets `kl_coeff`, which is not a field. Did you mean `kl_coef`?" in lines[0] and str(path) in lines[0]
    assert "fail_with_unknown_args" not in "\n".join(lines)
    assert not list(nothing_heavy.iterdir())


def test_recipe_name_typo_suggests_the_recipe(capsys):
    with pytest.raises(FileNotFoundError, match="Did you mean 'qwen3-8b-trace-fkl'"):
        resolve_recipe("qwen3-8b-trace-fk")
    assert cli_main(["train", "qwen3-8b-trace-fk", "--tiny"]) == 2
    assert "Did you mean 'qwen3-8b-trace-fkl'?" in _error(capsys)[0]


# --- values: the model path, the dataset columns --------------------------------------------------------------------


def test_missing_local_model_path_fails_before_loading(nothing_heavy, capsys):
    argv = ["train", RECIPE, *CPU, "--report_to", "none", "--model_name_or_path", "./no-such-model"]
    assert cli_main(argv) == 2
    lines = _error(capsys)
    assert "`--model_name_or_path ./no-such-model`: no such folder" in lines[0]
    assert "Hub id" in lines[1]


def test_hub_model_ids_pass_the_path_check():
    from trace_trl.cli_errors import CommandLineError, check_model_path

    check_model_path("Qwen/Qwen3-1.7B")  # not looked up: only local-looking paths are checked
    with pytest.raises(CommandLineError, match="runs/a/b"):
        check_model_path("runs/a/b")


def _write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_wrong_dataset_columns_name_the_mapping_flag(tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: pytest.fail("tokenizer loaded"))
    data = _write_rows(tmp_path / "rows.jsonl", [{"question": "1+1?", "answer": "2", "solution": "1+1=2"}])
    argv = ["train", RECIPE, *CPU, "--report_to", "none", "--model_name_or_path", str(tmp_path)]
    argv += ["--dataset_name", data, "--dataset_source", "custom", "--annotator", "regex", "--eval_strategy", "no"]
    argv += ["--load_best_model_at_end", "false"]
    assert cli_main(argv) == 2
    lines = _error(capsys)
    assert f"`--dataset_name {data}` has no column 'problem'" in lines[0] and "`--prompt_column`" in lines[0]
    assert (
        "found ['question', 'answer', 'solution']" in lines[0]
        and "needed ['problem', 'solution', 'answer']" in lines[0]
    )
    assert lines[1] == "Map your column: `--prompt_column question`."


def test_wrong_columns_of_a_known_schema_point_to_custom(tmp_path):
    from trace_trl.cli_errors import CommandLineError
    from trace_trl.scripts.train import TraceScriptArguments, load_datasets

    data = _write_rows(tmp_path / "rows.jsonl", [{"question": "1+1?", "solution": "1+1=2"}])
    script_args = TraceScriptArguments(dataset_name=data, dataset_source="math")
    training_args = type("Args", (), {"eval_strategy": "no"})()
    with pytest.raises(CommandLineError) as info:
        load_datasets(script_args, training_args)
    assert "`--dataset_source math`" in info.value.message
    assert "`--dataset_source custom --prompt_column question`" in info.value.hint


# --- trackers --------------------------------------------------------------------------------------------------------


def test_trackers_cover_every_transformers_integration():
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    from trace_trl.trackers import TRACKERS

    assert set(TRACKERS) == set(INTEGRATION_TO_CALLBACK)


def test_missing_tracker_names_the_extra_and_the_way_out(no_wandb):
    from trace_trl.trackers import MissingTrackerError, check_report_to

    with pytest.raises(MissingTrackerError) as info:
        check_report_to(["wandb"])
    message = str(info.value)
    assert '`pip install "trace-trl[wandb]"`' in message and "`--report_to none`" in message and "\n" not in message
    check_report_to("none")
    check_report_to([])
    check_report_to(None)
    with pytest.raises(MissingTrackerError, match="Did you mean `trackio`"):
        check_report_to(["trakio"])


def test_installed_trackers_pass(monkeypatch):
    from trace_trl.trackers import MissingTrackerError, check_report_to

    installed = {"wandb", "trackio", "tensorboardX", "mlflow"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in installed else None)
    check_report_to(["wandb", "trackio", "tensorboard", "mlflow", "kubeflow"])  # tensorboardX is enough
    with pytest.raises(MissingTrackerError, match="pip install dagshub mlflow"):
        check_report_to(["dagshub"])  # needs dagshub and mlflow
    with pytest.raises(MissingTrackerError, match="pip install azureml-core"):
        check_report_to("azure_ml")


@pytest.mark.parametrize("tiny", [[], ["--tiny"]])
def test_recipe_with_wandb_fails_at_once_without_wandb(tiny, no_wandb, nothing_heavy, capsys):
    # The shipped recipe says `report_to: [wandb]`; --tiny sets none, so the flag after it asks for wandb again.
    assert cli_main(["train", RECIPE, *tiny, *CPU, "--report_to", "wandb"]) == 2
    lines = _error(capsys)
    assert lines[0].startswith("trace-trl train: error: `--report_to wandb`: wandb is not installed.")
    assert 'pip install "trace-trl[wandb]"' in lines[0] and "`--report_to none`" in lines[0]
    assert not list(nothing_heavy.iterdir())


def test_extras_declare_the_trackers():
    import configparser

    config = configparser.ConfigParser()
    config.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    extras = config["options.extras_require"]
    assert extras["wandb"].strip().startswith("wandb>=") and extras["trackio"].strip().startswith("trackio>=")


# --- --tiny leaves nothing behind -------------------------------------------------------------------------------------


def test_tiny_build_failure_removes_the_temp_folder(monkeypatch, tmp_path, capsys):
    from trace_trl import tiny_recipe

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def broken(output_dir, dataset_path):
        Path(output_dir).mkdir(parents=True)
        raise RuntimeError("tokenizer training failed")

    monkeypatch.setattr(tiny_recipe, "build_tiny_model", broken)
    with pytest.raises(RuntimeError, match="tokenizer training failed"):
        cli_main(["train", RECIPE, "--tiny"])
    assert not list(tmp_path.glob("trace-trl-tiny-*"))


def test_tiny_error_in_the_run_removes_the_temp_folder(monkeypatch, tmp_path, capsys):
    from trace_trl import tiny_recipe, train
    from trace_trl.cli_errors import CommandLineError

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(tiny_recipe, "build_tiny_model", lambda output_dir, dataset_path: str(output_dir))
    built = []

    def failing_run(script_args, training_args, model_args):
        built.extend(tmp_path.glob("trace-trl-tiny-*/data/problems.jsonl"))
        raise CommandLineError("`--dataset_name x` has no column 'problem'.")

    monkeypatch.setattr(train, "run", failing_run)
    assert cli_main(["train", RECIPE, "--tiny"]) == 2
    assert built, "the tiny data was written before the run"
    assert "has no column 'problem'" in _error(capsys)[0]
    assert not list(tmp_path.glob("trace-trl-tiny-*"))


# --- reward functions that return the wrong thing ---------------------------------------------------------------------


def forgot_return(completions, **kwargs):
    [float(len(c) % 2) for c in completions]  # noqa: B018 (the bug under test)


def test_checked_reward_func_keeps_the_name_and_trl_semantics():
    from trace_trl.reward_checks import RewardFunctionError, checked_reward_func

    checked = checked_reward_func(forgot_return)
    assert checked.__name__ == "forgot_return" and checked_reward_func(checked) is checked
    with pytest.raises(RewardFunctionError, match=r"'forgot_return' returned None.*forget its `return`"):
        checked(prompts=["p", "q"], completions=["a", "b"])
    # Per-completion None is TRL's "not applicable": legal.
    partial = checked_reward_func(lambda completions, **kw: [None, 1.0], "partial")
    assert partial(completions=["a", "b"]) == [None, 1.0]
    with pytest.raises(RewardFunctionError, match=r"'short' returned 1 rewards for 2 completions \(\[1\.0\]\)"):
        checked_reward_func(lambda completions, **kw: [1.0], "short")(completions=["a", "b"])
    with pytest.raises(RewardFunctionError, match=r"'texts' returned a non-number, 'yes' \(str\)"):
        checked_reward_func(lambda completions, **kw: ["yes", 1.0], "texts")(completions=["a", "b"])
    with pytest.raises(RewardFunctionError, match=r"'scalar' returned 1\.0 \(float\)"):
        checked_reward_func(lambda completions, **kw: 1.0, "scalar")(completions=["a", "b"])


def test_async_reward_functions_stay_async_and_are_checked():
    import asyncio

    from trl.trainer.utils import is_async_callable

    from trace_trl.reward_checks import RewardFunctionError, checked_reward_func

    async def judge(completions, **kwargs):
        return None

    checked = checked_reward_func(judge)
    assert is_async_callable(checked) and checked.__name__ == "judge"
    with pytest.raises(RewardFunctionError, match="'judge' returned None"):
        asyncio.run(checked(completions=["a"]))


def test_tiny_with_a_missing_model_override_fails_before_building(nothing_heavy, capsys):
    assert cli_main(["train", RECIPE, "--tiny", "--model_name_or_path", "./no-such-model"]) == 2
    assert "`--model_name_or_path ./no-such-model`" in _error(capsys)[0]
    assert not list(nothing_heavy.iterdir())


def test_trainer_wraps_rewards_and_names_the_one_that_returned_none(tiny_model_dir, tiny_tokenizer, tmp_path):
    import torch
    from trainer_helpers import math_dataset, parity_reward, trace_config

    from trace_trl import TRACETrainer
    from trace_trl.reward_checks import CheckedRewardFunc, RewardFunctionError

    def half_scored(completions, **kwargs):
        return [1.0 if i % 2 else None for i in range(len(completions))]

    trainer = TRACETrainer(
        tiny_model_dir,
        [parity_reward, forgot_return, half_scored],
        args=trace_config(tmp_path, kl_coef=0.0),
        train_dataset=math_dataset(),
        processing_class=tiny_tokenizer,
    )
    assert trainer.reward_func_names == ["parity_reward", "forgot_return", "half_scored"]  # metric names unchanged
    assert all(isinstance(func, CheckedRewardFunc) for func in trainer.reward_funcs)
    inputs = [{"prompt": "What is 1 + 1?", "answer": "2"}] * 2
    with pytest.raises(RewardFunctionError, match="'forgot_return' returned None"):
        trainer._calculate_rewards(inputs, ["p", "p"], ["a", "bb"], [[1], [2, 3]])
    trainer.reward_funcs = [trainer.reward_funcs[0], trainer.reward_funcs[2], trainer.reward_funcs[2]]
    rewards = trainer._calculate_rewards(inputs, ["p", "p"], ["a", "bb"], [[1], [2, 3]])
    assert torch.isnan(rewards[0, 1]) and rewards[1, 1] == 1.0  # per-completion None: NaN, as TRL does


# --- the compact console ----------------------------------------------------------------------------------------------

LOGS = {
    "loss": 0.0213,
    "grad_norm": 0.5,
    "learning_rate": 1e-6,
    "reward": 0.625,
    "reward_std": 0.41,
    "entropy": 0.71,
    "completions/mean_length": 812.0,
    "trace/kl_weight": 0.5,
    "trace/routed_token_frac": 0.0833,
    "trace/fkl_mean": 0.0031,
    "trace/key_label_frac": 0.2,
    "trace/teacher_memory_bytes": 123.0,
    "rewards/accuracy_reward/mean": 0.5,
}


class _Bar:
    def __init__(self):
        self.lines: list[str] = []

    def write(self, text):
        self.lines.append(text)


def _state(step=10, max_steps=200):
    from transformers import TrainerState

    state = TrainerState(global_step=step, max_steps=max_steps)
    return state


def _trainer_with(callback):
    from transformers.trainer_callback import CallbackHandler

    handler = CallbackHandler([callback], None, None, None, None)
    return type("FakeTrainer", (), {"callback_handler": handler})()


def test_compact_console_prints_one_line_with_the_key_numbers():
    from transformers import ProgressCallback

    from trace_trl.console import CompactProgressCallback, install_console_log

    trainer = _trainer_with(ProgressCallback())
    install_console_log(trainer, "compact")
    (callback,) = trainer.callback_handler.callbacks
    assert type(callback) is CompactProgressCallback
    callback.training_bar = bar = _Bar()
    callback.on_log(None, _state(), None, logs=dict(LOGS))
    assert len(bar.lines) == 1 and "\n" not in bar.lines[0]
    line = bar.lines[0]
    assert line.startswith("step 10/200 | loss 0.0213 | reward 0.625")
    for part in ("kl_weight 0.5", "routed 0.0833", "fkl 0.0031", "entropy 0.71", "len 812", "lr 1e-06"):
        assert part in line
    assert "trace/" not in line and "{" not in line


def test_compact_console_without_tqdm_and_for_evaluations(capsys):
    from transformers import PrinterCallback

    from trace_trl.console import CompactPrinterCallback, install_console_log

    trainer = _trainer_with(PrinterCallback())
    install_console_log(trainer, "compact")
    (callback,) = trainer.callback_handler.callbacks
    assert type(callback) is CompactPrinterCallback
    callback.on_log(None, _state(), None, logs=dict(LOGS))
    callback.on_log(None, _state(), None, logs={"eval_reward": 0.5, "eval_rewards/accuracy_reward/mean": 0.25})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1] == "eval step 10/200 | reward 0.5 | accuracy_reward 0.25"


def test_full_console_keeps_the_whole_dict():
    from transformers import ProgressCallback

    from trace_trl.console import install_console_log

    trainer = _trainer_with(ProgressCallback())
    install_console_log(trainer, "full")
    (callback,) = trainer.callback_handler.callbacks
    assert type(callback) is ProgressCallback
    callback.training_bar = bar = _Bar()
    callback.on_log(None, _state(), None, logs=dict(LOGS))
    assert "'trace/key_label_frac'" in bar.lines[0] and "'trace/teacher_memory_bytes'" in bar.lines[0]


def test_console_log_is_a_train_flag():
    from trace_trl.scripts.train import parse_args

    script_args, _, _ = parse_args([RECIPE, *CPU])
    assert script_args.console_log == "compact"
    script_args, _, _ = parse_args([RECIPE, *CPU, "--console_log", "full"])
    assert script_args.console_log == "full"
