"""The generation side of TRACE: annotate the rollouts, label their tokens, cap the coverage, build teacher inputs.

`TRACETrainer._generate_and_score_completions` calls GRPO, then `RoutedBatchBuilder.build`, which adds four `(B, ...)`
tensors to GRPO's batch (they survive its shuffling and splitting): `trace_labels` (one `TokenLabel` per completion
token), `trace_route` (one `Route` per token), and the teacher's `[teacher prompt | student completion]` ids and
attention mask. The trainer keeps only its `GRPOTrainer` overrides; everything that turns annotations into routed
tokens lives here.

Two vocabularies, never mixed: a token's *label* says what the annotator marked (`spans.TokenLabel`: none, key,
error); its *route* says which loss it gets (`Route`: GRPO, forward KL, reverse KL). Their codes are disjoint, so a
label tensor can never be read as a route tensor by mistake.
"""

from __future__ import annotations

import logging
import math
import traceback
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np
import torch
from trl.trainer.utils import pad

from .annotators.base import Annotation, AnnotationRequest
from .annotators.redaction import redact
from .annotators.taxonomy import check_type_label, describe_type_label, type_label_dropped
from .config import TRACEConfig
from .context import TeacherContextBuilder
from .spans import Span, TokenLabel, labels_from_offsets, token_char_offsets


logger = logging.getLogger(__name__)


class Route(IntEnum):
    """The loss a completion token gets. Codes are disjoint from `TokenLabel`'s (0 aside: both mean "nothing")."""

    GRPO = 0
    FKL = 3
    RKL = 4


ROUTE_OF_ACTION: dict[str, Route] = {"grpo": Route.GRPO, "fkl": Route.FKL, "rkl": Route.RKL}


# ---------------------------------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------------------------------


def spans_for_rollout(annotation: Annotation, is_correct: bool, text_length: int) -> tuple[list[Span], int]:
    """Spans that count for this rollout and how many were dropped.

    Key spans count only in correct rollouts and error spans only in incorrect ones (our decision where the paper is
    silent; see docs/design.md); empty spans and spans starting past the text are dropped too. The annotator's order is
    kept, and the coverage cap follows it: importance for the segment protocol (most decisive first), text order for
    the quote protocol and the heuristic annotators (so the cap keeps their earliest spans).
    """
    if annotation.failed:
        return [], 0
    wanted = "key" if is_correct else "error"
    kept = [s for s in annotation.spans if s.kind == wanted and s.start < text_length and s.end > s.start]
    return kept, len(annotation.spans) - len(kept)


def routed_token_budget(num_tokens: int, max_fraction: float | None) -> int | None:
    """Most tokens of a rollout with `num_tokens` loss tokens that may be routed: `floor(max_fraction * num_tokens)`.

    `None` means no cap. A tiny tolerance keeps products like `0.29 * 100` from flooring to 28.
    """
    if max_fraction is None:
        return None
    return int(math.floor(max_fraction * num_tokens + 1e-9))


