"""The KL channel's pure functions: values and gradients against dense references and TRL's own helpers."""

from __future__ import annotations

import math

import pytest
import torch

from trace_trl.losses import (
    grpo_token_weights,
    normalize_like_grpo,
    output_logits,
    routed_divergence,
    token_divergence,
)


def _dense_kl(student_logits, teacher_logits, kind, temperature=1.0):
    log_s = torch.log_softmax(student_logits.double() / temperature, -1)
    log_t = torch.log_softmax(teacher_logits.double() / temperature, -1)
    if kind == "fkl":
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    return (log_s.exp() * (log_s - log_t)).sum(-1)


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(6, 50) * 3, torch.randn(6, 50) * 3


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_token_divergence_matches_dense_reference_in_value_and_gradient(logits, kind, temperature):
    student, teacher = logits
    student = student.clone().requires_grad_(True)
    ours = token_divergence(student, teacher, kind, temperature=temperature)
    reference = _dense_kl(student, teacher, kind, temperature)
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours.sum(), student)
    (g_ref,) = torch.autograd.grad(reference.sum(), student)
    torch.testing.assert_close(g_ours.double(), g_ref.double(), rtol=1e-4, atol=1e-6)
    assert (ours >= -1e-6).all()


@pytest.mark.parametrize(("kind", "alpha"), [("fkl", 0.0), ("rkl", 1.0)])
def test_token_divergence_matches_trl_compute_divergence(logits, kind, alpha):
    from trl.experimental.sdpo.loss_utils import compute_divergence

    student, teacher = logits
    student_a = student.clone().requires_grad_(True)
    student_b = student.clone().requires_grad_(True)
    ours = token_divergence(student_a, teacher, kind)
    theirs = compute_divergence(torch.log_softmax(student_b, -1), torch.log_softmax(teacher, -1), alpha)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours.sum(), student_a)
    (g_theirs,) = torch.autograd.grad(theirs.sum(), student_b)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
@pytest.mark.parametrize("topk", [None, 5])
def test_teacher_receives_no_gradient(logits, kind, topk):
    student, teacher = (t.clone().requires_grad_(True) for t in logits)
    token_divergence(student, teacher, kind, topk=topk).sum().backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
def test_topk_is_the_kl_of_the_coarsened_distributions(logits, kind):
    """Support = top-k of the expectation's distribution (teacher for FKL, student for RKL) plus one tail bucket."""
    student, teacher = logits
    k = 4
    ours = token_divergence(student, teacher, kind, topk=k)
    for row in range(student.size(0)):
        p_s, p_t = torch.softmax(student[row].double(), -1), torch.softmax(teacher[row].double(), -1)
        anchor = p_t if kind == "fkl" else p_s
        support = anchor.argsort(descending=True)[:k].tolist()
        rest = [v for v in range(student.size(1)) if v not in support]
        q_s = torch.cat([p_s[support], p_s[rest].sum().reshape(1)])
        q_t = torch.cat([p_t[support], p_t[rest].sum().reshape(1)])
        expected = (q_t * (q_t / q_s).log()).sum() if kind == "fkl" else (q_s * (q_s / q_t).log()).sum()
        assert math.isclose(ours[row].item(), expected.item(), rel_tol=1e-4, abs_tol=1e-6)
    # A coarsening never increases the KL, and a support of the whole vocabulary is the full KL.
    assert (ours <= token_divergence(student, teacher, kind) + 1e-5).all()
    torch.testing.assert_close(
        token_divergence(student, teacher, kind, topk=49), token_divergence(student, teacher, kind)
    )


