r"""The paper's ablation grid at CPU scale: does TRACE do what the paper says it does, on a task small enough to rerun?

Everything runs offline on CPU through trace-trl's public API (`TRACEConfig`, `TRACETrainer`, `trace_trl.annotators`,
`trace_trl.rewards`, `trace_trl.spans`, `trace_trl.tiny`). Results and their reading are in `docs/replication.md`.

**Task.** Chain arithmetic with a worked reference solution, one step per line:

    Compute 7 + 5 - 3.        ->   7 + 5 = 12
                                   12 - 3 = 9
                                   \boxed{9}

In distribution: two-step chains of one-digit operands (`+`/`-`, never below zero). Out of distribution (standing in
for the paper's GPQA-Diamond): three-step chains, never trained on. The student sees the question; the teacher (the
policy itself) also sees the reference solution, which holds every intermediate result: a real privileged-information
gap.

**Policy.** A byte-level BPE tokenizer and a tiny Qwen3 built on the spot, warm-started (SFT) on the reference
solutions to a middling accuracy, once per seed; every arm of that seed starts from the same checkpoint. The warm
start also shows the model the teacher's prompt (question + reference solution + a type label), so that its
privileged predictions mean something.

**Annotator ("strong API").** `rule_annotator_server.py`: a rule-based grader that reads the reference solution and
marks the decisive steps of correct rollouts and the first wrong step of incorrect ones, with taxonomy type labels,
in the segment protocol, behind a local OpenAI-compatible HTTP server; the arms call it through `OpenAIAnnotator`.

**Arms** (`ARMS`): GRPO; all-token self-OPD (forward KL on every token of every correct rollout, no decay, no cap); TRACE-FKL;
TRACE-RKL; random 25%; inverted 25%; TRACE-FKL with the KL never decayed; online self-annotation. Same seeds, data
order, step budget and hyperparameters for every arm (`Settings`).

**Measures** (per arm and seed): greedy accuracy and avg@k (sampled) in and out of distribution; policy entropy and
response length over training; the log-probability lift on teacher-supported key tokens after one optimizer step
(and after the warm-up); cumulative privileged exposure; training wall time as a ratio to GRPO's in the same seed.
Reported as the mean and a 95% bootstrap interval over seeds, with PNG curves.

    python benchmarks/replication.py                     # the full study (23 minutes on 2 shared CPU cores)
    python benchmarks/replication.py --quick             # the pipeline end to end in under a minute (not a result)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


sys.path.insert(0, str(Path(__file__).resolve().parent))
from rule_annotator_server import RuleAnnotatorServer, grade_segments  # noqa: E402


# --- settings: fixed before the final run, recorded in docs/replication.md ------------------------------------------

ARMS: tuple[str, ...] = (
    "grpo",
    "self_opd_all",
    "trace_fkl",
    "trace_fkl_element",
    "trace_rkl",
    "random_25",
    "inverted_25",
    "trace_fkl_no_decay",
)
# Online self-annotation is a probe, not a default arm: the tiny policy has only ever seen arithmetic, so it cannot
# answer the annotation prompt's JSON (every annotation fails and the arm trains as GRPO), while each annotation call
# runs the policy over a ~2,000-token prompt per rollout: 40x the cost of a step for nothing. `self_annotation_probe`
# measures what the policy does with the prompt, every seed; `--arms ... self_annotation` runs the arm anyway.
OPTIONAL_ARMS: tuple[str, ...] = ("self_annotation",)
ARM_TITLES: dict[str, str] = {
    "grpo": "GRPO",
    "self_opd_all": "all-token self-OPD",
    "trace_fkl": "TRACE-FKL",
    "trace_fkl_element": "TRACE-FKL, element clip",
    "trace_rkl": "TRACE-RKL",
    "random_25": "random 25%",
    "inverted_25": "inverted 25%",
    "trace_fkl_no_decay": "TRACE-FKL, KL never decayed",
    "self_annotation": "TRACE-FKL, online self-annotation",
}


def self_annotation_probe(trainer, problems: Sequence[Problem], settings: Settings, seed: int) -> dict[str, float]:
    """Ask the policy itself to annotate its own rollouts (`SelfAnnotator`, segment protocol, bound to `trainer`).

    Returns the fraction of usable annotations (parsed, at least one span), the fraction that failed, and the seconds
    per annotation: what the online self-annotation arm would get.
    """
    from trace_trl.annotators import AnnotationRequest, SelfAnnotator, bind_annotator
    from trace_trl.rewards import boxed_match_reward

    tokenizer = trainer.processing_class
    with torch.random.fork_rng():
        torch.manual_seed(20_000 + seed)
        completions = generate(
            trainer.model, tokenizer, [p.question for p in problems], samples=1, settings=settings, greedy=False
        )
    requests = []
    for problem, (completion,) in zip(problems, completions, strict=True):
        reward = boxed_match_reward([completion], answer=[problem.answer])[0]
        requests.append(AnnotationRequest(chat(problem.question), completion, reward == 1.0, reward, problem.solution))
    annotator = SelfAnnotator(
        max_new_tokens=settings.self_annotation_max_new_tokens, batch_size=len(requests), span_format="segments"
    )
    bind_annotator(annotator, trainer)
    started = time.perf_counter()
    annotations = annotator(requests)
    seconds = time.perf_counter() - started
    return {
        "self_annotation_usable": sum(a.error is None and len(a.spans) > 0 for a in annotations) / len(annotations),
        "self_annotation_failed": sum(a.error is not None for a in annotations) / len(annotations),
        "self_annotation_s_per_rollout": seconds / len(annotations),
    }


@dataclass(frozen=True)
class Settings:
    """Every knob of the study. The full study uses the defaults; `--quick` shrinks the sizes, never the method."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    arms: tuple[str, ...] = ARMS
    # task
    train_size: int = 2000
    eval_size: int = 64  # per set (in and out of distribution)
    probe_size: int = 64  # rollouts of the lift probe
    id_steps: int = 2  # chain length in distribution
    ood_steps: int = 3  # chain length out of distribution
    # policy and warm start
    vocab_size: int = 400
    hidden_size: int = 64
    num_layers: int = 2
    sft_steps: int = 300
    sft_batch_size: int = 32
    sft_learning_rate: float = 3e-3
    # RL (shared by every arm); the KL schedule is the paper's (TRACEConfig defaults)
    steps: int = 100
    prompts_per_step: int = 4
    num_generations: int = 8
    learning_rate: float = 1e-4
    temperature: float = 1.0
    max_completion_length: int = 32
    kl_coef: float = 0.5
    kl_warmup_steps: int = 10
    kl_decay_steps: int = 30
    kl_term_clip: float = 0.05
    self_annotation_max_new_tokens: int = 32
    self_annotation_probe_size: int = 16  # rollouts the policy is asked to annotate, per seed
    # evaluation
    eval_samples: int = 4  # k of avg@k
    eval_temperature: float = 0.6
    eval_top_p: float = 0.95
    eval_max_new_tokens: int = 40
    lift_steps: tuple[int, ...] = (1, 10)
    bootstrap_resamples: int = 2000


