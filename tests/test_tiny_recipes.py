"""`trace-trl train RECIPE --tiny`: any shipped recipe runs on a CPU, offline, in seconds, with its method intact."""

from __future__ import annotations

import json

import pytest
import yaml

from trace_trl.cli import main as cli_main
from trace_trl.scripts.tiny_recipe import alternating_correctness_reward, offline_annotator, tiny_overrides
from trace_trl.scripts.train import list_recipes, parse_args, resolve_recipe


def _recipe(name: str) -> dict:
    with open(resolve_recipe(name)) as f:
        return yaml.safe_load(f)


def test_server_annotators_become_offline_ones_of_the_same_family():
    assert offline_annotator("openai") == "regex"
    assert offline_annotator("random_like_openai") == "random"
    assert offline_annotator("inverted_openai") == "inverted_regex"
    for kept in ("regex", "all_tokens", "random", "self", "inverted_self", "none", None):
        assert offline_annotator(kept) == kept


def test_alternating_correctness_marks_half_of_each_batch():
    assert alternating_correctness_reward(["a", "b", "c", "d"]) == [1.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("name", list_recipes())
def test_every_recipe_parses_with_the_tiny_overrides_and_keeps_its_method(name, tmp_path, monkeypatch):
    from trace_trl import tiny_recipe

    # The model and data builders are exercised by the runs below; here only the overrides are checked.
    monkeypatch.setattr(tiny_recipe, "build_tiny_model", lambda output_dir, dataset_path: str(output_dir))
    recipe = _recipe(name)
    argv = [name, *tiny_overrides(recipe, tmp_path), "--max_steps", "3"]
    script_args, training_args, model_args = parse_args(argv)
    assert training_args.use_cpu and not training_args.bf16 and not training_args.use_vllm
    assert training_args.max_steps == 3  # flags after --tiny win
    assert model_args.dtype == "float32" and model_args.model_name_or_path == str(tmp_path / "model")
    assert script_args.dataset_source == "custom" and script_args.dataset_name.endswith("problems.jsonl")
    assert script_args.annotator == offline_annotator(recipe.get("annotator"))
    # The method is the recipe's.
    for field in ("kl_coef", "key_span_action", "error_span_action", "kl_warmup_steps", "kl_term_clip", "loss_type"):
        if field in recipe:
            assert getattr(training_args, field) == recipe[field], field
    assert script_args.reward_funcs[:-1] == recipe["reward_funcs"]
    assert training_args.reward_weights == [*recipe["reward_weights"], 0.0]
    assert training_args.correctness_reward_func == "alternating_correctness_reward"
    assert model_args.use_peft == bool(recipe.get("use_peft", False))


@pytest.mark.slow
@pytest.mark.parametrize("name, routed_metric", [("qwen3-8b-trace-fkl", "trace/fkl_mean"),
                                                 ("qwen3-1.7b-trace-rkl", "trace/rkl_mean")])  # fmt: skip
def test_paper_recipes_run_tiny_on_cpu_and_route_tokens(name, routed_metric, tmp_path):
    output_dir = tmp_path / "run"
    assert cli_main(["train", name, "--tiny", "--output_dir", str(output_dir)]) == 0
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    steps = [entry for entry in state["log_history"] if "trace/kl_weight" in entry]
    assert [entry["trace/kl_weight"] for entry in steps] == [0.5, 0.5]  # the recipe's warm-up weight
    assert any((entry.get(routed_metric) or 0.0) > 0 for entry in steps), "the recipe's KL channel routed tokens"
    card = (output_dir / "README.md").read_text()
    assert "## TRACE settings" in card and "RegexAnnotator" in card
