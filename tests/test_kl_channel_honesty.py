"""The KL channel says what it does: metrics beside the clipped value, micro-steps that route nothing still counted,
baselines that mean what their names say (no silent zero-GRPO, no silent prefix, a token-disjoint inverted control),
and a warning when correctness is a sum of unrelated rewards."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from trainer_helpers import constant_reward, make_trainer, math_dataset, parity_reward, trace_config

from trace_trl import TRACEConfig
from trace_trl.annotators import AllTokensAnnotator, AnnotationRequest, InvertedSpanAnnotator
from trace_trl.spans import Span, token_char_offsets, token_labels


def _logged(trainer, key):
    return [r[key] for r in trainer.state.log_history if key in r]


def test_metrics_show_the_unclipped_divergence_and_the_clipped_share(tiny_model_dir, tiny_tokenizer, tmp_path):
    """A tiny clip bounds every routed token: the loss's mean is at most the clip, the true divergence is larger and
    logged, the clipped share is 1; with the element clip the logged "KL" is below the true one as well."""
    for mode in ("token", "element"):
        args = trace_config(tmp_path / mode, kl_term_clip=1e-6, kl_clip_mode=mode, max_steps=1)
        trainer = make_trainer(tiny_model_dir, tiny_tokenizer, args, reward=constant_reward)
        trainer.train()
        clipped, unclipped = _logged(trainer, "trace/fkl_mean"), _logged(trainer, "trace/fkl_unclipped_mean")
        assert unclipped and unclipped[0] > 1e-4
        assert clipped[0] < unclipped[0]
        if mode == "token":
            assert clipped[0] == pytest.approx(1e-6, rel=1e-3)
        assert _logged(trainer, "trace/fkl_clipped_frac")[0] == pytest.approx(1.0)
        assert _logged(trainer, "trace/fkl_token_frac")[0] == pytest.approx(
            _logged(trainer, "trace/routed_token_frac")[0]
        )
        rkl = _logged(trainer, "trace/rkl_mean")[0]
        assert rkl is None or math.isnan(rkl)  # nothing of that kind routed (TRL logs a NaN mean as None)
        # Each routed token's unclipped divergence is kept for inspection.
        assert set(trainer.last_routed_divergences) == {"fkl", "rkl"}
        assert trainer.last_routed_divergences["fkl"].numel() > 0


def test_without_a_clip_nothing_counts_as_clipped(tiny_model_dir, tiny_tokenizer, tmp_path):
    args = trace_config(tmp_path, kl_term_clip=None, max_steps=1)
    trainer = make_trainer(tiny_model_dir, tiny_tokenizer, args, reward=constant_reward)
    trainer.train()
    assert _logged(trainer, "trace/fkl_clipped_frac") == [0.0]
    assert _logged(trainer, "trace/fkl_mean")[0] == pytest.approx(_logged(trainer, "trace/fkl_unclipped_mean")[0])


def test_micro_steps_that_route_nothing_count_in_the_routed_fraction_and_entropies(
    tiny_model_dir, tiny_tokenizer, tmp_path
):
    """Under TRACE-RKL with every rollout correct (annotated anyway, `annotate_unrouted_kinds`), key spans are
    labelled but nothing is routed: the KL-phase steps log a routed fraction of 0 (not nothing, which would bias the
    mean up), the key-span entropy, the labelled fraction, and no exposure."""
    args = trace_config(
        tmp_path, key_span_action="grpo", error_span_action="rkl", max_steps=2, annotate_unrouted_kinds=True
    )
    trainer = make_trainer(tiny_model_dir, tiny_tokenizer, args, reward=constant_reward)  # every rollout correct
    trainer.train()
    assert _logged(trainer, "trace/routed_token_frac") == [0.0, 0.0]
    assert all(v > 0 for v in _logged(trainer, "trace/key_label_frac"))
    assert all(v > 0 for v in _logged(trainer, "trace/entropy_key"))
    assert _logged(trainer, "trace/privileged_exposure") == [0.0, 0.0]
    assert trainer.privileged_exposure == 0.0


def test_exposure_is_the_sum_of_weight_times_routed_tokens(tiny_model_dir, tiny_tokenizer, tmp_path):
    args = trace_config(tmp_path, kl_coef=0.5, max_steps=2)
    trainer = make_trainer(tiny_model_dir, tiny_tokenizer, args, reward=constant_reward)
    trainer.train()
    # kl_weight is 0.5 throughout (a long warm-up): exposure / 0.5 counts routed tokens, an integer.
    exposure = _logged(trainer, "trace/privileged_exposure")
    assert exposure[0] > 0 and exposure[1] > exposure[0]
    assert exposure[-1] == trainer.privileged_exposure
    assert (2 * trainer.privileged_exposure) == pytest.approx(round(2 * trainer.privileged_exposure))


def test_constant_kl_with_complementary_grpo_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"kl_decay='none'.*routed_token_grpo='complementary'.*additive"):
        TRACEConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, kl_decay="none")
    for mode in ("additive", "exclusive"):
        TRACEConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, kl_decay="none", routed_token_grpo=mode)
    # GRPO (kl_coef=0) never reaches the channel, so the combination means nothing there.
    TRACEConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, kl_decay="none", kl_coef=0.0)


def test_clip_mode_is_validated(tmp_path):
    with pytest.raises(ValueError, match="kl_clip_mode"):
        TRACEConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, kl_clip_mode="tokens")


def test_all_tokens_annotator_under_a_cap_is_refused(tiny_model_dir, tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"AllTokensAnnotator.*max_routed_fraction=0.25.*prefix"):
        make_trainer(tiny_model_dir, tiny_tokenizer, trace_config(tmp_path), AllTokensAnnotator())
    trainer = make_trainer(
        tiny_model_dir, tiny_tokenizer, trace_config(tmp_path, max_routed_fraction=None), AllTokensAnnotator()
    )
    assert trainer.args.max_routed_fraction is None


def test_several_rewards_without_a_correctness_reward_warn(tiny_model_dir, tiny_tokenizer, tmp_path, caplog):
    from trainer_helpers import HalfSpanAnnotator

    from trace_trl.trainer import TRACETrainer

    with caplog.at_level(logging.WARNING, logger="trace_trl"):
        TRACETrainer(
            model=tiny_model_dir,
            reward_funcs=[parity_reward, constant_reward],
            args=trace_config(tmp_path),
            train_dataset=math_dataset(),
            processing_class=tiny_tokenizer,
            annotator=HalfSpanAnnotator(),
        )
    assert "correctness_reward_func" in caplog.text and "parity_reward" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trace_trl"):
        TRACETrainer(
            model=tiny_model_dir,
            reward_funcs=[parity_reward, constant_reward],
            args=trace_config(tmp_path, correctness_reward_func="parity_reward"),
            train_dataset=math_dataset(),
            processing_class=tiny_tokenizer,
            annotator=HalfSpanAnnotator(),
        )
    assert "correctness_reward_func" not in caplog.text


class _Fixed:
    def __init__(self, spans):
        self.spans = spans

    def __call__(self, requests):
        from trace_trl.annotators import Annotation

        return [Annotation(spans=tuple(self.spans)) for _ in requests]


def test_inverted_control_is_token_disjoint_from_the_key_spans(qwen_tokenizer):
    """A key span that ends inside a token makes that token a key token; the inverted control must then not route it,
    although its other characters lie outside the key span. Checked on the real Qwen vocabulary, over many seeds."""
    text = "Therefore the total is 12345678 apples, and 98765 oranges remain after everything."
    ids = qwen_tokenizer(text, add_special_tokens=False)["input_ids"]
    offsets = token_char_offsets(ids, qwen_tokenizer)
    # Key spans that cut tokens in the middle.
    multi = [(s, e) for s, e in offsets if e - s >= 3]
    key = [Span(multi[1][0] + 1, multi[2][0] + 1, "key"), Span(multi[5][0] + 2, multi[5][1] - 1, "key")]
    key_tokens = {i for i, label in enumerate(token_labels(ids, key, qwen_tokenizer)) if label}
    request = AnnotationRequest(prompt="p", completion=text, is_correct=True, reward=1.0, token_offsets=tuple(offsets))
    character_only = AnnotationRequest(prompt="p", completion=text, is_correct=True, reward=1.0)
    shared = 0
    for seed in range(40):
        control = InvertedSpanAnnotator(_Fixed(key), fraction=0.5, seed=seed)
        (annotation,) = control([request])
        inverted_tokens = {i for i, label in enumerate(token_labels(ids, annotation.spans, qwen_tokenizer)) if label}
        assert inverted_tokens and not inverted_tokens & key_tokens
        (loose,) = control([character_only])
        loose_tokens = {i for i, label in enumerate(token_labels(ids, loose.spans, qwen_tokenizer)) if label}
        shared += bool(loose_tokens & key_tokens)
    assert shared > 0, "without token boundaries the control shares boundary tokens: the case is not vacuous"


def test_the_trainer_gives_annotators_the_rollouts_token_boundaries(tiny_model_dir, tiny_tokenizer, tmp_path):
    seen = []

    def recording(requests):
        from trace_trl.annotators import Annotation

        seen.extend(requests)
        return [Annotation() for _ in requests]

    trainer = make_trainer(tiny_model_dir, tiny_tokenizer, trace_config(tmp_path, max_steps=1), recording)
    trainer.train()
    assert seen
    for request in seen:
        assert request.token_offsets is not None
        assert all(0 <= s <= e <= len(request.completion) for s, e in request.token_offsets)
        assert torch.tensor([e for _, e in request.token_offsets]).max().item() == len(request.completion) or not (
            request.completion
        )


@pytest.mark.parametrize(("clip", "mode"), [(0.05, "token"), (None, "token"), (1e-3, "token")])
def test_a_training_step_on_the_kl_channel_alone_lowers_the_true_divergence(
    tiny_model_dir, tiny_tokenizer, tmp_path, clip, mode
):
    """End to end, the direction of the whole channel: all advantages zero (GRPO contributes no gradient), so one
    optimizer step is a step on the KL alone. The same generation batch is trained on twice (`num_iterations=2`) against
    the same synced teacher, so the second step sees the same routed tokens: their true (unclipped) divergence must
    have gone down, whatever the clip bounds."""
    args = trace_config(
        tmp_path, kl_term_clip=clip, kl_clip_mode=mode, max_steps=2, num_iterations=2, learning_rate=1e-3,
        optim="sgd",
    )  # fmt: skip
    trainer = make_trainer(tiny_model_dir, tiny_tokenizer, args, reward=constant_reward)
    seen = []
    original = trainer._compute_loss

    def recording(model, inputs):
        loss = original(model, inputs)
        seen.append(trainer.last_routed_divergences["fkl"].sum().item())
        return loss

    trainer._compute_loss = recording
    trainer.train()
    before, after = seen
    assert before > 0
    assert after < before, (before, after)