def capped_token_labels(
    offsets: Sequence[tuple[int, int]],
    spans: Sequence[Span],
    eligible: Sequence[bool],
    budget: int | None,
) -> tuple[list[int], int]:
    """Token labels of one rollout under the coverage cap, and how many eligible labelled tokens the cap removed.

    Spans are taken in the given order (the annotator's: importance for the segment protocol, text order otherwise). Each contributes its eligible tokens
    (those in the loss mask) that no earlier span took, left to right, until `budget` tokens are labelled; the span
    that crosses the budget is cut there (it keeps its first tokens), and later spans get nothing. With
    `budget=None` this equals `spans.token_labels` (error wins over key on a shared token).

    Args:
        offsets: One `(start, end)` character range per completion token (`spans.token_char_offsets`).
        spans: The rollout's spans, in the annotator's order.
        eligible: One flag per token: whether it is in the loss mask (only those can be routed or use budget).
        budget: Most tokens to label, or `None` for no cap.

    Returns:
        `(labels, removed)`: one `TokenLabel` per token, and the number of eligible tokens the spans covered that the
        cap left unlabelled.
    """
    eligible_array = np.asarray(eligible, dtype=bool)
    uncapped = np.asarray(labels_from_offsets(offsets, spans), dtype=np.int64) if len(offsets) else np.zeros(0, int)
    uncapped[~eligible_array] = TokenLabel.NONE
    wanted = int((uncapped != TokenLabel.NONE).sum())
    if budget is None or wanted <= budget:
        return uncapped.tolist(), 0
    labels = np.zeros_like(uncapped)
    taken = 0
    for span in spans:
        if taken >= budget:
            break
        mine = np.asarray(labels_from_offsets(offsets, [span]), dtype=np.int64)
        free = np.flatnonzero((mine != TokenLabel.NONE) & eligible_array & (labels == TokenLabel.NONE))
        chosen = free[: budget - taken]
        labels[chosen] = mine[chosen]
        taken += len(chosen)
    return labels.tolist(), wanted - taken


def type_label_for_rollout(annotation: Annotation, is_correct: bool) -> tuple[str | None, bool]:
    """The annotator's type label (`Annotation.diagnosis`) if it belongs to the taxonomy of the rollout's own kind, and
    whether one was given and dropped.

    A correct rollout takes a key-step label, an incorrect one an error label (`annotators.taxonomy`); anything else
    (e.g. `arithmetic_error` on a correct rollout) never reaches the teacher.
    """
    if annotation.failed:
        return None, False
    label = check_type_label(annotation.diagnosis, is_correct)
    return label, type_label_dropped(annotation.diagnosis, is_correct)


# ---------------------------------------------------------------------------------------------------------------------
# The builder
# ---------------------------------------------------------------------------------------------------------------------


# Distinct failure causes logged at WARNING over a run; later new causes are only counted (and logged at DEBUG by the
# annotator), so a flaky server cannot flood the log.
MAX_FAILURE_WARNINGS = 5


def kind_is_routed(is_correct: bool, args: TRACEConfig) -> bool:
    """Whether a rollout of this correctness can have routed tokens: its kind's action is not `"grpo"`.

    Only those rollouts are sent to the annotator (unless `annotate_unrouted_kinds`): the others train as GRPO
    whatever their spans say.
    """
    return (args.key_span_action if is_correct else args.error_span_action) != "grpo"


def most_common_failure(annotations: Sequence[Annotation]) -> tuple[str, int]:
    """The most common error text of the failed annotations (already redacted by the annotator) and its count."""
    errors = Counter(a.error for a in annotations if a.failed)
    if not errors:
        return "no failure", 0
    error, times = errors.most_common(1)[0]
    return (error if len(error) <= 500 else error[:500] + "..."), times


def routed_char_ranges(offsets: Sequence[tuple[int, int]], route: torch.Tensor) -> list[tuple[int, int]]:
    """Character ranges of the completion text covered by runs of routed tokens (`route != Route.GRPO`).

    Consecutive routed tokens form one range, from the first token's start to the last token's end; adjacent or
    overlapping ranges (a multi-byte character shared by two tokens) are merged.
    """
    routed = (route != Route.GRPO).tolist()
    ranges: list[tuple[int, int]] = []
    for i, is_routed in enumerate(routed):
        if not is_routed:
            continue
        start, end = offsets[i]
        if ranges and i > 0 and routed[i - 1]:
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], end))
        elif ranges and start < ranges[-1][1]:  # shares a character with the previous run
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], end))
        else:
            ranges.append((start, end))
    return ranges


def mark_routed(text: str, ranges: Sequence[tuple[int, int]], open_mark: str = "⟦", close_mark: str = "⟧") -> str:
    """`text` with each routed range wrapped in `open_mark ... close_mark` (for the completions table)."""
    pieces, last = [], 0
    for start, end in ranges:
        pieces += [text[last:start], open_mark, text[start:end], close_mark]
        last = end
    pieces.append(text[last:])
    return "".join(pieces)


