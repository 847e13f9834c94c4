"""The KL channel's normalization and routing inside `_compute_loss`, for every GRPO loss type."""

from __future__ import annotations

import pytest
import torch
from trainer_helpers import make_trainer, math_dataset, trace_config
from trl import GRPOTrainer
from trl.trainer.utils import split_tensor_dict

from trace_trl.routing import Route
from trace_trl.spans import TokenLabel


LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]


def _trainer(model_dir, tokenizer, tmp_path, **overrides):
    args = trace_config(tmp_path, per_device_train_batch_size=8, num_generations=4, **overrides)
    trainer = make_trainer(model_dir, tokenizer, args)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def _batch(trainer, n=8):
    rows = [math_dataset()[i // 4] for i in range(n)]
    torch.manual_seed(1)
    return trainer._generate_and_score_completions(rows)


def _equal_length_mask(inputs, length):
    """Every row has exactly `length` loss tokens, so local-batch normalizers (bnpo) split evenly too."""
    mask = torch.zeros_like(inputs["completion_mask"])
    mask[:, :length] = 1
    return {**inputs, "completion_mask": mask, "num_items_in_batch": mask.sum()}


def _grads(trainer, batches, accumulation):
    model = trainer.model
    model.zero_grad()
    trainer.current_gradient_accumulation_steps = accumulation
    trainer.args.steps_per_generation = accumulation
    for batch in batches:
        trainer._compute_loss(model, batch).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradient_accumulation_over_halves_equals_the_full_batch(tiny_model_dir, tiny_tokenizer, tmp_path, loss_type):
    trainer = _trainer(tiny_model_dir, tiny_tokenizer, tmp_path, loss_type=loss_type)
    inputs = _equal_length_mask(_batch(trainer), length=6)
    assert (inputs["trace_route"] > 0).any()
    full = _grads(trainer, [inputs], accumulation=1)
    halves = _grads(trainer, split_tensor_dict(inputs, 2), accumulation=2)
    for name in full:
        torch.testing.assert_close(halves[name], full[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_padded_and_masked_tokens_contribute_exactly_zero(tiny_model_dir, tiny_tokenizer, tmp_path, loss_type):
    trainer = _trainer(tiny_model_dir, tiny_tokenizer, tmp_path, loss_type=loss_type)
    inputs = _equal_length_mask(_batch(trainer), length=5)
    reference = _grads(trainer, [inputs], accumulation=1)
    loss_ref = trainer._compute_loss(trainer.model, inputs).item()
    # Route every masked position to the KL channel and scramble the tokens there: nothing may change.
    masked = inputs["completion_mask"] == 0
    noisy_ids = inputs["completion_ids"].clone()
    noisy_ids[masked] = torch.randint(0, len(tiny_tokenizer), (int(masked.sum()),))
    teacher_ids = inputs["teacher_input_ids"].clone()
    teacher_ids[:, -noisy_ids.size(1) :] = noisy_ids
    route = inputs["trace_route"].clone()
    route[masked] = 1
    noisy = {**inputs, "completion_ids": noisy_ids, "teacher_input_ids": teacher_ids, "trace_route": route}
    assert trainer._compute_loss(trainer.model, noisy).item() == pytest.approx(loss_ref, rel=1e-5, abs=1e-7)
    for name, grad in _grads(trainer, [noisy], accumulation=1).items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize(
    ("mode", "kl_weight", "expected_on_routed"),
    [("exclusive", 1.0, 0.0), ("additive", 1.0, 1.0), ("complementary", 0.25, 0.75)],
)
def test_routed_token_grpo_modes_set_per_token_grpo_weights(
    tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch, mode, kl_weight, expected_on_routed
):
    # kl_weight 0.25 at step 3 of a linear decay from coef 1 over 4 steps, with no warm-up.
    schedule = {"kl_warmup_steps": 0, "kl_decay_steps": 4} if kl_weight < 1 else {}
    trainer = _trainer(tiny_model_dir, tiny_tokenizer, tmp_path, routed_token_grpo=mode, kl_coef=1.0, **schedule)
    inputs = _batch(trainer)
    trainer.state.global_step = 3 if kl_weight < 1 else 0
    assert trainer.current_kl_weight() == pytest.approx(kl_weight)
    seen = {}
    original = GRPOTrainer._compute_loss

    def spy(self, model, batch):
        seen["advantages"] = batch["advantages"]
        return original(self, model, batch)

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", spy)
    trainer._compute_loss(trainer.model, inputs)
    advantages = inputs["advantages"].unsqueeze(1).expand_as(seen["advantages"])
    weights = seen["advantages"] / advantages
    routed = (inputs["trace_route"] > 0) & (inputs["completion_mask"] > 0)
    nonzero = advantages != 0
    assert routed.any() and (~routed & nonzero).any()
    torch.testing.assert_close(
        weights[routed & nonzero], torch.full_like(weights[routed & nonzero], expected_on_routed)
    )
    torch.testing.assert_close(weights[~routed & nonzero], torch.ones_like(weights[~routed & nonzero]))
    # After the anneal every token is a GRPO token again: the inputs reach GRPO untouched.
    trainer.state.global_step = 10_000
    seen.clear()
    trainer._compute_loss(trainer.model, inputs)
    assert seen["advantages"] is inputs["advantages"]


def test_span_actions_choose_the_divergence_per_span_kind(tiny_model_dir, tiny_tokenizer, tmp_path):
    # Incorrect rollouts are sent too (they are not by default: error spans are not routed here), so that error labels
    # exist and can be seen left to GRPO.
    trainer = _trainer(
        tiny_model_dir,
        tiny_tokenizer,
        tmp_path,
        key_span_action="rkl",
        error_span_action="grpo",
        annotate_unrouted_kinds=True,
    )
    inputs = _batch(trainer)
    labels, route = inputs["trace_labels"], inputs["trace_route"]
    assert (labels == 1).any() and (labels == 2).any()
    assert (route[labels == TokenLabel.KEY] == Route.RKL).all(), "key spans routed to reverse KL"
    assert (route[labels == TokenLabel.ERROR] == Route.GRPO).all(), "error spans left to GRPO"
    assert (route[labels == TokenLabel.NONE] == Route.GRPO).all()
