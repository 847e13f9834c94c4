"""The paper's pointwise-clipped KL: the tiled hidden-state function against dense float64 references, at the real
Qwen vocabulary size, on the full-vocabulary and the top-k paths, plus the memory and edge-case guarantees."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import trace_trl.chunked_divergence as cd
from trace_trl.chunked_divergence import chunked_divergence
from trace_trl.losses import routed_divergence, token_divergence


QWEN_VOCAB = 151_936


def _logits(h, w, b, scale, cap):
    y = torch.nn.functional.linear(h, w, b) * scale
    return y if cap is None else torch.tanh(y / cap) * cap


def _dense_terms(student_logits, teacher_logits, kind, temperature):
    """float64 `[N, V]` terms a_v (log a_v - log b_v), written independently of the code under test."""
    log_s = torch.log_softmax(student_logits.double() / temperature, -1)
    log_t = torch.log_softmax(teacher_logits.double() / temperature, -1)
    log_a, log_b = (log_t, log_s) if kind == "fkl" else (log_s, log_t)
    return log_a.exp() * (log_a - log_b)


def _clip(terms, c):
    return terms if c is None else torch.where(terms < c, terms, torch.full_like(terms, c))


def _problem(n, hidden, vocab, *, spread=1.0, seed=0, bias=True, dtype=torch.float32):
    """A student head and a perturbed teacher: peaked enough that terms above 0.05 exist, like a real LM's."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) * (2.5 * spread / hidden**0.5)
    teacher_weight = weight + torch.randn(vocab, hidden, generator=g, dtype=torch.float64) * (1.0 / hidden**0.5)
    student_h = torch.randn(n, hidden, generator=g, dtype=torch.float64) * 1.5
    teacher_h = student_h + torch.randn(n, hidden, generator=g, dtype=torch.float64)
    b = torch.randn(vocab, generator=g, dtype=torch.float64) if bias else None
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return cast(student_h), cast(weight), cast(b), cast(teacher_h), cast(teacher_weight)


def _dense_reference(student_h, weight, bias, teacher_h, teacher_weight, kind, c, temperature, scale, cap):
    """float64 value and gradients (student hidden, weight, bias) of sum_n g_n D_n with fixed random g."""
    leaves = [x.detach().double().requires_grad_(True) for x in (student_h, weight)]
    b = None if bias is None else bias.detach().double().requires_grad_(True)
    zs = _logits(leaves[0], leaves[1], b, scale, cap)
    with torch.no_grad():
        zt = _logits(teacher_h.double(), teacher_weight.double(), None, scale, cap)
    value = _clip(_dense_terms(zs, zt, kind, temperature), c).sum(-1)
    upstream = torch.linspace(0.5, 1.5, value.numel(), dtype=torch.float64)
    grads = torch.autograd.grad((value * upstream).sum(), [*leaves] + ([b] if b is not None else []))
    return value.detach(), grads, upstream


def _ours(student_h, weight, bias, teacher_h, teacher_weight, kind, c, temperature, scale, cap, upstream, **kw):
    leaves = [x.detach().clone().requires_grad_(True) for x in (student_h, weight)]
    b = None if bias is None else bias.detach().clone().requires_grad_(True)
    value = chunked_divergence(
        leaves[0],
        (leaves[1], b),
        teacher_h,
        (teacher_weight, None),
        kind,
        term_clip=c,
        temperature=temperature,
        logit_scale=scale,
        final_logit_softcapping=cap,
        **kw,
    )
    grads = torch.autograd.grad((value * upstream.to(value.dtype)).sum(), [*leaves] + ([b] if b is not None else []))
    return value.detach(), grads