QUICK = Settings(
    seeds=(0,),
    train_size=400,
    eval_size=16,
    probe_size=16,
    sft_steps=60,
    steps=4,
    kl_warmup_steps=1,
    kl_decay_steps=2,
    eval_samples=2,
    lift_steps=(1,),
    self_annotation_probe_size=4,
    bootstrap_resamples=200,
)


# --- task --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str
    solution: str


def make_problem(rng: random.Random, n_steps: int) -> Problem:
    """A chain of `n_steps` additions/subtractions of one-digit numbers that never goes below zero."""
    value = rng.randint(1, 9)
    expression, lines = str(value), []
    for _ in range(n_steps):
        operand = rng.randint(1, 9)
        op = "-" if rng.random() < 0.5 and value - operand >= 0 else "+"
        result = value + operand if op == "+" else value - operand
        expression += f" {op} {operand}"
        lines.append(f"{value} {op} {operand} = {result}")
        value = result
    lines.append(f"\\boxed{{{value}}}")
    return Problem(f"Compute {expression}.", str(value), "\n".join(lines))


def make_problems(n: int, n_steps: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[Problem]:
    rng = random.Random(seed)
    problems: list[Problem] = []
    while len(problems) < n:
        problem = make_problem(rng, n_steps)
        if problem.question not in exclude:
            problems.append(problem)
    return problems


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class SeedData:
    train: list[Problem]
    eval_id: list[Problem]
    eval_ood: list[Problem]
    probe: list[Problem]


def seed_data(settings: Settings, seed: int) -> SeedData:
    train = make_problems(settings.train_size, settings.id_steps, seed=1000 + seed)
    seen = frozenset(p.question for p in train)
    # Held-out sets share no question with the training set.
    eval_id = make_problems(settings.eval_size, settings.id_steps, seed=2000 + seed, exclude=seen)
    eval_ood = make_problems(settings.eval_size, settings.ood_steps, seed=3000 + seed)
    probe = make_problems(settings.probe_size, settings.id_steps, seed=4000 + seed)
    return SeedData(train, eval_id, eval_ood, probe)


# --- policy: built and warm-started once per seed --------------------------------------------------------------------


# The teacher's user turn (`TRACEConfig.teacher_context_template`): the default's content in few words, because the
# tiny tokenizer spends a token on almost every character of English and the teacher forward pays for each.
TEACHER_TEMPLATE = (
    "{{ problem }}{% if privileged_context %}\nReference solution:\n{{ privileged_context }}{% endif %}"
    "{% if diagnosis %}\nStep type: {{ diagnosis }}.{% endif %}"
)


def teacher_question(problem: Problem, diagnosis: str | None) -> str:
    """The teacher's user turn, rendered as the trainer renders it with `TEACHER_TEMPLATE`."""
    import jinja2

    template = jinja2.Environment().from_string(TEACHER_TEMPLATE)
    return template.render(problem=problem.question, privileged_context=problem.solution, diagnosis=diagnosis)


def warm_start(settings: Settings, data: SeedData, seed: int, path: Path):
    """Tokenizer and tiny Qwen3, supervised on the reference solutions (student and teacher prompts), saved to `path`.

    Half of the teacher prompts carry a type label (as the trainer's teacher prompt does when the annotator gives
    one), so the label is not out of distribution for the teacher.
    """
    from trace_trl.annotators import ERROR_TYPES, KEY_STEP_TYPES, describe_type_label
    from trace_trl.tiny import build_tiny_qwen3, build_tiny_tokenizer, save_tiny_model

    rng = random.Random(seed)
    labels = [describe_type_label(label) for label in (*KEY_STEP_TYPES, *ERROR_TYPES)]
    student = [chat(p.question) for p in data.train]
    teacher = [chat(teacher_question(p, rng.choice(labels) if rng.random() < 0.5 else None)) for p in data.train]
    corpus = [m[0]["content"] + "\n" + p.solution for m, p in zip(teacher, data.train, strict=True)]
    tokenizer = build_tiny_tokenizer(corpus + ["<|im_start|>user\n<|im_start|>assistant\n"], settings.vocab_size)
    model = build_tiny_qwen3(tokenizer, hidden_size=settings.hidden_size, num_layers=settings.num_layers, seed=seed)
    texts, prompt_lengths = [], []
    for prompt, problem in zip(student + teacher, data.train * 2, strict=True):
        texts.append(
            tokenizer.apply_chat_template(
                prompt + [{"role": "assistant", "content": problem.solution}], tokenize=False
            )
        )
        prompt_lengths.append(len(prompt_ids(tokenizer, prompt)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.sft_learning_rate)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(settings.sft_steps):
        index = torch.randint(len(texts), (settings.sft_batch_size,), generator=generator).tolist()
        batch = tokenizer([texts[i] for i in index], return_tensors="pt", padding=True, padding_side="right")
        labels_ = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        for row, i in enumerate(index):
            labels_[row, : prompt_lengths[i]] = -100
        model(**batch, labels=labels_).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return save_tiny_model(model, tokenizer, path), tokenizer


# --- evaluation ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(
    model, tokenizer, questions: Sequence[str], *, samples: int, settings: Settings, greedy: bool
) -> list[list[str]]:
    """`samples` completions per question (greedy: one), decoded without special tokens."""
    was_training = model.training
    model.eval()
    prompts = [tokenizer.apply_chat_template(chat(q), add_generation_prompt=True, tokenize=False) for q in questions]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    kwargs: dict[str, Any] = (
        {"do_sample": False}
        if greedy
        else {
            "do_sample": True,
            "temperature": settings.eval_temperature,
            "top_p": settings.eval_top_p,
            "top_k": 0,
            "num_return_sequences": samples,
        }
    )
    out = model.generate(
        **batch, max_new_tokens=settings.eval_max_new_tokens, pad_token_id=tokenizer.pad_token_id, **kwargs
    )
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].size(1) :], skip_special_tokens=True)
    model.train(was_training)
    per = 1 if greedy else samples
    return [texts[i * per : (i + 1) * per] for i in range(len(questions))]


