"""The direction of the clipped KL's gradient, on LM-like rows at the real Qwen vocabulary size.

The default ``"token"`` clip must never point away from the teacher: on every routed token its gradient with respect to
the student's logits has a non-negative inner product with the unclipped divergence's gradient (a small descent step
never raises the true divergence), and under forward KL an entry the teacher prefers more than the student is never
pushed down. The literal per-entry ``"element"`` clip fails the second property; a test below documents that, which
is why it is not the default.

Every path is checked: `token_divergence` on materialized logits, the tiled full-vocabulary kernel behind
`routed_divergence` (logits fed through an identity "hidden state", so the head's gradient *is* the gradient with
respect to the logits), and the top-k path.
"""

from __future__ import annotations

import pytest
import torch

from trace_trl.losses import bound_divergence, routed_divergence, token_divergence


QWEN_VOCAB = 151_936
CLIP = 0.05


def _lm_like_rows(n: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits shaped like a language model's: a Zipf-like ranking of the vocabulary with noise,
    the teacher a perturbation of the student that moves mass onto tokens the student under-allocates (what privileged
    context does), with a spread of strengths so that some rows stay under the clip and most go over it."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.stack([torch.randperm(vocab, generator=g) for _ in range(n)]).double() + 1.0
    base = -1.1 * ranks.log() + 0.5 * torch.randn(n, vocab, generator=g, dtype=torch.float64)
    student = base + 0.3 * torch.randn(n, vocab, generator=g, dtype=torch.float64)
    strength = torch.linspace(0.02, 3.0, n, dtype=torch.float64).unsqueeze(-1)
    teacher = base + strength * torch.randn(n, vocab, generator=g, dtype=torch.float64)
    # The teacher's favourite among the student's top 50: the case the KL channel exists for.
    top = student.topk(50, dim=-1).indices
    pick = top.gather(-1, torch.randint(5, 50, (n, 1), generator=g))
    teacher.scatter_add_(-1, pick, 3.0 * strength)
    return student.float(), teacher.float()


def _grad_via_logits(student, teacher, kind, **kwargs) -> torch.Tensor:
    z = student.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(token_divergence(z, teacher, kind, **kwargs).sum(), z)
    return grad


def _grad_via_kernel(student, teacher, kind, **kwargs) -> torch.Tensor:
    """The hidden-state path: hidden = I_N and head weight = logits^T give logits = h W^T, and dD/dW = g^T h = g^T."""
    n = student.shape[0]
    eye = torch.eye(n, dtype=student.dtype)
    weight = student.t().contiguous().requires_grad_(True)
    value = routed_divergence(eye, eye, (weight, None), (teacher.t().contiguous(), None), kind, chunk_size=3, **kwargs)
    (grad_w,) = torch.autograd.grad(value.sum(), weight)
    return grad_w.t()


PATHS = {
    "token_divergence": lambda s, t, kind, **kw: _grad_via_logits(s, t, kind, **kw),
    "chunked_kernel": lambda s, t, kind, **kw: _grad_via_kernel(s, t, kind, **kw),
    "topk": lambda s, t, kind, **kw: _grad_via_kernel(s, t, kind, topk=64, **kw),
}


@pytest.fixture(scope="module")
def rows():
    return _lm_like_rows(8, QWEN_VOCAB, seed=0)


def _true_divergence(student, teacher, kind, topk=None) -> torch.Tensor:
    return token_divergence(student.double(), teacher.double(), kind, topk=topk)


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
@pytest.mark.parametrize("path", list(PATHS))
def test_token_clip_always_descends_the_true_divergence(rows, kind, path):
    student, teacher = rows
    topk = 64 if path == "topk" else None
    true = _true_divergence(student, teacher, kind, topk)
    # Not vacuous: the clip bounds most rows and leaves some alone.
    assert 0 < int((true > CLIP).sum()) < len(true)
    clipped_grad = PATHS[path](student, teacher, kind, term_clip=CLIP).double()
    true_grad = PATHS[path](student, teacher, kind).double()
    inner = (clipped_grad * true_grad).sum(-1)
    assert (inner > 0).all(), inner
    # Exactly the true gradient scaled by min(1, c / D): the direction is the true divergence's.
    scale = (CLIP / true.clamp(min=CLIP)).unsqueeze(-1)
    torch.testing.assert_close(clipped_grad, scale * true_grad, rtol=2e-3, atol=1e-9)
    # A small descent step along the clipped gradient lowers the true divergence on every row.
    step = 1e-2 / clipped_grad.norm(dim=-1, keepdim=True)
    after = _true_divergence(student.double() - step * clipped_grad, teacher, kind, topk)
    assert (after < true).all(), after - true


@pytest.mark.parametrize("path", list(PATHS))
def test_token_clip_never_pushes_down_an_entry_the_teacher_prefers(rows, path):
    """Forward KL: where p_teacher(v) > p_student(v), a descent step raises (never lowers) logit v. On the top-k path,
    for the teacher's top-k support (the tail bucket is one coarsened category, whose members share its gradient).
    In float64, so that entries where the two probabilities nearly tie are not decided by float32 rounding."""
    student, teacher = (x.double() for x in rows)
    grad = PATHS[path](student, teacher, "fkl", term_clip=CLIP)
    prefers = teacher.double().softmax(-1) > student.double().softmax(-1)
    if path == "topk":
        support = torch.zeros_like(prefers).scatter_(-1, teacher.topk(64, dim=-1).indices, True)
        prefers &= support
    assert prefers.sum() > 100
    assert (grad[prefers] <= 0).all()


def test_element_clip_pushes_the_teachers_token_down(rows):
    """Why `"element"` is not the default. The issue's example: teacher q = (0.9, 0.05, 0.05), student
    p = (0.05, 0.475, 0.475). The dominant term 0.9 log 18 is clipped, so its gradient is gone; what survives makes the
    "KL" negative and raises the student's logit of... the token the teacher does not want."""
    q = torch.tensor([[0.9, 0.05, 0.05]], dtype=torch.float64)
    p = torch.tensor([[0.05, 0.475, 0.475]], dtype=torch.float64)
    student = p.log().requires_grad_(True)
    value = token_divergence(student, q.log(), "fkl", term_clip=CLIP, clip_mode="element")
    (grad,) = torch.autograd.grad(value.sum(), student)
    assert value.item() == pytest.approx(-0.1751, abs=1e-3)  # a "KL" below zero
    assert grad[0, 0].item() == pytest.approx(0.005, abs=1e-3)  # descent *lowers* the teacher's 0.9 token
    # The token clip: value at the cap, and the gradient of the true KL (p - q) scaled by c / KL.
    token_student = p.log().requires_grad_(True)
    token_value = token_divergence(token_student, q.log(), "fkl", term_clip=CLIP)
    (token_grad,) = torch.autograd.grad(token_value.sum(), token_student)
    kl = (q * (q.log() - p.log())).sum()
    assert token_value.item() == pytest.approx(CLIP)
    torch.testing.assert_close(token_grad, (CLIP / kl) * (p - q))
    assert token_grad[0, 0] < 0

    # On LM-like rows at the Qwen vocabulary the element clip pushes preferred entries down in many rows.
    student_rows, teacher_rows = rows
    element_grad = _grad_via_kernel(student_rows, teacher_rows, "fkl", term_clip=CLIP, clip_mode="element")
    prefers = teacher_rows.double().softmax(-1) > student_rows.double().softmax(-1)
    wrong_way = ((element_grad > 0) & prefers).any(-1)
    assert wrong_way.sum() >= 4, wrong_way


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
def test_token_clip_values_and_gradients_match_dense_float64(rows, kind):
    """Value min(D, c) and gradient min(1, c / D) grad D of the kernel path against a float64 dense reference."""
    student, teacher = rows
    z = student.double().requires_grad_(True)
    log_s, log_t = z.log_softmax(-1), teacher.double().log_softmax(-1)
    log_a, log_b = (log_t, log_s) if kind == "fkl" else (log_s, log_t)
    dense = (log_a.exp() * (log_a - log_b)).sum(-1)
    (dense_grad,) = torch.autograd.grad(dense.sum(), z)
    reference_value = dense.detach().clamp(max=CLIP)
    reference_grad = dense_grad * (CLIP / dense.detach().clamp(min=CLIP)).unsqueeze(-1)

    eye = torch.eye(student.shape[0])
    weight = student.t().contiguous().requires_grad_(True)
    value, unclipped = routed_divergence(
        eye, eye, (weight, None), (teacher.t().contiguous(), None), kind, term_clip=CLIP, with_unclipped=True
    )
    (grad_w,) = torch.autograd.grad(value.sum(), weight)
    torch.testing.assert_close(value.double(), reference_value, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(unclipped.double(), dense.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_w.t().double(), reference_grad, rtol=1e-3, atol=1e-3 * reference_grad.abs().max())


def test_bound_divergence_is_min_in_value_and_a_positive_scale_in_gradient():
    d = torch.tensor([0.0, 0.01, 0.05, 0.2, 3.0], dtype=torch.float64, requires_grad=True)
    out = bound_divergence(d, 0.05)
    torch.testing.assert_close(out.detach(), d.detach().clamp(max=0.05))
    (grad,) = torch.autograd.grad(out.sum(), d)
    torch.testing.assert_close(grad, torch.tensor([1.0, 1.0, 1.0, 0.25, 0.05 / 3.0], dtype=torch.float64))
