"""The model card names TRACE, cites the paper and TRL, lists the TRACE settings, and never holds a secret."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from trainer_helpers import HalfSpanAnnotator, math_dataset, parity_reward, trace_config

from trace_trl import TRACETrainer
from trace_trl.annotators import AllTokensAnnotator, Annotation, RandomSpanAnnotator, RegexAnnotator
from trace_trl.model_card import (
    REDACTED,
    REPOSITORY_URL,
    add_trace_settings,
    annotator_card_settings,
    describe_base_model,
    redact,
    secret_values,
    trace_fields,
    trace_settings_section,
)


CANARY = "sk-test-CANARY-0123456789abcdef"


class LeakyAnnotator(HalfSpanAnnotator):
    """An API-style annotator that holds its key in every place a careless card writer might look."""

    def __init__(self) -> None:
        super().__init__()
        self.model = "judge-model"
        self.api_key = CANARY
        self._api_key = CANARY
        self.base_url = f"https://user:{CANARY}@annotator.internal/v1"
        self.headers = {"Authorization": f"Bearer {CANARY}"}

    def __repr__(self) -> str:  # a repr that would leak, to prove the card never uses it
        return f"LeakyAnnotator(api_key={self.api_key!r})"


class CardSettingsAnnotator(LeakyAnnotator):
    def card_settings(self) -> dict:
        # Even a careless `card_settings` that returns the key is filtered by name and by value type.
        return {"model": self.model, "api_key": self.api_key, "auth_token": CANARY, "headers": self.headers}


def _assert_clean(text: str) -> None:
    assert CANARY not in text
    assert "CANARY" not in text


def test_trace_fields_are_the_ones_grpo_lacks(tmp_path):
    fields = trace_fields(trace_config(tmp_path))
    for name in (
        "kl_coef",
        "kl_warmup_steps",
        "kl_decay_steps",
        "kl_decay",
        "key_span_action",
        "error_span_action",
        "routed_token_grpo",
        "teacher_kind",
        "annotation_failure",
    ):
        assert name in fields
    assert "learning_rate" not in fields and "output_dir" not in fields


def test_annotator_settings_allow_list():
    assert annotator_card_settings(None) == {"class": None}
    assert annotator_card_settings(AllTokensAnnotator()) == {
        "class": "AllTokensAnnotator",
        "kind_for_correct": "key",
        "kind_for_incorrect": "error",
    }
    regex = annotator_card_settings(RegexAnnotator(key_patterns=[RegexAnnotator.BOXED]))
    assert regex["key_patterns"] == [RegexAnnotator.BOXED]
    nested = annotator_card_settings(RandomSpanAnnotator(seed=3, like=AllTokensAnnotator()))
    assert nested["seed"] == 3 and nested["like"]["class"] == "AllTokensAnnotator"
    # Unknown classes without `card_settings()` give their class name only.
    assert annotator_card_settings(LeakyAnnotator()) == {"class": "LeakyAnnotator"}
    assert annotator_card_settings(CardSettingsAnnotator()) == {
        "class": "CardSettingsAnnotator",
        "model": "judge-model",
    }
    leaky_like = annotator_card_settings(RandomSpanAnnotator(like=LeakyAnnotator()))
    assert leaky_like["like"] == {"class": "LeakyAnnotator"}


def test_openai_annotator_card_settings(monkeypatch, tmp_path):
    openai_api = pytest.importorskip(
        "trace_trl.annotators.openai_api", reason="OpenAIAnnotator is not in this checkout"
    )
    monkeypatch.setenv("OPENAI_API_KEY", CANARY)
    annotator = openai_api.OpenAIAnnotator("gpt-test", base_url="http://127.0.0.1:9/v1", max_concurrency=7)
    settings = annotator_card_settings(annotator)
    assert settings["class"] == "OpenAIAnnotator" and settings["model"] == "gpt-test"
    assert settings["max_concurrency"] == 7 and "base_url" not in settings
    section = trace_settings_section(trace_config(tmp_path), RandomSpanAnnotator(like=annotator))
    assert "OpenAIAnnotator" in section and "gpt-test" in section
    _assert_clean(section)


def test_section_content(tmp_path):
    args = trace_config(tmp_path, kl_coef=0.5, key_span_action="grpo", error_span_action="rkl", teacher_kind="ema")
    section = trace_settings_section(args, RegexAnnotator(key_patterns=["a|b"]))
    assert section.startswith("## TRACE settings")
    assert "https://huggingface.co/papers/2605.10194" in section and "TRL" in section
    for row in (
        "| `kl_coef` | `0.5` |",
        "| `key_span_action` | `grpo` |",
        "| `error_span_action` | `rkl` |",
        "| `teacher_kind` | `ema` |",
        "| `teacher_context_template` | `default` |",
        "`RegexAnnotator`",
    ):
        assert row in section
    assert "a\\|b" in section  # a pipe in a pattern does not break the table
    # trace-trl is not on PyPI: the card links the repository users install from.
    assert f"[trace-trl]({REPOSITORY_URL})" in section and "pypi.org" not in section


def test_repository_url_is_the_package_url():
    import configparser
    from pathlib import Path

    parser = configparser.ConfigParser()
    parser.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    assert parser["metadata"]["url"] == REPOSITORY_URL


TRL_UNKNOWN_BASE = (
    "# Model Card for out\n\nThis model is a fine-tuned version of [None](https://huggingface.co/None) on the "
    "[my/data](https://huggingface.co/datasets/my/data) dataset.\n"
    "It has been trained using [TRL](https://github.com/huggingface/trl).\n"
)


def test_local_base_model_is_named_without_a_link():
    card = describe_base_model(TRL_UNKNOWN_BASE, "/models/qwen3-tiny")
    assert "[None]" not in card and "huggingface.co/None" not in card
    assert "fine-tuned version of the local model `/models/qwen3-tiny` on the [my/data]" in card


def test_unknown_base_model_is_not_named():
    for unknown in (None, ""):
        card = describe_base_model(TRL_UNKNOWN_BASE, unknown)
        assert "None" not in card
        assert "This model was fine-tuned on the [my/data](https://huggingface.co/datasets/my/data) dataset." in card
    without_dataset = "This model is a fine-tuned version of [None](https://huggingface.co/None).\n"
    assert describe_base_model(without_dataset, None) == "This model was fine-tuned.\n"


def test_hub_base_model_link_is_kept():
    card = "This model is a fine-tuned version of [Qwen/Qwen3-1.7B](https://huggingface.co/Qwen/Qwen3-1.7B).\n"
    assert describe_base_model(card, "Qwen/Qwen3-1.7B") == card


def test_redaction_of_environment_secrets(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", CANARY)
    monkeypatch.setenv("SHORT_KEY", "1")  # too short to redact safely: ordinary text is left alone
    secrets = secret_values(LeakyAnnotator())
    assert CANARY in secrets and "1" not in secrets
    assert redact(f"key={CANARY}; n=1", secrets) == f"key={REDACTED}; n=1"


def test_add_trace_settings_is_idempotent(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Card\n\nIntro.\n\n## Citations\n\nbib\n")
    args = trace_config(tmp_path)
    add_trace_settings(str(readme), args, None)
    add_trace_settings(str(readme), args, None)
    card = readme.read_text()
    assert card.count("## TRACE settings") == 1
    assert card.index("## TRACE settings") < card.index("## Citations")


def test_trained_model_card_and_saved_state_hold_no_secret(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", CANARY)
    annotator = CardSettingsAnnotator()
    args = trace_config(tmp_path, save_strategy="steps", save_steps=1, max_steps=1, hub_model_id="me/tiny-trace")
    trainer = TRACETrainer(
        tiny_model_dir,
        reward_funcs=parity_reward,
        args=args,
        train_dataset=math_dataset(4),
        annotator=annotator,
    )
    trainer.train()
    trainer.save_model()
    trainer.save_state()
    assert annotator.calls, "the annotator was used"

    output_dir = tmp_path / "out"
    card = (output_dir / "README.md").read_text()
    assert "TRACE" in card and "2605.10194" in card
    assert "https://github.com/huggingface/trl" in card and "vonwerra2020trl" in card
    assert "## TRACE settings" in card and "| `kl_coef` | `0.5` |" in card
    assert "`CardSettingsAnnotator` (model=`judge-model`)" in card
    assert "- trace" in card and "- self-distillation" in card
    # The base model is a local folder: named plainly, never TRL's "[None](https://huggingface.co/None)".
    assert "[None]" not in card and f"fine-tuned version of the local model `{tiny_model_dir}`" in card
    _assert_clean(card)

    checkpoint = output_dir / "checkpoint-1"
    for path in (output_dir / "trainer_state.json", checkpoint / "trainer_state.json"):
        _assert_clean(path.read_text())
    for path in (output_dir / "training_args.bin", checkpoint / "training_args.bin"):
        assert b"CANARY" not in path.read_bytes()
        saved = torch.load(path, weights_only=False)
        _assert_clean(saved.to_json_string())
        _assert_clean(json.dumps(saved.to_dict(), default=str))
        _assert_clean(repr(pickle.dumps(saved)))
    for path in output_dir.rglob("*"):
        if path.is_file() and path.suffix in {".json", ".md", ".txt", ".jinja"}:
            _assert_clean(path.read_text(errors="replace"))


def test_save_model_elsewhere_writes_no_card_there(tiny_model_dir, tmp_path):
    args = trace_config(tmp_path, kl_coef=0.0)
    trainer = TRACETrainer(tiny_model_dir, reward_funcs=parity_reward, args=args, train_dataset=math_dataset(4))
    other = tmp_path / "export"
    trainer.save_model(str(other))
    assert not (other / "README.md").exists()
    trainer.save_model()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## TRACE settings" in card
    assert "[None]" not in card and f"the local model `{tiny_model_dir}`" in card


def test_failed_annotations_are_cards_too(tmp_path):
    # A failing annotator class is still named in the card; its error strings never are.
    class Failing:
        def __call__(self, requests):
            return [Annotation.failure(f"401 for key {CANARY}") for _ in requests]

    section = trace_settings_section(trace_config(tmp_path), Failing())
    assert "`Failing`" in section
    _assert_clean(section)
