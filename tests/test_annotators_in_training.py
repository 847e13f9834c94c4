"""Real annotators inside real TRACE runs: every API fault leaves training running with the failures counted, the API
key reaches no file of the run, and a bound SelfAnnotator drives routing."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest
import torch
from fake_openai_server import FakeOpenAIServer
from trainer_helpers import make_trainer, math_dataset, trace_config

from trace_trl.annotators import Annotation, OpenAIAnnotator, SelfAnnotator
from trace_trl.annotators.base import AnnotatorPreflightError
from trace_trl.spans import Span


CANARY = "sk-test-CANARY-e41d0c9b77"


def _train(model_dir, tokenizer, tmp_path, annotator, **overrides):
    trainer = make_trainer(model_dir, tokenizer, trace_config(tmp_path, max_steps=2, **overrides), annotator)
    trainer.train()
    return trainer


def _logged(trainer, name):
    return [r[name] for r in trainer.state.log_history if name in r]


def _annotator(server, **kwargs):
    kwargs = {"api_key": CANARY, "timeout": 1.0, "max_retries": 1, "backoff_base": 0.01, "backoff_max": 0.05, **kwargs}
    kwargs.setdefault("span_format", "quotes")
    return OpenAIAnnotator("fake-model", base_url=server.base_url, **kwargs)


@pytest.mark.parametrize(
    ("behaviour", "expect"),
    [
        ("malformed", "failures"),
        ("500", "failures"),
        ("hang", "failures"),
        ("close", "failures"),
        ("missing", "dropped"),
    ],
)
def test_a_faulty_annotation_server_trains_as_grpo_when_told_to_skip(
    tiny_model_dir, tiny_tokenizer, tmp_path, behaviour, expect
):
    """With `annotation_batch_failure='skip'` (and no preflight), a broken server leaves training running, counted."""
    with FakeOpenAIServer(default=behaviour, hang_s=3.0) as server:
        trainer = _train(
            tiny_model_dir,
            tiny_tokenizer,
            tmp_path,
            _annotator(server, timeout=0.3),
            annotation_batch_failure="skip",
            annotation_preflight=False,
        )
    records = [r for r in trainer.state.log_history if "trace/annotation_failures" in r]
    assert trainer.state.global_step == 2 and records
    if expect == "failures":
        for record in records:
            assert record["trace/annotation_failures"] == record["trace/annotation_requests"], "all failed, counted"
        sent = sum(r["trace/annotation_requests"] for r in records)
        assert _logged(trainer, "annotator/failures")[-1] == sent
        assert all(r.get("trace/routed_token_frac", 0.0) == 0.0 for r in trainer.state.log_history)
    else:
        assert all(r["trace/annotation_failures"] == 0.0 for r in records)
        assert sum(r["trace/dropped_spans"] for r in records) > 0, "quotes not in the rollout are dropped, counted"


def _closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@pytest.mark.parametrize(
    ("behaviour", "cause"),
    [
        ("refused", "connection to the annotator server failed"),
        ("html_200", "not a chat completion"),
        ("500", "HTTP 500"),
        ("hang", "timed out"),
        ("401_echo", "HTTP 401"),
        ("reasoning_400", "Unsupported parameter: 'max_tokens'"),
    ],
)
def test_preflight_refuses_to_start_on_a_broken_server(tiny_model_dir, tiny_tokenizer, tmp_path, behaviour, cause):
    """Down, a login page, errors, a timeout, bad credentials, a rejected request: no step is trained."""
    with FakeOpenAIServer(default=behaviour, hang_s=3.0) as server:
        annotator = _annotator(server, timeout=0.3)
        if behaviour == "refused":
            annotator = OpenAIAnnotator(
                "fake-model",
                base_url=_closed_port_url(),
                api_key=CANARY,
                max_retries=1,
                backoff_base=0.01,
                backoff_max=0.05,
            )
        trainer = make_trainer(tiny_model_dir, tiny_tokenizer, trace_config(tmp_path, max_steps=2), annotator)
        with pytest.raises(AnnotatorPreflightError, match="one-request check before training") as info:
            trainer.train()
    assert cause in str(info.value) and CANARY not in str(info.value)
    assert "annotation_preflight=False" in str(info.value)
    assert trainer.state.global_step == 0
    assert annotator.metrics()["annotator/api_calls"] == 0, "the check is not part of the run's totals"


def test_preflight_can_be_skipped_and_is_not_run_for_grpo(tiny_model_dir, tiny_tokenizer, tmp_path):
    with FakeOpenAIServer(default="html_200") as server:
        trainer = make_trainer(
            tiny_model_dir, tiny_tokenizer, trace_config(tmp_path, max_steps=1, kl_coef=0.0), _annotator(server)
        )
        trainer.train()
        assert server.count == 0, "plain GRPO never calls the annotator"
        trainer = make_trainer(
            tiny_model_dir,
            tiny_tokenizer,
            trace_config(tmp_path, max_steps=1, annotation_preflight=False),
            _annotator(server),
        )
        with pytest.raises(RuntimeError, match="Every annotation of this generation batch failed"):
            trainer.train()


def test_preflight_passes_a_working_server_with_one_request(tiny_model_dir, tiny_tokenizer, tmp_path):
    with FakeOpenAIServer() as server:
        annotator = _annotator(server)
        trainer = make_trainer(tiny_model_dir, tiny_tokenizer, trace_config(tmp_path, max_steps=1), annotator)
        trainer._preflight_annotator()
        assert server.count == 1
        assert "17 + 25" in server.requests[0].user_message
    assert annotator.metrics()["annotator/requests"] == 0


def test_preflight_reaches_the_server_behind_a_control_annotator(tmp_path):
    from trace_trl.annotators import InvertedSpanAnnotator, RandomSpanAnnotator
    from trace_trl.annotators.base import preflight_annotator

    with FakeOpenAIServer(default="500") as server:
        for wrapper in (RandomSpanAnnotator(like=_annotator(server)), InvertedSpanAnnotator(_annotator(server))):
            with pytest.raises(AnnotatorPreflightError, match="HTTP 500"):
                preflight_annotator(wrapper)
    assert preflight_annotator(lambda requests: []) is False, "no server, no check"


def test_a_batch_whose_every_annotation_fails_stops_training_with_the_cause(tiny_model_dir, tiny_tokenizer, tmp_path):
    """The server passes the preflight, then breaks: the first batch where every annotation fails stops the run."""
    with FakeOpenAIServer(default="500") as server:
        server.plan = ["ok"]  # the preflight
        trainer = make_trainer(tiny_model_dir, tiny_tokenizer, trace_config(tmp_path, max_steps=2), _annotator(server))
        with pytest.raises(
            RuntimeError, match=r"Every annotation of this generation batch failed \(\d+ of \d+\)"
        ) as info:
            trainer.train()
    assert "HTTP 500 from the annotator server (after 2 attempt(s))" in str(info.value)
    assert "annotation_batch_failure='skip'" in str(info.value) and CANARY not in str(info.value)
    assert trainer.state.global_step == 0


def test_the_first_batch_with_failures_warns_with_the_most_common_cause(
    tiny_model_dir, tiny_tokenizer, tmp_path, caplog
):
    """Partial failures train on (`annotation_failure='skip'`), with the redacted cause at WARNING, once per cause."""
    with FakeOpenAIServer() as server:
        server.plan = ["ok", "html_200"]  # the preflight, then one proxy page; every other request is answered
        annotator = _annotator(server, max_concurrency=1)
        args = trace_config(tmp_path, max_steps=2, annotate_unrouted_kinds=True, teacher_kind="live")
        trainer = make_trainer(tiny_model_dir, tiny_tokenizer, args, annotator)
        with caplog.at_level(logging.WARNING, logger="trace_trl"):
            trainer.train()
    assert trainer.state.global_step == 2
    warnings = [r.getMessage() for r in caplog.records if "annotations of this batch failed" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "1 of 4 annotations of this batch failed; most common cause (1x)" in warnings[0]
    assert "not a chat completion" in warnings[0] and CANARY not in caplog.text


def test_an_exception_from_a_users_annotator_is_raised_with_its_traceback(tiny_model_dir, tiny_tokenizer, tmp_path):
    def buggy(requests):
        return [Annotation(spans=(Span(0, len(r.completion) // r.reward, "key"),)) for r in requests]

    trainer = make_trainer(tiny_model_dir, tiny_tokenizer, trace_config(tmp_path, max_steps=1), buggy)
    with pytest.raises(RuntimeError, match="most likely a bug in the annotator's own code") as info:
        trainer.train()
    assert "ZeroDivisionError" in str(info.value) or "TypeError" in str(info.value)
    assert "in buggy" in str(info.value), "the traceback names the user's function"


def test_rate_limited_then_answered_routes_tokens(tiny_model_dir, tiny_tokenizer, tmp_path):
    with FakeOpenAIServer() as server:
        server.plan = ["ok", "429", "429"]  # the preflight, then two rate limits
        server.retry_after = "0.05"
        trainer = _train(tiny_model_dir, tiny_tokenizer, tmp_path, _annotator(server, max_retries=3))
    assert all(f == 0.0 for f in _logged(trainer, "trace/annotation_failures"))
    assert _logged(trainer, "annotator/retries")[-1] >= 2
    assert any(v > 0 for v in _logged(trainer, "trace/routed_token_frac"))


def test_api_key_reaches_no_log_config_checkpoint_or_model_card(tiny_model_dir, tiny_tokenizer, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with FakeOpenAIServer() as server:
        trainer = _train(
            tiny_model_dir, tiny_tokenizer, tmp_path, _annotator(server), save_strategy="steps", save_steps=1
        )
        trainer.save_model()
    output = Path(trainer.args.output_dir)
    files = [p for p in output.rglob("*") if p.is_file()]
    assert any(p.name == "README.md" for p in files) and any("checkpoint-" in str(p) for p in files)
    for path in files:
        assert CANARY.encode() not in path.read_bytes(), f"API key leaked into {path}"
    assert CANARY not in caplog.text
    assert CANARY not in repr(trainer.args) and CANARY not in str(trainer.args.to_dict())


class _ScriptedSelfAnnotator(SelfAnnotator):
    """A test double of the generation backend: answers with a quote of each rollout's first characters."""

    def _generate(self, prompts, schemas=None):
        from fake_openai_server import extract_rollout

        replies = []
        for messages in prompts:
            rollout = extract_rollout(messages[-1]["content"]) or ""
            verdict = "key" if "Verdict: CORRECT" in messages[-1]["content"] else "error"
            replies.append(json.dumps({"spans": [{"quote": rollout[:8], "kind": verdict}], "diagnosis": None}))
        return replies