def accuracy(model, tokenizer, problems: Sequence[Problem], settings: Settings, seed: int) -> dict[str, float]:
    """Greedy accuracy and avg@k (sampled at the evaluation temperature) on `problems`."""
    from trace_trl.rewards import boxed_match_reward

    questions = [p.question for p in problems]
    greedy = [c[0] for c in generate(model, tokenizer, questions, samples=1, settings=settings, greedy=True)]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        sampled = generate(model, tokenizer, questions, samples=settings.eval_samples, settings=settings, greedy=False)
    greedy_ok = boxed_match_reward(greedy, answer=[p.answer for p in problems])
    avg = []
    for completions, problem in zip(sampled, problems, strict=True):
        scores = boxed_match_reward(completions, answer=[problem.answer] * len(completions))
        avg.append(sum(scores) / len(scores))
    return {"greedy": sum(greedy_ok) / len(problems), "avg@k": sum(avg) / len(problems)}


def teacher_accuracy(model, tokenizer, problems: Sequence[Problem], settings: Settings) -> float:
    """Greedy accuracy of the policy shown the reference solution (the teacher's prompt): the privileged gap's top."""
    from trace_trl.rewards import boxed_match_reward

    questions = [teacher_question(p, None) for p in problems]
    greedy = [c[0] for c in generate(model, tokenizer, questions, samples=1, settings=settings, greedy=True)]
    return sum(boxed_match_reward(greedy, answer=[p.answer for p in problems])) / len(problems)


def evaluate(model, tokenizer, data: SeedData, settings: Settings, seed: int) -> dict[str, float]:
    id_ = accuracy(model, tokenizer, data.eval_id, settings, seed)
    ood = accuracy(model, tokenizer, data.eval_ood, settings, seed)
    return {
        "acc_id_greedy": id_["greedy"],
        "acc_id_avgk": id_["avg@k"],
        "acc_ood_greedy": ood["greedy"],
        "acc_ood_avgk": ood["avg@k"],
    }


# --- the lift probe: log-probability of teacher-supported key tokens, before and after training steps ----------------