HEADS = {
    "bias-softcap-scale-T0.7": {"bias": True, "temperature": 0.7, "scale": 0.9, "cap": 30.0},
    "plain-T1.3": {"bias": False, "temperature": 1.3, "scale": 1.0, "cap": None},
}


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
@pytest.mark.parametrize("term_clip", [None, 0.05, 0.002])
@pytest.mark.parametrize("head", list(HEADS))
def test_values_and_gradients_match_dense_float64_at_qwen_vocab(kind, term_clip, head):
    cfg = HEADS[head]
    student_h, weight, bias, teacher_h, teacher_weight = _problem(5, 16, QWEN_VOCAB, bias=cfg["bias"])
    args = (kind, term_clip, cfg["temperature"], cfg["scale"], cfg["cap"])
    ref_value, ref_grads, upstream = _dense_reference(student_h, weight, bias, teacher_h, teacher_weight, *args)
    value, grads = _ours(student_h, weight, bias, teacher_h, teacher_weight, *args, upstream, chunk_size=2)

    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double(), ref_value, rtol=2e-5, atol=2e-5)
    for ours, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(ours.double(), ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())
    if term_clip is not None:
        # The case is not vacuous: some terms clip, most do not, and the clip changes the value.
        zs = _logits(
            student_h.double(), weight.double(), None if bias is None else bias.double(), cfg["scale"], cfg["cap"]
        )
        zt = _logits(teacher_h.double(), teacher_weight.double(), None, cfg["scale"], cfg["cap"])
        terms = _dense_terms(zs, zt, kind, cfg["temperature"])
        assert 0 < (terms >= term_clip).sum() < terms.numel() // 100
        assert (terms.sum(-1) - ref_value > 1e-3).any()


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
@pytest.mark.parametrize("term_clip", [None, 0.05])
def test_float64_inputs_agree_with_the_dense_reference_to_rounding(kind, term_clip):
    student_h, weight, bias, teacher_h, teacher_weight = _problem(4, 8, QWEN_VOCAB, dtype=torch.float64)
    args = (kind, term_clip, 0.8, 1.1, 20.0)
    ref_value, ref_grads, upstream = _dense_reference(student_h, weight, bias, teacher_h, teacher_weight, *args)
    value, grads = _ours(student_h, weight, bias, teacher_h, teacher_weight, *args, upstream, vocab_tile=5000)
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-10)
    for ours, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