@dataclass
class RolloutRecord:
    """One rollout of the last generation batch: what was asked, what the annotator said and what was routed."""

    request: AnnotationRequest
    annotation: Annotation
    annotated: bool  # sent to the annotator (False: its kind is not routed, so it was not asked about)
    type_label: str | None  # the type label that reached the teacher, if any
    routed_chars: list[tuple[int, int]]  # character ranges of the completion that were routed (after the cap)
    action: str  # the action of this rollout's kind: "fkl", "rkl" or "grpo"

    @property
    def kind(self) -> str:
        return "key" if self.request.is_correct else "error"

    def row(self, index: int) -> dict[str, Any]:
        """An annotation row (`inspection.annotation_row`) plus `annotated`, `routed_spans` and `action`."""
        from .inspection import annotation_row

        routed = [[start, end, self.kind, self.request.completion[start:end]] for start, end in self.routed_chars]
        return annotation_row(
            self.request,
            self.annotation,
            index=index,
            annotated=self.annotated,
            action=self.action,
            routed_spans=routed,
        )


# Generation batches with the KL weight > 0 and no routed token, from the start of the run, before `explain_unrouted`'s
# warning. One empty batch happens (a group all correct under TRACE-RKL); several in a row point at the configuration.
UNROUTED_BATCHES_BEFORE_WARNING = 3


def explain_unrouted(totals: Mapping[str, float], key_span_action: str, error_span_action: str, batches: int) -> str:
    """Why the KL channel routed no token over the first `batches` generation batches, and the likely fix.

    `totals` sums the builder's per-batch counts over those batches: `key` / `error` (tokens labelled with a span of
    the kind the rollout's correctness keeps), `correct`, `rollouts`, `failures`, `dropped_spans`. A label is routed
    when its kind's action is not `"grpo"`, so nothing routed means: every annotation failed, or the annotator marked
    only the kind the run leaves to GRPO, or no rollout had the correctness the routed kind needs, or no span at all.
    """
    routes_key, routes_error = key_span_action != "grpo", error_span_action != "grpo"
    if not routes_key and not routes_error:
        cause = "both `key_span_action` and `error_span_action` are 'grpo', so no span kind is routed"
    elif totals.get("rollouts", 0) and totals.get("failures", 0) >= totals["rollouts"]:
        cause = "every annotation failed (see `trace/annotation_failures` and the warning above with the most common cause)"
    elif totals.get("key", 0) > 0 and not routes_key:
        cause = (
            "the annotator marks key spans in correct rollouts, but `key_span_action` is 'grpo': this run routes only "
            f"error spans of incorrect rollouts (`error_span_action={error_span_action!r}`, e.g. the TRACE-RKL preset). "
            "Have the annotator mark error spans (regex: `regex_error_patterns`, e.g. BOXED for the wrong final "
            "answer), or route key spans (`key_span_action: fkl`)"
        )
    elif totals.get("error", 0) > 0 and not routes_error:
        cause = (
            "the annotator marks error spans in incorrect rollouts, but `error_span_action` is 'grpo': this run routes "
            f"only key spans of correct rollouts (`key_span_action={key_span_action!r}`, e.g. the TRACE-FKL preset). "
            "Have the annotator mark key spans (regex: `regex_key_patterns`), or route error spans "
            "(`error_span_action: rkl`)"
        )
    elif routes_key and not routes_error and totals.get("correct", 0) == 0:
        cause = "no rollout was correct, and this run routes only key spans of correct rollouts (check the rewards)"
    elif routes_error and not routes_key and totals.get("correct", 0) >= totals.get("rollouts", 0):
        cause = "every rollout was correct, and this run routes only error spans of incorrect rollouts"
    elif totals.get("dropped_spans", 0) > 0:
        cause = (
            "the annotator's spans were all of the kind the rollout's correctness drops (key spans in incorrect "
            "rollouts, error spans in correct ones; see `trace/dropped_spans`)"
        )
    elif routes_error and not routes_key:
        cause = (
            "the annotator marked no error span in the incorrect rollouts it was sent: this run routes only error "
            "spans of incorrect rollouts (`key_span_action` is 'grpo', e.g. the TRACE-RKL preset), so correct "
            "rollouts are not even sent. Have the annotator mark error spans (regex: `regex_error_patterns`, e.g. "
            "BOXED for the wrong final answer), or route key spans (`key_span_action: fkl`)"
        )
    elif routes_key and not routes_error:
        cause = (
            "the annotator marked no key span in the correct rollouts it was sent: this run routes only key spans of "
            "correct rollouts (`error_span_action` is 'grpo', e.g. the TRACE-FKL preset), so incorrect rollouts are "
            "not even sent. Have the annotator mark key spans (regex: `regex_key_patterns`; is `\\boxed{}` reached "
            "within `max_completion_length`?), or route error spans (`error_span_action: rkl`)"
        )
    else:
        cause = (
            "the annotator marked no span (regex: do the patterns match these rollouts, e.g. is `\\boxed{}` reached "
            "within `max_completion_length`?)"
        )
    return (
        f"The KL channel routed no token in the first {batches} generation batches while the KL weight is > 0: "
        f"{cause}. Until it routes tokens, this run trains as plain GRPO."
    )