class LiftProbe:
    """Key tokens of correct rollouts (rule annotator) where the teacher gives the token more probability than the
    student: the tokens the KL channel pushes up. `lift(model)` is the mean change of their student log-probability
    since the probe was built (nats).
    """

    def __init__(
        self,
        model,
        tokenizer,
        problems: Sequence[Problem],
        settings: Settings,
        seed: int,
        completions: Sequence[str] | None = None,
    ) -> None:
        """Held-out rollouts sampled here, or given `completions` (one per problem: the training batch's own rollouts,
        as the paper measures; a rollout whose text does not re-tokenize to the same length-consistent ids is left out).
        """
        from trace_trl.annotators.segments import split_segments
        from trace_trl.rewards import boxed_match_reward
        from trace_trl.spans import Span, token_labels

        if completions is None:
            with torch.random.fork_rng():
                torch.manual_seed(10_000 + seed)
                sampled = generate(
                    model, tokenizer, [p.question for p in problems], samples=1, settings=settings, greedy=False
                )
            completions = [completion for (completion,) in sampled]
        self.rows: list[tuple[list[int], list[int], list[int]]] = []  # (student ids, teacher ids, completion ids)
        self.tokenizer = tokenizer
        selected: list[list[int]] = []
        for problem, completion in zip(problems, completions, strict=True):
            if boxed_match_reward([completion], answer=[problem.answer])[0] != 1.0:
                continue
            segments = split_segments(completion)
            answer = grade_segments(problem.solution, [(s.index, s.text(completion)) for s in segments], True)
            chosen = {item["id"] for item in answer["segments"]}
            spans = [Span(s.start, s.end, "key") for s in segments if s.index in chosen]
            completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
            if tokenizer.decode(completion_ids, skip_special_tokens=True) != completion:
                continue
            labels = token_labels(completion_ids, spans, tokenizer)
            student = prompt_ids(tokenizer, chat(problem.question))
            teacher = prompt_ids(tokenizer, chat(teacher_question(problem, describe("computation"))))
            self.rows.append((student, teacher, completion_ids))
            selected.append([i for i, label in enumerate(labels) if label == 1])
        student_logp = self._logprobs(model, teacher=False)
        teacher_logp = self._logprobs(model, teacher=True)
        # Teacher-supported: the teacher, with the reference solution, puts more mass on the token than the student.
        self.positions = [
            [i for i in key if t[i] > s[i]] for key, s, t in zip(selected, student_logp, teacher_logp, strict=True)
        ]
        self.before = [[s[i] for i in pos] for pos, s in zip(self.positions, student_logp, strict=True)]
        self.count = sum(len(p) for p in self.positions)

    @torch.no_grad()
    def _logprobs(self, model, *, teacher: bool) -> list[list[float]]:
        was_training = model.training
        model.eval()
        result = []
        for student, teacher_ids, completion in self.rows:
            prompt = teacher_ids if teacher else student
            ids = torch.tensor([prompt + completion])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
            logp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(completion)[:, None])[:, 0]
            result.append(logp.tolist())
        model.train(was_training)
        return result

    def lift(self, model) -> float:
        if self.count == 0:
            return math.nan
        after = self._logprobs(model, teacher=False)
        deltas = [
            after_row[i] - b
            for pos, before, after_row in zip(self.positions, self.before, after, strict=True)
            for i, b in zip(pos, before, strict=True)
        ]
        return sum(deltas) / len(deltas)


def describe(label: str) -> str:
    from trace_trl.annotators import describe_type_label

    return describe_type_label(label)


# --- one arm -------------------------------------------------------------------------------------------------------------


def make_arm(arm: str, seed: int, base_url: str, settings: Settings) -> tuple[dict[str, Any], Any]:
    """The arm's `TRACEConfig` overrides and its annotator."""
    from trace_trl.annotators import (
        AllTokensAnnotator,
        InvertedSpanAnnotator,
        OpenAIAnnotator,
        RandomSpanAnnotator,
        SelfAnnotator,
    )

    def api() -> OpenAIAnnotator:
        return OpenAIAnnotator(
            "rule-annotator", base_url=base_url, api_key="local", span_format="segments", timeout=30
        )

    if arm == "grpo":
        return {"kl_coef": 0.0}, None
    if arm == "self_opd_all":
        # Dense self-distillation as in the shipped `qwen3-8b-all-token-opd` recipe: forward KL on every token of
        # every correct rollout (incorrect ones train as GRPO), never decayed, no coverage cap, and GRPO on every
        # token beside the KL ("additive": the SDPO/SRPO family).
        overrides = {"kl_decay": "none", "max_routed_fraction": None, "key_span_action": "fkl"}
        return {**overrides, "error_span_action": "grpo", "routed_token_grpo": "additive"}, AllTokensAnnotator()
    if arm == "trace_fkl":
        return {"key_span_action": "fkl", "error_span_action": "grpo"}, api()
    if arm == "trace_fkl_element":
        # The paper's literal per-entry clip (OPSD's), which can push forward KL away from the teacher.
        return {"key_span_action": "fkl", "error_span_action": "grpo", "kl_clip_mode": "element"}, api()
    if arm == "trace_rkl":
        return {"key_span_action": "grpo", "error_span_action": "rkl"}, api()
    if arm == "random_25":
        return {"key_span_action": "fkl", "error_span_action": "grpo"}, RandomSpanAnnotator(
            seed=seed, span_fraction=0.25
        )
    if arm == "inverted_25":
        return {"key_span_action": "fkl", "error_span_action": "grpo"}, InvertedSpanAnnotator(api(), 0.25, seed=seed)
    if arm == "trace_fkl_no_decay":
        # TRACE's warm-up rule kept forever: routed tokens get only the KL (what "complementary" gives at w = c).
        overrides = {"kl_decay": "none", "routed_token_grpo": "exclusive"}
        return {"key_span_action": "fkl", "error_span_action": "grpo", **overrides}, api()
    if arm == "self_annotation":
        annotator = SelfAnnotator(
            max_new_tokens=settings.self_annotation_max_new_tokens, batch_size=64, span_format="segments"
        )
        # The tiny policy fails every annotation (see OPTIONAL_ARMS); this arm measures that, so it must not stop there.
        return {"key_span_action": "fkl", "error_span_action": "grpo", "annotation_batch_failure": "skip"}, annotator
    raise ValueError(f"Unknown arm {arm!r}; expected one of {ARMS + OPTIONAL_ARMS}.")


