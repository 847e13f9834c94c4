"""Pure loss functions of the TRACE KL channel: no trainer state, the math in the docstrings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .chunked_divergence import chunked_divergence


DIVERGENCE_KINDS: tuple[str, ...] = ("fkl", "rkl")
CLIP_MODES: tuple[str, ...] = ("token", "element")


def bound_divergence(divergence: torch.Tensor, term_clip: float) -> torch.Tensor:
    r"""The ``"token"`` clip: each token's divergence $D_t$ becomes $D_t \cdot \mathrm{sg}(\min(1, c / D_t))$.

    The value is $\min(D_t, c)$, and the gradient is the true divergence's, scaled by $\min(1, c / D_t) \in (0, 1]$:

    $$\nabla \tilde D_t = \min\bigl(1, c / D_t\bigr)\, \nabla D_t,$$

    which is the gradient of the concave, increasing surrogate $D_t$ for $D_t \le c$ and $c\,(1 + \log(D_t / c))$
    above. A token far from the teacher therefore weighs at most as much as a token at divergence $c$ (the
    influence bound the paper's clip is for), and since the scale is positive the gradient always points along the
    true divergence's: a small descent step never raises $D_t$, and under forward KL an entry the teacher prefers
    more than the student is never pushed down. (The ``"element"`` clip, $\sum_v \min(\text{term}_v, c)$, has
    neither property: see `token_divergence`.)
    """
    return divergence * (term_clip / divergence.detach().clamp(min=term_clip))


def _check_clip(term_clip: float | None, clip_mode: str) -> None:
    if term_clip is not None and not term_clip > 0:
        raise ValueError(f"term_clip must be > 0 or None (no clip), got {term_clip}.")
    if clip_mode not in CLIP_MODES:
        raise ValueError(f"clip_mode must be one of {CLIP_MODES}, got {clip_mode!r}.")


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str,
    *,
    topk: int | None = None,
    temperature: float = 1.0,
    term_clip: float | None = None,
    clip_mode: str = "token",
) -> torch.Tensor:
    r"""Per-row KL divergence between the teacher's and the student's next-token distributions.

    With $p_s = \mathrm{softmax}(z_s / T)$ and $p_t = \mathrm{softmax}(z_t / T)$ over the vocabulary:

    - ``"fkl"`` (forward): $\mathrm{KL}(p_t \,\|\, p_s) = \sum_v p_t(v) \,(\log p_t(v) - \log p_s(v))$, mode-covering;
    - ``"rkl"`` (reverse): $\mathrm{KL}(p_s \,\|\, p_t) = \sum_v p_s(v) \,(\log p_s(v) - \log p_t(v))$, mode-seeking.

    With ``topk=k`` both distributions are coarsened to $k + 1$ categories: the $k$ most likely tokens of the
    distribution the KL takes its expectation under (the teacher for ``"fkl"``, the student for ``"rkl"``) and one
    tail bucket holding the remaining mass, $\log p(\text{tail}) = \log \sum_{v \notin S} p(v)$. The coarsened KL is a
    lower bound of the full one and equals it when $k \ge V - 1$.

    With ``term_clip=c`` the influence of a large divergence is bounded, in one of two ways (``clip_mode``):

    - ``"token"`` (the default): the row's divergence $D$ becomes $\min(D, c)$ in value, with the gradient of $D$
      scaled by $\min(1, c / D)$ (`bound_divergence`): it never points away from the teacher.
    - ``"element"`` (the literal pointwise clip, OPSD's ``jsd_token_clip``): each term $a_v(\log a_v - \log b_v)$ of
      the sum, with $(a, b) = (p_t, p_s)$ for ``"fkl"`` and $(p_s, p_t)$ for ``"rkl"``, becomes
      $\min(\text{term}_v, c)$ before the sum over the vocabulary. The clip is one-sided (negative terms are kept),
      and a clipped term carries no gradient: the mask is $[\text{term}_v < c]$, so a term exactly at $c$ counts as
      clipped. Kept for fidelity experiments only: once the teacher's dominant entries are clipped, the forward-KL
      gradient on an entry $u$ becomes $-m_u p_t(u) + A\,p_s(u)$ with $A$ the kept teacher mass, which *lowers* the
      logit of a clipped entry the teacher prefers, and the value can fall below zero.

    With ``topk`` the (element-)clipped terms are those of the $k + 1$ coarsened categories ($k$ support tokens and
    the tail bucket), and the token clip bounds the coarsened divergence.

    The teacher is detached: the gradient reaches ``student_logits`` only.

    Args:
        student_logits (`torch.Tensor`): `[N, V]` student logits.
        teacher_logits (`torch.Tensor`): `[N, V]` teacher logits.
        kind (`str`): `"fkl"` or `"rkl"`.
        topk (`int`, *optional*): size of the top-k support; `None` for the full vocabulary.
        temperature (`float`, *optional*, defaults to `1.0`): both logits are divided by it.
        term_clip (`float`, *optional*): the clip's value `c` (> 0); `None` for no clip.
        clip_mode (`str`, *optional*, defaults to `"token"`): `"token"` or `"element"`, see above.

    Returns:
        `torch.Tensor`: `[N]` divergences in float32 (float64 for float64 logits).
    """
    if kind not in DIVERGENCE_KINDS:
        raise ValueError(f"kind must be one of {DIVERGENCE_KINDS}, got {kind!r}.")
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"student_logits and teacher_logits must both be [N, V]; got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}."
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    _check_clip(term_clip, clip_mode)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_p_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    vocab = log_p_s.size(-1)
    if topk is not None and topk < vocab - 1:
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}.")
        anchor = log_p_t if kind == "fkl" else log_p_s.detach()
        support = anchor.topk(topk, dim=-1).indices
        log_p_s = _topk_with_tail(log_p_s, support)
        log_p_t = _topk_with_tail(log_p_t, support)
    log_a, log_b = (log_p_t, log_p_s) if kind == "fkl" else (log_p_s, log_p_t)
    terms = log_a.exp() * (log_a - log_b)
    if term_clip is None:
        return terms.sum(-1)
    if clip_mode == "token":
        return bound_divergence(terms.sum(-1), term_clip)
    # `where`, not `clamp`: clamp passes the gradient at the boundary, and a term at the clip must carry none.
    return torch.where(terms < term_clip, terms, torch.full_like(terms, term_clip)).sum(-1)


def _topk_with_tail(log_probs: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """`[N, k + 1]` log-probabilities: the `support` columns, then the log of the mass outside them."""
    in_support = torch.zeros_like(log_probs, dtype=torch.bool).scatter_(-1, support, True)
    tail = torch.logsumexp(log_probs.masked_fill(in_support, -math.inf), dim=-1, keepdim=True)
    return torch.cat([log_probs.gather(-1, support), tail], dim=-1)


def output_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
) -> torch.Tensor:
    """The LM head applied to `[N, H]` hidden states, with the model's logit scale and soft-capping (Gemma, Cohere)."""
    logits = F.linear(hidden.to(weight.dtype), weight, bias).float() * logit_scale
    if final_logit_softcapping is not None:
        logits = torch.tanh(logits / final_logit_softcapping) * final_logit_softcapping
    return logits


def routed_divergence(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: tuple[torch.Tensor, torch.Tensor | None],
    teacher_head: tuple[torch.Tensor, torch.Tensor | None],
    kind: str,
    *,
    topk: int | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
    term_clip: float | None = None,
    clip_mode: str = "token",
    with_unclipped: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""`token_divergence` at `N` routed positions, from hidden states, without ever holding `[N, V]` logits.

    Full vocabulary: `trace_trl.chunked_divergence.chunked_divergence`, which tiles rows (`chunk_size`) and the
    vocabulary, applies the ``"element"`` clip if asked, and back-propagates to the student hidden states and head
    only. On CPU it is as fast as TRL's unclipped `ChunkedDivergenceFunction` (docs/performance.md), so it serves
    every case there; on CUDA the unclipped divergence (also the base of the ``"token"`` clip) takes TRL's kernel,
    fused in Triton, except under DeepSpeed ZeRO-3, whose partitioned head only the project's kernel gathers
    correctly beside a plain-tensor teacher head. With ``topk``: `chunk_size` positions at a time through
    `token_divergence`, each chunk re-computed in the backward pass (activation checkpointing), so at most one
    `[chunk_size, V]` tile lives. The ``"token"`` clip (`bound_divergence`) is applied to the divergences last.

    Args:
        student_hidden (`torch.Tensor`): `[N, H]`, with grad.
        teacher_hidden (`torch.Tensor`): `[N, H]`, no grad.
        student_head, teacher_head (`tuple`): `(weight [V, H], bias [V] or None)` of each LM head.
        kind (`str`): `"fkl"` or `"rkl"`.
        term_clip (`float`, *optional*): the clip's value; `None` for none. clip_mode (`str`): as `token_divergence`.
        with_unclipped (`bool`): also return the unclipped divergences (detached), for metrics.

    Returns:
        `torch.Tensor`: `[N]` float32 divergences, or `(divergences, unclipped)` with ``with_unclipped``.
    """
    if kind not in DIVERGENCE_KINDS:
        raise ValueError(f"kind must be one of {DIVERGENCE_KINDS}, got {kind!r}.")
    _check_clip(term_clip, clip_mode)
    element_clip = term_clip if clip_mode == "element" else None
    n = student_hidden.size(0)
    teacher_hidden = teacher_hidden.detach()
    if n == 0 and topk is not None:
        # Keep the graph connected so an empty micro-batch still back-propagates a zero. (The full-vocabulary path
        # leaves that to `chunked_divergence`, which still joins a ZeRO-3 head's gathers with zero rows.)
        divergence = student_hidden.sum(-1).float() * 0.0
        unclipped = divergence.detach()
    elif topk is None and element_clip is None and n > 0 and _trl_kernel_applies(student_hidden.device.type):
        divergence = _trl_full_vocab(
            student_hidden, teacher_hidden, student_head, teacher_head, kind, temperature, logit_scale,
            final_logit_softcapping,
        )  # fmt: skip
        unclipped = divergence.detach()
    elif topk is None:
        divergence, unclipped = chunked_divergence(
            student_hidden,
            student_head,
            teacher_hidden,
            teacher_head,
            kind,
            term_clip=element_clip,
            temperature=temperature,
            logit_scale=logit_scale,
            final_logit_softcapping=final_logit_softcapping,
            chunk_size=chunk_size,
            return_unclipped=True,
        )
        divergence, unclipped = divergence.float(), unclipped.float()
    else:
        settings = (kind, topk, temperature, logit_scale, final_logit_softcapping)
        chunks, unclipped_chunks = [], []
        for start in range(0, n, chunk_size):
            s_h, t_h = student_hidden[start : start + chunk_size], teacher_hidden[start : start + chunk_size]
            chunk = checkpoint(
                _topk_chunk, s_h, t_h, *student_head, *teacher_head, *settings, element_clip, use_reentrant=False
            )
            chunks.append(chunk)
            if element_clip is None:
                unclipped_chunks.append(chunk.detach())
            else:
                with torch.no_grad():
                    unclipped_chunks.append(_topk_chunk(s_h, t_h, *student_head, *teacher_head, *settings, None))
        divergence, unclipped = torch.cat(chunks), torch.cat(unclipped_chunks)
    if term_clip is not None and clip_mode == "token":
        divergence = bound_divergence(divergence, term_clip)
    return (divergence, unclipped) if with_unclipped else divergence


def _trl_kernel_applies(device_type: str) -> bool:
    """Whether the unclipped full-vocabulary divergence takes TRL's kernel: on CUDA (Triton), not under ZeRO-3.

    Under ZeRO-3, TRL's kernel gathers every head it is given and reads `.ds_status` on each, which the teacher's head
    (already gathered into a plain tensor) does not have; the project's kernel gathers only partitioned parameters.
    """
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return device_type == "cuda" and not is_deepspeed_zero3_enabled()


def _trl_full_vocab(s_h, t_h, student_head, teacher_head, kind, temperature, scale, softcap) -> torch.Tensor:
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    beta = 0.0 if kind == "fkl" else 1.0
    divergence, _ = ChunkedDivergenceFunction.apply(
        s_h, *student_head, t_h, *teacher_head, beta, temperature, scale, softcap, scale, softcap
    )
    return divergence.float()


def _topk_chunk(
    s_h, t_h, s_w, s_b, t_w, t_b, kind, topk, temperature, logit_scale, softcap, term_clip
) -> torch.Tensor:
    student_logits = output_logits(s_h, s_w, s_b, logit_scale=logit_scale, final_logit_softcapping=softcap)
    with torch.no_grad():
        teacher_logits = output_logits(t_h, t_w, t_b, logit_scale=logit_scale, final_logit_softcapping=softcap)
    # `term_clip` here is only ever the element clip: `routed_divergence` applies the token clip after the chunks.
    return token_divergence(
        student_logits, teacher_logits, kind, topk=topk, temperature=temperature, term_clip=term_clip,
        clip_mode="element",
    ).float()  # fmt: skip


def normalize_like_grpo(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str,
    gradient_accumulation_steps: float,
    max_completion_length: int,
    num_items_in_batch: torch.Tensor | None = None,
    num_processes: int = 1,
    steps_per_generation: int = 1,
    training: bool = True,
) -> torch.Tensor:
    r"""Reduce a `[B, T]` per-token loss exactly as GRPO reduces its policy loss for ``loss_type``.

    Let $m$ be the mask, $G$ the gradient-accumulation steps (1 outside training), and $\ell$ the per-token loss:

    - ``grpo``, ``sapo``: $\frac{1}{G}\,\mathrm{mean}_b \frac{\sum_t \ell_{bt} m_{bt}}{\max(1, \sum_t m_{bt})}$
    - ``bnpo``: $\frac{1}{G}\,\frac{\sum \ell m}{\max(1, \sum m)}$
    - ``dr_grpo``: $\frac{1}{G}\,\frac{\sum \ell m}{B \cdot L_{\max}}$
    - ``dapo``, ``cispo``, ``vespo``: $\frac{\sum \ell m}{N_{\text{items}} / P \cdot G / S}$ in training
      ($N_{\text{items}}$ counts the masked tokens of the whole generation batch on all $P$ processes, $S$ is
      ``steps_per_generation``), $\frac{\sum \ell m}{N_{\text{items}} / P}$ in evaluation
    - ``luspo``: $\frac{1}{G}\,\mathrm{mean}_b \sum_t \ell_{bt} m_{bt}$

    So a routed token weighs exactly like a GRPO token at ``kl_coef = 1``, and a masked token contributes zero.
    """
    g = gradient_accumulation_steps if training else 1.0
    masked = per_token * mask
    if loss_type in ("grpo", "sapo"):
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / g
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0) / g
    if loss_type == "dr_grpo":
        return masked.sum() / (per_token.size(0) * max_completion_length) / g
    if loss_type in ("dapo", "cispo", "vespo"):
        if num_items_in_batch is None:
            raise ValueError(f"loss_type={loss_type!r} normalizes by `num_items_in_batch`, which is missing.")
        normalizer = num_items_in_batch.clamp(min=1.0) / num_processes
        if training:
            normalizer = normalizer * gradient_accumulation_steps / steps_per_generation
        return masked.sum() / normalizer
    if loss_type == "luspo":
        return masked.sum(-1).mean() / g
    raise ValueError(f"Unknown loss_type {loss_type!r}.")


def sequence_normalize(
    per_token: torch.Tensor, mask: torch.Tensor, *, gradient_accumulation_steps: float = 1.0
) -> torch.Tensor:
    r"""The paper's sequence-normalized KL loss of one micro-batch, so that an optimizer step's total is exact.

    The KL loss of an optimizer step over its $R$ rollouts (all processes, all accumulation micro-batches) is

    $$\mathcal{L}_{\mathrm{KL}} = \frac{1}{R} \sum_{y} \frac{1}{|y|} \sum_{t \in S_y} D_t,$$

    where $|y|$ counts the rollout's completion tokens in the loss `mask`, $S_y$ its routed tokens (their `per_token`
    entries; every other entry is 0) and rollouts with nothing routed still count in $R$. A micro-batch of $B$ rows on
    one of $P$ processes returns $\frac{1}{B G} \sum_{y \in \text{batch}} \frac{1}{|y|} \sum_{t} D_t$ with $G$ =
    ``gradient_accumulation_steps``: TRL splits every generation batch into equal micro-batches, so $R = B G P$, and
    the data-parallel gradient average over $P$ processes plus the sum over $G$ micro-batches give exactly
    $\nabla \mathcal{L}_{\mathrm{KL}}$, whatever `steps_per_generation` is. A rollout with $|y| = 0$ (e.g. a masked
    truncated completion) contributes 0.

    Args:
        per_token (`torch.Tensor`): `[B, T]` divergences, 0 where nothing is routed.
        mask (`torch.Tensor`): `[B, T]` loss mask (completion mask times tool mask).
        gradient_accumulation_steps (`float`): micro-batches of the current optimizer step ($G$).
    """
    lengths = mask.sum(-1).clamp(min=1.0)
    per_rollout = (per_token * mask).sum(-1) / lengths
    return per_rollout.sum() / (per_token.size(0) * gradient_accumulation_steps)


def grpo_token_weights(routed: torch.Tensor, *, mode: str, kl_weight: float, kl_coef: float) -> torch.Tensor:
    r"""Weight of the GRPO loss on each token, given which tokens are routed to the KL channel.

    Non-routed tokens always weigh 1. While $w = $ ``kl_weight`` $> 0$, a routed token weighs:

    - ``"exclusive"``: $0$ (it gets only the KL loss);
    - ``"additive"``: $1$ (it gets both);
    - ``"complementary"``: $1 - w / c$ with $c = $ ``kl_coef``, a smooth hand-off from KL back to GRPO.

    Once $w = 0$ every token weighs 1 (plain GRPO). The weights multiply the per-token advantages, which scales the
    clipped surrogate linearly since the weights are non-negative.
    """
    if mode not in ("exclusive", "additive", "complementary"):
        raise ValueError(f"Unknown routed_token_grpo mode {mode!r}.")
    routed = routed.float()
    if kl_weight <= 0.0 or mode == "additive":
        return torch.ones_like(routed)
    on_routed = 0.0 if mode == "exclusive" else max(0.0, 1.0 - kl_weight / kl_coef)
    return 1.0 - routed * (1.0 - on_routed)