@dataclass
class RoutedBatch:
    """What `RoutedBatchBuilder.build` adds to GRPO's batch, and the metrics of the step (already summed over processes)."""

    tensors: dict[str, torch.Tensor]
    metrics: dict[str, float]


class RoutedBatchBuilder:
    """Turns one process's scored rollouts into routed tokens and teacher inputs.

    Args:
        args: the run's `TRACEConfig`.
        tokenizer: the policy's tokenizer (decodes completions, maps spans to tokens).
        annotator: the annotator (see `trace_trl.annotators`).
        teacher_context: renders and tokenizes the teacher prompts.
        reduce_sum: sums a 1-D tensor over all processes (`accelerator.reduce(t, "sum")`); every process calls it the
            same number of times per step.
        device: the training device.
    """

    def __init__(
        self,
        args: TRACEConfig,
        tokenizer: Any,
        annotator: Callable[[list[AnnotationRequest]], list[Annotation]],
        teacher_context: TeacherContextBuilder,
        reduce_sum: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device,
    ) -> None:
        self.args = args
        self.tokenizer = tokenizer
        self.annotator = annotator
        self.teacher_context = teacher_context
        self.reduce_sum = reduce_sum
        self.device = device
        self._annotator_exception: Exception | None = None
        self._annotator_traceback = ""
        self._malformed = False
        self._warned_causes: set[str] = set()
        # The last generation batch, rollout by rollout (for the completions table and the HTML viewer).
        self.last_batch: list[RolloutRecord] = []
        # Counts of the batches that routed nothing since the start (see `explain_unrouted`); `None` once one routed.
        self._unrouted: dict[str, float] | None = {}
        self._unrouted_batches = 0

    def build(
        self,
        prompts: list[Any],
        rows: Sequence[Mapping[str, Any]],
        completion_ids_list: Sequence[Sequence[int]],
        rewards: torch.Tensor,
        output: Mapping[str, torch.Tensor],
    ) -> RoutedBatch:
        """Annotate, label, cap and build teacher inputs for this process's `len(prompts)` rollouts.

        Args:
            prompts: the prompts as the student saw them.
            rows: the dataset rows (the privileged context column is read from them).
            completion_ids_list: each rollout's completion ids (unpadded).
            rewards: `[n]` rollout rewards that decide correctness (NaN: unscored, so incorrect).
            output: GRPO's batch (`completion_ids`, `completion_mask`, optional `tool_mask`).
        """
        args = self.args
        completion_ids_list = [list(map(int, ids)) for ids in completion_ids_list]
        n = len(prompts)
        rewards = rewards.float().cpu()
        correct = (rewards >= args.correct_reward_threshold).tolist()  # NaN compares False: unscored = incorrect
        texts = self.tokenizer.batch_decode(completion_ids_list, skip_special_tokens=True)
        contexts = privileged_contexts(rows, args.privileged_context_column)
        # Only rollouts whose kind this run routes are sent (and paid for): under TRACE-FKL the incorrect ones go to
        # GRPO whatever their error spans, under TRACE-RKL the correct ones.
        sent = [i for i in range(n) if args.annotate_unrouted_kinds or kind_is_routed(bool(correct[i]), args)]
        # Token boundaries of the sent rollouts: the annotators get them (the inverted control keeps clear of the
        # tokens a key span touches), and the labels below use the same ones.
        offsets = {i: tuple(token_char_offsets(completion_ids_list[i], self.tokenizer)) for i in sent}
        requests = [
            AnnotationRequest(
                prompt=prompts[i],
                completion=texts[i],
                is_correct=bool(correct[i]),
                reward=float(rewards[i]),
                privileged_context=contexts[i],
                metadata=request_metadata(rows[i], args.privileged_context_column),
                token_offsets=offsets.get(i),
            )
            for i in range(n)
        ]
        annotations = [Annotation() for _ in range(n)]
        if sent:
            for i, annotation in zip(sent, self._annotate([requests[i] for i in sent]), strict=True):
                annotations[i] = annotation

        width = output["completion_ids"].size(1)
        loss_mask = output["completion_mask"] * output.get("tool_mask", torch.ones_like(output["completion_mask"]))
        loss_mask_cpu = loss_mask.bool().cpu()
        labels = torch.zeros(n, width, dtype=torch.long)
        dropped_spans = cap_removed = 0
        type_labels: list[str | None] = []
        dropped_labels = 0
        for i, annotation in enumerate(annotations):
            label, label_dropped = type_label_for_rollout(annotation, correct[i])
            type_labels.append(label)
            dropped_labels += label_dropped
            spans, n_dropped = spans_for_rollout(annotation, correct[i], len(texts[i]))
            dropped_spans += n_dropped + annotation.dropped_spans
            if not spans:
                continue
            ids = completion_ids_list[i]
            eligible = loss_mask_cpu[i, : len(ids)].tolist()
            # The cap bounds routed tokens: spans of a kind this run leaves to GRPO are not capped (nor routed).
            action = args.key_span_action if correct[i] else args.error_span_action
            budget = None if action == "grpo" else routed_token_budget(sum(eligible), args.max_routed_fraction)
            row, removed = capped_token_labels(offsets[i], spans, eligible, budget)
            cap_removed += removed
            labels[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        labels = labels.to(self.device) * loss_mask.long()
        route = torch.full_like(labels, Route.GRPO)
        route[labels == TokenLabel.KEY] = ROUTE_OF_ACTION[args.key_span_action]
        route[labels == TokenLabel.ERROR] = ROUTE_OF_ACTION[args.error_span_action]

        routed_rows = (route != Route.GRPO).any(dim=1).tolist()
        teacher_ids, teacher_mask, truncated = self._teacher_inputs(
            prompts, contexts, type_labels, routed_rows, output
        )
        failures = sum(annotations[i].failed for i in sent)
        counts = {
            "key": float((labels == TokenLabel.KEY).sum()),
            "error": float((labels == TokenLabel.ERROR).sum()),
            "tokens": float(loss_mask.sum()),
            "failures": float(failures),
            "dropped_spans": float(dropped_spans),
            "dropped_labels": float(dropped_labels),
            "cap_removed": float(cap_removed),
            "correct": float(sum(correct)),
            "rollouts": float(n),
            "truncated": float(truncated),
            "malformed": float(self._malformed),
            "exceptions": float(self._annotator_exception is not None and not self._malformed),
            "routed": float((route != Route.GRPO).sum()),
            "sent": float(len(sent)),
        }
        totals = dict(zip(counts, self.reduce_sum(torch.tensor(list(counts.values()), device=self.device)).tolist()))
        self._raise_on_failures([annotations[i] for i in sent], totals)
        self._warn_on_failures([annotations[i] for i in sent], len(sent))
        self._check_routes_something(totals)
        route_cpu = route.cpu()
        sent_set = set(sent)
        self.last_batch = [
            RolloutRecord(
                request=requests[i],
                annotation=annotations[i],
                annotated=i in sent_set,
                type_label=type_labels[i],
                routed_chars=routed_char_ranges(offsets[i], route_cpu[i, : len(offsets[i])]) if i in offsets else [],
                action=(args.key_span_action if correct[i] else args.error_span_action),
            )
            for i in range(n)
        ]
        tokens, rollouts = max(totals["tokens"], 1.0), max(totals["rollouts"], 1.0)
        metrics = {
            "trace/key_label_frac": totals["key"] / tokens,  # labelled, routed or not (see trace/fkl_token_frac)
            "trace/error_label_frac": totals["error"] / tokens,
            "trace/annotation_failures": totals["failures"],
            "trace/annotation_failure_rate": totals["failures"] / max(totals["sent"], 1.0),
            "trace/annotation_requests": totals["sent"],
            "trace/annotation_skipped": totals["rollouts"] - totals["sent"],
            "trace/dropped_spans": totals["dropped_spans"],
            "trace/dropped_type_labels": totals["dropped_labels"],
            "trace/cap_removed_tokens": totals["cap_removed"],
            "trace/correct_frac": totals["correct"] / rollouts,
            "trace/teacher_context_truncated": totals["truncated"],
        }
        return RoutedBatch(
            tensors={
                "trace_route": route,
                "trace_labels": labels,
                "teacher_input_ids": teacher_ids,
                "teacher_attention_mask": teacher_mask,
            },
            metrics=metrics,
        )

    def _check_routes_something(self, totals: Mapping[str, float]) -> None:
        """Warn once when the first `UNROUTED_BATCHES_BEFORE_WARNING` batches (KL weight > 0) routed no token."""
        if self._unrouted is None:
            return
        if totals["routed"] > 0:
            self._unrouted = None
            return
        for name, value in totals.items():
            self._unrouted[name] = self._unrouted.get(name, 0.0) + value
        self._unrouted_batches += 1
        if self._unrouted_batches == UNROUTED_BATCHES_BEFORE_WARNING:
            args = self.args
            logger.warning(
                explain_unrouted(self._unrouted, args.key_span_action, args.error_span_action, self._unrouted_batches)
            )

    def _annotate(self, requests: list[AnnotationRequest]) -> list[Annotation]:
        """Call the annotator. An exception from it becomes per-rollout failures here; whether it stops training is
        decided after the global count (`_raise_on_failures`), so that every process raises together."""
        self._annotator_exception = None
        self._annotator_traceback = ""
        self._malformed = False
        try:
            annotations = self.annotator(requests)
        except Exception as exc:
            # A server may echo the API key in its error: the text is redacted before it is logged or stored.
            message = self._redact(f"{type(exc).__name__}: {exc}")
            self._annotator_exception = exc
            self._annotator_traceback = self._redact("".join(traceback.format_exception(exc))[-4000:])
            if self.args.annotator_exception == "skip" and self.args.annotation_failure != "raise":
                logger.warning("Annotator raised %s; these %d rollouts train as GRPO.", message, len(requests))
            return [Annotation.failure(message) for _ in requests]
        annotations, problem = _checked_answer(annotations, len(requests))
        if problem is not None:
            # A broken annotator is a bug to fix, whatever `annotation_failure` says; it is raised on every process
            # after the global count.
            self._annotator_exception = TypeError(problem)
            self._malformed = True
            return [Annotation.failure(problem) for _ in requests]
        return annotations

    def _redact(self, text: str) -> str:
        own_redact = getattr(self.annotator, "redact", None)
        return own_redact(text) if callable(own_redact) else redact(text)

    def _raise_on_failures(self, annotations: list[Annotation], totals: Mapping[str, float]) -> None:
        """Stop training where the settings say so. Decided on global counts, so that every process raises together
        instead of leaving others waiting in a collective.

        In order: a malformed answer (always); an exception from the annotator's code (`annotator_exception`); every
        annotation of the batch failed (`annotation_batch_failure`); any failure (`annotation_failure="raise"`).
        """
        args = self.args
        if totals["malformed"]:
            if self._malformed:
                raise self._annotator_exception
            raise RuntimeError("The annotator returned a malformed answer on another process; see its error.")
        exception_raises = args.annotator_exception == "raise" or args.annotation_failure == "raise"
        if totals["exceptions"] and exception_raises:
            if self._annotator_exception is None:
                raise RuntimeError("The annotator raised an exception on another process; see its error.")
            # The redacted text and traceback, without the original exception chained: its message may hold an
            # echoed API key.
            setting = (
                "annotation_failure='raise'" if args.annotation_failure == "raise" else "annotator_exception='raise'"
            )
            raise RuntimeError(
                f"The annotator raised ({annotations[0].error}) with {setting}; training stops on every process. "
                "The built-in annotators never raise (they return failed annotations), so this is most likely a bug "
                "in the annotator's own code; its traceback (redacted):\n"
                f"{self._annotator_traceback}\nFix it, or set `annotator_exception='skip'` (and "
                "`annotation_failure='skip'`) to train these rollouts as plain GRPO."
            ) from None
        if totals["failures"] == 0:
            return
        cause, times = most_common_failure(annotations)
        if args.annotation_failure == "raise":
            detail = f"most common cause ({times}x): {cause}" if times else "on another process"
            raise RuntimeError(
                f"{int(totals['failures'])} annotation(s) failed ({detail}) with annotation_failure='raise'. Set "
                "`annotation_failure='skip'` to train these rollouts as plain GRPO instead."
            )
        if totals["failures"] >= totals["sent"] and args.annotation_batch_failure == "raise":
            raise RuntimeError(
                f"Every annotation of this generation batch failed ({int(totals['failures'])} of "
                f"{int(totals['sent'])}); most common cause ({times}x): {cause}. Training stops rather than silently "
                "train as plain GRPO. Check the annotator (`trace-trl annotate --limit 5` on a few rollouts shows the "
                "same error), or set `annotation_batch_failure='skip'` to train such batches as GRPO."
            )

    def _warn_on_failures(self, annotations: list[Annotation], sent: int) -> None:
        """A WARNING with the most common (redacted) cause on the first batch with failures, and again for each new
        cause, up to `MAX_FAILURE_WARNINGS` causes; every failure is counted in `trace/annotation_failures`."""
        failed = [a for a in annotations if a.failed]
        if not failed or self._annotator_exception is not None:  # an exception was already reported
            return
        cause, times = most_common_failure(failed)
        if cause in self._warned_causes or len(self._warned_causes) >= MAX_FAILURE_WARNINGS:
            return
        self._warned_causes.add(cause)
        last = len(self._warned_causes) == MAX_FAILURE_WARNINGS
        logger.warning(
            "%d of %d annotations of this batch failed; most common cause (%dx): %s. Those rollouts train as GRPO "
            "(counted in trace/annotation_failures).%s",
            len(failed),
            sent,
            times,
            cause,
            " Further new causes are not logged (set the `trace_trl` logger to DEBUG to see every failure)."
            if last
            else "",
        )

    def _teacher_inputs(
        self,
        prompts: list[Any],
        contexts: list[str | None],
        type_labels: list[str | None],
        routed_rows: list[bool],
        output: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """`[teacher prompt | student completion]` ids and attention mask; empty prompts for rows with no routed token.

        The teacher prompt holds the problem, the privileged context and the rollout's type label; never the span text
        or positions.
        """
        chosen = [i for i, routed in enumerate(routed_rows) if routed]
        # The teacher reads the label in words ("missed case analysis"), never the span text or positions.
        label_words = [describe_type_label(type_labels[i]) if type_labels[i] else None for i in chosen]
        built, ids = self.teacher_context.build(
            [prompts[i] for i in chosen], [contexts[i] for i in chosen], label_words, rows=chosen
        )
        rows: list[list[int]] = [[] for _ in prompts]
        for i, row_ids in zip(chosen, ids, strict=True):
            rows[i] = row_ids
        truncated = sum(b.context_truncated for b in built)
        if any(b.over_length for b in built):
            logger.warning(
                "%d teacher prompt(s) exceed max_teacher_prompt_length=%s even without privileged context; the problem "
                "is kept whole.",
                sum(b.over_length for b in built),
                self.args.max_teacher_prompt_length,
            )
        if truncated:
            logger.warning(
                "Cut the privileged context of %d teacher prompt(s) to max_teacher_prompt_length.", truncated
            )
        pad_id = self.tokenizer.pad_token_id
        tensors = [torch.tensor(r, dtype=torch.long) for r in rows]
        prompt_ids = pad(tensors, padding_value=pad_id, padding_side="left").to(self.device)
        prompt_mask = pad([torch.ones_like(t) for t in tensors], padding_value=0, padding_side="left").to(self.device)
        input_ids = torch.cat([prompt_ids, output["completion_ids"]], dim=1)
        attention_mask = torch.cat([prompt_mask.long(), output["completion_mask"].long()], dim=1)
        return input_ids, attention_mask, truncated


def privileged_contexts(rows: Sequence[Mapping[str, Any]], column: str) -> list[str | None]:
    """The privileged context of each row (`None` when missing or blank)."""
    if rows and column not in rows[0]:
        raise ValueError(
            f"The training dataset has no column {column!r} (`privileged_context_column`), which holds the "
            f"privileged context the teacher sees. Available columns: {sorted(rows[0])}. Add the column or set "
            "`privileged_context_column` to the right name."
        )
    contexts = []
    for row in rows:
        value = row.get(column)
        contexts.append(None if value is None or (isinstance(value, str) and not value.strip()) else str(value))
    return contexts


def request_metadata(row: Mapping[str, Any], privileged_column: str) -> dict[str, Any]:
    """The dataset row's scalar fields other than the prompt and the privileged context, for the annotator."""
    skip = {"prompt", privileged_column}
    return {k: v for k, v in row.items() if k not in skip and isinstance(v, str | int | float | bool)}


def _checked_answer(annotations: Any, n_requests: int) -> tuple[list[Annotation], str | None]:
    """An annotator's return value as a list, and what is wrong with it in words that say what to return (or `None`)."""
    expected = (
        f"An annotator must return a list of exactly {n_requests} `trace_trl.annotators.Annotation` objects, one per "
        "request and in order (`Annotation()` for a rollout with no span, `Annotation.failure(reason)` for one it "
        "could not annotate)"
    )
    if annotations is None or isinstance(annotations, (Annotation, str, bytes, Mapping)):
        return [], f"{expected}; it returned {type(annotations).__name__}."
    try:
        annotations = list(annotations)
    except TypeError:
        return [], f"{expected}; it returned {type(annotations).__name__}, which is not a sequence."
    if len(annotations) != n_requests:
        return [], f"{expected}; it returned {len(annotations)} items."
    wrong = next((a for a in annotations if not isinstance(a, Annotation)), None)
    if wrong is not None:
        return [], f"{expected}; it returned items of type {type(wrong).__name__}."
    return annotations, None