def _callbacks(
    arm: str,
    seed: int,
    settings: Settings,
    probe: LiftProbe,
    lifts: dict[int, float],
    batch_probe: dict[str, LiftProbe],
    batch_lifts: dict[int, float],
    trainer,
    divergences: dict[str, list[float]],
):
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=settings.steps, desc=f"seed {seed} {arm:>18}", leave=True, file=sys.stderr)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                self.bar.set_postfix(reward=f"{logs['reward']:.2f}", refresh=False)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step in settings.lift_steps:
                lifts[state.global_step] = probe.lift(model)
                if "probe" in batch_probe:
                    batch_lifts[state.global_step] = batch_probe["probe"].lift(model)
            for kind, values in trainer.last_routed_divergences.items():
                divergences.setdefault(kind, []).extend(values.tolist())
            trainer.last_routed_divergences = {}
            self.bar.update(1)

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return [Progress()]


def arm_config(settings: Settings, overrides: dict[str, Any], *, output_dir: Path, seed: int, steps: int):
    """The `TRACEConfig` every arm shares (the study's RL settings and the paper's KL schedule), plus the arm's own."""
    from trace_trl import TRACEConfig

    common = {
        "kl_coef": settings.kl_coef,
        "kl_warmup_steps": settings.kl_warmup_steps,
        "kl_decay_steps": settings.kl_decay_steps,
        "kl_term_clip": settings.kl_term_clip,
        "teacher_context_template": TEACHER_TEMPLATE,
    }
    return TRACEConfig(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        seed=seed,
        max_steps=steps,
        learning_rate=settings.learning_rate,
        per_device_train_batch_size=settings.prompts_per_step * settings.num_generations,
        num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_length,
        temperature=settings.temperature,
        epsilon=0.2,
        epsilon_high=0.28,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        **{**common, **overrides},
    )


def run_arm(
    arm: str, seed: int, base_path: str, tokenizer, data: SeedData, base_url: str, settings: Settings, out_dir: Path
) -> dict[str, Any]:
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback

    from trace_trl import TRACETrainer
    from trace_trl.rewards import boxed_match_reward

    overrides, annotator = make_arm(arm, seed, base_url, settings)
    config = arm_config(settings, overrides, output_dir=out_dir / f"seed{seed}" / arm, seed=seed, steps=settings.steps)
    dataset = Dataset.from_list(
        [{"prompt": chat(p.question), "answer": p.answer, "solution": p.solution} for p in data.train]
    )
    trainer = TRACETrainer(
        model=base_path,
        reward_funcs=boxed_match_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        annotator=annotator,
    )
    trainer.remove_callback(PrinterCallback)
    probe = LiftProbe(trainer.model, tokenizer, data.probe, settings, seed)
    # Before any training, on the warm-start weights (the same for every arm of the seed).
    extra = (
        self_annotation_probe(trainer, data.probe[: settings.self_annotation_probe_size], settings, seed)
        if arm == "trace_fkl"
        else {}
    )
    lifts: dict[int, float] = {}
    # The paper's lift: on the first training batch's own rollouts, captured before the first update.
    batch_probe: dict[str, LiftProbe] = {}
    batch_lifts: dict[int, float] = {}
    generate_and_score, policy = trainer._generate_and_score_completions, trainer.model

    def capture_first_batch(inputs):
        output = generate_and_score(inputs)
        if "probe" not in batch_probe:
            problems = [Problem(row["prompt"][-1]["content"], row["answer"], row["solution"]) for row in inputs]
            completions = [
                tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
                for ids, mask in zip(output["completion_ids"], output["completion_mask"], strict=True)
            ]
            batch_probe["probe"] = LiftProbe(policy, tokenizer, problems, settings, seed, completions)
        return output

    trainer._generate_and_score_completions = capture_first_batch
    divergences: dict[str, list[float]] = {}
    for callback in _callbacks(arm, seed, settings, probe, lifts, batch_probe, batch_lifts, trainer, divergences):
        trainer.add_callback(callback)
    torch.manual_seed(seed)
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    logs = [r for r in trainer.state.log_history if "reward" in r]
    annotation_failures = sum(r.get("trace/annotation_failures", 0.0) for r in trainer.state.log_history)
    result = {
        "arm": arm,
        "seed": seed,
        **evaluate(trainer.model, tokenizer, data, settings, seed),
        **{f"lift_step{step}": lifts.get(step, math.nan) for step in settings.lift_steps},
        **{f"batch_lift_step{step}": batch_lifts.get(step, math.nan) for step in settings.lift_steps},
        "lift_tokens": probe.count,
        "batch_lift_tokens": batch_probe["probe"].count if "probe" in batch_probe else 0,
        **divergence_summary(divergences, settings.kl_term_clip),
        "exposure": float(trainer.privileged_exposure),
        "wall_s": wall,
        "annotation_failures": float(annotation_failures),
        **extra,
        "curves": {
            "reward": [r["reward"] for r in logs],
            "entropy": [r.get("entropy", math.nan) for r in logs],
            "length": [r.get("completions/mean_length", math.nan) for r in logs],
            "routed_frac": [r.get("trace/routed_token_frac", math.nan) for r in logs],
        },
    }
    del trainer
    return result


