"""`TRACETrainer`: GRPO plus a token-routed KL channel to a privileged self-teacher.

It changes as little of `GRPOTrainer` as it can:

- `_calculate_rewards` keeps what GRPO does not return (prompts, completion ids, dataset rows, gathered rewards);
- `_generate_and_score_completions` calls GRPO, then annotates the local rollouts, maps spans to tokens and builds
  the teacher inputs, adding them to the batch as `(B, ...)` tensors that survive GRPO's shuffling and splitting;
- `_compute_loss` runs the teacher (no grad), then GRPO's own loss with per-token advantages that route GRPO away
  from KL tokens, capturing the student's hidden states from GRPO's single forward with a hook, and adds the KL
  channel on routed tokens with GRPO's normalizer;
- `_save_checkpoint` / `_load_optimizer_and_scheduler` persist the cumulative exposure and the EMA teacher.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from accelerate.utils import is_peft_model
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import pad

from .annotators.base import Annotation, AnnotationRequest, bind_annotator
from .config import TRACEConfig
from .context import TeacherContextBuilder
from .losses import (
    ROUTE_CODES,
    ROUTE_FKL,
    ROUTE_GRPO,
    ROUTE_RKL,
    grpo_token_weights,
    normalize_like_grpo,
    routed_divergence,
)
from .model_card import add_trace_settings
from .schedule import kl_weight
from .spans import Span, token_labels
from .teacher import Teacher, causal_lm_of, lm_head_scaling, remove_teacher_adapters


logger = logging.getLogger(__name__)

TRACE_STATE_FILE = "trace_state.json"
LABEL_OTHER, LABEL_KEY, LABEL_ERROR = 0, 1, 2

_CITATION = """\
@article{trace2026,
    title   = {{Distilling Where It Matters via Token-Routed Self On-Policy Alignment}},
    author  = {Wang and Ouyang and Chen and Hu and Pan and Li and Guo},
    journal = {arXiv preprint arXiv:2605.10194},
    year    = {2026}
}"""


class TRACETrainer(GRPOTrainer):
    """
    Trainer for TRACE (token-routed self on-policy distillation), a `GRPOTrainer` with a KL channel on annotated spans.

    The policy teaches itself under privileged context (a reference solution and a diagnosis) that the student never
    sees, but only on the spans an annotator marks: forward KL on key spans of correct rollouts, optionally reverse KL
    on error spans of incorrect ones, GRPO on every other token, with the KL weight annealed to zero after a warm-up.

    Args:
        model, reward_funcs, train_dataset, eval_dataset, processing_class, reward_processing_classes, callbacks,
        optimizers, peft_config, **kwargs:
            Exactly as for [`~trl.GRPOTrainer`].
        args ([`TRACEConfig`], *optional*):
            Configuration; defaults to `TRACEConfig(output_dir="<model>-TRACE")`.
        annotator (`Callable[[list[AnnotationRequest]], list[Annotation]]`, *optional*):
            Marks key and error spans of each rollout (see `trace_trl.annotators`). Required unless `kl_coef == 0`.
            If it has a `bind(trainer)` method it is called once with this trainer; if it has `metrics()`, the
            returned numbers are logged.

    Example:

    ```python
    from trace_trl import TRACEConfig, TRACETrainer
    from trace_trl.annotators import RegexAnnotator

    trainer = TRACETrainer(
        model="Qwen/Qwen3-1.7B",
        reward_funcs=accuracy_reward,
        args=TRACEConfig(output_dir="qwen3-trace", kl_warmup_steps=20, kl_decay_steps=20),
        train_dataset=dataset,  # columns: prompt, answer, solution (the privileged context)
        annotator=RegexAnnotator(key_patterns=[RegexAnnotator.BOXED]),
    )
    trainer.train()
    ```
    """

    _tag_names = ["trl", "grpo", "trace"]
    _name = "TRACE"
    _paper = {
        "title": "Distilling Where It Matters via Token-Routed Self On-Policy Alignment",
        "id": "2605.10194",
        "citation": _CITATION,
    }

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: TRACEConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
        annotator=None,
        **kwargs: Any,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = TRACEConfig(output_dir=f"{model_name.split('/')[-1]}-TRACE")
        elif not isinstance(args, TRACEConfig):
            hint = " Build it with TRACEConfig(**grpo_config.to_dict())." if isinstance(args, GRPOConfig) else ""
            raise TypeError(f"TRACETrainer needs `args` to be a TRACEConfig, got {type(args).__name__}.{hint}")
        if annotator is None and args.kl_coef > 0:
            raise ValueError(
                "TRACETrainer needs an `annotator` to mark the spans it distills on. Pass e.g. "
                "`annotator=RegexAnnotator(...)`, `OpenAIAnnotator(...)` or `AllTokensAnnotator()` (all-token "
                "self-distillation), or set `kl_coef=0` to train plain GRPO."
            )
        if annotator is not None and not callable(annotator):
            raise TypeError(
                f"`annotator` must be callable as annotator(requests) -> annotations; got {type(annotator).__name__}."
            )
        super().__init__(
            model,
            reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            callbacks=callbacks,
            optimizers=optimizers,
            peft_config=peft_config,
            **kwargs,
        )
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError(
                "The model has no trainable parameter, so training would change nothing. With a PEFT model, load it "
                "with `is_trainable=True` or pass `peft_config=` instead of an already-wrapped frozen model."
            )
        if args.correctness_reward_func is not None and args.correctness_reward_func not in self.reward_func_names:
            raise ValueError(
                f"`correctness_reward_func={args.correctness_reward_func!r}` is not one of the reward functions "
                f"{self.reward_func_names}."
            )
        _check_sharded_training(self, args)
        _warn_if_resume_is_inexact(args)
        if self._is_vlm and args.kl_coef > 0:
            raise NotImplementedError(
                "TRACE's teacher forward runs the text decoder only, so vision-language models are not supported yet; "
                "set `kl_coef=0` to train them with plain GRPO."
            )
        self.annotator = annotator
        if annotator is not None:
            bind_annotator(annotator, self)
        unwrapped = self.accelerator.unwrap_model(self.model)
        routes_something = args.key_span_action != "grpo" or args.error_span_action != "grpo"

        def kl_finished(step: int) -> bool:
            # The schedule never rises again once it is zero: from then on nothing uses the teacher.
            schedule = dict(warmup_steps=args.kl_warmup_steps, decay_steps=args.kl_decay_steps, decay=args.kl_decay)
            return annotator is None or not routes_something or kl_weight(step, coef=args.kl_coef, **schedule) == 0.0

        self.teacher = Teacher(
            args.teacher_kind,
            unwrapped,
            ema_rate=args.teacher_ema_rate,
            sync_steps=args.teacher_sync_steps,
            reference_model=self.ref_model,
            kl_finished=kl_finished,
        )
        self.add_callback(_TeacherUpdateCallback(self))
        self._teacher_context = TeacherContextBuilder(
            args.teacher_context_template,
            tokenize=lambda prompts: self._tokenize_prompts(prompts)[0],
            encode_text=lambda text: self._tokenizer(text, add_special_tokens=False)["input_ids"],
            decode_text=lambda ids: self._tokenizer.decode(ids),
            max_length=args.max_teacher_prompt_length,
        )
        self._logit_scale, self._softcap = lm_head_scaling(causal_lm_of(unwrapped).config)
        self._trace_stash: dict[str, Any] | None = None
        self._captured: dict[str, Any] | None = None
        self.privileged_exposure = 0.0  # sum over micro-steps of kl_weight x routed tokens (all processes)

    # ------------------------------------------------------------------------------------------------------------
    # Schedule
    # ------------------------------------------------------------------------------------------------------------
    def current_kl_weight(self) -> float:
        """KL-channel weight at the current optimizer step (0 outside training)."""
        args = self.args
        return kl_weight(
            self.state.global_step,
            coef=args.kl_coef,
            warmup_steps=args.kl_warmup_steps,
            decay_steps=args.kl_decay_steps,
            decay=args.kl_decay,
        )

    def _kl_channel_active(self) -> bool:
        # The schedule never rises again once it is zero, so a zero now means no routed batch is needed from here on.
        routes_something = self.args.key_span_action != "grpo" or self.args.error_span_action != "grpo"
        return self.annotator is not None and routes_something and self.current_kl_weight() > 0.0

    # ------------------------------------------------------------------------------------------------------------
    # Generation: annotate, label tokens, build teacher inputs
    # ------------------------------------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.args.privileged_context_column not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, self.args.privileged_context_column]

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._trace_stash = {
            "inputs": inputs,
            "prompts": prompts,
            "completion_ids_list": completion_ids_list,
            "rewards_per_func": rewards_per_func,
        }
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        stash, self._trace_stash = self._trace_stash, None
        if not self.model.training or not self._kl_channel_active() or stash is None:
            return output
        # New keys go after GRPO's: GRPO's shuffling reads the batch size from the first value.
        return {**output, **self._routed_batch(stash, output)}

    def _rollout_rewards(self, rewards_per_func: torch.Tensor, n_local: int) -> torch.Tensor:
        """This process's rollout rewards for correctness: one reward function's, or the weighted sum (NaN if unscored)."""
        start = self.accelerator.process_index * n_local
        local = rewards_per_func[start : start + n_local]
        if self.args.correctness_reward_func is not None:
            return local[:, self.reward_func_names.index(self.args.correctness_reward_func)]
        weighted = (local * self.reward_weights.to(local.device).unsqueeze(0)).nansum(dim=1)
        return weighted.masked_fill(torch.isnan(local).all(dim=1), math.nan)

    def _routed_batch(self, stash: dict[str, Any], output: dict[str, Any]) -> dict[str, torch.Tensor]:
        device = self.accelerator.device
        prompts, rows = stash["prompts"], stash["inputs"]
        completion_ids_list = [list(map(int, ids)) for ids in stash["completion_ids_list"]]
        n = len(prompts)
        rewards = self._rollout_rewards(stash["rewards_per_func"], n).float().cpu()
        correct = (rewards >= self.args.correct_reward_threshold).tolist()  # NaN compares False: unscored = incorrect
        texts = self._tokenizer.batch_decode(completion_ids_list, skip_special_tokens=True)
        contexts = self._privileged_contexts(rows)
        requests = [
            AnnotationRequest(
                prompt=prompts[i],
                completion=texts[i],
                is_correct=bool(correct[i]),
                reward=float(rewards[i]),
                privileged_context=contexts[i],
                metadata=self._request_metadata(rows[i]),
            )
            for i in range(n)
        ]
        annotations = self._annotate(requests)

        width = output["completion_ids"].size(1)
        loss_mask = output["completion_mask"] * output.get("tool_mask", torch.ones_like(output["completion_mask"]))
        labels = torch.zeros(n, width, dtype=torch.long)
        dropped = 0
        for i, annotation in enumerate(annotations):
            spans, n_dropped = _spans_for_rollout(annotation, correct[i], len(texts[i]))
            dropped += n_dropped + annotation.dropped_spans
            if spans:
                row = token_labels(completion_ids_list[i], spans, self._tokenizer)
                labels[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        labels = labels.to(device) * loss_mask.long()
        route = torch.full_like(labels, ROUTE_GRPO)
        route[labels == LABEL_KEY] = ROUTE_CODES[self.args.key_span_action]
        route[labels == LABEL_ERROR] = ROUTE_CODES[self.args.error_span_action]

        teacher_ids, teacher_mask, truncated = self._teacher_inputs(
            prompts, contexts, annotations, (route > 0).any(dim=1).tolist(), output
        )
        failures = sum(a.failed for a in annotations)
        self._log_annotation_metrics(labels, loss_mask, correct, failures, dropped, truncated)
        self._raise_on_failures(annotations, failures)
        return {
            "trace_route": route,
            "trace_labels": labels,
            "teacher_input_ids": teacher_ids,
            "teacher_attention_mask": teacher_mask,
        }

    def _privileged_contexts(self, rows: Sequence[dict[str, Any]]) -> list[str | None]:
        column = self.args.privileged_context_column
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

    def _request_metadata(self, row: dict[str, Any]) -> dict[str, Any]:
        skip = {"prompt", self.args.privileged_context_column}
        return {k: v for k, v in row.items() if k not in skip and isinstance(v, str | int | float | bool)}

    def _annotate(self, requests: list[AnnotationRequest]) -> list[Annotation]:
        """Call the annotator; a crash becomes per-rollout failures unless `annotation_failure="raise"`."""
        try:
            annotations = self.annotator(requests)
        except Exception as exc:
            if self.args.annotation_failure == "raise":
                raise
            logger.warning(
                "Annotator raised %s: %s; these %d rollouts train as GRPO.", type(exc).__name__, exc, len(requests)
            )
            return [Annotation.failure(f"{type(exc).__name__}: {exc}") for _ in requests]
        annotations = list(annotations)
        if len(annotations) != len(requests):
            raise ValueError(
                f"The annotator returned {len(annotations)} annotations for {len(requests)} requests; it must return "
                "exactly one per request, in order."
            )
        for annotation in annotations:
            if not isinstance(annotation, Annotation):
                raise TypeError(
                    f"The annotator must return `trace_trl.annotators.Annotation` objects, got {type(annotation).__name__}."
                )
        return annotations

    def _raise_on_failures(self, annotations: list[Annotation], local_failures: int) -> None:
        if self.args.annotation_failure != "raise":
            return
        # Decided on the global count so that every process raises together instead of leaving others in a collective.
        total = self.accelerator.reduce(torch.tensor(float(local_failures), device=self.accelerator.device), "sum")
        if total.item() > 0:
            errors = [a.error for a in annotations if a.failed]
            detail = errors[0] if errors else "on another process"
            raise RuntimeError(
                f"{int(total.item())} annotation(s) failed (first: {detail}). Set `annotation_failure='skip'` to train "
                "these rollouts as plain GRPO instead."
            )

    def _teacher_inputs(
        self,
        prompts: list[Any],
        contexts: list[str | None],
        annotations: list[Annotation],
        routed_rows: list[bool],
        output: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """`[teacher prompt | student completion]` ids and attention mask; empty prompts for rows with no routed token."""
        device = self.accelerator.device
        chosen = [i for i, routed in enumerate(routed_rows) if routed]
        built, ids = self._teacher_context.build(
            [prompts[i] for i in chosen], [contexts[i] for i in chosen], [annotations[i].diagnosis for i in chosen]
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
        pad_id = self._tokenizer.pad_token_id
        tensors = [torch.tensor(r, dtype=torch.long) for r in rows]
        prompt_ids = pad(tensors, padding_value=pad_id, padding_side="left").to(device)
        prompt_mask = pad([torch.ones_like(t) for t in tensors], padding_value=0, padding_side="left").to(device)
        input_ids = torch.cat([prompt_ids, output["completion_ids"]], dim=1)
        attention_mask = torch.cat([prompt_mask.long(), output["completion_mask"].long()], dim=1)
        return input_ids, attention_mask, truncated

    def _log_annotation_metrics(self, labels, loss_mask, correct, failures, dropped, truncated) -> None:
        device = self.accelerator.device
        local = torch.tensor(
            [
                float((labels == LABEL_KEY).sum()),
                float((labels == LABEL_ERROR).sum()),
                float(loss_mask.sum()),
                float(failures),
                float(dropped),
                float(sum(correct)),
                float(len(correct)),
                float(truncated),
            ],
            device=device,
        )
        key, error, tokens, failures_, dropped_, n_correct, n, truncated_ = self.accelerator.reduce(
            local, "sum"
        ).tolist()
        metrics = self._metrics["train"]
        metrics["trace/key_token_frac"].append(key / max(tokens, 1.0))
        metrics["trace/error_token_frac"].append(error / max(tokens, 1.0))
        metrics["trace/annotation_failures"].append(failures_)
        metrics["trace/annotation_failure_rate"].append(failures_ / max(n, 1.0))
        metrics["trace/dropped_spans"].append(dropped_)
        metrics["trace/correct_frac"].append(n_correct / max(n, 1.0))
        metrics["trace/teacher_context_truncated"].append(truncated_)
        annotator_metrics = getattr(self.annotator, "metrics", None)
        if callable(annotator_metrics):
            for name, value in annotator_metrics().items():
                metrics[name if "/" in name else f"annotator/{name}"].append(float(value))

    # ------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        route = inputs.get("trace_route")
        training = self.model.training
        weight = self.current_kl_weight() if training else 0.0
        if training:
            self._metrics["train"]["trace/kl_weight"].append(weight)
        if route is None or weight == 0.0:
            return super()._compute_loss(model, inputs)

        mask = inputs["completion_mask"] * inputs.get("tool_mask", torch.ones_like(inputs["completion_mask"]))
        routed = (route > ROUTE_GRPO) & mask.bool()
        # A global decision: under ZeRO-3 / FSDP the teacher forward gathers weights, a collective every process joins.
        any_routed = self.accelerator.reduce(routed.any().float().reshape(1), "sum").item() > 0
        if not any_routed:
            self._log_exposure(0.0)
            return super()._compute_loss(model, inputs)

        unwrapped = self.accelerator.unwrap_model(model)
        rows, cols = routed.nonzero(as_tuple=True)
        # Teacher first, so adapter switches (base/EMA teachers with LoRA) never sit between the student's forward and
        # its backward.
        teacher_hidden, teacher_head = self._teacher_hidden_states(unwrapped, inputs, rows, cols)

        grpo_weights = grpo_token_weights(
            routed, mode=self.args.routed_token_grpo, kl_weight=weight, kl_coef=self.args.kl_coef
        )
        advantages = inputs["advantages"]
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        grpo_inputs = {**inputs, "advantages": advantages * grpo_weights}  # a new dict: batches are revisited
        with self._capture_student(unwrapped) as captured:
            loss = super()._compute_loss(model, grpo_inputs)

        student = causal_lm_of(unwrapped)
        head = student.get_output_embeddings()
        prompt_width = inputs["prompt_ids"].size(1)
        student_hidden = captured["hidden"][rows, prompt_width - 1 + cols]
        kinds = route[rows, cols]
        student_head = _full_head(head.weight, head.bias)
        teacher_head = _full_head(*teacher_head)
        per_token = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        sums = []
        for code, kind in ((ROUTE_FKL, "fkl"), (ROUTE_RKL, "rkl")):
            selected = kinds == code
            divergence = routed_divergence(
                student_hidden[selected],
                teacher_hidden[selected],
                student_head,
                teacher_head,
                kind,
                topk=self.args.kl_topk,
                temperature=self.args.kl_temperature or self.temperature,
                chunk_size=self.args.kl_chunk_size,
                logit_scale=self._logit_scale,
                final_logit_softcapping=self._softcap,
            )
            per_token = per_token.index_put((rows[selected], cols[selected]), divergence)
            sums += [divergence.detach().sum(), selected.sum().float()]
        kl_loss = self.normalize_like_grpo(per_token, mask, inputs)
        self._log_loss_metrics(sums, routed, mask, inputs["trace_labels"], captured.get("entropy"), weight)
        return loss + weight * kl_loss

    def normalize_like_grpo(self, per_token: torch.Tensor, mask: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        """Reduce a `[B, T]` per-token loss with this run's GRPO normalizer (`loss_type`, accumulation, processes)."""
        return normalize_like_grpo(
            per_token,
            mask,
            loss_type=self.loss_type,
            gradient_accumulation_steps=self.current_gradient_accumulation_steps,
            max_completion_length=self.max_completion_length,
            num_items_in_batch=inputs.get("num_items_in_batch"),
            num_processes=self.accelerator.num_processes,
            steps_per_generation=self.args.steps_per_generation,
            training=self.model.training,
        )

    def _teacher_hidden_states(
        self, unwrapped, inputs, rows: torch.Tensor, cols: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]]:
        """Teacher hidden states at the routed positions, from a forward over only the rows that need it.

        Each row is cut after its batch's last routed token: with causal attention the tokens after it cannot change
        the hidden states before it.
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
        with torch.no_grad(), self.teacher.activate(unwrapped) as view, self.accelerator.autocast():
            hidden = view.backbone(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state
            head = (view.head_weight, view.head_bias)
        return hidden[local_index, teacher_prompt_width - 1 + cols].detach(), head

    @contextlib.contextmanager
    def _capture_student(self, unwrapped) -> Iterator[dict[str, Any]]:
        """Capture the decoder's last hidden states (with grad) and GRPO's per-token entropies of one forward."""
        captured: dict[str, Any] = {}

        def keep_hidden(module, args, output):
            captured["hidden"] = output.last_hidden_state

        handle = causal_lm_of(unwrapped).base_model.register_forward_hook(keep_hidden)
        self._captured = captured
        try:
            yield captured
        finally:
            handle.remove()
            self._captured = None

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._captured is not None and entropies is not None:
            self._captured["entropy"] = entropies.detach()
        return logps, entropies, aux_loss

    def _log_exposure(self, routed_tokens: float) -> None:
        self.privileged_exposure += self.current_kl_weight() * routed_tokens
        self._metrics["train"]["trace/privileged_exposure"].append(self.privileged_exposure)

    def _log_loss_metrics(self, sums, routed, mask, labels, entropy, weight) -> None:
        mask_f = mask.float()
        local = [*sums, routed.sum().float(), mask_f.sum()]
        if entropy is None:
            entropy = torch.zeros_like(mask_f)
        for label in (LABEL_KEY, LABEL_ERROR, LABEL_OTHER):
            selected = (labels == label).float() * mask_f
            local += [(entropy * selected).sum(), selected.sum()]
        totals = self.accelerator.reduce(torch.stack([t.float() for t in local]), "sum").tolist()
        fkl_sum, fkl_n, rkl_sum, rkl_n, n_routed, n_tokens = totals[:6]
        metrics = self._metrics["train"]
        metrics["trace/fkl_mean"].append(fkl_sum / fkl_n if fkl_n else math.nan)
        metrics["trace/rkl_mean"].append(rkl_sum / rkl_n if rkl_n else math.nan)
        metrics["trace/routed_token_frac"].append(n_routed / max(n_tokens, 1.0))
        for name, (total, count) in zip(
            ("key", "error", "other"), zip(totals[6::2], totals[7::2], strict=True), strict=True
        ):
            metrics[f"trace/entropy_{name}"].append(total / count if count else math.nan)
        self.privileged_exposure += weight * n_routed
        metrics["trace/privileged_exposure"].append(self.privileged_exposure)

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        checkpoint = os.path.join(
            self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        with open(os.path.join(checkpoint, TRACE_STATE_FILE), "w") as f:
            json.dump({"privileged_exposure": self.privileged_exposure}, f)
        self.teacher.save(self.accelerator.unwrap_model(self.model), checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, TRACE_STATE_FILE)
        if os.path.exists(path):
            with open(path) as f:
                self.privileged_exposure = float(json.load(f)["privileged_exposure"])
        self.teacher.load(self.accelerator.unwrap_model(self.model), checkpoint)

    # ------------------------------------------------------------------------------------------------------------
    # Model card
    # ------------------------------------------------------------------------------------------------------------
    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's card (TRACE, its paper and TRL cited) plus a "TRACE settings" section; see `trace_trl.model_card`."""
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=[*tags, "self-distillation"])
        if self.is_world_process_zero():
            add_trace_settings(os.path.join(self.args.output_dir, "README.md"), self.args, self.annotator)

    def save_model(self, output_dir=None, _internal_call=False):
        super().save_model(output_dir, _internal_call)
        folder = output_dir or self.args.output_dir
        # Checkpoints keep a LoRA teacher adapter for resume; the model a user saves or pushes holds only the trained one.
        if self.args.should_save and not os.path.basename(os.path.normpath(folder)).startswith(PREFIX_CHECKPOINT_DIR):
            remove_teacher_adapters(folder)
        # A user's save into the run folder also writes the card (checkpoints and `push_to_hub` write their own).
        run_folder = os.path.abspath(self.args.output_dir)
        if not _internal_call and os.path.abspath(output_dir or run_folder) == run_folder:
            self.create_model_card(model_name=os.path.basename(os.path.normpath(self.args.output_dir)))


