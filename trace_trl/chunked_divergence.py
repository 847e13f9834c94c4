r"""The full-vocabulary KL from hidden states, with the optional per-entry ("element") clip, tiled so no `[N, V]` tensor
exists. (The default "token" clip bounds the unclipped result per token: `trace_trl.losses.bound_divergence`.)

For each of `N` positions, with student logits $y^s = h^s W_s^\top + b_s$ and teacher logits $y^t = h^t W_t^\top + b_t$,
both passed through the model's output transform $z = \sigma(\text{scale} \cdot y) / T$ (where $\sigma(x) = c_{\text{cap}}
\tanh(x / c_{\text{cap}})$ with final-logit soft-capping, the identity without), $p_s = \mathrm{softmax}(z^s)$ and
$p_t = \mathrm{softmax}(z^t)$, this computes

$$D = \sum_v \min\bigl(\text{term}_v,\ c\bigr), \qquad \text{term}_v = a_v\,(\log a_v - \log b_v),$$

with $(a, b) = (p_t, p_s)$ for the forward KL (``"fkl"``) and $(a, b) = (p_s, p_t)$ for the reverse KL (``"rkl"``);
$c = \infty$ (``term_clip=None``) is the plain KL. A clipped term carries no gradient: with the mask
$m_v = [\text{term}_v < c]$ (a term exactly at $c$ counts as clipped) the gradient on the student's transformed
logits is

- forward KL: $\displaystyle \frac{\partial D}{\partial z^s_u} = -m_u\,p_t(u) + p_s(u)\,A$, with $A = \sum_v m_v\,p_t(v)$;
- reverse KL: $\displaystyle \frac{\partial D}{\partial z^s_u} = m_u\,p_s(u)\,(f_u + 1) - p_s(u)\,B$, with
  $f_v = \log p_s(v) - \log p_t(v)$ and $B = \sum_v m_v\,p_s(v)\,(f_v + 1)$.

(From $\partial \log p_s(v) / \partial z^s_u = \delta_{uv} - p_s(u)$ and $\partial p_s(v) / \partial z^s_u = p_s(v)(\delta_{uv}
- p_s(u))$.) Unclipped, $A = 1$ and $B = \mathrm{KL} + 1$, the familiar $p_s - p_t$ and $p_s(f - \mathrm{KL})$. The chain
rule back to the head's output multiplies by $\text{scale} \cdot (1 - \tanh^2(\text{scale}\cdot y / c_{\text{cap}})) / T$
(no tanh factor without soft-capping), then $\partial D / \partial h^s = g\,W_s$, $\partial D / \partial W_s = g^\top h^s$,
$\partial D / \partial b_s = \sum_n g_n$. The teacher gets no gradient.

**How it avoids a second pass in the forward.** The clipped sum needs both normalizers before any term is known, which
naively costs a second projection of both heads over the vocabulary. Instead, one pass folds the tiles into
online-logsumexp statistics that give the *unclipped* KL, $\mathrm{KL} = \mathbb{E}_a[z^a - z^b] - \log Z_a + \log Z_b$, and
on the way collects the few *candidates* that could clip: entries with $a_v > \tau = c / 512$ measured against the running
normalizer (a running normalizer only grows, so every entry whose final $a_v$ exceeds $\tau$ is collected, and each
tile contributes at most $1/\tau$ per row). An entry outside the candidates has $a_v \le \tau$, and since
$x \mapsto x(\log x - \log b_v)$ is convex with value 0 at 0, its term is at most
$\tau(\log \tau + \log Z_b - \min_w z^b_w)$. Where that bound is below $c / 2$ (a margin for rounding), no other
entry can clip, so $D = \mathrm{KL} - \sum_{\text{clipped candidates}} (\text{term}_v - c)$ exactly, and $A$, $B$
follow from the same few entries. Rows where the bound fails (a log-probability of $b$ below about $-265$ nats at
$c = 0.05$: only extreme logits), or chunks with too many candidates (a tiny $c$), take an exact second pass. The
backward recomputes the tiles once, like TRL's kernel, and rebuilds the mask from the saved normalizers with the same
float expression as the forward (so the two agree on which terms clip). So the clipped divergence costs the same
projections as TRL's unclipped `ChunkedDivergenceFunction`: one per head in the forward, one per head plus the
gradient products in the backward.

Memory: rows go `chunk_size` at a time and the vocabulary `vocab_tile` columns at a time; at most one
`[chunk_size, vocab_tile]` tile of each kind lives at once, plus per-row statistics and the candidate entries.

Devices: the same torch code on CPU and CUDA (no Triton kernel: none could be tested here). The tiles are large enough
that each op is a big vectorized kernel on either device.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from .sharding import is_zero3_param


DIVERGENCE_KINDS: tuple[str, ...] = ("fkl", "rkl")
DEFAULT_CHUNK_SIZE = 1024
DEFAULT_VOCAB_TILE = 8192
# Candidates are entries whose anchor probability exceeds tau = term_clip / _CANDIDATE_FACTOR. The one-pass forward is
# exact for a row whose bound tau (log tau + log Z_b - min z_b) is below _BOUND_MARGIN * term_clip (the margin absorbs
# rounding): log Z_b - min z_b < 256 + log(512 / term_clip), about 265 nats at term_clip = 0.05, which covers real LM
# logits even at low temperature. LM-like rows collect a few hundred to a thousand candidates (measured at V = 151,936).
_CANDIDATE_FACTOR = 512.0
_BOUND_MARGIN = 0.5
# Above this many candidates per row (on average over a row chunk) the chunk takes the exact second pass instead. A
# high-entropy row collects a few hundred per tile early on, while its running normalizer is still small; the storage
# (12 bytes a candidate) stays within about one float32 tile.
_CANDIDATE_BUDGET_PER_VOCAB_TILE_COLUMN = 0.25


def chunked_divergence(
    student_hidden: torch.Tensor,
    student_head: tuple[torch.Tensor, torch.Tensor | None],
    teacher_hidden: torch.Tensor,
    teacher_head: tuple[torch.Tensor, torch.Tensor | None],
    kind: str,
    *,
    term_clip: float | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_tile: int = DEFAULT_VOCAB_TILE,
    return_unclipped: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-row (clipped) KL of the two heads' distributions, see the module docstring; `[N]` float32 (float64 in).

    Args:
        student_hidden (`torch.Tensor`): `[N, H_s]` student hidden states (the gradient flows to them).
        student_head (`tuple`): `(weight [V, H_s], bias [V] or None)`; gradients where they require grad.
        teacher_hidden (`torch.Tensor`): `[N, H_t]` teacher hidden states (detached).
        teacher_head (`tuple`): `(weight [V, H_t], bias [V] or None)` (detached).
        kind (`str`): `"fkl"` = KL(p_teacher || p_student) or `"rkl"` = KL(p_student || p_teacher).
        term_clip (`float`, *optional*): each vocabulary term becomes `min(term, term_clip)`; `None` for no clip.
        temperature, logit_scale, final_logit_softcapping: the output transform, applied to both heads.
        chunk_size (`int`): rows per tile. vocab_tile (`int`): vocabulary columns per tile.
        return_unclipped (`bool`): also return the unclipped KL per row (detached; the same pass computes it).
    """
    if kind not in DIVERGENCE_KINDS:
        raise ValueError(f"kind must be one of {DIVERGENCE_KINDS}, got {kind!r}.")
    if term_clip is not None and not term_clip > 0:
        raise ValueError(f"term_clip must be > 0 or None (no clip), got {term_clip}.")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if chunk_size < 1 or vocab_tile < 1:
        raise ValueError(f"chunk_size and vocab_tile must be >= 1, got {chunk_size} and {vocab_tile}.")
    if student_hidden.dim() != 2 or teacher_hidden.shape[0] != student_hidden.shape[0]:
        raise ValueError(
            f"student_hidden must be [N, H] and teacher_hidden [N, H_t] with the same N; got "
            f"{tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}."
        )
    if student_head[0].shape[0] != teacher_head[0].shape[0]:
        raise ValueError(
            f"The student and teacher heads must share the vocabulary; got {student_head[0].shape[0]} and "
            f"{teacher_head[0].shape[0]} rows."
        )
    if student_hidden.shape[0] == 0 and not is_zero3_param(student_head[0]):
        # Keep the graph connected so an empty micro-batch still back-propagates a zero. A ZeRO-3 partitioned head goes
        # through the function anyway: its gathers (one in the forward, one in the backward) are collectives that
        # every process must make, routed tokens or not.
        zero = student_hidden.sum(-1).float() * 0.0
        return (zero, zero.detach()) if return_unclipped else zero
    teacher_weight, teacher_bias = teacher_head
    value, unclipped = ClippedDivergenceFunction.apply(
        student_hidden,
        student_head[0],
        student_head[1],
        teacher_hidden.detach(),
        teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
        kind,
        term_clip,
        temperature,
        logit_scale,
        final_logit_softcapping,
        chunk_size,
        vocab_tile,
    )
    return (value, unclipped) if return_unclipped else value