def divergence_summary(divergences: dict[str, list[float]], clip: float) -> dict[str, float]:
    """Distribution of the unclipped per-token divergences on routed tokens over the run (every kind pooled), and the
    fraction of them that a token clip at `clip` bounds."""
    values = sorted(v for kind_values in divergences.values() for v in kind_values)
    if not values:
        return {"div_n": 0.0}

    def quantile(q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))]

    return {
        "div_n": float(len(values)),
        "div_mean": sum(values) / len(values),
        "div_p10": quantile(0.10),
        "div_p50": quantile(0.50),
        "div_p90": quantile(0.90),
        "div_bounded_frac": sum(v > clip for v in values) / len(values),
    }


# --- aggregation and report ---------------------------------------------------------------------------------------------


MEASURES: tuple[tuple[str, str, str], ...] = (
    # (key, title, format)
    ("acc_id_greedy", "ID greedy acc.", "pct"),
    ("acc_id_avgk", "ID avg@k", "pct"),
    ("acc_ood_greedy", "OOD greedy acc.", "pct"),
    ("acc_ood_avgk", "OOD avg@k", "pct"),
    ("entropy_kl_phase", "entropy, steps 1-40", "f3"),
    ("entropy_end", "entropy, last 10 steps", "f3"),
    ("length_kl_phase", "length, steps 1-40 (tokens)", "f1"),
    ("length_end", "length, last 10 steps (tokens)", "f1"),
    ("exposure", "cumulative exposure", "f0"),
    ("wall_ratio", "wall time / GRPO", "f2"),
    # the mechanism: lifts on teacher-supported key tokens, and what the clip sees on routed tokens
    ("lift_step1", "held-out lift, 1 step", "f3"),
    ("lift_step10", "held-out lift, 10 steps", "f3"),
    ("batch_lift_step1", "batch lift, 1 step", "f3"),
    ("batch_lift_step10", "batch lift, 10 steps", "f3"),
    ("div_p50", "routed divergence p50", "f3"),
    ("div_p90", "routed divergence p90", "f3"),
    ("div_bounded_frac", "share > clip", "f2"),
)
# Table blocks of MEASURES: accuracy, dynamics, mechanism.
ACCURACY, DYNAMICS, MECHANISM = MEASURES[:4], MEASURES[4:10], MEASURES[10:]
PAIRED_KEYS: tuple[str, ...] = (
    "acc_id_greedy", "acc_id_avgk", "acc_ood_greedy", "acc_ood_avgk",
    "lift_step1", "lift_step10", "batch_lift_step1", "batch_lift_step10",
)  # fmt: skip


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]
    return sum(values) / len(values) if values else math.nan


def derived_measures(run: dict[str, Any], grpo_wall: float | None, settings: Settings) -> dict[str, float]:
    kl_phase = settings.kl_warmup_steps + settings.kl_decay_steps
    curves = run["curves"]
    return {
        "entropy_kl_phase": _mean(curves["entropy"][:kl_phase]),
        "entropy_end": _mean(curves["entropy"][-10:]),
        "length_kl_phase": _mean(curves["length"][:kl_phase]),
        "length_end": _mean(curves["length"][-10:]),
        "wall_ratio": run["wall_s"] / grpo_wall if grpo_wall else math.nan,
    }


