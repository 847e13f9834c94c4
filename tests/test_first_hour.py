"""A new user's first hour: configs converted from GRPO, errors at init that say what to do."""

from __future__ import annotations

import dataclasses

import pytest
from trainer_helpers import TRAINING_ARGS, HalfSpanAnnotator, math_dataset, parity_reward, trace_config
from trl import GRPOConfig

from trace_trl import TRACEConfig, TRACETrainer
from trace_trl.annotators import RegexAnnotator


def _grpo_config(tmp_path) -> GRPOConfig:
    return GRPOConfig(
        output_dir=str(tmp_path / "grpo"), **{**TRAINING_ARGS, "learning_rate": 3e-6, "steps_per_generation": 2}
    )


def test_grpo_config_to_dict_does_not_convert_but_from_grpo_config_does(tmp_path):
    grpo = _grpo_config(tmp_path)
    with pytest.raises(ValueError):  # the conversion users try first; the error hint points at from_grpo_config
        TRACEConfig(**grpo.to_dict())
    trace = TRACEConfig.from_grpo_config(grpo, kl_coef=0.25, key_span_action="rkl")
    assert isinstance(trace, TRACEConfig)
    for f in dataclasses.fields(GRPOConfig):
        assert getattr(trace, f.name) == getattr(grpo, f.name), f.name
    assert trace.kl_coef == 0.25 and trace.key_span_action == "rkl"
    assert trace.kl_term_clip == 0.05 and trace.teacher_kind == "synced"  # the other TRACE fields: the defaults
    trace.learning_rate = 1.0
    assert grpo.learning_rate == 3e-6, "the GRPOConfig must not be shared"


def test_from_grpo_config_validates_and_names_wrong_fields(tmp_path):
    grpo = _grpo_config(tmp_path)
    with pytest.raises(ValueError, match="`kl_coef` must be >= 0"):
        TRACEConfig.from_grpo_config(grpo, kl_coef=-1.0)
    with pytest.raises(TypeError, match=r"\['learning_rate'\] are GRPOConfig fields"):
        TRACEConfig.from_grpo_config(grpo, learning_rate=1e-5)
    with pytest.raises(TypeError, match=r"Unknown TRACE field\(s\) \['kl_cof'\].*TRACE fields are"):
        TRACEConfig.from_grpo_config(grpo, kl_cof=0.5)
    with pytest.raises(TypeError, match="takes a GRPOConfig"):
        TRACEConfig.from_grpo_config({"learning_rate": 1e-6})


def test_trainer_accepts_a_converted_config_and_the_grpo_hint_works(tiny_model_dir, tiny_tokenizer, tmp_path):
    grpo = _grpo_config(tmp_path)
    with pytest.raises(TypeError, match=r"TRACEConfig.from_grpo_config\(grpo_config"):
        TRACETrainer(
            tiny_model_dir, parity_reward, args=grpo, train_dataset=math_dataset(), processing_class=tiny_tokenizer
        )
    trainer = TRACETrainer(
        tiny_model_dir,
        parity_reward,
        args=TRACEConfig.from_grpo_config(grpo, teacher_kind="live"),
        train_dataset=math_dataset(),
        processing_class=tiny_tokenizer,
        annotator=HalfSpanAnnotator(),
    )
    assert trainer.args.steps_per_generation == 2


def test_no_args_and_no_annotator_gives_advice_that_works(tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"pass `args=TRACEConfig\(output_dir=\.\.\., kl_coef=0\)`") as info:
        TRACETrainer(tiny_model_dir, parity_reward, train_dataset=math_dataset(), processing_class=tiny_tokenizer)
    assert "RegexAnnotator(key_patterns=[RegexAnnotator.BOXED])" in str(info.value)
    # The advice, followed as written, works.
    TRACETrainer(
        tiny_model_dir,
        parity_reward,
        args=TRACEConfig(output_dir=str(tmp_path / "o"), kl_coef=0, use_cpu=True, bf16=False, report_to="none"),
        train_dataset=math_dataset(),
        processing_class=tiny_tokenizer,
    )
    TRACETrainer(
        tiny_model_dir,
        parity_reward,
        args=trace_config(tmp_path),
        train_dataset=math_dataset(),
        processing_class=tiny_tokenizer,
        annotator=RegexAnnotator(key_patterns=[RegexAnnotator.BOXED]),
    )


def test_annotator_class_instead_of_instance_is_refused_at_init(tiny_model_dir, tiny_tokenizer, tmp_path):
    with pytest.raises(
        TypeError, match=r"the class RegexAnnotator, not an instance: pass `annotator=RegexAnnotator\(\.\.\.\)`"
    ):
        TRACETrainer(
            tiny_model_dir,
            parity_reward,
            args=trace_config(tmp_path),
            train_dataset=math_dataset(),
            processing_class=tiny_tokenizer,
            annotator=RegexAnnotator,
        )