class _Transform:
    """The output transform $z = \\sigma(\\text{scale}\\cdot y)/T$ and the projection of one tile, in place."""

    def __init__(self, temperature: float, logit_scale: float, softcap: float | None, dtype: torch.dtype) -> None:
        self.inv_t = 1.0 / temperature
        self.scale = logit_scale
        self.softcap = softcap
        self.dtype = dtype  # float32, or float64 for float64 inputs (gradcheck)

    def project(self, out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        """`out = transform(hidden @ weight.T + bias)`, computed in `self.dtype` (logits are never rounded to bf16)."""
        if hidden.dtype == weight.dtype == self.dtype:
            torch.mm(hidden, weight.t(), out=out)
        elif out.device.type == "cuda" and weight.dtype in (torch.float16, torch.bfloat16):
            out.copy_(torch.mm(hidden.to(weight.dtype), weight.t(), out_dtype=self.dtype))
        else:
            torch.mm(hidden.to(self.dtype), weight.to(self.dtype).t(), out=out)
        if bias is not None:
            out.add_(bias.to(self.dtype))
        if self.softcap is None:
            out.mul_(self.scale * self.inv_t)
        else:
            out.mul_(self.scale / self.softcap).tanh_().mul_(self.softcap * self.inv_t)
        return out

    def chain_factor(self, z_student: torch.Tensor) -> torch.Tensor | float:
        """d z / d y for the student tile, from its transformed logits: `scale (1 - tanh^2) / T`."""
        if self.softcap is None:
            return self.scale * self.inv_t
        th = z_student * (1.0 / (self.softcap * self.inv_t))
        return th.mul_(th).neg_().add_(1.0).mul_(self.scale * self.inv_t)


def _lm_head_ctx(weight: torch.Tensor, bias: torch.Tensor | None):
    # Under DeepSpeed ZeRO-3 a head parameter is partitioned; TRL's helper gathers it for a direct access (a no-op
    # otherwise). A head already gathered into a plain tensor (the teacher's, see the trainer) needs nothing.
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    return maybe_gather_lm_head_ctx(*(p for p in (weight, bias) if p is not None and is_zero3_param(p)))


def _anchor_other(kind: str, zs: torch.Tensor, zt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(z_a, z_b)`: the distribution the KL takes its expectation under first."""
    return (zt, zs) if kind == "fkl" else (zs, zt)


class ClippedDivergenceFunction(torch.autograd.Function):
    """Autograd function behind `chunked_divergence` (see the module docstring for the math and the tiling)."""

    @staticmethod
    def forward(
        ctx,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        student_bias: torch.Tensor | None,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        teacher_bias: torch.Tensor | None,
        kind: str,
        term_clip: float | None,
        temperature: float,
        logit_scale: float,
        softcap: float | None,
        chunk_size: int,
        vocab_tile: int,
    ) -> torch.Tensor:
        dtype = torch.float64 if student_weight.dtype == torch.float64 else torch.float32
        tf = _Transform(temperature, logit_scale, softcap, dtype)
        n_rows, vocab = student_hidden.shape[0], student_weight.shape[0]
        device = student_hidden.device
        log_z_s = torch.empty(n_rows, device=device, dtype=dtype)
        log_z_t = torch.empty_like(log_z_s)
        value = torch.empty_like(log_z_s)
        unclipped = torch.empty_like(log_z_s)
        aux = torch.empty_like(log_z_s)  # A (fkl) or B (rkl) of the module docstring
        with (
            torch.autocast(device.type, enabled=False),  # the tiles are float32 whatever the surrounding autocast
            _lm_head_ctx(student_weight, student_bias),
            _lm_head_ctx(teacher_weight, teacher_bias),
        ):
            for r0 in range(0, n_rows, chunk_size):
                rows = slice(r0, min(r0 + chunk_size, n_rows))
                _forward_chunk(
                    student_hidden[rows],
                    teacher_hidden[rows],
                    (student_weight, student_bias),
                    (teacher_weight, teacher_bias),
                    kind,
                    term_clip,
                    tf,
                    vocab,
                    vocab_tile,
                    out=(log_z_s[rows], log_z_t[rows], value[rows], unclipped[rows], aux[rows]),
                )
        ctx.save_for_backward(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, log_z_s, log_z_t,
            aux,
        )  # fmt: skip
        ctx.settings = (kind, term_clip, tf, chunk_size, vocab_tile)
        ctx.mark_non_differentiable(unclipped)
        return value, unclipped

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_value: torch.Tensor, _grad_unclipped: torch.Tensor | None):
        (s_h, s_w, s_b, t_h, t_w, t_b, log_z_s, log_z_t, aux) = ctx.saved_tensors
        kind, term_clip, tf, chunk_size, vocab_tile = ctx.settings
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if s_h.shape[0] == 0:
            # Nothing routed here (a ZeRO-3 head, see `chunked_divergence`): join the gathers, contribute no gradient.
            with _lm_head_ctx(s_w, s_b), _lm_head_ctx(t_w, t_b):
                pass
            return (torch.zeros_like(s_h) if need_h else None, *(None,) * 12)
        grad_h = torch.zeros(s_h.shape, device=s_h.device, dtype=tf.dtype) if need_h else None
        grad_w = torch.zeros(s_w.shape, device=s_w.device, dtype=tf.dtype) if need_w else None
        grad_b = torch.zeros(s_b.shape, device=s_b.device, dtype=tf.dtype) if need_b else None
        if need_h or need_w or need_b:
            n_rows = s_h.shape[0]
            grad_value = grad_value.to(tf.dtype)
            with torch.autocast(s_h.device.type, enabled=False), _lm_head_ctx(s_w, s_b), _lm_head_ctx(t_w, t_b):
                for r0 in range(0, n_rows, chunk_size):
                    rows = slice(r0, min(r0 + chunk_size, n_rows))
                    h_s, h_t = s_h[rows], t_h[rows]
                    h_s_mm = h_s.to(tf.dtype)
                    for cols, zs, zt in _logit_tiles(h_s, h_t, (s_w, s_b), (t_w, t_b), tf, vocab_tile):
                        g = _logit_grad_tile(
                            kind, term_clip, tf, zs, zt, log_z_s[rows], log_z_t[rows], aux[rows], grad_value[rows]
                        )
                        if grad_h is not None:
                            grad_h[rows].addmm_(g, s_w[cols].to(tf.dtype))
                        if grad_w is not None:
                            grad_w[cols].addmm_(g.t(), h_s_mm)
                        if grad_b is not None:
                            grad_b[cols] += g.sum(0)
        return (
            None if grad_h is None else grad_h.to(s_h.dtype),
            None if grad_w is None else grad_w.to(s_w.dtype),
            None if grad_b is None else grad_b.to(s_b.dtype),
            *(None,) * 10,
        )


def _forward_chunk(s_h, t_h, s_head, t_head, kind, term_clip, tf, vocab, vocab_tile, *, out) -> None:
    """One pass over the vocabulary for `n` rows: normalizers, the unclipped KL, and the clip candidates."""
    log_z_s_out, log_z_t_out, value_out, unclipped_out, aux_out = out
    n, device, dtype = s_h.shape[0], s_h.device, tf.dtype
    clip = term_clip is not None
    tau = term_clip / _CANDIDATE_FACTOR if clip else 0.0
    full = lambda fill: torch.full((n,), fill, device=device, dtype=dtype)  # noqa: E731
    a_max, a_sum, b_max, b_sum, gap = full(-math.inf), full(0.0), full(-math.inf), full(0.0), full(0.0)
    b_min = full(math.inf)  # the other distribution's smallest transformed logit, for the candidate bound
    cand_rows, cand_za, cand_zb = [], [], []
    n_candidates, collecting = 0, clip
    budget = max(256, int(_CANDIDATE_BUDGET_PER_VOCAB_TILE_COLUMN * vocab_tile)) * n
    e_buf = torch.empty((n, min(vocab_tile, vocab)), device=device, dtype=dtype)
    for _, zs, zt in _logit_tiles(s_h, t_h, s_head, t_head, tf, vocab_tile):
        za, zb = _anchor_other(kind, zs, zt)
        e = e_buf[:, : zs.shape[1]]
        # The other distribution's online logsumexp (and its minimum logit, for the candidate bound).
        if clip:
            tile_min, tile_max = torch.aminmax(zb, dim=-1)
            torch.minimum(b_min, tile_min, out=b_min)
        else:
            tile_max = zb.amax(-1)
        new_max = torch.maximum(b_max, tile_max)
        torch.sub(zb, new_max.unsqueeze(-1), out=e).exp_()
        b_sum.mul_(torch.exp(b_max - new_max)).add_(e.sum(-1))
        b_max = new_max
        # The anchor's online logsumexp and its weighted gap E_a[z_a - z_b], rescaled as the maximum moves.
        new_max = torch.maximum(a_max, za.amax(-1))
        rescale = torch.exp(a_max - new_max)
        torch.sub(za, new_max.unsqueeze(-1), out=e).exp_()
        a_sum.mul_(rescale).add_(e.sum(-1))
        a_max = new_max
        if collecting:
            # Anchor probability above tau against the running normalizer: a superset of the final a_v > tau.
            hits = (e > (tau * a_sum).unsqueeze(-1)).nonzero()
            n_candidates += hits.shape[0]
            if n_candidates > budget:
                collecting = False
                cand_rows, cand_za, cand_zb = [], [], []
            elif hits.shape[0]:
                r, c = hits.unbind(-1)
                cand_rows.append(r.to(torch.int32))
                cand_za.append(za[r, c])
                cand_zb.append(zb[r, c])
        zb.sub_(za)  # now z_b - z_a
        gap.mul_(rescale).sub_(torch.linalg.vecdot(e, zb))
    log_z_a = a_max + torch.log(a_sum)
    log_z_b = b_max + torch.log(b_sum)
    kl = gap / a_sum - log_z_a + log_z_b
    log_z_s, log_z_t = (log_z_b, log_z_a) if kind == "fkl" else (log_z_a, log_z_b)
    log_z_s_out.copy_(log_z_s)
    log_z_t_out.copy_(log_z_t)
    value_out.copy_(kl)
    unclipped_out.copy_(kl)
    aux_out.copy_(torch.ones_like(kl) if kind == "fkl" else kl + 1.0)  # A = 1, B = KL + 1 unclipped
    if not clip:
        return
    # Clipped: value = KL - sum (term - c) and aux = A or B minus the clipped entries' share, over the candidates.
    exact = collecting & (tau * (math.log(tau) + log_z_b - b_min) < _BOUND_MARGIN * term_clip)
    if collecting and cand_rows:
        r, za, zb = torch.cat(cand_rows).long(), torch.cat(cand_za), torch.cat(cand_zb)
        term = _terms(za - log_z_a[r], zb - log_z_b[r])
        clipped = term >= term_clip
        r, term, log_a = r[clipped], term[clipped], (za - log_z_a[r])[clipped]
        value_out.index_add_(0, r, -(term - term_clip))
        removed = log_a.exp() if kind == "fkl" else term + log_a.exp()
        aux_out.index_add_(0, r, -removed)
    if not bool(exact.all()):
        redo = (~exact).nonzero().squeeze(-1)
        value, aux = _exact_pass(s_h[redo], t_h[redo], s_head, t_head, kind, term_clip, tf, vocab_tile,
                                 log_z_s[redo], log_z_t[redo])  # fmt: skip
        value_out[redo] = value
        aux_out[redo] = aux


def _logit_tiles(s_h, t_h, s_head, t_head, tf, vocab_tile):
    """Both heads' transformed logits, one `[n, width]` vocabulary tile at a time, as `(cols, zs, zt)`; every pass
    walks the vocabulary this way. The two tiles live in buffers reused from one tile to the next (no allocation per
    tile): a consumer is done with a tile when it asks for the next."""
    vocab = s_head[0].shape[0]
    s_buf = torch.empty((s_h.shape[0], min(vocab_tile, vocab)), device=s_h.device, dtype=tf.dtype)
    t_buf = torch.empty_like(s_buf)
    for v0 in range(0, vocab, vocab_tile):
        cols = slice(v0, min(v0 + vocab_tile, vocab))
        width = cols.stop - v0
        zs = tf.project(s_buf[:, :width], s_h, s_head[0][cols], None if s_head[1] is None else s_head[1][cols])
        zt = tf.project(t_buf[:, :width], t_h, t_head[0][cols], None if t_head[1] is None else t_head[1][cols])
        yield cols, zs, zt


def _terms(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """`a (log a - log b)`, the one expression every pass uses, so the clip decisions agree bit for bit."""
    return log_a.exp() * (log_a - log_b)


def _exact_pass(s_h, t_h, s_head, t_head, kind, term_clip, tf, vocab_tile, log_z_s, log_z_t):
    """The clipped sum and `A`/`B` by a second pass over the vocabulary, for the rows the one-pass bound missed."""
    n, device = s_h.shape[0], s_h.device
    value = torch.zeros(n, device=device, dtype=tf.dtype)
    aux = torch.zeros_like(value)
    log_z_a, log_z_b = _anchor_other(kind, log_z_s, log_z_t)
    for _, zs, zt in _logit_tiles(s_h, t_h, s_head, t_head, tf, vocab_tile):
        log_a, log_b = _anchor_other(kind, zs, zt)
        log_a.sub_(log_z_a.unsqueeze(-1))
        log_b.sub_(log_z_b.unsqueeze(-1))
        term = _terms(log_a, log_b)
        kept = term < term_clip
        value += torch.where(kept, term, term_clip).sum(-1)
        kept_mass = log_a.exp_().mul_(kept)  # a_v m_v
        aux += kept_mass.sum(-1) if kind == "fkl" else (term * kept).sum(-1) + kept_mass.sum(-1)
    return value, aux


def _logit_grad_tile(kind, term_clip, tf, zs, zt, log_z_s, log_z_t, aux, grad_value) -> torch.Tensor:
    """`dD/dy` on one `[n, width]` tile of the student's head output (overwrites `zs` and `zt`)."""
    chain = tf.chain_factor(zs)  # needs the transformed logits, before they become log-probabilities
    log_ps = zs.sub_(log_z_s.unsqueeze(-1))
    log_pt = zt.sub_(log_z_t.unsqueeze(-1))
    row_scale = grad_value.unsqueeze(-1)
    if kind == "fkl":
        # -m p_t + A p_s
        if term_clip is None:
            g = log_ps.exp().sub_(log_pt.exp_())
        else:
            kept = _terms(log_pt, log_ps) < term_clip
            g = log_ps.exp().mul_(aux.unsqueeze(-1)).sub_(log_pt.exp_().mul_(kept))
    else:
        # m p_s (f + 1) - B p_s = p_s (m (f + 1) - B)
        kept = None if term_clip is None else _terms(log_ps, log_pt) < term_clip
        f = log_pt.neg_().add_(log_ps)  # log p_s - log p_t, in place of log p_t
        if kept is None:
            g = f.sub_(aux.unsqueeze(-1) - 1.0)
        else:
            g = f.add_(1.0).mul_(kept).sub_(aux.unsqueeze(-1))
        g.mul_(log_ps.exp_())
    g.mul_(row_scale)
    return g.mul_(chain)