def bootstrap_ci(values: Sequence[float], resamples: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95% percentile-bootstrap interval over `values` (one per seed); `nan` where undefined."""
    values = [v for v in values if v == v]
    if not values:
        return math.nan, math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, math.nan, math.nan
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(resamples))
    return mean, means[int(0.025 * (resamples - 1))], means[int(0.975 * (resamples - 1))]


def aggregate(runs: list[dict[str, Any]], base: dict[int, dict[str, float]], settings: Settings) -> dict[str, Any]:
    """Per arm and measure: per-seed values, mean and interval; per arm: paired difference to GRPO on accuracy."""
    by_seed = {(r["seed"], r["arm"]): r for r in runs}
    table: dict[str, dict[str, Any]] = {}
    per_seed: dict[str, dict[str, list[float]]] = {}
    for arm in settings.arms:
        rows = []
        for seed in settings.seeds:
            run = by_seed.get((seed, arm))
            if run is None:
                continue
            grpo = by_seed.get((seed, "grpo"))
            rows.append({**run, **derived_measures(run, grpo["wall_s"] if grpo else None, settings)})
        per_seed[arm] = {key: [row.get(key, math.nan) for row in rows] for key, _, _ in MEASURES}
        table[arm] = {
            key: dict(zip(("mean", "low", "high"), bootstrap_ci(values, settings.bootstrap_resamples)))
            for key, values in per_seed[arm].items()
        }
    base_values = {key: [base[s][key] for s in settings.seeds if s in base] for key in base[next(iter(base))]}
    table["base"] = {
        key: dict(zip(("mean", "low", "high"), bootstrap_ci(values, settings.bootstrap_resamples)))
        for key, values in base_values.items()
    }
    deltas: dict[str, dict[str, Any]] = {}
    for arm in settings.arms:
        if arm == "grpo" or "grpo" not in per_seed:
            continue
        deltas[arm] = {}
        for key in PAIRED_KEYS:
            diffs = [
                by_seed[(s, arm)].get(key, math.nan) - by_seed[(s, "grpo")].get(key, math.nan)
                for s in settings.seeds
                if (s, arm) in by_seed and (s, "grpo") in by_seed
            ]
            deltas[arm][key] = dict(zip(("mean", "low", "high"), bootstrap_ci(diffs, settings.bootstrap_resamples)))
    return {"table": table, "deltas_vs_grpo": deltas, "per_seed": per_seed, "base_per_seed": base_values}


def _fmt(value: float, kind: str) -> str:
    if value != value:
        return "–"
    if kind == "pct":
        return f"{100 * value:.1f}"
    return f"{value:.{int(kind[1:])}f}"


def _cell(stats: dict[str, float], kind: str) -> str:
    if stats["low"] != stats["low"]:
        return _fmt(stats["mean"], kind)
    return f"{_fmt(stats['mean'], kind)} [{_fmt(stats['low'], kind)}, {_fmt(stats['high'], kind)}]"


def markdown_tables(summary: dict[str, Any], settings: Settings) -> str:
    table, deltas = summary["table"], summary["deltas_vs_grpo"]
    arms = [arm for arm in settings.arms if arm in table]
    lines = [
        "Mean over seeds and 95% bootstrap interval [low, high]; accuracies in %.",
        "",
        "| arm | " + " | ".join(title for _, title, _ in MEASURES[:4]) + " |",
        "|:---|" + "---:|" * 4,
    ]
    base = table["base"]
    lines.append("| base (warm start) | " + " | ".join(_cell(base[key], kind) for key, _, kind in MEASURES[:4]) + " |")
    for arm in arms:
        lines.append(
            f"| {ARM_TITLES[arm]} | " + " | ".join(_cell(table[arm][k], f) for k, _, f in MEASURES[:4]) + " |"
        )
    for block in (DYNAMICS, MECHANISM):
        lines += ["", "| arm | " + " | ".join(title for _, title, _ in block) + " |", "|:---|" + "---:|" * len(block)]
        for arm in arms:
            lines.append(f"| {ARM_TITLES[arm]} | " + " | ".join(_cell(table[arm][k], f) for k, _, f in block) + " |")
    if deltas:
        titles = {key: title for key, title, _ in MEASURES}
        lines += [
            "",
            "Paired difference to GRPO (same seed): accuracies in percentage points, lifts in nats:",
            "",
            "| arm | " + " | ".join(titles[key] for key in PAIRED_KEYS) + " |",
            "|:---|" + "---:|" * len(PAIRED_KEYS),
        ]
        for arm in arms:
            if arm in deltas:
                cells = [
                    _cell({k: (100 * v if key.startswith("acc") else v) for k, v in deltas[arm][key].items()},
                          "f1" if key.startswith("acc") else "f3")
                    for key in PAIRED_KEYS
                ]  # fmt: skip
                lines.append(f"| {ARM_TITLES[arm]} | " + " | ".join(cells) + " |")
    teacher = table["base"].get("teacher_acc_id_greedy")
    if teacher is not None:
        lines += [
            "",
            f"The warm-start policy shown the reference solution (the teacher's prompt) answers "
            f"{_cell(teacher, 'pct')}% of the ID held-out problems greedily: the privileged-information gap.",
        ]
    probe = summary.get("self_annotation_probe", {})
    if probe.get("self_annotation_usable") == probe.get("self_annotation_usable"):  # not NaN / missing
        lines += [
            "",
            f"Online self-annotation probe (the warm-start policy annotating its own rollouts, segment protocol): "
            f"{probe['self_annotation_usable']:.0%} usable annotations, {probe['self_annotation_failed']:.0%} failed, "
            f"{probe['self_annotation_s_per_rollout']:.2f} s per rollout.",
        ]
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]], summary: dict[str, Any], settings: Settings, images_dir: Path) -> list[str]:
    """Curves (mean over seeds) of reward, entropy and response length, and the accuracy bars; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images_dir.mkdir(parents=True, exist_ok=True)
    arms = [arm for arm in settings.arms if any(r["arm"] == arm for r in runs)]
    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, (curve, title) in zip(
        axes,
        (
            ("reward", "rollout reward (sampled, T=1)"),
            ("entropy", "policy entropy (nats)"),
            ("length", "response length (tokens)"),
        ),
        strict=True,
    ):
        for arm in arms:
            series = [r["curves"][curve] for r in runs if r["arm"] == arm]
            n = min(len(s) for s in series)
            mean = [_mean([s[i] for s in series]) for i in range(n)]
            window = 5 if n >= 20 else 1
            smooth = [_mean(mean[max(0, i - window + 1) : i + 1]) for i in range(n)]
            ax.plot(range(1, n + 1), smooth, label=ARM_TITLES[arm], linewidth=1.5)
        kl_end = settings.kl_warmup_steps + settings.kl_decay_steps
        ax.axvline(settings.kl_warmup_steps, color="grey", linestyle=":", linewidth=1)
        ax.axvline(kl_end, color="grey", linestyle="--", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Training curves, mean over {len(settings.seeds)} seed(s) (dotted: end of warm-up; dashed: KL off)")
    fig.tight_layout()
    path = images_dir / "replication_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(str(path))

    fig, ax = plt.subplots(figsize=(12, 4.5))
    table = summary["table"]
    keys = [key for key, _, _ in MEASURES[:4]]
    names = ["base", *arms]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        means = [100 * table[name][k]["mean"] for k in keys]
        lows = [100 * (table[name][k]["mean"] - table[name][k]["low"]) for k in keys]
        highs = [100 * (table[name][k]["high"] - table[name][k]["mean"]) for k in keys]
        err = None if any(v != v for v in lows + highs) else [lows, highs]
        ax.bar(
            [j + i * width for j in range(len(keys))],
            means,
            width,
            yerr=err,
            capsize=2,
            label="base (warm start)" if name == "base" else ARM_TITLES[name],
        )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
    ax.set_xticklabels([title for _, title, _ in MEASURES[:4]])
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=7, ncol=3)
    ax.set_title("Held-out accuracy after training: mean and 95% bootstrap interval over seeds")
    fig.tight_layout()
    path = images_dir / "replication_accuracy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(str(path))
    return paths


# --- driver ----------------------------------------------------------------------------------------------------------------


def run_study(settings: Settings, out_dir: Path, images_dir: Path) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    for name in ("transformers", "trl", "accelerate", "datasets", "httpx", "trace_trl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # One thread: the model is so small that a second one buys little, and on a shared machine it spins.
    torch.set_num_threads(1)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "settings.json").write_text(json.dumps(dataclasses.asdict(settings), indent=1))
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    base: dict[int, dict[str, float]] = {}
    with RuleAnnotatorServer() as server:
        for seed in settings.seeds:
            data = seed_data(settings, seed)
            seed_started = time.perf_counter()
            base_path, tokenizer = warm_start(settings, data, seed, out_dir / f"seed{seed}" / "base-model")
            from transformers import AutoModelForCausalLM

            base_model = AutoModelForCausalLM.from_pretrained(base_path)
            base[seed] = evaluate(base_model, tokenizer, data, settings, seed)
            base[seed]["teacher_acc_id_greedy"] = teacher_accuracy(base_model, tokenizer, data.eval_id, settings)
            del base_model
            print(
                f"seed {seed}: warm start + base evaluation {time.perf_counter() - seed_started:.0f} s; base ID greedy "
                f"{base[seed]['acc_id_greedy']:.1%}, OOD greedy {base[seed]['acc_ood_greedy']:.1%}, teacher (with the "
                f"reference) ID greedy {base[seed]['teacher_acc_id_greedy']:.1%}",
                file=sys.stderr,
                flush=True,
            )
            for arm in settings.arms:
                run_file = out_dir / f"seed{seed}" / f"{arm}.json"
                if run_file.exists():
                    runs.append(json.loads(run_file.read_text()))
                    continue
                run = run_arm(arm, seed, base_path, tokenizer, data, server.base_url, settings, out_dir)
                run_file.write_text(json.dumps(run))
                runs.append(run)
                print(
                    f"  seed {seed} {arm}: ID greedy {run['acc_id_greedy']:.1%}, OOD greedy {run['acc_ood_greedy']:.1%},"
                    f" lift@1 {run.get('lift_step1', math.nan):+.3f}, train {run['wall_s']:.0f} s,"
                    f" annotation failures {run['annotation_failures']:.0f}",
                    file=sys.stderr,
                    flush=True,
                )
        annotator_requests = server.requests
    summary = aggregate(runs, base, settings)
    summary["settings"] = dataclasses.asdict(settings)
    summary["total_wall_s"] = time.perf_counter() - started
    summary["annotator_requests"] = annotator_requests
    summary["annotation_failures"] = {
        arm: _mean([r["annotation_failures"] for r in runs if r["arm"] == arm]) for arm in settings.arms
    }
    summary["lift_tokens"] = _mean([r["lift_tokens"] for r in runs])
    summary["self_annotation_probe"] = {
        key: _mean([r[key] for r in runs if key in r])
        for key in ("self_annotation_usable", "self_annotation_failed", "self_annotation_s_per_rollout")
    }
    (out_dir / "results.json").write_text(json.dumps(summary, indent=1))
    (out_dir / "runs.json").write_text(json.dumps(runs))
    markdown = markdown_tables(summary, settings)
    (out_dir / "results.md").write_text(markdown)
    try:
        images = plot(runs, summary, settings, images_dir)
    except ImportError:
        images = []
        print('matplotlib is missing, so no plots: pip install "trace-trl[notebook]"', file=sys.stderr)
    summary["images"] = images
    print(markdown)
    print(f"Total {summary['total_wall_s'] / 60:.1f} min. Results: {out_dir / 'results.md'}; plots: {images}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 4 steps, tiny sets: checks the pipeline only")
    parser.add_argument("--output-dir", default="replication-output", help="runs, results.json, results.md")
    parser.add_argument("--images-dir", default=None, help="where the PNG plots go (default: OUTPUT_DIR/images)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the seeds")
    parser.add_argument(
        "--arms", nargs="+", choices=ARMS + OPTIONAL_ARMS, default=None, help="a subset of the arms (GRPO first)"
    )
    parser.add_argument(
        "--set", nargs="+", default=(), metavar="FIELD=VALUE", help="override a `Settings` field (not for final runs)"
    )
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    for item in args.set:
        name, _, value = item.partition("=")
        current = getattr(settings, name)
        settings = dataclasses.replace(settings, **{name: type(current)(value)})
    if args.seeds:
        settings = dataclasses.replace(settings, seeds=tuple(args.seeds))
    if args.arms:
        settings = dataclasses.replace(settings, arms=tuple(args.arms))
    out_dir = Path(args.output_dir)
    run_study(settings, out_dir, Path(args.images_dir) if args.images_dir else out_dir / "images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
