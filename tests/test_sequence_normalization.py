"""The paper's sequence-normalized KL loss: exactly (1/R) sum_y (1/|y|) sum_{t routed in y} D_t per optimizer step,
whatever the split into accumulation micro-batches, checked against an independent float64 reference. The split into
processes is checked by `test_multiprocess.py` (two gloo processes equal one process on the global batch)."""

from __future__ import annotations

import pytest
import torch
from trainer_helpers import make_trainer, math_dataset, trace_config
from transformers import AutoModelForCausalLM
from trl.trainer.utils import split_tensor_dict

from trace_trl.annotators import Annotation
from trace_trl.losses import sequence_normalize
from trace_trl.spans import Span


def test_sequence_normalize_matches_its_definition():
    torch.manual_seed(0)
    per_token = torch.rand(4, 6, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]]).double()
    routed = torch.zeros_like(mask)
    routed[0, :2] = routed[1, 3] = routed[3, 0] = 1
    per_token = per_token * routed
    expected = (per_token[0, :2].sum() / 3 + per_token[1, 3] / 6 + 0.0 + per_token[3, 0] / 1) / 4
    torch.testing.assert_close(sequence_normalize(per_token, mask), expected)
    # Two accumulation micro-batches of two rows each sum to the full batch.
    halves = sum(
        sequence_normalize(per_token[i : i + 2], mask[i : i + 2], gradient_accumulation_steps=2) for i in (0, 2)
    )
    torch.testing.assert_close(halves, expected)


class EveryOtherRolloutAnnotator:
    """Marks two separate spans in even-numbered rollouts and nothing in the others (which still count in R)."""

    def __call__(self, requests):
        out = []
        for i, r in enumerate(requests):
            n = len(r.completion)
            kind = "key" if r.is_correct else "error"
            spans = (Span(0, n // 3, kind), Span(n // 2, n, kind)) if i % 2 == 0 and n >= 3 else ()
            out.append(Annotation(spans=spans))
        return out


def _reward(value: float):
    def reward(completions, **kwargs):
        return [value for _ in completions]

    reward.__name__ = f"constant_{int(value)}"
    return reward


def _float64_reference(model_dir, trainer, model, inputs, kind: str, term_clip: float | None):
    """`(1/R) sum_y (1/|y|) sum_t D_t` from ordinary dense forwards of a float64 copy, and its gradients."""
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)  # a fresh model: no patched forward
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    ref.train()
    prompt_width, width = inputs["prompt_ids"].size(1), inputs["completion_ids"].size(1)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    student = ref(input_ids=ids, attention_mask=attn).logits[:, prompt_width - 1 : -1] / trainer.temperature
    with torch.no_grad():
        t_ids, t_attn = inputs["teacher_input_ids"], inputs["teacher_attention_mask"]
        teacher = ref(input_ids=t_ids, attention_mask=t_attn).logits[:, -width - 1 : -1] / trainer.temperature
    log_s, log_t = student.log_softmax(-1), teacher.log_softmax(-1)
    terms = log_t.exp() * (log_t - log_s) if kind == "fkl" else log_s.exp() * (log_s - log_t)
    if term_clip is not None:
        terms = torch.where(terms > term_clip, torch.full_like(terms, term_clip), terms)
    per_token = terms.sum(-1)
    mask = inputs["completion_mask"].double()
    routed = (inputs["trace_route"] != 0).double() * mask
    per_rollout = (per_token * routed).sum(-1) / mask.sum(-1).clamp(min=1.0)
    loss = per_rollout.mean()  # R = every rollout of the step, routed or not
    loss.backward()
    return loss.item(), {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    ("reward", "actions", "kind"),
    [(1.0, {"key_span_action": "fkl"}, "fkl"), (0.0, {"error_span_action": "rkl", "key_span_action": "grpo"}, "rkl")],
    ids=["fkl-on-key-spans", "rkl-on-error-spans"],
)
def test_kl_loss_equals_the_float64_reference_for_every_accumulation_split(
    tiny_model_dir, tiny_tokenizer, tmp_path, reward, actions, kind
):
    # Constant rewards make every GRPO advantage zero, so the gradient is the KL channel's alone (weight 1).
    args = trace_config(
        tmp_path,
        per_device_train_batch_size=8,
        num_generations=4,
        kl_coef=1.0,
        teacher_kind="base",
        kl_term_clip=None,
        max_routed_fraction=None,
        kl_normalization="sequence",
        **actions,
    )
    trainer = make_trainer(tiny_model_dir, tiny_tokenizer, args, EveryOtherRolloutAnnotator(), reward=_reward(reward))
    model = trainer.model
    model.train()
    rows = [math_dataset()[i // 4] for i in range(8)]
    torch.manual_seed(3)
    inputs = trainer._generate_and_score_completions(rows)
    # Rollouts of different lengths make |y| matter (the tiny model never stops early): mask their ends, as EOS would.
    mask = inputs["completion_mask"].clone()
    for i, length in enumerate([10, 7, 4, 9, 6, 10, 3, 8]):
        mask[i, length:] = 0
    inputs = {**inputs, "completion_mask": mask, "num_items_in_batch": mask.sum()}
    assert torch.all(inputs["advantages"] == 0)
    routed_rows = (inputs["trace_route"] != 0).any(1)
    lengths = inputs["completion_mask"].sum(1)
    assert routed_rows.any() and not routed_rows.all(), "some rollouts route nothing and must still count in R"
    assert len(set(lengths.tolist())) > 1, "rollouts of different lengths make |y| matter"

    ref_loss, ref_grads = _float64_reference(tiny_model_dir, trainer, model, inputs, kind, term_clip=None)
    for accumulation, steps_per_generation in ((1, 1), (2, 2), (4, 2), (8, 4)):
        model.zero_grad()
        trainer.current_gradient_accumulation_steps = accumulation
        trainer.args.steps_per_generation = steps_per_generation
        total = 0.0
        for batch in split_tensor_dict(inputs, accumulation):
            loss = trainer._compute_loss(model, batch)
            loss.backward()
            total += loss.item()
        assert total == pytest.approx(ref_loss, rel=1e-4), (accumulation, steps_per_generation)
        for name, grad in ref_grads.items():
            ours = model.get_parameter(name).grad
            torch.testing.assert_close(
                ours.double(), grad, rtol=2e-3, atol=1e-6, msg=f"{name} (G={accumulation}, S={steps_per_generation})"
            )
