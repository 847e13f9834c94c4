"""`TRACETrainer`: GRPO plus a token-routed KL channel to a privileged self-teacher.

It changes as little of `GRPOTrainer` as it can:

- `_calculate_rewards` keeps what GRPO does not return (prompts, completion ids, dataset rows, gathered rewards);
- `_generate_and_score_completions` calls GRPO, then `routing.RoutedBatchBuilder` (annotate, label, cap the coverage,
  build the teacher inputs), adding its tensors to the batch as `(B, ...)` tensors that survive GRPO's shuffling and
  splitting;
- `_compute_loss` asks the `KLChannel` (`kl_channel.py`, built once in `__init__`) for GRPO's loss plus the weighted
  KL term of the micro-step (teacher forward under no grad, GRPO's own loss with per-token advantages that route GRPO
  away from KL tokens, the routed divergence computed inside GRPO's single student forward, its normalization) and
  logs the statistics it returns in one place;
- `_save_checkpoint` / `_load_optimizer_and_scheduler` persist the cumulative exposure and the teacher's own weights."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOConfig, GRPOTrainer

from .annotators.base import bind_annotator, preflight_annotator
from .config import (
    TRACEConfig,
    _check_annotator,
    _check_privileged_column,
    _check_sharded_training,
    _warn_if_resume_is_inexact,
)
from .context import TeacherContextBuilder
from .kl_channel import KLChannel
from .losses import normalize_like_grpo
from .model_card import add_trace_settings
from .reward_checks import check_reward_funcs
from .rollout_records import (  # noqa: F401 (COMPLETION_SPAN_COLUMNS: re-exported)
    COMPLETION_SPAN_COLUMNS,
    append_jsonl,
    completion_span_columns,
    rollout_dump_rows,
    rollout_rewards,
)
from .routing import RoutedBatchBuilder
from .schedule import kl_weight, kl_weight_sq_sum
from .teacher import Teacher, remove_teacher_adapters
from .teacher_stores import sharded_store
from .vllm_cpu import use_live_weights


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
        if args.use_vllm and args.vllm_mode == "colocate":
            use_live_weights()  # vLLM's CPU build only: lets TRL's weight sync reach the engine (see vllm_cpu.py)
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
        # A reward function that forgets its `return` fails naming itself, not as TRL's "'NoneType' is not iterable".
        self.reward_funcs = check_reward_funcs(self.reward_funcs, self.reward_func_names)
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
        self._trace_stash: dict[str, Any] | None = None
        self.kl_channel = KLChannel(
            args,
            self.teacher,
            self.accelerator,
            unwrapped,
            sharding_engine=engine,
            temperature=self.temperature,
            normalize_like_grpo=self.normalize_like_grpo,
            accumulation_steps=lambda: self.current_gradient_accumulation_steps,
        )
        self.privileged_exposure = 0.0  # sum over micro-steps of kl_weight x routed tokens (all processes)

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
        if stash is not None and self.args.dump_rollouts and self.model.training:
            self._dump_rollouts(stash)
        routed = None
        if self.model.training and self._kl_channel_active() and stash is not None:
            routed = self._routed_batch(stash, output)
        if self.log_completions:
            self._log_completion_spans(output["completion_ids"].size(0), routed is not None)
        # New keys go after GRPO's: GRPO's shuffling reads the batch size from the first value.
        return output if routed is None else {**output, **routed}

    def _rollout_rewards(self, rewards_per_func: torch.Tensor, n_local: int) -> torch.Tensor:
        """This process's rollout rewards for correctness: one reward function's, or the weighted sum (NaN if unscored)."""
        name = self.args.correctness_reward_func
        return rollout_rewards(
            rewards_per_func,
            n_local,
            self.accelerator.process_index,
            self.reward_weights,
            None if name is None else self.reward_func_names.index(name),
        )

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
        if self.args.log_annotator_metrics and callable(annotator_metrics):
            for name, value in annotator_metrics().items():
                # Running totals since the start: the logged value is the latest total, not the mean of the totals
                # seen in the logging window.
                metrics[name if "/" in name else f"annotator/{name}"] = [float(value)]
        return routed.tensors

    # ------------------------------------------------------------------------------------------------------------
    # What a user sees of the annotation: preflight, completions table, last batch, rollout dump
    # ------------------------------------------------------------------------------------------------------------
    def train(self, *args, **kwargs):
        """`GRPOTrainer.train`, after a one-request check of a network annotator (`annotation_preflight`)."""
        self._preflight_annotator()
        return super().train(*args, **kwargs)

    def _preflight_annotator(self) -> None:
        args = self.args
        routes_something = args.key_span_action != "grpo" or args.error_span_action != "grpo"
        if not args.annotation_preflight or self.annotator is None or args.kl_coef == 0 or not routes_something:
            return
        if preflight_annotator(self.annotator):
            logger.info("Annotator preflight passed: its server answered one annotation request.")

    @property
    def last_annotations(self) -> list[dict[str, Any]]:
        """This process's rollouts of the last annotated generation batch, as annotation rows (`trace-trl annotate`'s
        format, plus `annotated`, `action` and `routed_spans`: the character ranges routed after the cap).

        Show them in Jupyter with `trace_trl.inspection.AnnotationView(trainer.last_annotations)`.
        """
        return [record.row(i) for i, record in enumerate(self._batch_builder.last_batch)]

    def _log_completion_spans(self, n_local: int, routed: bool) -> None:
        """Add the routed spans to TRL's completions table (`log_completions`; columns: `completion_span_columns`).

        GRPO has already flushed its extra columns for this batch, so these are gathered and appended the same way, one
        value per rollout of every batch (train and eval), so that every column of the table has one value per row.
        """
        from accelerate.utils import gather_object

        columns = completion_span_columns(
            self._batch_builder.last_batch, n_local, training=self.model.training, routed=routed
        )
        for name, values in columns.items():
            self._logs["extra"][name].extend(gather_object(values))

    def _dump_rollouts(self, stash: dict[str, Any]) -> None:
        """Append this generation batch's rollouts to `dump_rollouts` (JSONL in `trace-trl annotate`'s columns)."""
        from accelerate.utils import gather_object

        n = len(stash["prompts"])
        rows = rollout_dump_rows(
            step=self.state.global_step,
            prompts=stash["prompts"],
            inputs=stash["inputs"],
            completions=self._tokenizer.batch_decode(
                [list(map(int, ids)) for ids in stash["completion_ids_list"]], skip_special_tokens=True
            ),
            rewards=self._rollout_rewards(stash["rewards_per_func"], n).float().cpu().tolist(),
            correct_threshold=self.args.correct_reward_threshold,
            privileged_context_column=self.args.privileged_context_column,
        )
        rows = gather_object(rows)
        if self.accelerator.is_main_process:
            append_jsonl(self.args.dump_rollouts, rows)

    # ------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        training = self.model.training
        weight = self.current_kl_weight() if training else 0.0
        if training:
            self._metrics["train"]["trace/kl_weight"].append(weight)
            self._metrics["train"]["trace/kl_weight_sq_sum"].append(self.kl_weight_sq_sum())
        if inputs.get("trace_route") is None or weight == 0.0:
            return super()._compute_loss(model, inputs)
        loss, stats = self.kl_channel.loss(
            model, inputs, weight, grpo_loss=lambda batch: super(TRACETrainer, self)._compute_loss(model, batch)
        )
        self.privileged_exposure += weight * stats.n_routed  # sum over micro-steps of kl_weight x routed tokens
        self.kl_channel.log(self._metrics["train"], stats, self.privileged_exposure)
        return loss

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

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        self.kl_channel.record_entropies(entropies)
        return logps, entropies, aux_loss

    @property
    def last_routed_divergences(self) -> dict[str, torch.Tensor]:
        """This process's unclipped per-token divergences of the last KL-phase micro-step, by kind (`KLChannel`)."""
        return self.kl_channel.last_routed_divergences

    @last_routed_divergences.setter
    def last_routed_divergences(self, value: dict[str, torch.Tensor]) -> None:
        self.kl_channel.last_routed_divergences = value

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
            # The model id TRL's card reads; a local folder or "" is what TRL renders as "[None]".
            base_model = getattr(self.model.config, "_name_or_path", "") or None
            add_trace_settings(
                os.path.join(self.args.output_dir, "README.md"), self.args, self.annotator, base_model=base_model
            )

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
