"""Real annotators inside real TRACE runs: every API fault leaves training running with the failures counted, the API
key reaches no file of the run, and a bound SelfAnnotator drives routing."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from fake_openai_server import FakeOpenAIServer
from trainer_helpers import make_trainer, trace_config

from trace_trl.annotators import OpenAIAnnotator, SelfAnnotator


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
def test_a_faulty_annotation_server_never_stops_training(tiny_model_dir, tiny_tokenizer, tmp_path, behaviour, expect):
    with FakeOpenAIServer(default=behaviour, hang_s=3.0) as server:
        trainer = _train(tiny_model_dir, tiny_tokenizer, tmp_path, _annotator(server, timeout=0.3))
    failures, dropped = _logged(trainer, "trace/annotation_failures"), _logged(trainer, "trace/dropped_spans")
    assert trainer.state.global_step == 2
    if expect == "failures":
        assert failures and all(f == 4.0 for f in failures), "every rollout's annotation failed and was counted"
        assert _logged(trainer, "annotator/failures")[-1] == 8.0
        assert all(r.get("trace/routed_token_frac", 0.0) == 0.0 for r in trainer.state.log_history)
    else:
        assert all(f == 0.0 for f in failures) and sum(dropped) > 0, "quotes not in the rollout are dropped, counted"


def test_rate_limited_then_answered_routes_tokens(tiny_model_dir, tiny_tokenizer, tmp_path):
    with FakeOpenAIServer() as server:
        server.plan = ["429", "429"]
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
    assert _logged(trainer, "annotator/requests")[-1] == 8.0
