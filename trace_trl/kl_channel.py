"""The KL channel of one micro-step: teacher forward, student hook, routed divergence, normalization, statistics.

`TRACETrainer._compute_loss` asks a `KLChannel` (built once in `__init__`) for the KL term of a micro-step and logs
the `KLStats` it returns; everything between the routed batch and the loss lives here:

1. the teacher's hidden states at the routed positions, from a forward over only the rows that route something, cut
   after the last routed token (`teacher_hidden_states`); under FSDP2 / ZeRO-3 through the teacher's wrapper, with
   its LM head gathered once into plain tensors;
2. GRPO's own loss, with per-token advantages that route GRPO away from KL tokens (`grpo_token_weights`), run by the
   caller while a forward hook on the student's decoder computes the routed divergence inside GRPO's single student
   forward (`capture_student`), so FSDP2 and ZeRO-3 gather the LM head and reduce its gradient as for any loss
   computed in the wrapped forward;
3. the per-token divergences reduced with the paper's sequence normalization or GRPO's normalizer;
4. the statistics the trainer logs (`KLStats`, reduced over processes by `KLChannel.log`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import TRACEConfig
from .losses import grpo_token_weights, routed_divergence, sequence_normalize
from .routing import Route
from .sharding import forward_through, full_tensor, is_dtensor, reshard
from .spans import TokenLabel
from .teacher import Teacher, causal_lm_of, lm_head_scaling


KINDS = (("fkl", Route.FKL), ("rkl", Route.RKL))


@dataclass
class KLStats:
    """What one KL-phase micro-step logs, on this process (`KLChannel.log` sums it over processes).

    `sums[kind]` holds `[sum of the divergences the loss used (clipped), sum of the unclipped divergences, tokens the
    clip bounded, routed tokens]` for `"fkl"` and `"rkl"`; it is empty when nothing was routed anywhere (the micro-step
    still counts, with a routed fraction of 0). `n_routed` is the global number of routed tokens.
    """

    routed: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    n_routed: float
    entropy: torch.Tensor | None = None
    sums: dict[str, list[torch.Tensor]] = field(default_factory=dict)


class KLChannel:
    """The token-routed KL channel of a `TRACETrainer`.

    Args:
        args (`TRACEConfig`): the run's configuration (divergence, clip, top-k, chunking, normalization, GRPO routing).
        teacher (`Teacher`): the teacher whose forward runs under no grad.
        accelerator: the trainer's `accelerate.Accelerator` (unwrapping, autocast, cross-process sums).
        policy (`nn.Module`): the unwrapped policy (its LM head's logit scale and softcapping are the teacher's too).
        sharding_engine (`str`, *optional*): `"fsdp2"`, `"zero3"` or `None`.
        temperature (`float`): the sampling temperature, used when `kl_temperature` is unset.
        normalize_like_grpo (`Callable`): `(per_token, mask, inputs) -> loss` with this run's GRPO normalizer.
        accumulation_steps (`Callable[[], int]`): the current gradient-accumulation steps (sequence normalization).
    """

    def __init__(
        self,
        args: TRACEConfig,
        teacher: Teacher,
        accelerator: Any,
        policy: nn.Module,
        *,
        sharding_engine: str | None,
        temperature: float,
        normalize_like_grpo: Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], torch.Tensor],
        accumulation_steps: Callable[[], int],
    ) -> None:
        self.args = args
        self.teacher = teacher
        self.accelerator = accelerator
        self.sharding_engine = sharding_engine
        self.temperature = temperature
        self._normalize_like_grpo = normalize_like_grpo
        self._accumulation_steps = accumulation_steps
        self._logit_scale, self._softcap = lm_head_scaling(causal_lm_of(policy).config)
        self._captured: dict[str, Any] | None = None
        # This process's unclipped per-token divergences of the last KL-phase micro-step, by kind ("fkl", "rkl"; empty
        # when it routed nothing): for inspecting what the clip sees (the replication study reports their distribution).
        self.last_routed_divergences: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------------------------
    # The KL term of a micro-step
    # ------------------------------------------------------------------------------------------------------------
    def routed_tokens(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, float]:
        """`(routed [B, T] bool, loss mask [B, T], global routed-token count)`.

        The count is global: under ZeRO-3 / FSDP the teacher forward gathers weights, a collective every process
        joins, so whether it runs is decided for all processes at once; the same count feeds the exposure.
        """
        mask = inputs["completion_mask"] * inputs.get("tool_mask", torch.ones_like(inputs["completion_mask"]))
        routed = (inputs["trace_route"] != Route.GRPO) & mask.bool()
        n_routed = self.accelerator.reduce(routed.sum().float().reshape(1), "sum").item()
        return routed, mask, n_routed

    def loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        weight: float,
        grpo_loss: Callable[[dict[str, Any]], torch.Tensor],
    ) -> tuple[torch.Tensor, KLStats]:
        """GRPO's loss (by `grpo_loss(batch)`) plus `weight` times the routed KL, and the micro-step's statistics.

        The teacher runs first, so adapter switches (base/EMA teachers with LoRA) never sit between the student's
        forward and its backward; GRPO's per-token advantages are scaled by `grpo_token_weights`, and the KL channel
        is computed on the decoder's output inside GRPO's single student forward.
        """
        routed, mask, n_routed = self.routed_tokens(inputs)
        stats = KLStats(routed=routed, mask=mask, labels=inputs["trace_labels"], n_routed=n_routed)
        self.last_routed_divergences = {}
        unwrapped = self.accelerator.unwrap_model(model)
        if n_routed == 0:
            # Still a KL-phase micro-step: its (zero) routed fraction and its span entropies count in the metrics.
            with self.capture_student(unwrapped, None) as captured:
                loss = grpo_loss(inputs)
            stats.entropy = captured.get("entropy")
            return loss, stats

        route = inputs["trace_route"]
        rows, cols = routed.nonzero(as_tuple=True)
        teacher_hidden, teacher_head = self.teacher_hidden_states(model, unwrapped, inputs, rows, cols)
        grpo_weights = grpo_token_weights(
            routed, mode=self.args.routed_token_grpo, kl_weight=weight, kl_coef=self.args.kl_coef
        )
        advantages = inputs["advantages"]
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        grpo_inputs = {**inputs, "advantages": advantages * grpo_weights}  # a new dict: batches are revisited
        positions = (rows, inputs["prompt_ids"].size(1) - 1 + cols)

        def kl_inside_forward(hidden: torch.Tensor):
            return self.routed_kl(
                unwrapped, hidden[positions], teacher_hidden, teacher_head, route[rows, cols], rows, cols, mask.shape
            )

        with self.capture_student(unwrapped, kl_inside_forward) as captured:
            loss = grpo_loss(grpo_inputs)
        if "kl" not in captured:
            raise RuntimeError(
                "GRPO's loss did not run the student's decoder, so TRACE's KL channel has no hidden states."
            )
        per_token, stats.sums = captured["kl"]
        stats.entropy = captured.get("entropy")
        if self.args.kl_normalization == "sequence":
            kl_loss = sequence_normalize(per_token, mask, gradient_accumulation_steps=self._accumulation_steps())
        else:
            kl_loss = self._normalize_like_grpo(per_token, mask, inputs)
        return loss + weight * kl_loss, stats

    # ------------------------------------------------------------------------------------------------------------
    # Teacher and student
    # ------------------------------------------------------------------------------------------------------------
    def teacher_hidden_states(
        self, model: nn.Module, unwrapped: nn.Module, inputs: dict[str, Any], rows: torch.Tensor, cols: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]]:
        """Teacher hidden states at the routed positions, from a forward over only the rows that need it, and the
        teacher's LM head `(weight, bias)`.

        Each row is cut after its batch's last routed token: with causal attention the tokens after it cannot change
        the hidden states before it. Under FSDP2 / ZeRO-3 the forward runs through the teacher's wrapper (so the
        engine gathers each unit's weights) and the head is gathered once into plain tensors in the hidden states'
        dtype; every process does both, routed tokens or not.
        """
        teacher_rows, local_index = torch.unique(rows, return_inverse=True)
        completion_width = inputs["completion_ids"].size(1)
        teacher_prompt_width = inputs["teacher_input_ids"].size(1) - completion_width
        cut = teacher_prompt_width + int(cols.max()) + 1 if rows.numel() else teacher_prompt_width + 1
        if teacher_rows.numel() == 0:
            # This process routes nothing while another does: run a one-token forward so sharded-weight collectives
            # (ZeRO-3, FSDP) see every process.
            teacher_rows = torch.zeros(1, dtype=torch.long, device=rows.device)
        input_ids = inputs["teacher_input_ids"][teacher_rows, :cut]
        attention_mask = inputs["teacher_attention_mask"][teacher_rows, :cut]

        def decoder(view) -> torch.Tensor:
            return view.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

        with torch.no_grad(), self.teacher.activate(unwrapped, wrapper=model) as view, self.accelerator.autocast():
            if self.sharding_engine is None:
                hidden = decoder(view)
                head = view.head()
            else:
                hidden = forward_through(view.wrapper, view.root, decoder, view)
                reshard(view.wrapper)  # FSDP2 keeps a root unit gathered after its forward; gather the head alone
                weight, bias = view.head()
                head = (full_tensor(weight, hidden.dtype), full_tensor(bias, hidden.dtype))
        return hidden[local_index, teacher_prompt_width - 1 + cols].detach(), head

    @contextlib.contextmanager
    def capture_student(self, unwrapped: nn.Module, kl_inside_forward) -> Iterator[dict[str, Any]]:
        """While GRPO's loss runs: on the decoder's output, inside the student's single forward, compute the KL channel
        with `kl_inside_forward(hidden_states)` (unless it is `None`); and keep GRPO's per-token entropies (the
        trainer hands them over with `record_entropies`)."""
        captured: dict[str, Any] = {}

        def routed_kl_hook(module, args, output):
            if "kl" in captured:
                raise RuntimeError("The student's decoder ran twice in one GRPO loss; TRACE expects a single forward.")
            captured["kl"] = kl_inside_forward(output.last_hidden_state)

        handle = None
        if kl_inside_forward is not None:
            handle = causal_lm_of(unwrapped).base_model.register_forward_hook(routed_kl_hook)
        self._captured = captured
        try:
            yield captured
        finally:
            if handle is not None:
                handle.remove()
            self._captured = None

    def record_entropies(self, entropies: torch.Tensor | None) -> None:
        """GRPO's per-token entropies of the student forward running now (kept only inside `capture_student`)."""
        if self._captured is not None and entropies is not None:
            self._captured["entropy"] = entropies.detach()

    def routed_kl(self, unwrapped, student_hidden, teacher_hidden, teacher_head, kinds, rows, cols, shape):
        """`[B, T]` per-token divergences (zero off the routed tokens) and their sums, from the student's hidden states
        at the routed positions.

        Runs inside the student's forward. Under FSDP2 the head is the gathered parameter of its unit (Accelerate
        shards the final norm and the LM head as one unit, gathered when the norm runs). Under ZeRO-3 DeepSpeed has
        fetched the head for this forward (TRL's fused head reads it in the same forward), and where it has not, the
        kernel gathers it (once in its forward, once in its backward). Both kinds go through the kernel on every
        process, whatever it routes, so every process makes the same collectives.

        If the head's unit is freed after the forward (FSDP2 `reshard_after_forward` on it), the pre-backward hook on
        the forward's outputs (GRPO's log-probs) gathers it again before the kernel's backward runs: every node of
        GRPO's loss is created after this function runs, and the autograd engine runs the most recently created ready
        node first, so it reaches the log-probs before any node of the KL channel.
        """
        head = causal_lm_of(unwrapped).get_output_embeddings()
        if is_dtensor(head.weight):
            raise RuntimeError(
                "The LM head is still sharded when the decoder's forward ends: its FSDP unit is gathered later, or "
                "never. Put `lm_head` in a unit gathered during the forward, as Accelerate's FSDP2 preparation does "
                "(it shards the final norm and the LM head as one unit; examples/accelerate/fsdp2.yaml), not in a unit "
                "of its own. TRL's fused log-prob head reads it at the same point."
            )
        per_token = torch.zeros(shape, dtype=torch.float32, device=student_hidden.device)
        sums: dict[str, list[torch.Tensor]] = {}
        for kind, code in KINDS:
            selected = kinds == code
            divergence, unclipped = routed_divergence(
                student_hidden[selected],
                teacher_hidden[selected],
                (head.weight, head.bias),
                teacher_head,
                kind,
                topk=self.args.kl_topk,
                temperature=self.args.kl_temperature or self.temperature,
                chunk_size=self.args.kl_chunk_size,
                logit_scale=self._logit_scale,
                final_logit_softcapping=self._softcap,
                term_clip=self.args.kl_term_clip,
                clip_mode=self.args.kl_clip_mode,
                with_unclipped=True,
            )
            per_token = per_token.index_put((rows[selected], cols[selected]), divergence)
            # A token counts as clipped where the clip lowered its divergence (by more than rounding).
            clipped = (unclipped - divergence.detach()) > 1e-6
            sums[kind] = [divergence.detach().sum(), unclipped.sum(), clipped.sum().float(), selected.sum().float()]
            self.last_routed_divergences[kind] = unclipped
        return per_token, sums

    # ------------------------------------------------------------------------------------------------------------
    # Metrics
    # ------------------------------------------------------------------------------------------------------------
    def log(self, metrics: dict[str, list[float]], stats: KLStats, privileged_exposure: float) -> None:
        """The KL channel's metrics of one KL-phase micro-step, summed over processes.

        Per divergence kind: the mean of what the loss used (`trace/fkl_mean`, clipped), the mean of the true divergence
        (`trace/fkl_unclipped_mean`) and the fraction of routed tokens the clip bounded (`trace/fkl_clipped_frac`); an
        element-clipped "KL" can be negative, the unclipped one never is. Span entropies count key-, error- and
        unlabelled loss tokens."""
        mask_f = stats.mask.float()
        zero = mask_f.new_zeros(())
        local = [
            *(t for kind, _ in KINDS for t in stats.sums.get(kind, [zero] * 4)),
            stats.routed.sum().float(),
            mask_f.sum(),
        ]
        entropy = stats.entropy if stats.entropy is not None else torch.zeros_like(mask_f)
        for label in (TokenLabel.KEY, TokenLabel.ERROR, TokenLabel.NONE):
            selected = (stats.labels == label).float() * mask_f
            local += [(entropy * selected).sum(), selected.sum()]
        totals = self.accelerator.reduce(torch.stack([t.float() for t in local]), "sum").tolist()
        for i, (kind, _) in enumerate(KINDS):
            clipped_sum, unclipped_sum, n_clipped, n = totals[4 * i : 4 * i + 4]
            metrics[f"trace/{kind}_mean"].append(clipped_sum / n if n else math.nan)
            metrics[f"trace/{kind}_unclipped_mean"].append(unclipped_sum / n if n else math.nan)
            metrics[f"trace/{kind}_clipped_frac"].append(n_clipped / n if n else math.nan)
            metrics[f"trace/{kind}_token_frac"].append(n / max(totals[9], 1.0))
        n_routed, n_tokens = totals[8:10]
        metrics["trace/routed_token_frac"].append(n_routed / max(n_tokens, 1.0))
        for name, (total, count) in zip(
            ("key", "error", "other"), zip(totals[10::2], totals[11::2], strict=True), strict=True
        ):
            metrics[f"trace/entropy_{name}"].append(total / count if count else math.nan)
        metrics["trace/privileged_exposure"].append(privileged_exposure)
