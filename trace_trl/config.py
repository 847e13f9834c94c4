"""`TRACEConfig`: `GRPOConfig` plus the fields of the TRACE KL channel, teacher and annotation."""

from __future__ import annotations

import copy
import logging
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import jinja2
import jinja2.meta
from trl import GRPOConfig

from .losses import CLIP_MODES
from .schedule import KL_DECAYS


logger = logging.getLogger(__name__)


SPAN_ACTIONS: tuple[str, ...] = ("fkl", "rkl", "grpo")
ROUTED_TOKEN_GRPO_MODES: tuple[str, ...] = ("exclusive", "additive", "complementary")
TEACHER_KINDS: tuple[str, ...] = ("synced", "live", "base", "ema")
KL_NORMALIZATIONS: tuple[str, ...] = ("sequence", "grpo")
ANNOTATION_FAILURE_MODES: tuple[str, ...] = ("skip", "raise")
ANNOTATION_BATCH_FAILURE_MODES: tuple[str, ...] = ("raise", "skip")
ANNOTATOR_EXCEPTION_MODES: tuple[str, ...] = ("raise", "skip")

# Rendered into the last user turn of the teacher's prompt; the completion tokens that follow are the student's.
# Variables: `problem` (the student's last user message), `privileged_context` (dataset column, may be empty) and
# `diagnosis` (the annotator's coarse type label of the rollout in words, e.g. "missed case analysis", from the key-step
# taxonomy for a correct rollout or the error taxonomy for an incorrect one; may be None). The span text and its
# position are never shown to the teacher: only the problem, the reference solution and that label (the paper).
DEFAULT_TEACHER_CONTEXT_TEMPLATE = (
    "{{ problem }}"
    "{% if privileged_context %}\n\nHere is a verified reference solution to this problem:\n"
    "{{ privileged_context }}{% endif %}"
    "{% if diagnosis %}\n\nA reviewer read an attempt at this problem and classified its decisive step as: "
    "{{ diagnosis }}.{% endif %}"
    "\n\nUsing what you know, solve the problem correctly in your own words."
)


def is_cpu_precision_refusal(message: str) -> bool:
    """Whether `message` is transformers' refusal of bf16 on a machine without a bf16-capable accelerator
    (`TrainingArguments.__post_init__`: "Your setup doesn't support bf16/gpu. You need to assign use_cpu ...")."""
    return "bf16/gpu" in message or ("bf16" in message and "use_cpu" in message)


def cpu_precision_hint(*, cli: bool = False) -> str:
    """What to do about that refusal, in the Python API's words or the command line's (`trace-trl train`)."""
    if cli:
        return "On a machine without a GPU: add `--use_cpu true --bf16 false`, or `--tiny` for a smoke run."
    return (
        "On a machine without a GPU, build the config with `TRACEConfig(..., use_cpu=True, bf16=False)` (float32 on "
        "the CPU; TRL's GRPOConfig turns bf16 on by default) and pass it to the trainer as `args=`."
    )


