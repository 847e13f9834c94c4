"""`TRACETrainer`: GRPO plus a token-routed KL channel to a privileged self-teacher.

It changes as little of `GRPOTrainer` as it can:

- `_calculate_rewards` keeps what GRPO does not return (prompts, completion ids, dataset rows, gathered rewards);
- `_generate_and_score_completions` calls GRPO, then `routing.RoutedBatchBuilder` (annotate, label, cap the coverage,
  build the teacher inputs), adding its tensors to the batch as `(B, ...)` tensors that survive GRPO's shuffling and
  splitting;
- `_compute_loss` runs the teacher (no grad), then GRPO's own loss with per-token advantages that route GRPO away
  from KL tokens; the KL channel on routed tokens is computed inside GRPO's single student forward (a hook on the
  decoder's output), so FSDP2 and ZeRO-3 gather the LM head and reduce its gradient as for any loss computed in the
  wrapped forward, and is sequence-normalized (the paper) or reduced with GRPO's normalizer;
- `_save_checkpoint` / `_load_optimizer_and_scheduler` persist the cumulative exposure and the teacher's own weights."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOConfig, GRPOTrainer

from .annotators.base import bind_annotator
from .annotators.heuristic import AllTokensAnnotator
from .config import TRACEConfig
from .context import TeacherContextBuilder
from .losses import grpo_token_weights, normalize_like_grpo, routed_divergence, sequence_normalize
from .model_card import add_trace_settings
from .routing import Route, RoutedBatchBuilder
from .schedule import kl_weight, kl_weight_sq_sum
from .sharding import FSDP2, ZERO3, forward_through, full_tensor, is_dtensor, reshard, sharding_engine
from .spans import TokenLabel
from .teacher import Teacher, causal_lm_of, lm_head_scaling, remove_teacher_adapters
from .teacher_stores import sharded_store


logger = logging.getLogger(__name__)

TRACE_STATE_FILE = "trace_state.json"

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
        no_args = args is None
        if args is None:
            # Before building the default config: on a CPU-only machine its bf16 default fails first, hiding this advice.
            _check_annotator(annotator, None, no_args=True)
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = TRACEConfig(output_dir=f"{model_name.split('/')[-1]}-TRACE")
        elif not isinstance(args, TRACEConfig):
            hint = (
                " Convert it with `TRACEConfig.from_grpo_config(grpo_config, kl_coef=..., ...)`."
                if isinstance(args, GRPOConfig)
                else ""
            )
            raise TypeError(f"TRACETrainer needs `args` to be a TRACEConfig, got {type(args).__name__}.{hint}")
        _check_annotator(annotator, args, no_args)
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
        if args.kl_coef > 0 and args.correctness_reward_func is None and len(self.reward_func_names) > 1:
            logger.warning(
                "With several reward functions (%s) and no `correctness_reward_func`, a rollout counts as correct when "
                "the weighted sum of all rewards reaches `correct_reward_threshold` (%s): with an accuracy and a format "
                "reward, a well-formatted wrong answer may count as correct and get key spans. Set "
                "`correctness_reward_func` to the reward that checks the answer (e.g. 'accuracy_reward').",
                ", ".join(self.reward_func_names),
                args.correct_reward_threshold,
            )
        _check_privileged_column(train_dataset if train_dataset is not None else self.train_dataset, args)
        self.sharding_engine = _check_sharded_training(self, args)
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
        engine = self.sharding_engine
        self.teacher = Teacher(
            args.teacher_kind,
            unwrapped,
            ema_rate=args.teacher_ema_rate,
            sync_steps=args.teacher_sync_steps,
            reference_model=self.ref_model,
            kl_finished=self._kl_channel_off,
            shard=(lambda policy: sharded_store(policy, self.accelerator, engine)) if engine else None,
        )
        self.add_callback(_TeacherUpdateCallback(self))
        teacher_context = TeacherContextBuilder(
            args.teacher_context_template,
            tokenize=self._tokenize_teacher_prompts,
            encode_text=lambda text: self._tokenizer(text, add_special_tokens=False)["input_ids"],
            decode_text=lambda ids: self._tokenizer.decode(ids),
            max_length=args.max_teacher_prompt_length,
        )
        self._batch_builder = RoutedBatchBuilder(
            args,
            self._tokenizer,
            annotator,
            teacher_context,
            reduce_sum=lambda t: self.accelerator.reduce(t, "sum"),
            device=self.accelerator.device,
        )
        self._logit_scale, self._softcap = lm_head_scaling(causal_lm_of(unwrapped).config)
        self._trace_stash: dict[str, Any] | None = None
        self._captured: dict[str, Any] | None = None
        self.privileged_exposure = 0.0  # sum over micro-steps of kl_weight x routed tokens (all processes)
        # This process's unclipped per-token divergences of the last KL-phase micro-step, by kind ("fkl", "rkl"; empty
        # when it routed nothing): for inspecting what the clip sees (the replication study reports their distribution).
        self.last_routed_divergences: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------------------------
    # Schedule
    # ------------------------------------------------------------------------------------------------------------
    def _schedule(self) -> dict[str, Any]:
        args = self.args
        return dict(
            coef=args.kl_coef, warmup_steps=args.kl_warmup_steps, decay_steps=args.kl_decay_steps, decay=args.kl_decay
        )

    def current_kl_weight(self) -> float:
        """KL-channel weight at the current optimizer step (0 outside training)."""
        return kl_weight(self.state.global_step, **self._schedule())

    def kl_weight_sq_sum(self) -> float:
        """Sum of the squared KL weights of the optimizer steps so far, current one included (the paper's exposure bound).

        A pure function of the schedule and the step, so it needs no state and resumes exactly.
        """
        return kl_weight_sq_sum(self.state.global_step, **self._schedule())

    def _kl_channel_off(self, step: int) -> bool:
        """Whether nothing of the KL channel runs at optimizer `step`: no annotation, no teacher forward or copy.

        The schedule never rises again once it is zero, so this stays true for every later step.
        """
        args = self.args
        routes_something = args.key_span_action != "grpo" or args.error_span_action != "grpo"
        return self.annotator is None or not routes_something or kl_weight(step, **self._schedule()) == 0.0

    def _kl_channel_active(self) -> bool:
        return not self._kl_channel_off(self.state.global_step)

    # ------------------------------------------------------------------------------------------------------------
    # Generation: annotate, label tokens, build teacher inputs
    # ------------------------------------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.args.privileged_context_column not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, self.args.privileged_context_column]

    def _tokenize_teacher_prompts(self, prompts: list[Any], rows: list[int]) -> list[list[int]]:
        """GRPO's prompt tokenization for teacher prompts of some rows of the local batch.

        With `environment_factory`, GRPO renders each prompt with the tools of its row's environment, zipping the
        prompts with the whole batch's environments; teacher prompts exist only for routed rows, so the environments
        are narrowed to those rows for the call.
        """
        if getattr(self, "environment_factories", None) is None:
            return self._tokenize_prompts(prompts)[0]
        batch_environments = self._batch_environments
        self._batch_environments = [batch_environments[i] for i in rows]
        try:
            return self._tokenize_prompts(prompts)[0]
        finally:
            self._batch_environments = batch_environments

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
        n = len(stash["prompts"])
        routed = self._batch_builder.build(
            stash["prompts"],
            stash["inputs"],
            stash["completion_ids_list"],
            self._rollout_rewards(stash["rewards_per_func"], n),
            output,
        )
        metrics = self._metrics["train"]
        for name, value in routed.metrics.items():
            metrics[name].append(value)
        annotator_metrics = getattr(self.annotator, "metrics", None)
        if callable(annotator_metrics):
            for name, value in annotator_metrics().items():
                metrics[name if "/" in name else f"annotator/{name}"].append(float(value))
        return routed.tensors

    # ------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        route = inputs.get("trace_route")
        training = self.model.training
        weight = self.current_kl_weight() if training else 0.0
        if training:
            self._metrics["train"]["trace/kl_weight"].append(weight)
            self._metrics["train"]["trace/kl_weight_sq_sum"].append(self.kl_weight_sq_sum())
        if route is None or weight == 0.0:
            return super()._compute_loss(model, inputs)

        mask = inputs["completion_mask"] * inputs.get("tool_mask", torch.ones_like(inputs["completion_mask"]))
        routed = (route != Route.GRPO) & mask.bool()
        # A global count: under ZeRO-3 / FSDP the teacher forward gathers weights, a collective every process joins, so
        # whether it runs is decided for all processes at once; the same count feeds the exposure.
        n_routed = self.accelerator.reduce(routed.sum().float().reshape(1), "sum").item()
        self.privileged_exposure += weight * n_routed
        self.last_routed_divergences = {}
        if n_routed == 0:
            # Still a KL-phase micro-step: its (zero) routed fraction and its span entropies count in the metrics.
            with self._capture_student(self.accelerator.unwrap_model(model), None) as captured:
                loss = super()._compute_loss(model, inputs)
            self._log_loss_metrics({}, routed, mask, inputs["trace_labels"], captured.get("entropy"))
            return loss

        unwrapped = self.accelerator.unwrap_model(model)
        rows, cols = routed.nonzero(as_tuple=True)
        # Teacher first, so adapter switches (base/EMA teachers with LoRA) never sit between the student's forward and
        # its backward.
        teacher_hidden, teacher_head = self._teacher_hidden_states(model, unwrapped, inputs, rows, cols)

        grpo_weights = grpo_token_weights(
            routed, mode=self.args.routed_token_grpo, kl_weight=weight, kl_coef=self.args.kl_coef
        )
        advantages = inputs["advantages"]
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        grpo_inputs = {**inputs, "advantages": advantages * grpo_weights}  # a new dict: batches are revisited
        positions = (rows, inputs["prompt_ids"].size(1) - 1 + cols)

        def kl_inside_forward(hidden: torch.Tensor):
            return self._routed_kl(
                unwrapped, hidden[positions], teacher_hidden, teacher_head, route[rows, cols], rows, cols, mask.shape
            )

        with self._capture_student(unwrapped, kl_inside_forward) as captured:
            loss = super()._compute_loss(model, grpo_inputs)
        if "kl" not in captured:
            raise RuntimeError(
                "GRPO's loss did not run the student's decoder, so TRACE's KL channel has no hidden states."
            )
        per_token, sums = captured["kl"]
        if self.args.kl_normalization == "sequence":
            kl_loss = sequence_normalize(
                per_token, mask, gradient_accumulation_steps=self.current_gradient_accumulation_steps
            )
        else:
            kl_loss = self.normalize_like_grpo(per_token, mask, inputs)
        self._log_loss_metrics(sums, routed, mask, inputs["trace_labels"], captured.get("entropy"))
        return loss + weight * kl_loss

    def _routed_kl(self, unwrapped, student_hidden, teacher_hidden, teacher_head, kinds, rows, cols, shape):
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
        for code, kind in ((Route.FKL, "fkl"), (Route.RKL, "rkl")):
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
        self, model, unwrapped, inputs, rows: torch.Tensor, cols: torch.Tensor
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
    def _capture_student(self, unwrapped, kl_inside_forward) -> Iterator[dict[str, Any]]:
        """While GRPO's loss runs: on the decoder's output, inside the student's single forward, compute the KL channel
        with `kl_inside_forward(hidden_states)` (unless it is `None`); and keep GRPO's per-token entropies."""
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

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._captured is not None and entropies is not None:
            self._captured["entropy"] = entropies.detach()
        return logps, entropies, aux_loss

    def _log_loss_metrics(self, sums, routed, mask, labels, entropy) -> None:
        """The KL channel's metrics of one KL-phase micro-step, summed over processes (`sums` is empty when nothing
        was routed anywhere: the step still counts, with a routed fraction of 0).

        Per divergence kind: the mean of what the loss used (`trace/fkl_mean`, clipped), the mean of the true divergence
        (`trace/fkl_unclipped_mean`) and the fraction of routed tokens the clip bounded (`trace/fkl_clipped_frac`); an
        element-clipped "KL" can be negative, the unclipped one never is. Span entropies count key-, error- and
        unlabelled loss tokens."""
        mask_f = mask.float()
        zero = mask_f.new_zeros(())
        local = [*(t for kind in ("fkl", "rkl") for t in sums.get(kind, [zero] * 4)), routed.sum().float(), mask_f.sum()]
        if entropy is None:
            entropy = torch.zeros_like(mask_f)
        for label in (TokenLabel.KEY, TokenLabel.ERROR, TokenLabel.NONE):
            selected = (labels == label).float() * mask_f
            local += [(entropy * selected).sum(), selected.sum()]
        totals = self.accelerator.reduce(torch.stack([t.float() for t in local]), "sum").tolist()
        metrics = self._metrics["train"]
        for i, kind in enumerate(("fkl", "rkl")):
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
        metrics["trace/privileged_exposure"].append(self.privileged_exposure)

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        checkpoint = os.path.join(
            self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        # Every process: a sharded teacher's state is gathered (a collective); the main process writes.
        self.teacher.save(self.accelerator.unwrap_model(self.model), checkpoint, write=self.args.should_save)
        if self.args.should_save:
            with open(os.path.join(checkpoint, TRACE_STATE_FILE), "w") as f:
                json.dump({"privileged_exposure": self.privileged_exposure}, f)

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


def _check_sharded_training(trainer: TRACETrainer, args: TRACEConfig) -> str | None:
    """The sharded engine the KL channel runs under (`"fsdp2"`, `"zero3"` or `None`), refusing what it cannot run.

    FSDP2 and ZeRO-3 are supported for full fine-tuning and LoRA: the KL channel runs inside the student's wrapped
    forward and the teacher's forward through its wrapper (see `_routed_kl` and `_teacher_hidden_states`). Refused:
    FSDP1 (deprecated upstream) and the top-k ablation under ZeRO-3 (its chunks read the partitioned head directly).
    """
    if args.kl_coef == 0:
        return None
    engine = sharding_engine(trainer.accelerator)
    if engine == ZERO3 and args.kl_topk is not None:
        raise NotImplementedError(
            "`kl_topk` (the top-k divergence ablation) reads the LM head outside the ZeRO-3 gather; under DeepSpeed "
            "ZeRO-3 use the full-vocabulary divergence (`kl_topk=None`, the default) or FSDP2."
        )
    if engine == FSDP2 and type(getattr(trainer.accelerator.state.fsdp_plugin, "cpu_offload", None)).__name__ == (
        "CPUOffloadPolicy"
    ):
        logger.warning(
            "FSDP2 with parameter offload: the teacher copy is sharded with the same offload policy, and its LM head "
            "is gathered to the training device once per step during the KL phase."
        )
    return engine


def _check_privileged_column(dataset: Any, args: TRACEConfig) -> None:
    """A missing privileged-context column is an error at init, not after the first rollouts are generated."""
    columns = getattr(dataset, "column_names", None)
    if args.kl_coef == 0 or not isinstance(columns, list) or args.privileged_context_column in columns:
        return
    raise ValueError(
        f"The training dataset has no column {args.privileged_context_column!r} (`privileged_context_column`), which "
        f"holds the privileged context the teacher sees. Available columns: {sorted(columns)}. Add the column or set "
        "`privileged_context_column` to the right name."
    )


def _check_annotator(annotator: Any, args: TRACEConfig | None, no_args: bool) -> None:
    """Errors that would otherwise come only after the model loads and a rollout is generated."""
    if annotator is None:
        if args is not None and args.kl_coef == 0:
            return
        grpo_hint = (
            "pass `args=TRACEConfig(output_dir=..., kl_coef=0)` to train plain GRPO"
            if no_args
            else "set `kl_coef=0` in your TRACEConfig to train plain GRPO"
        )
        raise ValueError(
            "TRACETrainer needs an `annotator` to mark the spans it distills on. Pass e.g. "
            "`annotator=RegexAnnotator(key_patterns=[RegexAnnotator.BOXED])`, `OpenAIAnnotator(model=...)` or "
            f"`AllTokensAnnotator()` (all-token self-distillation), or {grpo_hint}."
        )
    if isinstance(annotator, type):
        raise TypeError(
            f"`annotator` is the class {annotator.__name__}, not an instance: pass `annotator={annotator.__name__}(...)`."
        )
    if not callable(annotator):
        raise TypeError(
            f"`annotator` must be callable as annotator(requests) -> list[Annotation]; got {type(annotator).__name__}."
        )
    if isinstance(annotator, AllTokensAnnotator) and args is not None and args.kl_coef > 0:
        if args.max_routed_fraction is not None:
            raise ValueError(
                f"`AllTokensAnnotator` marks every token, but `max_routed_fraction={args.max_routed_fraction}` caps "
                "the routed tokens of each rollout, so only a prefix of each rollout would be distilled, not all of "
                "it. Set `max_routed_fraction=None` for the all-token baselines (or use `RandomSpanAnnotator` for a "
                "25% control)."
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
