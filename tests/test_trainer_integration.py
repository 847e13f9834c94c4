"""End-to-end behaviour of TRACETrainer: isolation of privileged context, resume, failures, teacher prompts."""

from __future__ import annotations

import json
import os

import pytest
import torch
from trainer_helpers import HalfSpanAnnotator, make_trainer, math_dataset, parity_reward, trace_config

from trace_trl import TRACETrainer
from trace_trl.annotators import Annotation
from trace_trl.spans import Span


CANARY = "CANARY-7f3e-privileged"


def _make(tiny_model_dir, tiny_tokenizer, tmp_path, annotator=None, dataset=None, peft=False, **overrides):
    args = trace_config(tmp_path, **overrides)
    return make_trainer(tiny_model_dir, tiny_tokenizer, args, annotator, dataset=dataset, peft=peft)


@pytest.mark.parametrize("conversational", [True, False], ids=["chat", "plain"])
@pytest.mark.parametrize("teacher_kind", ["live", "base"])
def test_privileged_context_reaches_the_teacher_only(
    tiny_model_dir, tiny_tokenizer, tmp_path, conversational, teacher_kind
):
    dataset = math_dataset(conversational=conversational, solution="{a} + {b} = {c} " + CANARY)
    trainer = _make(tiny_model_dir, tiny_tokenizer, tmp_path, dataset=dataset, teacher_kind=teacher_kind, max_steps=2)
    decode = tiny_tokenizer.decode
    generated, student, teacher = [], [], []
    model = trainer.model
    original_generate = model.generate

    def recording_generate(*args, **kwargs):
        generated.extend(decode(row) for row in kwargs["input_ids"])
        return original_generate(*args, **kwargs)

    model.generate = recording_generate

    def record(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        (student if torch.is_grad_enabled() else teacher).extend(decode(row) for row in ids)

    backbones = [model.base_model]
    if trainer.teacher.copy is not None:
        backbones.append(trainer.teacher.copy.base_model)
    handles = [b.register_forward_pre_hook(record, with_kwargs=True) for b in backbones]
    trainer.train()
    for h in handles:
        h.remove()
    assert generated and student and teacher
    assert not any(CANARY in text for text in generated), "privileged context leaked into generation"
    assert not any(CANARY in text for text in student), "privileged context leaked into the student's scoring"
    assert any(CANARY in text for text in teacher), "the teacher never saw the privileged context"


def test_resumed_run_continues_the_schedule_and_exposure(tiny_model_dir, tiny_tokenizer, tmp_path):
    common = dict(max_steps=4, save_strategy="steps", save_steps=1, kl_coef=1.0, kl_warmup_steps=1, kl_decay_steps=4)
    full = _make(tiny_model_dir, tiny_tokenizer, tmp_path / "a", **common)
    full.train()
    weights = {r["step"]: r["trace/kl_weight"] for r in full.state.log_history if "trace/kl_weight" in r}
    assert [weights[s] for s in (1, 2, 3, 4)] == [1.0, 1.0, 0.75, 0.5]
    checkpoint = os.path.join(full.args.output_dir, "checkpoint-2")
    with open(os.path.join(checkpoint, "trace_state.json")) as f:
        saved_exposure = json.load(f)["privileged_exposure"]
    assert saved_exposure > 0

    resumed = _make(tiny_model_dir, tiny_tokenizer, tmp_path / "b", **common)
    resumed.args.output_dir = full.args.output_dir
    resumed._load_optimizer_and_scheduler(None)  # no-op without a checkpoint
    resumed.train(resume_from_checkpoint=checkpoint)
    resumed_weights = {r["step"]: r["trace/kl_weight"] for r in resumed.state.log_history if "trace/kl_weight" in r}
    assert resumed_weights[3] == 0.75 and resumed_weights[4] == 0.5
    squares = {r["step"]: r["trace/kl_weight_sq_sum"] for r in full.state.log_history if "trace/kl_weight_sq_sum" in r}
    assert squares[4] == pytest.approx(1.0 + 1.0 + 0.75**2 + 0.5**2)
    resumed_squares = {
        r["step"]: r["trace/kl_weight_sq_sum"] for r in resumed.state.log_history if "trace/kl_weight_sq_sum" in r
    }
    assert resumed_squares[3] == squares[3] and resumed_squares[4] == squares[4]
    # log_history holds the checkpoint's steps too; look at the steps trained after the resume.
    exposures = {
        r["step"]: r["trace/privileged_exposure"]
        for r in resumed.state.log_history
        if "trace/privileged_exposure" in r
    }
    assert exposures[3] > saved_exposure, "exposure must continue from the checkpoint, not from zero"
    assert exposures[4] > exposures[3]


class _BothKindsAnnotator:
    """Key and error spans on every rollout (plus one unplaceable quote): only the kind matching correctness counts."""

    def __init__(self):
        self.requests = []

    def __call__(self, requests):
        self.requests = list(requests)
        return [
            Annotation(spans=(Span(0, 3, "key"), Span(3, 6, "error")), dropped_spans=1)
            if len(r.completion) > 6
            else Annotation()
            for r in requests
        ]


def test_span_kinds_follow_correctness_and_drops_are_counted(tiny_model_dir, tiny_tokenizer, tmp_path):
    annotator = _BothKindsAnnotator()
    # Every rollout is sent (for inspection), so that wrong-kind spans of both kinds are seen and dropped.
    trainer = _make(
        tiny_model_dir, tiny_tokenizer, tmp_path, annotator=annotator, max_steps=1, annotate_unrouted_kinds=True
    )
    trainer.model.train()
    batch = trainer._generate_and_score_completions([math_dataset()[i // 4] for i in range(4)])
    annotated = [r for r in annotator.requests if len(r.completion) > 6]
    assert annotated, "the tiny model should produce some text"
    # One span of the wrong kind plus the annotator's own unplaceable quote, per annotated rollout.
    assert trainer._metrics["train"]["trace/dropped_spans"][-1] == 2.0 * len(annotated)
    for row, request in enumerate(annotator.requests):
        kinds = set(batch["trace_labels"][row].tolist()) - {0}
        if len(request.completion) > 6:
            assert kinds == ({1} if request.is_correct else {2})
        else:
            assert kinds == set()


def _failing_annotator(requests):
    raise ConnectionError("annotation server unreachable")


def test_failed_annotation_trains_as_grpo_and_is_counted(tiny_model_dir, tiny_tokenizer, tmp_path):
    trainer = _make(
        tiny_model_dir,
        tiny_tokenizer,
        tmp_path,
        annotator=_failing_annotator,
        max_steps=2,
        annotator_exception="skip",
        annotation_batch_failure="skip",
        annotate_unrouted_kinds=True,
    )
    trainer.train()
    failures = [r["trace/annotation_failures"] for r in trainer.state.log_history if "trace/annotation_failures" in r]
    assert failures and all(f == 4.0 for f in failures)
    assert all(r.get("trace/routed_token_frac", 0.0) == 0.0 for r in trainer.state.log_history)


def test_annotation_failure_raise_stops_training(tiny_model_dir, tiny_tokenizer, tmp_path):
    failing = lambda requests: [Annotation.failure("rate limited") for _ in requests]  # noqa: E731
    trainer = _make(
        tiny_model_dir,
        tiny_tokenizer,
        tmp_path,
        annotator=failing,
        annotation_failure="raise",
        annotate_unrouted_kinds=True,
    )
    with pytest.raises(RuntimeError, match=r"4 annotation\(s\) failed \(most common cause \(4x\): rate limited\)"):
        trainer.train()
    trainer = _make(tiny_model_dir, tiny_tokenizer, tmp_path, annotator=_failing_annotator, annotation_failure="raise")
    with pytest.raises(RuntimeError, match=r"annotator raised \(ConnectionError"):
        trainer.train()


@pytest.mark.parametrize(
    ("annotator", "error", "match"),
    [
        (lambda requests: [Annotation()], TypeError, "exactly 4 `trace_trl.annotators.Annotation` .*returned 1 items"),
        (
            lambda requests: [{"spans": []} for _ in requests],
            TypeError,
            "must return a list of exactly 4 `trace_trl.annotators.Annotation` .*items of type dict",
        ),
    ],
)
def test_malformed_annotator_output_is_a_clear_error(
    tiny_model_dir, tiny_tokenizer, tmp_path, annotator, error, match
):
    trainer = _make(tiny_model_dir, tiny_tokenizer, tmp_path, annotator=annotator, annotate_unrouted_kinds=True)
    with pytest.raises(error, match=match):
        trainer.train()


def test_constructor_errors_name_the_problem(tiny_model_dir, tiny_tokenizer, tmp_path):
    from trl import GRPOConfig

    with pytest.raises(ValueError, match="needs an `annotator`"):
        TRACETrainer(
            model=tiny_model_dir,
            reward_funcs=parity_reward,
            args=trace_config(tmp_path),
            train_dataset=math_dataset(),
            processing_class=tiny_tokenizer,
        )
    with pytest.raises(TypeError, match="TRACEConfig"):
        TRACETrainer(
            model=tiny_model_dir,
            reward_funcs=parity_reward,
            args=GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none"),
            train_dataset=math_dataset(),
            processing_class=tiny_tokenizer,
            annotator=HalfSpanAnnotator(),
        )
    with pytest.raises(ValueError, match="is not one of the reward functions"):
        _make(tiny_model_dir, tiny_tokenizer, tmp_path, correctness_reward_func="accuracy")
    with pytest.raises(TypeError, match="must be callable"):
        _make(tiny_model_dir, tiny_tokenizer, tmp_path, annotator="regex")
    # GRPO without an annotator is allowed.
    TRACETrainer(
        model=tiny_model_dir,
        reward_funcs=parity_reward,
        args=trace_config(tmp_path, kl_coef=0.0),
        train_dataset=math_dataset(),
        processing_class=tiny_tokenizer,
    )


def test_missing_privileged_column_is_a_clear_error_at_init(tiny_model_dir, tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="no column 'solution' .*Available columns: \\['answer', 'prompt'\\]"):
        _make(tiny_model_dir, tiny_tokenizer, tmp_path, dataset=math_dataset(solution=None))
    # Plain GRPO needs no privileged context.
    _make(tiny_model_dir, tiny_tokenizer, tmp_path, dataset=math_dataset(solution=None), kl_coef=0.0)


def test_teacher_prompt_uses_the_students_chat_template_kwargs(tiny_model_dir, tiny_tokenizer, tmp_path):
    trainer = _make(
        tiny_model_dir,
        tiny_tokenizer,
        tmp_path,
        chat_template_kwargs={"enable_thinking": False},
        max_completion_length=6,
    )
    trainer.model.train()
    batch = trainer._generate_and_score_completions([math_dataset()[0]] * 4)
    width = batch["completion_ids"].size(1)
    routed_rows = (batch["trace_route"] > 0).any(1)
    assert routed_rows.any()
    for row in torch.nonzero(routed_rows).flatten().tolist():
        teacher_prompt = tiny_tokenizer.decode(batch["teacher_input_ids"][row, :-width], skip_special_tokens=False)
        student_prompt = tiny_tokenizer.decode(batch["prompt_ids"][row], skip_special_tokens=False)
        for text in (teacher_prompt, student_prompt):
            assert text.replace("<|endoftext|>", "").endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert "What is 2 + 1?" in teacher_prompt and "2 + 1 = 3" in teacher_prompt
        assert torch.equal(batch["teacher_input_ids"][row, -width:], batch["completion_ids"][row])


def test_over_long_privileged_context_is_cut_but_the_problem_is_kept(tiny_model_dir, tiny_tokenizer, tmp_path):
    long_solution = "step " * 400 + "so {a} + {b} = {c}"
    dataset = math_dataset(solution=long_solution)
    trainer = _make(tiny_model_dir, tiny_tokenizer, tmp_path, dataset=dataset, max_teacher_prompt_length=130)
    trainer.model.train()
    batch = trainer._generate_and_score_completions([dataset[1]] * 4)
    width = batch["completion_ids"].size(1)
    assert trainer._metrics["train"]["trace/teacher_context_truncated"][-1] > 0
    for row in torch.nonzero((batch["trace_route"] > 0).any(1)).flatten().tolist():
        prompt_ids = batch["teacher_input_ids"][row, :-width][batch["teacher_attention_mask"][row, :-width].bool()]
        assert len(prompt_ids) <= 130
        assert "What is 3 + 4?" in tiny_tokenizer.decode(prompt_ids)
        assert "step step" in tiny_tokenizer.decode(prompt_ids)


@pytest.mark.parametrize("teacher_kind", ["synced", "live", "base", "ema"])
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_every_teacher_kind_trains_with_gradient_checkpointing(
    tiny_model_dir, tiny_tokenizer, tmp_path, teacher_kind, peft
):
    trainer = _make(
        tiny_model_dir,
        tiny_tokenizer,
        tmp_path,
        teacher_kind=teacher_kind,
        peft=peft,
        gradient_checkpointing=True,
        max_steps=2,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert all(not torch.equal(v, trainer.model.get_parameter(n)) for n, v in before.items())
    assert any("trace/fkl_mean" in r or "trace/rkl_mean" in r for r in trainer.state.log_history)


class _Calculator:
    """A minimal TRL environment: `reset` plus one tool."""

    def reset(self, **kwargs):
        return None

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first integer.
            b: The second integer.
        """
        return a + b


def test_environment_factory_runs_route_only_some_rows(tiny_model_dir, tiny_tokenizer, tmp_path):
    """GRPO renders prompts with per-row environment tools; teacher prompts exist only for routed rows."""
    import copy

    import trl

    tokenizer = copy.deepcopy(tiny_tokenizer)
    with open(os.path.join(os.path.dirname(trl.__file__), "chat_templates", "qwen3.jinja")) as f:
        tokenizer.chat_template = f.read()  # a template that renders tools, as TRL requires with environments

    def first_rollout_only(requests):
        spans = [(Span(0, len(requests[0].completion), "key" if requests[0].is_correct else "error"),)]
        return [Annotation(spans=s) for s in spans + [()] * (len(requests) - 1)]

    args = trace_config(tmp_path, max_steps=1, teacher_kind="live", error_span_action="rkl", max_routed_fraction=None)
    trainer = TRACETrainer(
        model=tiny_model_dir,
        reward_funcs=parity_reward,
        args=args,
        train_dataset=math_dataset(),
        processing_class=tokenizer,
        annotator=first_rollout_only,
        environment_factory=_Calculator,
    )
    trainer.train()
    routed = [r["trace/routed_token_frac"] for r in trainer.state.log_history if "trace/routed_token_frac" in r]
    assert routed and 0 < routed[0] < 1
    # The teacher prompt carries the environment's tool schema, like the student's.
    trainer.model.train()
    batch = trainer._generate_and_score_completions([math_dataset()[0]] * 4)
    width = batch["completion_ids"].size(1)
    teacher_prompt = tokenizer.decode(batch["teacher_input_ids"][0, :-width], skip_special_tokens=False)
    student_prompt = tokenizer.decode(batch["prompt_ids"][0], skip_special_tokens=False)
    assert '"name": "add"' in student_prompt and '"name": "add"' in teacher_prompt


def test_annotator_exception_with_raise_stops_every_process_after_the_global_count(
    tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch
):
    """The exception is raised after the collective that counts failures, so no process is left waiting in it."""

    def broken(requests):
        raise ConnectionError("annotation server unreachable")

    trainer = _make(tiny_model_dir, tiny_tokenizer, tmp_path, annotator=broken, annotation_failure="raise")
    reduced = []
    original = trainer._batch_builder.reduce_sum

    def counting_reduce(tensor):
        reduced.append(tensor.clone())
        return original(tensor)

    monkeypatch.setattr(trainer._batch_builder, "reduce_sum", counting_reduce)
    with pytest.raises(RuntimeError, match=r"annotator raised \(ConnectionError: annotation server unreachable\)"):
        trainer.train()
    assert len(reduced) == 1, "the failure count must be reduced (every process joins) before raising"


def test_malformed_annotator_answer_raises_whatever_annotation_failure_says(tiny_model_dir, tiny_tokenizer, tmp_path):
    trainer = _make(
        tiny_model_dir,
        tiny_tokenizer,
        tmp_path,
        annotator=lambda requests: None,
        annotation_failure="skip",
        annotate_unrouted_kinds=True,
    )
    with pytest.raises(TypeError, match=r"must return a list of exactly 4 .*Annotation\(\)"):
        trainer.train()


def test_coverage_cap_routes_at_most_the_fraction_and_counts_what_it_removed(tiny_model_dir, tiny_tokenizer, tmp_path):
    def batch(max_routed_fraction):
        trainer = _make(tiny_model_dir, tiny_tokenizer, tmp_path, max_routed_fraction=max_routed_fraction)
        trainer.model.train()
        torch.manual_seed(5)
        out = trainer._generate_and_score_completions([math_dataset()[1]] * 4)
        return out, trainer._metrics["train"]["trace/cap_removed_tokens"][-1]

    capped, removed = batch(0.25)
    uncapped, removed_none = batch(None)
    assert torch.equal(capped["completion_ids"], uncapped["completion_ids"]), "same rollouts"
    assert removed_none == 0
    routed_capped = capped["trace_route"] != 0
    routed_uncapped = uncapped["trace_route"] != 0
    lengths = capped["completion_mask"].sum(1)
    for row in range(4):
        budget = int(0.25 * lengths[row].item())
        assert routed_capped[row].sum() <= budget
        # HalfSpanAnnotator marks the first half: the cap keeps the span's first `budget` tokens.
        kept = torch.nonzero(routed_capped[row]).flatten().tolist()
        assert kept == torch.nonzero(routed_uncapped[row]).flatten().tolist()[: len(kept)]
    assert not (routed_capped & ~routed_uncapped).any(), "the cap only removes routed tokens"
    assert removed == (routed_uncapped.sum() - routed_capped.sum()).item() > 0


def test_type_labels_reach_the_teacher_in_words_only_from_the_rollouts_own_taxonomy(
    tiny_model_dir, tiny_tokenizer, tmp_path
):
    """An error label on a correct rollout is dropped and counted; a valid one reaches the teacher prompt in words."""

    def labelled(requests):
        out = []
        for r in requests:
            kind = "key" if r.is_correct else "error"
            out.append(Annotation(spans=(Span(0, max(1, len(r.completion)), kind),), diagnosis="arithmetic_error"))
        return out

    def first_half_correct(completions, **kwargs):
        return [1.0 if i < len(completions) // 2 else 0.0 for i in range(len(completions))]

    args = trace_config(tmp_path, error_span_action="rkl", max_routed_fraction=None)
    trainer = make_trainer(tiny_model_dir, tiny_tokenizer, args, labelled, reward=first_half_correct)
    trainer.model.train()
    batch = trainer._generate_and_score_completions([math_dataset()[0]] * 4)
    width = batch["completion_ids"].size(1)
    metrics = trainer._metrics["train"]
    assert metrics["trace/correct_frac"][-1] == 0.5
    assert metrics["trace/dropped_type_labels"][-1] == 2, "the error label of each correct rollout is dropped"
    for row in range(4):
        prompt = tiny_tokenizer.decode(batch["teacher_input_ids"][row, :-width], skip_special_tokens=True)
        is_error_row = (batch["trace_labels"][row] == 2).any()
        assert ("classified its decisive step as: arithmetic error." in prompt) == bool(is_error_row)
        assert "arithmetic_error" not in prompt


def test_an_annotator_exception_that_echoes_the_api_key_is_redacted(tiny_model_dir, tiny_tokenizer, tmp_path, caplog):
    key = "sk-proj-" + "k3Y9" * 8

    def leaky(requests):
        raise PermissionError(f"401 Incorrect API key provided: {key}")

    trainer = _make(
        tiny_model_dir,
        tiny_tokenizer,
        tmp_path,
        annotator=leaky,
        annotator_exception="skip",
        annotation_batch_failure="skip",
        annotate_unrouted_kinds=True,
    )
    trainer.model.train()
    # On the package's logger: an earlier `trace-trl train` run in the same process may have raised its level.
    with caplog.at_level("WARNING", logger="trace_trl"):
        trainer._generate_and_score_completions([math_dataset()[0]] * 4)
    assert "PermissionError" in caplog.text and key not in caplog.text and key[-8:] not in caplog.text
    assert trainer._metrics["train"]["trace/annotation_failures"][-1] == 4
    trainer.args.annotation_failure = "raise"
    with pytest.raises(RuntimeError) as info:
        trainer._generate_and_score_completions([math_dataset()[0]] * 4)
    assert key not in str(info.value) and key[-8:] not in str(info.value) and info.value.__cause__ is None