def _full_head(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Under FSDP2 the head's weight is a DTensor; the chunked kernel needs plain tensors (one all-gather, as TRL's
    distillation loss does). ZeRO-3 partitions are gathered inside the kernel itself."""
    dtensor = getattr(getattr(torch.distributed, "tensor", None), "DTensor", None)
    if dtensor is not None and isinstance(weight, dtensor):
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    return weight, bias


def _check_sharded_training(trainer: TRACETrainer, args: TRACEConfig) -> None:
    """Refuse full fine-tuning under ZeRO-3 / FSDP with the KL channel on; warn that LoRA there is unverified.

    The KL channel reads `lm_head.weight` directly, outside the model's forward. For a frozen head (LoRA) that only
    needs the weight gathered (the chunked kernel does it under ZeRO-3; FSDP2 DTensors are materialized in
    `_compute_loss`). A trained head under ZeRO-3 / FSDP would also need its gradient reduced by the engine, which only
    happens for losses computed inside the wrapped module's forward (TRL's `_ForwardRedirection`); TRACE does not do
    that yet, so the head's KL gradient could be silently wrong.
    """
    if args.kl_coef == 0:
        return
    zero3 = (
        bool(trainer.is_deepspeed_enabled)
        and getattr(trainer.accelerator.state.deepspeed_plugin, "zero_stage", None) == 3
    )
    fsdp = bool(trainer.is_fsdp_enabled)
    if not (zero3 or fsdp):
        return
    engine = "DeepSpeed ZeRO-3" if zero3 else "FSDP"
    if not is_peft_model(trainer.accelerator.unwrap_model(trainer.model)):
        raise NotImplementedError(
            f"TRACE's KL channel with full fine-tuning under {engine} is not supported: the routed divergence reads "
            "the LM head outside the model's forward, so the engine would not reduce the head's gradient. Use LoRA "
            "(`peft_config=`), DDP or DeepSpeed ZeRO-1/2, or set `kl_coef=0` for plain GRPO. See docs/scaling.md."
        )
    logger.warning(
        "TRACE with LoRA under %s has not been verified on real hardware (only DDP was); see docs/scaling.md.", engine
    )


def _warn_if_resume_is_inexact(args: TRACEConfig) -> None:
    """GRPO regenerates rollouts after a resume: a checkpoint inside a generation window cannot resume exactly."""
    if args.save_strategy != "steps" or args.save_steps < 1:
        return
    window = args.steps_per_generation * args.num_iterations  # micro-steps between two generations
    if (int(args.save_steps) * args.gradient_accumulation_steps) % window != 0:
        logger.warning(
            "Checkpoints every %d optimizer steps fall inside a generation window (steps_per_generation=%d x "
            "num_iterations=%d micro-steps, gradient_accumulation_steps=%d): GRPO regenerates rollouts after a "
            "resume, so resuming from such a checkpoint trains on new rollouts and does not reproduce the "
            "uninterrupted run. For exact resume, make save_steps x gradient_accumulation_steps a multiple of "
            "steps_per_generation x num_iterations.",
            int(args.save_steps),
            args.steps_per_generation,
            args.num_iterations,
            args.gradient_accumulation_steps,
        )


def _spans_for_rollout(annotation: Annotation, is_correct: bool, text_length: int) -> tuple[list[Span], int]:
    """Spans that count for this rollout (key if correct, error if not, inside the text) and how many were dropped."""
    if annotation.failed:
        return [], 0
    wanted = "key" if is_correct else "error"
    kept = [s for s in annotation.spans if s.kind == wanted and s.start < text_length and s.end > s.start]
    return kept, len(annotation.spans) - len(kept)


class _TeacherUpdateCallback(TrainerCallback):
    """Drives the teacher's life cycle: built or restored at train begin (after `accelerator.prepare` and checkpoint
    loading, on the training device), then after every optimizer step an EMA step or a sync, and its release once the
    KL weight is zero for good."""

    def __init__(self, trainer: TRACETrainer) -> None:
        self._trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._trainer
        trainer.teacher.begin(trainer.accelerator.unwrap_model(trainer.model), state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self._trainer
        trainer.teacher.update(trainer.accelerator.unwrap_model(trainer.model), state.global_step)
        trainer._metrics["train"]["trace/teacher_memory_bytes"].append(float(trainer.teacher.memory_bytes()))
