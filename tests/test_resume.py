"""Exact resume: a run stopped at a checkpoint and resumed ends with the same weights as an uninterrupted run.

Everything that decides the next steps must come back: the weights and optimizer (Trainer), the RNG state (Trainer's
`rng_state.pth`, so regenerated rollouts are the same), the data position (Trainer skips consumed batches), the KL
schedule (a pure function of `global_step`), the EMA teacher (`trace_teacher_state.pt`) and the deterministic
annotator (stateless here).
"""

from __future__ import annotations

import os

import pytest
import torch
from trainer_helpers import make_trainer, trace_config


def _make(model_dir, tokenizer, output_dir, peft, **overrides):
    args = trace_config(
        output_dir,
        save_strategy="steps",
        save_steps=2,
        max_steps=4,
        kl_warmup_steps=1,
        kl_decay_steps=4,
        **overrides,
    )
    args.output_dir = str(output_dir)
    return make_trainer(model_dir, tokenizer, args, peft=peft)


def _weights(trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("peft", "teacher_kind"),
    [(False, "ema"), (True, "ema")],
    ids=["full-ema", "lora-ema"],
)
def test_stop_and_resume_ends_with_the_uninterrupted_weights(
    tiny_model_dir, tiny_tokenizer, tmp_path, peft, teacher_kind
):
    uninterrupted = _make(tiny_model_dir, tiny_tokenizer, tmp_path / "full", peft, teacher_kind=teacher_kind)
    uninterrupted.train()
    expected = _weights(uninterrupted)
    expected_teacher = uninterrupted.teacher.state_dict(uninterrupted.accelerator.unwrap_model(uninterrupted.model))
    losses = {r["step"]: r["loss"] for r in uninterrupted.state.log_history if "loss" in r}

    # "Stop" after step 2: a fresh process-like trainer resumes from checkpoint-2 of the same run.
    checkpoint = os.path.join(uninterrupted.args.output_dir, "checkpoint-2")
    resumed = _make(tiny_model_dir, tiny_tokenizer, tmp_path / "resumed", peft, teacher_kind=teacher_kind)
    resumed.train(resume_from_checkpoint=checkpoint)
    actual = _weights(resumed)
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), (
            f"{name}: resumed weights differ by {(actual[name] - expected[name]).abs().max():.3g}"
        )
    teacher = resumed.teacher.state_dict(resumed.accelerator.unwrap_model(resumed.model))
    for name in expected_teacher:
        torch.testing.assert_close(teacher[name], expected_teacher[name], rtol=0, atol=1e-6, msg=name)
    resumed_losses = {r["step"]: r["loss"] for r in resumed.state.log_history if "loss" in r}
    for step in (3, 4):
        assert resumed_losses[step] == pytest.approx(losses[step], abs=1e-6)


@pytest.mark.parametrize(
    ("ga", "spg", "iterations", "save_steps", "warns"),
    [
        (1, 1, 1, 3, False),
        (2, 2, 1, 1, False),
        (1, 2, 1, 3, True),
        (1, 2, 1, 2, False),
        (2, 2, 2, 1, True),
        (2, 2, 2, 2, False),
        (4, 2, 1, 1, False),
    ],
)
def test_checkpoint_inside_a_generation_window_warns(tmp_path, caplog, ga, spg, iterations, save_steps, warns):
    """GRPO regenerates after a resume: a checkpoint in the middle of a generation window cannot resume exactly."""
    import logging

    from trace_trl.trainer import _warn_if_resume_is_inexact

    args = trace_config(
        tmp_path,
        gradient_accumulation_steps=ga,
        steps_per_generation=spg,
        num_iterations=iterations,
        save_strategy="steps",
        save_steps=save_steps,
        per_device_train_batch_size=4 * spg // ga if spg > ga else 4,
    )
    with caplog.at_level(logging.WARNING, logger="trace_trl"):
        _warn_if_resume_is_inexact(args)
    assert any("generation window" in r.getMessage() for r in caplog.records) == warns