@pytest.mark.parametrize("term_clip", [None, 0.05])
def test_gradcheck_float64_small_vocab(kind, term_clip):
    torch.manual_seed(3)
    vocab, hidden = 23, 3
    student_h = torch.randn(3, hidden, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(vocab, hidden, dtype=torch.float64) * 1.5).requires_grad_(True)
    bias = torch.randn(vocab, dtype=torch.float64, requires_grad=True)
    teacher_h = torch.randn(3, hidden, dtype=torch.float64)
    teacher_w = weight.detach() + torch.randn(vocab, hidden, dtype=torch.float64)

    def f(h, w, b):
        return chunked_divergence(
            h, (w, b), teacher_h, (teacher_w, None), kind, term_clip=term_clip, temperature=0.9,
            logit_scale=1.2, final_logit_softcapping=6.0, chunk_size=3, vocab_tile=8,
        )  # fmt: skip

    if term_clip is not None:
        zs = _logits(student_h, weight, bias, 1.2, 6.0)
        zt = _logits(teacher_h, teacher_w, None, 1.2, 6.0)
        assert (_dense_terms(zs, zt, kind, 0.9) >= term_clip).any()  # the clip is exercised
    assert torch.autograd.gradcheck(f, (student_h, weight, bias), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
def test_a_clipped_term_carries_no_gradient(kind):
    """One vocabulary entry's term far above the clip: its logit gradient is exactly the normalization part."""
    vocab, hidden, u = 50, 4, 17
    torch.manual_seed(0)
    weight = torch.randn(vocab, hidden, dtype=torch.float64) * 0.1
    student_bias = torch.zeros(vocab, dtype=torch.float64)
    teacher_bias = torch.zeros(vocab, dtype=torch.float64)
    if kind == "fkl":
        teacher_bias[u] = 6.0  # the teacher puts most of its mass on u, the student does not
    else:
        student_bias[u] = 6.0
    h = torch.randn(1, hidden, dtype=torch.float64)
    c = 0.05
    zs, zt = _logits(h, weight, student_bias, 1.0, None), _logits(h, weight, teacher_bias, 1.0, None)
    terms = _dense_terms(zs, zt, kind, 1.0)[0]
    assert terms[u] > 10 * c and (terms[torch.arange(vocab) != u] < c).all()

    b = student_bias.clone().requires_grad_(True)
    value = chunked_divergence(h, (weight, b), h, (weight, teacher_bias), kind, term_clip=c, vocab_tile=16)
    (grad,) = torch.autograd.grad(value.sum(), b)  # with one row, the bias gradient is the logit gradient
    p_s, p_t = zs.softmax(-1)[0], zt.softmax(-1)[0]
    kept = (torch.arange(vocab) != u).double()
    if kind == "fkl":
        expected = -kept * p_t + p_s * (kept * p_t).sum()
    else:
        f = p_s.log() - p_t.log()
        expected = kept * p_s * (f + 1) - p_s * (kept * p_s * (f + 1)).sum()
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    # u's own contribution (the m_u term) is gone: unclipped, its gradient differs.
    (unclipped,) = torch.autograd.grad(
        chunked_divergence(h, (weight, b), h, (weight, teacher_bias), kind, vocab_tile=16).sum(), b
    )
    assert abs(unclipped[u] - grad[u]) > 0.1
    torch.testing.assert_close(value, terms.clamp(max=c).sum().reshape(1), rtol=1e-10, atol=1e-12)


def test_a_term_exactly_at_the_clip_counts_as_clipped():
    """`token_divergence(clip_mode="element")`: the mask is [term < c], so a term equal to c gets a zero gradient (where, not clamp)."""
    torch.manual_seed(0)
    student = torch.randn(1, 20, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(1, 20, dtype=torch.float64) * 3
    terms = _dense_terms(student.detach(), teacher, "fkl", 1.0)[0]
    u = int(terms.argmax())
    c = terms[u].item()  # exactly the largest term
    (grad,) = torch.autograd.grad(
        token_divergence(student, teacher, "fkl", term_clip=c, clip_mode="element").sum(), student
    )
    p_s, p_t = student.detach().softmax(-1)[0], teacher.softmax(-1)[0]
    kept = (torch.arange(20) != u).double()
    torch.testing.assert_close(grad[0], -kept * p_t + p_s * (kept * p_t).sum(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
def test_no_clip_equals_trls_kernel_and_the_dense_kl(kind):
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    student_h, weight, bias, teacher_h, teacher_weight = _problem(6, 16, QWEN_VOCAB, seed=1)
    leaves_a = [x.clone().requires_grad_(True) for x in (student_h, weight, bias)]
    leaves_b = [x.clone().requires_grad_(True) for x in (student_h, weight, bias)]
    ours = chunked_divergence(
        leaves_a[0], (leaves_a[1], leaves_a[2]), teacher_h, (teacher_weight, None), kind, temperature=0.8,
        logit_scale=0.9, final_logit_softcapping=30.0,
    )  # fmt: skip
    theirs, _ = ChunkedDivergenceFunction.apply(
        leaves_b[0], leaves_b[1], leaves_b[2], teacher_h, teacher_weight, None, 0.0 if kind == "fkl" else 1.0, 0.8,
        0.9, 30.0, 0.9, 30.0,
    )  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(ours.sum(), leaves_a), torch.autograd.grad(theirs.sum(), leaves_b)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    dense = token_divergence(
        _logits(student_h, weight, bias, 0.9, 30.0), _logits(teacher_h, teacher_weight, None, 0.9, 30.0), kind,
        temperature=0.8,
    )  # fmt: skip
    # float32 dense log-softmax over 151,936 entries carries ~3e-5 relative rounding of its own.
    torch.testing.assert_close(ours, dense, rtol=1e-4, atol=1e-4)


def _topk_reference(student_logits, teacher_logits, kind, k, temperature, c):
    """Coarsen both distributions to the anchor's top k plus a tail bucket, in float64, then clip the k + 1 terms."""
    log_s = torch.log_softmax(student_logits.double() / temperature, -1)
    log_t = torch.log_softmax(teacher_logits.double() / temperature, -1)
    support = (log_t if kind == "fkl" else log_s).topk(k, -1).indices

    def coarsen(log_p):
        top = log_p.gather(-1, support)
        tail = torch.log1p(-top.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-15))
        return torch.cat([top, tail], -1)

    cs, ct = coarsen(log_s), coarsen(log_t)
    log_a, log_b = (ct, cs) if kind == "fkl" else (cs, ct)
    return _clip(log_a.exp() * (log_a - log_b), c).sum(-1)


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
@pytest.mark.parametrize("term_clip", [0.05, 0.002])
def test_topk_path_with_clip_matches_the_dense_topk_reference(kind, term_clip):
    student_h, weight, bias, teacher_h, teacher_weight = _problem(5, 16, QWEN_VOCAB, seed=2)
    leaves = [x.clone().requires_grad_(True) for x in (student_h, weight, bias)]
    ours = routed_divergence(
        leaves[0], teacher_h, (leaves[1], leaves[2]), (teacher_weight, None), kind, topk=20, temperature=0.7,
        chunk_size=2, term_clip=term_clip, clip_mode="element",
    )  # fmt: skip
    dense_leaves = [x.double().requires_grad_(True) for x in (student_h, weight, bias)]
    ref = _topk_reference(
        _logits(*dense_leaves, 1.0, None), _logits(teacher_h.double(), teacher_weight.double(), None, 1.0, None),
        kind, 20, 0.7, term_clip,
    )  # fmt: skip
    unclipped = _topk_reference(
        _logits(*dense_leaves, 1.0, None).detach(), _logits(teacher_h.double(), teacher_weight.double(), None, 1.0, None),
        kind, 20, 0.7, None,
    )  # fmt: skip
    assert (unclipped - ref.detach() > 1e-3).any()  # the clip bites
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=1e-5, atol=2e-5)
    for a, b in zip(torch.autograd.grad(ours.sum(), leaves), torch.autograd.grad(ref.sum(), dense_leaves)):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-3 * b.abs().max().item())
    # token_divergence on materialized logits takes the same path.
    dense_ours = token_divergence(
        _logits(student_h, weight, bias, 1.0, None), _logits(teacher_h, teacher_weight, None, 1.0, None), kind,
        topk=20, temperature=0.7, term_clip=term_clip, clip_mode="element",
    )  # fmt: skip
    torch.testing.assert_close(dense_ours.double(), ref.detach(), rtol=1e-5, atol=2e-5)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operator produces (forward and backward alike)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("term_clip", [None, 0.05, 1e-4])
def test_no_n_by_v_tensor_is_ever_produced(term_clip):
    """Every operator output, forward and backward, is at most one tile or the [V, H] head gradient."""
    n, hidden, chunk, tile = 32, 4, 16, 8192
    student_h, weight, bias, teacher_h, teacher_weight = _problem(n, hidden, QWEN_VOCAB, seed=4)
    student_h.requires_grad_(True)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    with _LargestTensor() as probe:
        value = chunked_divergence(
            student_h, (weight, bias), teacher_h, (teacher_weight, None), "fkl", term_clip=term_clip,
            chunk_size=chunk, vocab_tile=tile,
        )  # fmt: skip
        value.sum().backward()
    allowed = max(chunk * tile, QWEN_VOCAB * hidden)
    assert probe.largest <= allowed < n * QWEN_VOCAB // 4
    assert torch.isfinite(weight.grad).all()
    # The probe would have seen a dense computation.
    with _LargestTensor() as dense_probe:
        _logits(student_h, weight, bias, 1.0, None).log_softmax(-1)
    assert dense_probe.largest == n * QWEN_VOCAB


def test_the_one_pass_forward_is_exact_and_the_fallbacks_are_taken_when_needed(monkeypatch):
    """Mild rows need no second pass; a row whose bound fails, and a chunk over its candidate budget, get one."""
    calls = []
    original = cd._exact_pass

    def counting(s_h, *args, **kwargs):
        calls.append(s_h.shape[0])
        return original(s_h, *args, **kwargs)

    monkeypatch.setattr(cd, "_exact_pass", counting)
    student_h, weight, bias, teacher_h, teacher_weight = _problem(6, 16, QWEN_VOCAB, seed=5)
    args = ("fkl", 0.05, 1.0, 1.0, None)

    def check(s_h, t_h, **kw):
        ref_value, ref_grads, upstream = _dense_reference(s_h, weight, bias, t_h, teacher_weight, *args)
        value, grads = _ours(s_h, weight, bias, t_h, teacher_weight, *args, upstream, **kw)
        torch.testing.assert_close(value.double(), ref_value, rtol=2e-5, atol=2e-5)
        for ours, ref in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(ours.double(), ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())

    check(student_h, teacher_h)
    assert calls == []
    # One row with logits spread over hundreds of nats: the bound fails for that row only.
    extreme = student_h.clone()
    extreme[2] *= 40
    check(extreme, teacher_h)
    assert calls == [1]
    calls.clear()
    # A tiny clip makes almost every entry a candidate: the chunk goes over budget and is redone whole.
    ref_value, _, upstream = _dense_reference(
        student_h, weight, bias, teacher_h, teacher_weight, "fkl", 1e-6, 1.0, 1.0, None
    )
    value, _ = _ours(student_h, weight, bias, teacher_h, teacher_weight, "fkl", 1e-6, 1.0, 1.0, None, upstream)
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-4, atol=1e-5)
    assert calls == [6]


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
def test_empty_input_is_a_connected_zero(kind):
    weight = torch.randn(QWEN_VOCAB, 8, requires_grad=True)
    student_h = torch.randn(0, 8, requires_grad=True)
    for out in (
        chunked_divergence(
            student_h, (weight, None), torch.randn(0, 8), (weight.detach(), None), kind, term_clip=0.05
        ),
        routed_divergence(student_h, torch.randn(0, 8), (weight, None), (weight.detach(), None), kind, term_clip=0.05),
    ):
        assert out.shape == (0,) and out.dtype == torch.float32
        (grad,) = torch.autograd.grad(out.sum(), student_h)
        assert grad.shape == (0, 8)