def test_bound_self_annotator_drives_routing_in_a_real_run(tiny_model_dir, tiny_tokenizer, tmp_path):
    annotator = _ScriptedSelfAnnotator(max_new_tokens=32, span_format="quotes")
    trainer = _train(tiny_model_dir, tiny_tokenizer, tmp_path, annotator)
    assert annotator._trainer is trainer, "TRACETrainer binds the annotator to itself"
    assert any(v > 0 for v in _logged(trainer, "trace/routed_token_frac"))
    sent = sum(_logged(trainer, "trace/annotation_requests"))
    skipped = sum(_logged(trainer, "trace/annotation_skipped"))
    assert sent + skipped == 8.0, "two batches of four rollouts"
    assert _logged(trainer, "annotator/requests")[-1] == sent, "only the rollouts whose kind is routed are asked about"


def _half_correct(completions, **kwargs):
    return [1.0 if i % 2 == 0 else 0.0 for i in range(len(completions))]


@pytest.mark.parametrize(
    ("preset", "actions"),
    [
        ("TRACE-FKL", dict(key_span_action="fkl", error_span_action="grpo")),
        ("TRACE-RKL", dict(key_span_action="grpo", error_span_action="rkl")),
    ],
)
def test_only_rollouts_whose_kind_is_routed_are_sent_and_cached(
    tiny_model_dir, tiny_tokenizer, tmp_path, preset, actions
):
    """On a batch with mixed correctness, each paper preset asks about half the rollouts (it used to ask about all)."""
    from trace_trl.annotators.cache import AnnotationCache

    counts = {}
    for send_all in (True, False):
        with FakeOpenAIServer() as server:
            annotator = _annotator(server, cache_dir=tmp_path / f"cache-{send_all}")
            args = trace_config(tmp_path, per_device_train_batch_size=8, annotate_unrouted_kinds=send_all, **actions)
            trainer = make_trainer(tiny_model_dir, tiny_tokenizer, args, annotator, reward=_half_correct)
            trainer.model.train()
            torch.manual_seed(0)
            trainer._generate_and_score_completions([math_dataset()[0]] * 4 + [math_dataset()[1]] * 4)
            asked = [r for r in server.requests]
            counts[send_all] = len(asked)
            metrics = trainer._metrics["train"]
            verdicts = {"Verdict: CORRECT" in r.user_message for r in asked}
            cached = len(AnnotationCache(tmp_path / f"cache-{send_all}"))
        if not send_all:
            assert verdicts == {actions["key_span_action"] != "grpo"}, "only the routed kind is asked about"
            assert metrics["trace/annotation_skipped"][-1] == 4 and metrics["trace/annotation_requests"][-1] == 4
            records = trainer._batch_builder.last_batch
            assert sum(not r.annotated for r in records) == 4
        assert cached == counts[send_all], "the cache holds exactly what was asked"
    print(f"{preset}: {counts[True]} requests before, {counts[False]} after")
    assert counts[True] == 8 and counts[False] == 4


def test_annotator_totals_are_logged_as_their_latest_value_or_not_at_all(tiny_model_dir, tiny_tokenizer, tmp_path):
    """A window of two generation batches logs the total after both, not the mean of the two running totals."""
    from trainer_helpers import HalfSpanAnnotator

    class Counting(HalfSpanAnnotator):
        def metrics(self):
            return {"requests": float(sum(len(c) for c in self.calls))}

    annotator = Counting()
    args = trace_config(tmp_path, max_steps=2, logging_steps=2, annotate_unrouted_kinds=True)
    trainer = make_trainer(tiny_model_dir, tiny_tokenizer, args, annotator)
    trainer.train()
    (logged,) = _logged(trainer, "annotator/requests")
    assert logged == 8.0, "the total after the window's two batches of four"
    quiet = make_trainer(
        tiny_model_dir, tiny_tokenizer, trace_config(tmp_path, max_steps=1, log_annotator_metrics=False), Counting()
    )
    quiet.train()
    assert not _logged(quiet, "annotator/requests")