def test_token_divergence_rejects_bad_input(logits):
    student, teacher = logits
    with pytest.raises(ValueError, match="kind"):
        token_divergence(student, teacher, "jsd")
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        token_divergence(student, teacher[:, :10], "fkl")
    with pytest.raises(ValueError, match="temperature"):
        token_divergence(student, teacher, "fkl", temperature=0.0)


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
@pytest.mark.parametrize("topk", [None, 7])
@pytest.mark.parametrize(("term_clip", "clip_mode"), [(None, "token"), (0.05, "token"), (0.05, "element")])
def test_routed_divergence_equals_dense_logits_path(kind, topk, term_clip, clip_mode):
    """The chunked hidden-state path equals materialized logits, in value and in all student gradients."""
    torch.manual_seed(1)
    n, hidden, vocab = 11, 16, 300
    weight = torch.randn(vocab, hidden, requires_grad=True)
    bias = torch.randn(vocab, requires_grad=True)
    student_h = torch.randn(n, hidden, requires_grad=True)
    teacher_h = torch.randn(n, hidden)
    teacher_w = weight.detach() + 0.1 * torch.randn(vocab, hidden)
    ours = routed_divergence(
        student_h,
        teacher_h,
        (weight, bias),
        (teacher_w, None),
        kind,
        topk=topk,
        temperature=0.8,
        chunk_size=4,
        logit_scale=0.9,
        final_logit_softcapping=30.0,
        term_clip=term_clip,
        clip_mode=clip_mode,
    )
    head = {"logit_scale": 0.9, "final_logit_softcapping": 30.0}
    dense = token_divergence(
        output_logits(student_h, weight, bias, **head),
        output_logits(teacher_h, teacher_w, None, **head),
        kind,
        topk=topk,
        temperature=0.8,
        term_clip=term_clip,
        clip_mode=clip_mode,
    )
    torch.testing.assert_close(ours, dense, rtol=1e-4, atol=1e-5)
    grads_ours = torch.autograd.grad(ours.sum(), (student_h, weight, bias))
    grads_dense = torch.autograd.grad(dense.sum(), (student_h, weight, bias))
    for a, b in zip(grads_ours, grads_dense, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_routed_divergence_of_nothing_is_a_connected_zero():
    student_h = torch.randn(0, 8, requires_grad=True)
    out = routed_divergence(student_h, torch.randn(0, 8), (torch.randn(5, 8), None), (torch.randn(5, 8), None), "fkl")
    assert out.shape == (0,)
    out.sum().backward()  # must not raise


LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_masked_tokens_contribute_exactly_zero(loss_type):
    torch.manual_seed(0)
    per_token = torch.rand(3, 5, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.float32)
    kwargs = dict(
        loss_type=loss_type, gradient_accumulation_steps=1, max_completion_length=5, num_items_in_batch=mask.sum()
    )
    loss = normalize_like_grpo(per_token, mask, **kwargs)
    (grad,) = torch.autograd.grad(loss, per_token)
    assert (grad[mask == 0] == 0).all()
    # Garbage (even inf-free huge values) under the mask changes nothing.
    noisy = per_token.detach().clone()
    noisy[mask == 0] = 1e6
    assert normalize_like_grpo(noisy, mask, **kwargs).item() == pytest.approx(loss.item())


def test_normalizers_match_grpo_formulas():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    common = dict(
        gradient_accumulation_steps=2,
        max_completion_length=4,
        num_items_in_batch=torch.tensor(8.0),
        num_processes=2,
        steps_per_generation=4,
    )
    assert normalize_like_grpo(per_token, mask, loss_type="grpo", **common).item() == pytest.approx(
        (2.0 + 4.0) / 2 / 2
    )
    assert normalize_like_grpo(per_token, mask, loss_type="bnpo", **common).item() == pytest.approx(10.0 / 4 / 2)
    assert normalize_like_grpo(per_token, mask, loss_type="dr_grpo", **common).item() == pytest.approx(10.0 / 8 / 2)
    # dapo: sum / (num_items / processes * GA / steps_per_generation) = 10 / (8 / 2 * 2 / 4)
    assert normalize_like_grpo(per_token, mask, loss_type="dapo", **common).item() == pytest.approx(10.0 / 2.0)
    assert normalize_like_grpo(per_token, mask, loss_type="dapo", training=False, **common).item() == pytest.approx(
        10.0 / 4.0
    )
    assert normalize_like_grpo(per_token, mask, loss_type="luspo", **common).item() == pytest.approx(
        (6.0 + 4.0) / 2 / 2
    )
    with pytest.raises(ValueError, match="num_items_in_batch"):
        normalize_like_grpo(per_token, mask, loss_type="dapo", gradient_accumulation_steps=1, max_completion_length=4)


def test_grpo_token_weights_for_each_routing_mode():
    routed = torch.tensor([[1, 0, 1]], dtype=torch.bool)
    exclusive = grpo_token_weights(routed, mode="exclusive", kl_weight=0.5, kl_coef=1.0)
    additive = grpo_token_weights(routed, mode="additive", kl_weight=0.5, kl_coef=1.0)
    complementary = grpo_token_weights(routed, mode="complementary", kl_weight=0.25, kl_coef=1.0)
    assert exclusive.tolist() == [[0.0, 1.0, 0.0]]
    assert additive.tolist() == [[1.0, 1.0, 1.0]]
    assert complementary.tolist() == [[0.75, 1.0, 0.75]]
    # Once the KL weight is zero every token is a GRPO token again.
    for mode in ("exclusive", "additive", "complementary"):
        assert grpo_token_weights(routed, mode=mode, kl_weight=0.0, kl_coef=1.0).tolist() == [[1.0, 1.0, 1.0]]
    with pytest.raises(ValueError, match="mode"):
        grpo_token_weights(routed, mode="sometimes", kl_weight=0.5, kl_coef=1.0)
