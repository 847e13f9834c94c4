"""`trace-trl train`: every shipped recipe parses with the CLI's parser; a recipe trains a few steps on a tiny model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from trace_trl import TRACEConfig
from trace_trl.cli import main as cli_main
from trace_trl.rewards import REWARD_FUNCTIONS
from trace_trl.scripts.train import (
    ANNOTATORS,
    TraceScriptArguments,
    build_annotator,
    check_recipe_has_no_secrets,
    get_reward_funcs,
    list_recipes,
    parse_args,
    recipes_dir,
    resolve_recipe,
)


FIXTURES = Path(__file__).parent / "fixtures"
RECIPES = list_recipes()
# Annotators that need a server or the trainer; their construction is covered where those annotators are tested.
OFFLINE_ANNOTATORS = {"none", "regex", "all_tokens", "random"}


def tiny_overrides(tiny_model_dir: str, output_dir: Path, **extra: str) -> list[str]:
    """Command-line overrides that turn any recipe into a CPU run of a few seconds on the tiny model."""
    overrides = {
        "model_name_or_path": tiny_model_dir,
        "dtype": "float32",
        "dataset_name": str(FIXTURES / "math_lighteval.jsonl"),
        "dataset_source": "math",
        "use_vllm": "false",
        "use_cpu": "true",
        "bf16": "false",
        "gradient_checkpointing": "false",
        "per_device_train_batch_size": "4",
        "num_generations": "4",
        "gradient_accumulation_steps": "1",
        "max_completion_length": "8",
        "max_steps": "2",
        "kl_warmup_steps": "5",
        "learning_rate": "1e-3",
        "logging_steps": "1",
        "report_to": "none",
        "log_completions": "false",
        "save_strategy": "no",
        "eval_strategy": "no",
        "load_best_model_at_end": "false",
        "output_dir": str(output_dir),
        **extra,
    }
    return [item for key, value in overrides.items() for item in (f"--{key}", value)]


PAPER_RECIPES = ("qwen3-8b-trace-fkl", "qwen3-1.7b-trace-rkl")
# Full fine-tuning recipes on the paper's data and GRPO settings (the LoRA recipes depart from them to fit one GPU).
PAPER_SETUP_RECIPES = (
    *PAPER_RECIPES,
    "qwen3-8b-grpo",
    "qwen3-1.7b-grpo",
    "qwen3-8b-all-token-opd",
    "qwen3-1.7b-all-token-opd",
    "qwen3-1.7b-all-token",
    "qwen3-1.7b-random-25",
    "qwen3-1.7b-inverted-25",
    "qwen3-8b-random-spans",
    "qwen3-8b-trace-self",
)


def test_recipes_are_shipped():
    assert set(PAPER_SETUP_RECIPES) | {"qwen3-1.7b-trace-lora", "qwen3-4b-trace-lora"} == set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_parses_into_trace_config(name):
    # `use_cpu` only: transformers refuses `bf16: true` on a machine without a GPU unless training is on the CPU.
    script_args, training_args, model_args = parse_args([name, "--use_cpu", "true"])
    assert isinstance(training_args, TRACEConfig)
    assert isinstance(script_args, TraceScriptArguments)
    assert model_args.model_name_or_path.startswith("Qwen/Qwen3-")
    assert script_args.annotator in ANNOTATORS
    assert script_args.dataset_name
    assert all(name in REWARD_FUNCTIONS for name in script_args.reward_funcs)
    assert len(get_reward_funcs(script_args.reward_funcs)) == len(script_args.reward_funcs)
    # Realistic settings of the paper's runs.
    assert training_args.bf16 and training_args.use_vllm and training_args.gradient_checkpointing
    assert training_args.num_generations == 8 and training_args.loss_type == "dapo"
    assert 1024 <= training_args.max_completion_length <= 8192
    assert "enable_thinking" in training_args.chat_template_kwargs
    assert not training_args.push_to_hub
    if training_args.kl_coef == 0:
        assert script_args.annotator == "none"
    else:
        assert script_args.annotator != "none"
    if model_args.use_peft:
        assert model_args.lora_r == 64 and training_args.learning_rate == pytest.approx(1e-5)
        assert training_args.vllm_mode == "colocate" and training_args.vllm_enable_sleep_mode
    else:
        assert training_args.learning_rate == pytest.approx(1e-6)
    if script_args.annotator in OFFLINE_ANNOTATORS:
        annotator = build_annotator(script_args)
        assert (annotator is None) == (script_args.annotator == "none")
    with open(resolve_recipe(name)) as f:
        check_recipe_has_no_secrets(yaml.safe_load(f))


# The paper's TRACE mechanics (DESIGN.md section 2): schedule, routed-token GRPO, normalization, clip, cap, teacher.
PAPER_TRACE = {
    "kl_coef": 0.5,
    "kl_warmup_steps": 10,
    "kl_decay_steps": 30,
    "kl_decay": "linear",
    "routed_token_grpo": "complementary",
    "kl_normalization": "sequence",
    "kl_term_clip": 0.05,
    "max_routed_fraction": 0.25,
    "teacher_kind": "synced",
    "teacher_sync_steps": 10,
}
# The paper's GRPO setup: DAPO clip-higher, thinking mode for student and teacher.
PAPER_GRPO = {
    "loss_type": "dapo",
    "epsilon": 0.2,
    "epsilon_high": 0.28,
    "chat_template_kwargs": {"enable_thinking": True},
}
# The paper's data: OpenThoughts-114k math, at most 30K problems, a held-out validation split for checkpoints.
PAPER_DATA = {
    "dataset_name": "open-thoughts/OpenThoughts-114k",
    "dataset_config": "metadata",
    "dataset_source": "openthoughts",
    "max_train_samples": 30000,
}
PRESET_ACTIONS = {
    "qwen3-8b-trace-fkl": ("Qwen/Qwen3-8B", "fkl", "grpo"),  # TRACE-FKL, strong bases
    "qwen3-1.7b-trace-rkl": ("Qwen/Qwen3-1.7B", "grpo", "rkl"),  # TRACE-RKL, weak bases
}


def _assert_fields(obj, expected: dict):
    actual = {name: getattr(obj, name) for name in expected}
    assert actual == expected


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_paper_recipes_have_exactly_the_papers_values(name):
    script, args, model_args = parse_args([name, "--use_cpu", "true"])
    model, key_action, error_action = PRESET_ACTIONS[name]
    assert model_args.model_name_or_path == model
    assert (args.key_span_action, args.error_span_action) == (key_action, error_action)
    _assert_fields(args, PAPER_TRACE)
    _assert_fields(args, PAPER_GRPO)
    _assert_fields(script, PAPER_DATA)
    assert script.annotator == "openai" and script.annotator_span_format == "segments"
    assert 0 < script.validation_size < 30000
    # Checkpoints are selected on the validation split.
    assert args.eval_strategy == "steps" and args.load_best_model_at_end
    assert args.metric_for_best_model == "eval_rewards/accuracy_reward/mean" and args.greater_is_better
    assert args.eval_steps == args.save_steps
    # The library defaults are the paper's too, so a recipe that omits these fields gets the same values.
    defaults = TRACEConfig(output_dir="x", use_cpu=True)
    _assert_fields(defaults, PAPER_TRACE)


def test_baselines_and_controls_share_the_paper_setup():
    _, rkl, _ = parse_args(["qwen3-1.7b-trace-rkl", "--use_cpu", "true"])
    shared = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
              "max_completion_length", "num_generations", "temperature", "beta", "seed")  # fmt: skip
    for name in PAPER_SETUP_RECIPES:
        script, args, model_args = parse_args([name, "--use_cpu", "true"])
        _assert_fields(args, PAPER_GRPO)
        _assert_fields(script, PAPER_DATA)
        assert args.max_completion_length == 8192 and args.num_generations == 8 and args.learning_rate == 1e-6
        if model_args.model_name_or_path == "Qwen/Qwen3-1.7B":
            assert all(getattr(args, field) == getattr(rkl, field) for field in shared), name

    script, grpo, _ = parse_args(["qwen3-8b-grpo", "--use_cpu", "true"])
    assert grpo.kl_coef == 0 and script.annotator == "none"
    script, grpo, _ = parse_args(["qwen3-1.7b-grpo", "--use_cpu", "true"])
    assert grpo.kl_coef == 0 and script.annotator == "none"

    # All-token self-OPD baselines: constant KL, no coverage cap.
    for name in ("qwen3-8b-all-token-opd", "qwen3-1.7b-all-token-opd"):
        script, opd, _ = parse_args([name, "--use_cpu", "true"])
        assert (opd.kl_decay, opd.max_routed_fraction, opd.kl_coef) == ("none", None, 0.5)
        assert (opd.key_span_action, opd.error_span_action) == ("fkl", "grpo")
        assert script.annotator == "all_tokens"
        assert type(build_annotator(script)).__name__ == "AllTokensAnnotator"

    # The 1.7B routing controls: the paper's schedule and mechanics, key-span FKL; only the routed tokens differ.
    routing = {
        "qwen3-1.7b-all-token": ("all_tokens", None),
        "qwen3-1.7b-random-25": ("random", 0.25),
        "qwen3-1.7b-inverted-25": ("inverted_openai", 0.25),
    }
    for name, (annotator, cap) in routing.items():
        script, args, _ = parse_args([name, "--use_cpu", "true"])
        _assert_fields(args, {**PAPER_TRACE, "max_routed_fraction": cap})
        assert (args.key_span_action, args.error_span_action) == ("fkl", "grpo")
        assert script.annotator == annotator
        if annotator != "all_tokens":
            assert script.random_span_fraction == 0.25
    random_script, _, _ = parse_args(["qwen3-1.7b-random-25", "--use_cpu", "true"])
    annotator = build_annotator(random_script)
    assert type(annotator).__name__ == "RandomSpanAnnotator" and annotator.span_fraction == 0.25

    script, args, _ = parse_args(["qwen3-8b-random-spans", "--use_cpu", "true"])
    assert script.annotator == "random_like_openai"
    _assert_fields(args, PAPER_TRACE)
    script, args, _ = parse_args(["qwen3-8b-trace-self", "--use_cpu", "true"])
    assert script.annotator == "self" and script.annotator_span_format == "segments"
    _assert_fields(args, PAPER_TRACE)


@pytest.mark.parametrize("name", ["qwen3-1.7b-trace-lora", "qwen3-4b-trace-lora"])
def test_lora_recipes_use_the_papers_mechanics(name):
    _, args, model_args = parse_args([name, "--use_cpu", "true"])
    assert model_args.use_peft
    _assert_fields(args, PAPER_TRACE)
    # Their stated departure: thinking off and MATH, to fit one 24 GB GPU.
    assert args.chat_template_kwargs == {"enable_thinking": False}


def test_openthoughts_recipe_loads_disjoint_train_and_validation(monkeypatch):
    from trace_trl import data
    from trace_trl.scripts.train import load_datasets

    fixture = str(FIXTURES / "openthoughts_metadata.jsonl")
    monkeypatch.setattr(data, "PAPER_MAX_TRAIN_SAMPLES", 6)  # the 30K cap, made small
    script, args, _ = parse_args(
        [
            "qwen3-8b-trace-fkl",
            "--use_cpu",
            "true",
            "--dataset_name",
            fixture,
            "--validation_size",
            "4",
            "--max_train_samples",
            "None",
        ]  # fmt: skip
    )
    assert script.max_train_samples is None  # None: the source's cap, the paper's 30K
    train, validation = load_datasets(script, args)
    assert (len(train), len(validation)) == (6, 4)
    assert not set(train["problem"]) & set(validation["problem"])
    assert args.privileged_context_column in train.column_names
    script.max_train_samples = 3
    assert len(load_datasets(script, args)[0]) == 3
    args.eval_strategy = "no"
    assert load_datasets(script, args)[1] is None
    args.eval_strategy = "steps"
    script.validation_size = 0
    with pytest.raises(ValueError, match="`validation_size` is 0"):
        load_datasets(script, args)


def test_command_line_overrides_the_recipe(tmp_path):
    recipe = resolve_recipe("qwen3-8b-trace-fkl")
    script_args, training_args, _ = parse_args(
        [
            recipe,
            "--use_cpu",
            "true",
            "--learning_rate",
            "3e-7",
            "--kl_coef",
            "0.3",
            "--annotator",
            "regex",
            "--chat_template_kwargs",
            '{"enable_thinking": false}',
        ]
    )
    assert training_args.learning_rate == pytest.approx(3e-7)
    assert training_args.kl_coef == 0.3
    assert training_args.chat_template_kwargs == {"enable_thinking": False}
    assert script_args.annotator == "regex"
    assert training_args.max_completion_length == 8192  # untouched values still come from the recipe
    # `--config path` works too, and `.yaml` on a name is optional.
    _, same, _ = parse_args(["--config", "qwen3-8b-trace-fkl.yaml", "--use_cpu", "true"])
    assert same.kl_coef == 0.5


def test_unknown_recipe_lists_the_shipped_ones(capsys):
    with pytest.raises(FileNotFoundError, match="qwen3-8b-trace-fkl"):
        resolve_recipe("no-such-recipe")
    assert cli_main(["train", "no-such-recipe"]) == 2
    assert "Shipped recipes" in capsys.readouterr().err


def test_list_recipes(capsys):
    assert cli_main(["train", "--list"]) == 0
    assert capsys.readouterr().out.split() == RECIPES
    assert recipes_dir().is_dir()


@pytest.mark.parametrize(
    "recipe",
    [
        {"annotator": "openai", "annotator_api_key": "sk-test-CANARY"},
        {"env": {"OPENAI_API_KEY": "sk-test-CANARY"}},
        {"hub_token": "hf_CANARY"},
        {"env": {"WANDB": {"api_key": "x" * 12}}},
    ],
)
def test_recipe_with_a_secret_is_refused(tmp_path, recipe, capsys):
    path = tmp_path / "leaky.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "Qwen/Qwen3-0.6B", **recipe}))
    assert cli_main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "credential" in err and "CANARY" not in err
    assert "OPENAI_API_KEY" not in os.environ or os.environ["OPENAI_API_KEY"] != "sk-test-CANARY"


def test_harmless_names_are_not_secrets():
    check_recipe_has_no_secrets(
        {"annotator_api_key_env": "MY_KEY", "annotator_max_tokens": 512, "max_completion_length": 8, "hub_token": None}
    )


def test_regex_annotator_from_named_patterns():
    from trace_trl.annotators import AnnotationRequest, RegexAnnotator

    script_args = TraceScriptArguments(annotator="regex", regex_key_patterns=["BOXED", r"x = \d+"])
    annotator = build_annotator(script_args)
    assert [p.pattern for p in annotator.key_patterns] == [RegexAnnotator.BOXED, r"x = \d+"]
    request = AnnotationRequest(prompt="?", completion="so x = 3 and \\boxed{3}", is_correct=True, reward=1.0)
    assert len(annotator([request])[0].spans) == 2


def test_random_like_openai_wraps_the_api_annotator(monkeypatch):
    pytest.importorskip("trace_trl.annotators.openai_api", reason="OpenAIAnnotator is not in this checkout")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-CANARY-random-like")
    script_args = TraceScriptArguments(
        annotator="random_like_openai", annotator_model="gpt-test", annotator_base_url="http://127.0.0.1:9/v1"
    )
    annotator = build_annotator(script_args)
    assert type(annotator).__name__ == "RandomSpanAnnotator"
    assert type(annotator.like).__name__ == "OpenAIAnnotator" and annotator.like.model == "gpt-test"


def test_openai_annotator_needs_a_model():
    pytest.importorskip("trace_trl.annotators.openai_api", reason="OpenAIAnnotator is not in this checkout")
    with pytest.raises(ValueError, match="annotator_model"):
        build_annotator(TraceScriptArguments(annotator="openai"))


def test_tiny_training_run_from_a_recipe(tiny_model_dir, tmp_path):
    """The LoRA recipe, shrunk by command-line overrides, trains 2 steps end to end and writes a TRACE model card."""
    output_dir = tmp_path / "run"
    argv = ["qwen3-1.7b-trace-lora", *tiny_overrides(tiny_model_dir, output_dir)]
    argv += ["--annotator", "regex", "--regex_key_patterns", r"\S+", "--regex_error_patterns", r"\S+"]
    argv += ["--lora_r", "4", "--lora_alpha", "8", "--save_strategy", "steps", "--save_steps", "1"]
    assert cli_main(["train", *argv]) == 0

    assert (output_dir / "adapter_model.safetensors").is_file()
    assert (output_dir / "checkpoint-2" / "trace_state.json").is_file()
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    logged = {key for entry in state["log_history"] for key in entry}
    assert {"trace/kl_weight", "trace/error_label_frac", "reward"} <= logged
    card = (output_dir / "README.md").read_text()
    assert "## TRACE settings" in card and "RegexAnnotator" in card and "| `error_span_action` | `rkl` |" in card


def test_grpo_recipe_runs_without_an_annotator(tiny_model_dir, tmp_path):
    output_dir = tmp_path / "grpo"
    argv = ["qwen3-8b-grpo", *tiny_overrides(tiny_model_dir, output_dir, max_steps="1")]
    assert cli_main(["train", *argv]) == 0
    assert (output_dir / "model.safetensors").is_file()
    assert "`kl_coef` | `0.0`" in (output_dir / "README.md").read_text()


def test_trace_without_annotator_fails_clearly(tiny_model_dir, tmp_path):
    argv = ["qwen3-8b-trace-fkl", *tiny_overrides(tiny_model_dir, tmp_path / "x"), "--annotator", "none"]
    with pytest.raises(ValueError, match="annotator: none"):
        cli_main(["train", *argv])


def test_tiny_run_selects_checkpoints_on_the_openthoughts_validation_split(tiny_model_dir, tmp_path):
    """The paper recipe's data and checkpoint selection, shrunk: the validation split is evaluated and picks the best."""
    output_dir = tmp_path / "ot"
    overrides = tiny_overrides(
        tiny_model_dir,
        output_dir,
        dataset_name=str(FIXTURES / "openthoughts_metadata.jsonl"),
        dataset_source="openthoughts",
        validation_size="4",
        max_train_samples="8",
        eval_strategy="steps",
        eval_steps="1",
        save_strategy="steps",
        save_steps="1",
        load_best_model_at_end="true",
        per_device_eval_batch_size="4",
    )
    argv = ["qwen3-1.7b-trace-rkl", *overrides, "--annotator", "regex", "--regex_error_patterns", r"\S+"]
    assert cli_main(["train", *argv]) == 0
    state = json.loads((output_dir / "trainer_state.json").read_text())
    evaluations = [entry for entry in state["log_history"] if "eval_rewards/accuracy_reward/mean" in entry]
    assert [entry["step"] for entry in evaluations] == [1, 2]
    assert state["best_model_checkpoint"] is not None and state["best_metric"] is not None
    assert state["best_metric"] == max(entry["eval_rewards/accuracy_reward/mean"] for entry in evaluations)