class CPUPrecisionError(ValueError):
    """bf16 (TRL's default) asked for where no device supports it: transformers' message plus what to do.

    `reason` keeps transformers' message alone, so that the command line can give its own flags instead.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"{reason} {cpu_precision_hint()}")

    def __reduce__(self):  # pickled (e.g. across processes) from `reason`, not the message with its hint
        return (type(self), (self.reason,))


@dataclass
class TRACEConfig(GRPOConfig):
    r"""
    Configuration for [`TRACETrainer`]: every [`~trl.GRPOConfig`] field plus the TRACE KL channel.

    TRACE routes tokens: key spans of correct rollouts get `key_span_action` (forward KL to the privileged teacher by
    default), error spans of incorrect rollouts get `error_span_action` (reverse KL by default), and all other tokens
    get the GRPO loss. The KL channel is weighted by [`~trace_trl.schedule.kl_weight`] at the current optimizer step.

    Parameters:
        > KL channel

        kl_coef (`float`, *optional*, defaults to `0.5`):
            Weight of the KL channel during the warm-up (the paper's 0.5). `0.0` makes TRACE exactly GRPO.
        kl_warmup_steps (`int`, *optional*, defaults to `10`):
            Optimizer steps at full `kl_coef` (the paper's 10).
        kl_decay_steps (`int`, *optional*, defaults to `30`):
            Optimizer steps over which the weight then falls to zero (the paper's 30); afterwards training is plain GRPO
            and nothing of the KL channel runs (no annotation, no teacher forward, no teacher copy).
        kl_decay (`str`, *optional*, defaults to `"linear"`):
            Shape of the decay: `"linear"`, `"cosine"`, `"exponential"`, or `"none"` (constant weight forever, the
            all-token self-OPD baseline).
        key_span_action (`str`, *optional*, defaults to `"fkl"`):
            Loss on key-span tokens of correct rollouts: `"fkl"` = KL(teacher ‖ student), `"rkl"` = KL(student ‖
            teacher), `"grpo"` = ordinary GRPO (no routing).
        error_span_action (`str`, *optional*, defaults to `"grpo"`):
            Loss on error-span tokens of incorrect rollouts, same choices. The paper's two presets: TRACE-FKL (strong
            bases) is `key_span_action="fkl", error_span_action="grpo"`; TRACE-RKL (weak bases) is
            `key_span_action="grpo", error_span_action="rkl"`.
        routed_token_grpo (`str`, *optional*, defaults to `"complementary"`):
            What GRPO does on routed tokens while the KL weight is above zero: `"complementary"` (the paper: GRPO
            weight `1 - kl_weight / kl_coef`, 0 in the warm-up), `"exclusive"` (no GRPO there), `"additive"` (full
            GRPO as well).
        kl_normalization (`str`, *optional*, defaults to `"sequence"`):
            How the per-token divergences of a step are reduced. `"sequence"` (the paper): each rollout's routed
            divergences are summed and divided by its number of completion tokens `|y|`, then averaged over all the
            rollouts of the optimizer step (rollouts with nothing routed count), whatever the split into processes,
            accumulation micro-batches and `steps_per_generation`. `"grpo"`: GRPO's own normalizer for `loss_type`.
        kl_term_clip (`float` or `None`, *optional*, defaults to `0.05`):
            The clip's value `c` (the paper clips at 0.05); how it applies is `kl_clip_mode`. `None` turns it off.
        kl_clip_mode (`str`, *optional*, defaults to `"token"`):
            `"token"` (ours, the default): each routed token's divergence `D` counts as `min(D, c)`, its gradient is
            the true divergence's scaled by `min(1, c / D)`, so a far-off token weighs no more than one at `c` and the
            gradient never points away from the teacher. `"element"` (the paper's literal pointwise clip, OPSD's):
            every per-vocabulary term `a_v (log a_v - log b_v)` becomes `min(term, c)` before the sum, with no
            gradient past the cap; under forward KL that pushes the student *away* from the teacher's dominant tokens
            once their terms clip (docs/design.md), so it is kept for fidelity experiments only.
        max_routed_fraction (`float` or `None`, *optional*, defaults to `0.25`):
            Coverage cap (the paper's 25%): at most this fraction of each rollout's completion tokens is routed.
            Spans are kept in the annotator's order, the one that crosses the cap cut at it. `None` turns it off
            (the all-token baseline).
        kl_topk (`int` or `None`, *optional*, defaults to `None`):
            Compute the divergence on the teacher's top-k tokens plus one tail bucket instead of the full vocabulary.
        kl_temperature (`float` or `None`, *optional*, defaults to `None`):
            Temperature the logits are divided by in the KL channel; `None` uses `temperature`, like GRPO's
            log-probabilities.

        > Teacher

        teacher_kind (`str`, *optional*, defaults to `"synced"`):
            `"synced"` (the paper): a frozen snapshot of the policy (with LoRA, of the adapter), re-copied every
            `teacher_sync_steps` optimizer steps while the KL weight is above zero and freed once it reaches zero;
            `"live"`: the current policy under privileged context; `"base"`: the initial weights (with LoRA, the model
            with adapters disabled); `"ema"`: an exponential moving average of the weights (or of the LoRA adapter).
        teacher_sync_steps (`int`, *optional*, defaults to `10`):
            Optimizer steps between two re-copies of the `"synced"` teacher (the paper's 10).
        teacher_ema_rate (`float`, *optional*, defaults to `0.05`):
            EMA rate `r` in `teacher <- (1 - r) * teacher + r * student`, applied after every optimizer step.
        privileged_context_column (`str`, *optional*, defaults to `"solution"`):
            Dataset column holding the privileged context (e.g. a reference solution). Never shown to the student.
        teacher_context_template (`str`, *optional*):
            Jinja2 template of the teacher's last user turn, with variables `problem`, `privileged_context` and
            `diagnosis`. Rendered with the same chat template and `chat_template_kwargs` as the student's prompt.
        max_teacher_prompt_length (`int` or `None`, *optional*, defaults to `4096`):
            Longest teacher prompt in tokens. Over-long privileged context is cut first (with a warning); the problem
            itself is never truncated away.

        > Annotation

        correct_reward_threshold (`float`, *optional*, defaults to `1.0`):
            A rollout is correct when its reward is at least this value.
        correctness_reward_func (`str` or `None`, *optional*, defaults to `None`):
            Name of the reward function that decides correctness (e.g. `"accuracy_reward"`); `None` uses the weighted
            sum of all rewards.
        annotation_failure (`str`, *optional*, defaults to `"skip"`):
            `"skip"`: a failed annotation leaves that rollout to pure GRPO and is counted; `"raise"`: stop training.
        kl_chunk_size (`int`, *optional*, defaults to `1024`):
            Routed tokens per chunk of the full-vocabulary divergence; bounds the memory of one `[chunk, vocab]` tile.
        annotation_batch_failure (`str`, *optional*, defaults to `"raise"`):
            What happens when *every* annotation of a generation batch fails (a server that is down, a proxy's login
            page, a request the server rejects): `"raise"` stops training with the most common (redacted) cause;
            `"skip"` trains the batch as GRPO and warns. Partial failures follow `annotation_failure`.
        annotator_exception (`str`, *optional*, defaults to `"raise"`):
            An exception raised by the annotator itself (a bug in a user's annotator; the built-in annotators return
            failed annotations instead): `"raise"` stops training with it and its (redacted) traceback; `"skip"`
            fails that batch's annotations (then `annotation_batch_failure` applies).
        annotation_preflight (`bool`, *optional*, defaults to `True`):
            At `train()` start, send one annotation request to a network annotator (`OpenAIAnnotator`, and the
            controls built on one) and refuse to start when the server is unreachable, answers something that is not
            a chat completion, or rejects the request. Annotators without a server are not checked.
        annotate_unrouted_kinds (`bool`, *optional*, defaults to `False`):
            Also send rollouts whose kind is not routed (incorrect ones when `error_span_action="grpo"`, correct ones
            when `key_span_action="grpo"`) to the annotator, for inspection; by default they are not sent (not paid
            for) and counted in `trace/annotation_skipped`.
        log_annotator_metrics (`bool`, *optional*, defaults to `True`):
            Log the annotator's running totals (`annotator/*`: requests, API calls, tokens, ...) at every logging step.
        dump_rollouts (`str` or `None`, *optional*, defaults to `None`):
            JSONL file that every generation batch's rollouts are appended to (columns `prompt`, `completion`,
            `is_correct`, `reward`, `reference`: what `trace-trl annotate` reads), e.g. to try an annotator on real
            rollouts before paying for a run. Written by the main process, in every phase of training.
    """

    kl_coef: float = field(
        default=0.5,
        metadata={"help": "Weight of the KL channel during the warm-up (paper: 0.5). 0.0 makes TRACE exactly GRPO."},
    )
    kl_warmup_steps: int = field(
        default=10,
        metadata={"help": "Optimizer steps at full `kl_coef` (paper: 10)."},
    )
    kl_decay_steps: int = field(
        default=30,
        metadata={"help": "Optimizer steps over which the KL weight then falls to zero (plain GRPO afterwards)."},
    )
    kl_decay: str = field(
        default="linear",
        metadata={
            "help": "Shape of the KL-weight decay after the warm-up.",
            "choices": list(KL_DECAYS),
        },
    )
    key_span_action: str = field(
        default="fkl",
        metadata={
            "help": "Loss on key-span tokens of correct rollouts: 'fkl' = KL(teacher||student), 'rkl' = "
            "KL(student||teacher), 'grpo' = ordinary GRPO.",
            "choices": list(SPAN_ACTIONS),
        },
    )
    error_span_action: str = field(
        default="grpo",
        metadata={
            "help": "Loss on error-span tokens of incorrect rollouts: 'rkl', 'fkl' or 'grpo'. Paper presets: TRACE-FKL "
            "= key 'fkl' + error 'grpo'; TRACE-RKL = key 'grpo' + error 'rkl'.",
            "choices": list(SPAN_ACTIONS),
        },
    )
    routed_token_grpo: str = field(
        default="complementary",
        metadata={
            "help": "GRPO on routed tokens while the KL weight is above zero: 'complementary' (paper: weight "
            "1 - kl_weight/kl_coef), 'exclusive' (none), 'additive' (full).",
            "choices": list(ROUTED_TOKEN_GRPO_MODES),
        },
    )
    kl_normalization: str = field(
        default="sequence",
        metadata={
            "help": "Reduction of the KL channel: 'sequence' (paper: per rollout, sum of routed divergences / |y|, "
            "averaged over the step's rollouts) or 'grpo' (GRPO's normalizer for `loss_type`).",
            "choices": list(KL_NORMALIZATIONS),
        },
    )
    kl_term_clip: float | None = field(
        default=0.05,
        metadata={"help": "The KL clip's value c (paper: 0.05); how it applies is `kl_clip_mode`. None: off."},
    )
    kl_clip_mode: str = field(
        default="token",
        metadata={
            "help": "'token' (default): each routed token's divergence D counts as min(D, c) with its gradient scaled "
            "by min(1, c/D), never pointing away from the teacher. 'element' (paper's literal clip): each "
            "per-vocabulary term clipped at c before the sum, no gradient past it; can push forward KL away from "
            "the teacher (docs/design.md), for fidelity experiments.",
            "choices": list(CLIP_MODES),
        },
    )
    max_routed_fraction: float | None = field(
        default=0.25,
        metadata={
            "help": "Coverage cap (paper: 0.25): most routed fraction of each rollout's completion tokens; spans are "
            "kept in the annotator's order, the last one cut at the cap. None: off (all-token baseline)."
        },
    )
    kl_topk: int | None = field(
        default=None,
        metadata={"help": "Divergence over the teacher's top-k tokens plus a tail bucket instead of the full vocab."},
    )
    kl_temperature: float | None = field(
        default=None,
        metadata={"help": "Temperature of the KL channel's logits; None uses `temperature` (as GRPO does)."},
    )
    teacher_kind: str = field(
        default="synced",
        metadata={
            "help": "Teacher weights: 'synced' (paper: frozen snapshot re-copied every `teacher_sync_steps`), 'live' "
            "(current policy), 'base' (initial weights; LoRA: adapters off), 'ema'.",
            "choices": list(TEACHER_KINDS),
        },
    )
    teacher_sync_steps: int = field(
        default=10,
        metadata={"help": "Optimizer steps between two re-copies of the 'synced' teacher (paper: 10)."},
    )
    teacher_ema_rate: float = field(
        default=0.05,
        metadata={"help": "EMA rate r in teacher <- (1 - r) * teacher + r * student, per optimizer step."},
    )
    privileged_context_column: str = field(
        default="solution",
        metadata={"help": "Dataset column with the privileged context (e.g. a reference solution)."},
    )
    teacher_context_template: str = field(
        default=DEFAULT_TEACHER_CONTEXT_TEMPLATE,
        metadata={
            "help": "Jinja2 template of the teacher's last user turn, with `problem`, `privileged_context` and "
            "`diagnosis`."
        },
    )
    max_teacher_prompt_length: int | None = field(
        default=4096,
        metadata={"help": "Longest teacher prompt in tokens; privileged context is cut first, never the problem."},
    )
    correct_reward_threshold: float = field(
        default=1.0,
        metadata={"help": "A rollout is correct when its reward is at least this value."},
    )
    correctness_reward_func: str | None = field(
        default=None,
        metadata={"help": "Name of the reward function that decides correctness; None uses the weighted sum."},
    )
    annotation_failure: str = field(
        default="skip",
        metadata={
            "help": "'skip': a failed annotation leaves the rollout to GRPO and is counted; 'raise': stop training.",
            "choices": list(ANNOTATION_FAILURE_MODES),
        },
    )
    kl_chunk_size: int = field(
        default=1024,
        metadata={"help": "Routed tokens per chunk of the full-vocabulary divergence."},
    )
    annotation_batch_failure: str = field(
        default="raise",
        metadata={
            "help": "When every annotation of a generation batch fails (server down, login page, rejected request): "
            "'raise' stops training with the most common cause, 'skip' trains the batch as GRPO and warns.",
            "choices": list(ANNOTATION_BATCH_FAILURE_MODES),
        },
    )
    annotator_exception: str = field(
        default="raise",
        metadata={
            "help": "An exception raised by the annotator's own code: 'raise' stops training with it (redacted), "
            "'skip' fails that batch's annotations.",
            "choices": list(ANNOTATOR_EXCEPTION_MODES),
        },
    )
    annotation_preflight: bool = field(
        default=True,
        metadata={
            "help": "At train() start, send one request to a network annotator and refuse to start if the server is "
            "unreachable, answers something that is not a chat completion, or rejects the request."
        },
    )
    annotate_unrouted_kinds: bool = field(
        default=False,
        metadata={
            "help": "Also annotate rollouts whose kind is not routed (for inspection); by default they are not sent "
            "and counted in trace/annotation_skipped."
        },
    )
    log_annotator_metrics: bool = field(
        default=True,
        metadata={"help": "Log the annotator's running totals (annotator/*) at every logging step."},
    )
    dump_rollouts: str | None = field(
        default=None,
        metadata={
            "help": "JSONL file every generation batch's rollouts are appended to (prompt, completion, is_correct, "
            "reward, reference), for `trace-trl annotate`."
        },
    )

    def __post_init__(self):
        try:
            super().__post_init__()
        except ValueError as exc:
            # TRL turns bf16 on by default, so a plain `TRACEConfig(output_dir=...)` on a laptop meets transformers'
            # refusal, which names neither the field to turn off nor the value to pass.
            if not is_cpu_precision_refusal(str(exc)):
                raise
            raise CPUPrecisionError(str(exc)) from exc
        self._check_trace_fields()

    @classmethod
    def from_grpo_config(cls, config: GRPOConfig, **trace_fields: Any) -> TRACEConfig:
        """A `TRACEConfig` with every setting of an existing `GRPOConfig`, plus TRACE fields.

        `TRACEConfig(**grpo_config.to_dict())` does not work: `to_dict` returns values that `GRPOConfig.__post_init__`
        derived (e.g. both `generation_batch_size` and `steps_per_generation`), which a new config refuses. This copies
        the finished `GRPOConfig` as it is and adds the TRACE fields (their defaults, or `trace_fields`), validated.

        Example:

        ```python
        grpo_args = GRPOConfig(output_dir="qwen3-grpo", learning_rate=1e-6, num_generations=8)
        trace_args = TRACEConfig.from_grpo_config(grpo_args, kl_coef=0.5, key_span_action="fkl")
        ```
        """
        if not isinstance(config, GRPOConfig):
            raise TypeError(f"`from_grpo_config` takes a GRPOConfig, got {type(config).__name__}.")
        own = {f.name: f for f in fields(cls) if f.name not in {g.name for g in fields(GRPOConfig)}}
        unknown = sorted(set(trace_fields) - set(own))
        if unknown:
            grpo_names = [name for name in unknown if hasattr(config, name)]
            hint = (
                f" {grpo_names} are GRPOConfig fields: set them on the GRPOConfig before converting."
                if grpo_names
                else f" TRACE fields are: {sorted(own)}."
            )
            raise TypeError(f"Unknown TRACE field(s) {unknown} for `from_grpo_config`.{hint}")
        new = cls.__new__(cls)
        new.__dict__.update(copy.deepcopy(config.__dict__))
        for name, f in own.items():
            if name in trace_fields:
                value = trace_fields[name]
            elif f.default is not MISSING:
                value = f.default
            else:
                value = f.default_factory()
            setattr(new, name, value)
        new._check_trace_fields()
        return new

    def _check_trace_fields(self) -> None:
        _check_choice("kl_decay", self.kl_decay, KL_DECAYS)
        _check_choice("key_span_action", self.key_span_action, SPAN_ACTIONS)
        _check_choice("error_span_action", self.error_span_action, SPAN_ACTIONS)
        _check_choice("routed_token_grpo", self.routed_token_grpo, ROUTED_TOKEN_GRPO_MODES)
        _check_choice("teacher_kind", self.teacher_kind, TEACHER_KINDS)
        _check_choice("annotation_failure", self.annotation_failure, ANNOTATION_FAILURE_MODES)
        _check_choice("kl_normalization", self.kl_normalization, KL_NORMALIZATIONS)
        _check_choice("kl_clip_mode", self.kl_clip_mode, CLIP_MODES)
        if self.kl_coef > 0 and self.kl_decay == "none" and self.routed_token_grpo == "complementary":
            raise ValueError(
                "`kl_decay='none'` with `routed_token_grpo='complementary'` gives routed tokens a GRPO weight of "
                "1 - kl_weight / kl_coef = 0 for the whole run: they would never get GRPO. Choose explicitly: "
                "`routed_token_grpo='additive'` (GRPO on every token plus the constant KL: the all-token self-OPD "
                "baseline) or `routed_token_grpo='exclusive'` (routed tokens get only the KL, forever)."
            )
        _check_choice("annotation_batch_failure", self.annotation_batch_failure, ANNOTATION_BATCH_FAILURE_MODES)
        _check_choice("annotator_exception", self.annotator_exception, ANNOTATOR_EXCEPTION_MODES)
        if self.dump_rollouts in ("", "None", "none", "null"):  # `--dump_rollouts None` on the command line
            self.dump_rollouts = None
        if self.kl_coef < 0:
            raise ValueError(f"`kl_coef` must be >= 0, got {self.kl_coef}.")
        for name in ("kl_warmup_steps", "kl_decay_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        if not 0.0 < self.teacher_ema_rate <= 1.0:
            raise ValueError(f"`teacher_ema_rate` must be in (0, 1], got {self.teacher_ema_rate}.")
        if self.kl_topk is not None and self.kl_topk < 1:
            raise ValueError(f"`kl_topk` must be a positive integer or None, got {self.kl_topk}.")
        if self.kl_temperature is not None and self.kl_temperature <= 0:
            raise ValueError(f"`kl_temperature` must be > 0 or None, got {self.kl_temperature}.")
        if self.max_teacher_prompt_length is not None and self.max_teacher_prompt_length < 1:
            raise ValueError(
                f"`max_teacher_prompt_length` must be a positive integer or None, got {self.max_teacher_prompt_length}."
            )
        if self.teacher_sync_steps < 1:
            raise ValueError(f"`teacher_sync_steps` must be >= 1, got {self.teacher_sync_steps}.")
        if self.kl_term_clip is not None and not self.kl_term_clip > 0:
            raise ValueError(
                f"`kl_term_clip` must be > 0 or None (no clip), got {self.kl_term_clip}. The paper clips at 0.05."
            )
        if self.max_routed_fraction is not None and not 0.0 < self.max_routed_fraction <= 1.0:
            raise ValueError(
                f"`max_routed_fraction` must be in (0, 1] or None (no cap), got {self.max_routed_fraction}. The paper "
                "caps at 0.25."
            )
        if self.kl_chunk_size < 1:
            raise ValueError(f"`kl_chunk_size` must be >= 1, got {self.kl_chunk_size}.")
        if not self.privileged_context_column:
            raise ValueError("`privileged_context_column` must name a dataset column, got an empty string.")
        _check_teacher_template(self.teacher_context_template)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}.")


def _check_teacher_template(template: str) -> None:
    env = jinja2.Environment()
    try:
        variables = jinja2.meta.find_undeclared_variables(env.parse(template))
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"`teacher_context_template` is not a valid Jinja2 template: {exc}") from exc
    unknown = variables - {"problem", "privileged_context", "diagnosis"}
    if unknown:
        raise ValueError(
            f"`teacher_context_template` uses unknown variables {sorted(unknown)}; the allowed variables are "
            "'problem', 'privileged_context' and 'diagnosis'."
        )
    if "problem" not in variables:
        raise ValueError(
            "`teacher_context_template` must contain {{ problem }}: the teacher has to see the problem it is teaching."
        )


# ----------------------------------------------------------------------------------------------------------------------
# Checks that need more than the config (the trainer, its dataset, its annotator); `TRACETrainer.__init__` runs them.
# ----------------------------------------------------------------------------------------------------------------------


def _check_sharded_training(trainer: Any, args: TRACEConfig) -> str | None:
    """The sharded engine the KL channel runs under (`"fsdp2"`, `"zero3"` or `None`), refusing what it cannot run.

    FSDP2 and ZeRO-3 are supported for full fine-tuning and LoRA: the KL channel runs inside the student's wrapped
    forward and the teacher's forward through its wrapper (see `KLChannel.routed_kl` and `KLChannel.teacher_hidden_states`). Refused:
    FSDP1 (deprecated upstream) and the top-k ablation under ZeRO-3 (its chunks read the partitioned head directly).
    """
    from .sharding import FSDP2, ZERO3, sharding_engine

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
    from .annotators.heuristic import AllTokensAnnotator

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