@pytest.mark.parametrize(("n", "chunk", "vocab", "tile"), [(7, 3, 1000, 333), (5, 5, 1000, 1000), (4, 16, 257, 64)])
def test_row_and_vocabulary_tile_boundaries(n, chunk, vocab, tile):
    student_h, weight, bias, teacher_h, teacher_weight = _problem(n, 8, vocab, seed=6, dtype=torch.float64)
    args = ("rkl", 0.05, 0.9, 1.0, 10.0)
    ref_value, ref_grads, upstream = _dense_reference(student_h, weight, bias, teacher_h, teacher_weight, *args)
    value, grads = _ours(
        student_h, weight, bias, teacher_h, teacher_weight, *args, upstream, chunk_size=chunk, vocab_tile=tile
    )
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-10)
    for ours, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
@pytest.mark.parametrize("cap", [None, 30.0])
def test_huge_logits_stay_finite(kind, cap):
    """Logits of +-1e4 (probabilities that underflow to exactly 0) give finite values and gradients, no NaN."""
    student_h, weight, bias, teacher_h, teacher_weight = _problem(3, 8, 5000, seed=7)
    s_h = (student_h * 1e3).requires_grad_(True)
    value = chunked_divergence(
        s_h, (weight, None), teacher_h * 1e3, (teacher_weight, None), kind, term_clip=0.05, temperature=0.5,
        final_logit_softcapping=cap, vocab_tile=1024,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(value.sum(), s_h)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    assert (value <= 0.05 * 5000).all()


def test_bad_arguments_are_rejected_with_the_field_named():
    h, w = torch.randn(2, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match="term_clip"):
        chunked_divergence(h, (w, None), h, (w, None), "fkl", term_clip=0.0)
    with pytest.raises(ValueError, match="term_clip"):
        token_divergence(torch.randn(2, 5), torch.randn(2, 5), "fkl", term_clip=-1.0)
    with pytest.raises(ValueError, match="term_clip"):
        routed_divergence(h, h, (w, None), (w, None), "fkl", term_clip=-0.5)
    with pytest.raises(ValueError, match="vocabulary"):
        chunked_divergence(h, (w, None), h, (torch.randn(11, 4), None), "fkl")
    with pytest.raises(ValueError, match="kind"):
        chunked_divergence(h, (w, None), h, (w, None), "jsd")
    assert math.isfinite(chunked_divergence(h, (w, None), h, (w, None), "fkl", term_clip=0.05).sum().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_term_clipped_below_the_candidate_threshold_is_still_found(monkeypatch, dtype):
    """Adversarial: the teacher gives u less mass than the candidate threshold, but the student's log-probability of u
    is so low (-1100 nats) that u's term still exceeds the clip. The one-pass bound must fail and the row be redone."""
    calls = []
    original = cd._exact_pass
    monkeypatch.setattr(cd, "_exact_pass", lambda s_h, *a, **k: calls.append(s_h.shape[0]) or original(s_h, *a, **k))
    vocab, u, c = 1000, 990, 0.05  # u in the last tile: the running normalizer is nearly final there
    tau = c / cd._CANDIDATE_FACTOR
    teacher_bias = torch.zeros(vocab, dtype=dtype)
    teacher_bias[u] = math.log(tau / 2 * (vocab - 1) / (1 - tau / 2))  # p_t(u) = tau / 2
    student_bias = torch.zeros(vocab, dtype=dtype)
    student_bias[u] = -1100.0
    b = student_bias.clone().requires_grad_(True)
    h, w = torch.zeros(1, 2, dtype=dtype), torch.zeros(vocab, 2, dtype=dtype)
    terms = _dense_terms(student_bias[None], teacher_bias[None], "fkl", 1.0)[0]
    assert (
        terms[u] > c
        and torch.softmax(teacher_bias.double(), -1)[u] < tau
        and (terms[torch.arange(vocab) != u] < c).all()
    )

    value = chunked_divergence(h, (w, b), h, (w, teacher_bias), "fkl", term_clip=c, vocab_tile=256)
    assert calls == [1]
    torch.testing.assert_close(value.double(), _clip(terms, c).sum().reshape(1), rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(value.sum(), b)
    p_s, p_t = torch.softmax(student_bias.double(), -1), torch.softmax(teacher_bias.double(), -1)
    kept = (torch.arange(vocab) != u).double()
    torch.testing.assert_close(grad.double(), -kept * p_t + p_s * (kept * p_t).sum(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("head_dtype", [torch.bfloat16, torch.float32], ids=["bf16-head", "fp32-head"])
def test_low_precision_hidden_states_follow_the_heads_dtype_and_ignore_autocast(head_dtype):
    """bf16 hidden states (a bf16 policy) meet the head in the head's dtype, with float32 logits whatever the autocast
    around the loss: a bf16 head multiplies bf16 inputs, a float32 head (`cast_lm_head_to_fp32`) float32 ones, as TRL's
    own fused head does. The result is the dense reference on exactly those inputs."""
    s_h, w, b, t_h, t_w = _problem(6, 32, 4096, seed=7)
    s_h, t_h = s_h.bfloat16(), t_h.bfloat16()
    w, t_w = w.to(head_dtype), t_w.to(head_dtype)
    for kind in ("fkl", "rkl"):
        clip = {"term_clip": 0.05, "clip_mode": "element"}
        plain = routed_divergence(s_h, t_h, (w, None), (t_w, None), kind, **clip)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = routed_divergence(s_h, t_h, (w, None), (t_w, None), kind, **clip)
        assert under_autocast.dtype == torch.float32
        torch.testing.assert_close(under_autocast, plain, rtol=0, atol=0)
        # The reference: the same (rounded) inputs, in float64.
        reference, _, _ = _dense_reference(
            s_h.to(head_dtype), w, None, t_h.to(head_dtype), t_w, kind, 0.05, 1.0, 1.0, None
        )
        torch.testing.assert_close(plain.double(), reference, rtol=1e-4, atol=1e-5)
