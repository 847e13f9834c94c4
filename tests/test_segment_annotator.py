"""The segment protocol end to end: OpenAIAnnotator against a real local HTTP server, SelfAnnotator, the quote
protocol's unchanged cache keys, and canaries that span text and positions never reach the teacher."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
from fake_openai_server import FakeOpenAIServer

from trace_trl.annotators import AnnotationRequest, OpenAIAnnotator, SelfAnnotator, describe_type_label
from trace_trl.annotators.cache import request_cache_key
from trace_trl.annotators.prompts import SEGMENT_SYSTEM_PROMPT, SYSTEM_PROMPT
from trace_trl.annotators.protocol import SEGMENT_REASK_MESSAGE
from trace_trl.annotators.segments import split_segments
from trace_trl.annotators.taxonomy import ERROR_TYPES, KEY_STEP_TYPES
from trace_trl.config import DEFAULT_TEACHER_CONTEXT_TEMPLATE
from trace_trl.context import TeacherContextBuilder
from trace_trl.spans import Span


SPAN_CANARY = "CANARY_SPAN_TEXT_5c1e"
# A long first line puts every span offset above 1000, so any offset leaking into text is recognizable.
PREAMBLE = "We restate the problem carefully: " + "the integer x satisfies x^2 - x - 6 = 0 and x > 0; " * 20
CORRECT = (
    PREAMBLE
    + "\nFactor: (x - 3)(x + 2) = 0.\nSo x = 3 or x = -2.\nSince x > 0, x = 3. "
    + SPAN_CANARY
    + "\nThe answer is \\boxed{3}."
)
WRONG = (
    PREAMBLE
    + "\nFactor: (x - 3)(x + 2) = 0.\nSo x = 3 or x = -2, and we take x = -2. "
    + SPAN_CANARY
    + "\nThe answer is \\boxed{-2}."
)
_NUMBERED = re.compile(r"^\[(\d+)\] (.*)$", re.MULTILINE)


def numbered_lines(rollout: str) -> dict[int, str]:
    return {int(number): text for number, text in _NUMBERED.findall(rollout)}


def segment_answer(rollout: str, is_correct: bool, body: dict) -> dict:
    """Answer like a model shown numbered segments: mark the canary's segment first, then the factoring step."""
    lines = numbered_lines(rollout)
    canary = next(n for n, text in lines.items() if SPAN_CANARY in text)
    factor = next(n for n, text in lines.items() if text.startswith("Factor"))
    if is_correct:
        return {"segments": [{"id": canary, "kind": "key"}, {"id": factor, "kind": "key"}], "type": "case_analysis"}
    return {"segments": [{"id": canary, "kind": "error"}], "type": "missed_case_analysis"}


def make_request(completion: str, is_correct: bool) -> AnnotationRequest:
    return AnnotationRequest(
        prompt=[{"role": "user", "content": "Find the positive root of x^2 - x - 6 = 0."}],
        completion=completion,
        is_correct=is_correct,
        reward=float(is_correct),
        privileged_context="x^2 - x - 6 = (x - 3)(x + 2), so x = 3.",
    )


def annotator_for(server: FakeOpenAIServer, **kwargs) -> OpenAIAnnotator:
    kwargs = {"api_key": "sk-test", "timeout": 2.0, "max_retries": 1, "backoff_base": 0.01, **kwargs}
    return OpenAIAnnotator("fake-model", base_url=server.base_url, **kwargs)


def segment_span(completion: str, needle: str, kind: str) -> Span:
    segment = next(s for s in split_segments(completion) if needle in s.text(completion))
    return Span(segment.start, segment.end, kind)


@pytest.fixture
def server():
    with FakeOpenAIServer(answer=segment_answer) as fake:
        yield fake


def test_segment_protocol_end_to_end_over_http(server, tmp_path):
    annotator = annotator_for(server, cache_dir=tmp_path / "cache")
    assert annotator.span_format == "segments"  # the paper's protocol is the default
    good, bad = annotator([make_request(CORRECT, True), make_request(WRONG, False)])

    assert good.error is None and bad.error is None
    assert good.spans == (segment_span(CORRECT, SPAN_CANARY, "key"), segment_span(CORRECT, "Factor", "key"))
    assert good.spans[0].start > 1000 and CORRECT[good.spans[0].start : good.spans[0].end].endswith(SPAN_CANARY)
    assert bad.spans == (segment_span(WRONG, SPAN_CANARY, "error"),)
    assert (good.diagnosis, bad.diagnosis) == ("case_analysis", "missed_case_analysis")

    # What went over the wire: the segment prompt, numbered segments, a per-kind strict schema.
    bodies = sorted(
        (r.body for r in server.requests), key=lambda b: "Verdict: INCORRECT" in b["messages"][1]["content"]
    )
    for body, kind, labels in ((bodies[0], "key", KEY_STEP_TYPES), (bodies[1], "error", ERROR_TYPES)):
        assert body["messages"][0]["content"] == SEGMENT_SYSTEM_PROMPT
        user = body["messages"][1]["content"]
        assert "Rollout (numbered segments):" in user and "[1] We restate the problem" in user
        schema = body["response_format"]["json_schema"]
        assert schema["name"] == "trace_segment_annotation" and schema["strict"] is True
        properties = schema["schema"]["properties"]
        assert properties["segments"]["items"]["properties"]["kind"]["enum"] == [kind]
        assert properties["type"]["enum"] == [*labels, None]

    # The cache serves the same annotations without a request, under a key that differs from the quote protocol's.
    count = server.count
    again = annotator_for(server, cache_dir=tmp_path / "cache")(
        [make_request(CORRECT, True), make_request(WRONG, False)]
    )
    assert server.count == count
    assert [a.spans for a in again] == [good.spans, bad.spans] and again[0].diagnosis == "case_analysis"
    quotes = annotator_for(server, span_format="quotes")
    request = make_request(CORRECT, True)
    assert request_cache_key(quotes.config_fingerprint, request) != request_cache_key(
        annotator.config_fingerprint, request
    )
    assert json.loads(annotator.config_fingerprint)["span_format"] == "segments"
    assert annotator_for(server, max_segment_chars=100).config_fingerprint != annotator.config_fingerprint


def test_bad_ids_and_labels_are_dropped_and_counted_in_metrics(server):
    def hostile(rollout, is_correct, body):
        last = max(numbered_lines(rollout))
        items = [{"id": 2, "kind": "key"}, {"id": 2, "kind": "key"}, {"id": last + 1, "kind": "key"}]
        items += [{"id": "2a", "kind": "key"}, {"id": 1, "kind": "error"}]
        return {"segments": items, "type": "arithmetic_error"}  # an error label on a correct rollout

    server.answer = hostile
    annotator = annotator_for(server)
    (annotation,) = annotator([make_request(CORRECT, True)])
    assert annotation.spans == (Span(*_segment_bounds(CORRECT, 2), "key"),)
    assert annotation.dropped_spans == 4 and annotation.diagnosis is None
    metrics = annotator.metrics()
    assert metrics["annotator/dropped_spans"] == 4 and metrics["annotator/dropped_labels"] == 1
    assert metrics["annotator/spans"] == 1


def _segment_bounds(text, number):
    segment = split_segments(text)[number - 1]
    return segment.start, segment.end


def test_schema_fallback_and_reask_follow_the_segment_protocol(server):
    server.plan = ["400_schema", "malformed", "ok"]
    annotator = annotator_for(server, reask_on_malformed=True)
    (annotation,) = annotator([make_request(WRONG, False)])
    assert annotation.error is None and annotation.spans == (segment_span(WRONG, SPAN_CANARY, "error"),)
    assert annotator.metrics()["annotator/json_schema_fallbacks"] == 1
    last = server.requests[-1].body
    assert "response_format" not in last
    assert last["messages"][-1]["content"] == SEGMENT_REASK_MESSAGE


def test_quote_protocol_cache_keys_are_unchanged():
    """Literal keys computed on the code before `span_format` existed (commit b2cb53d): old caches stay valid."""
    annotator = OpenAIAnnotator("gpt-4.1-mini", api_key="sk-test", span_format="quotes")
    request = AnnotationRequest(
        prompt=[{"role": "user", "content": "What is 6 * 7?"}],
        completion="6 * 7 = 42, so \\boxed{42}.",
        is_correct=True,
        reward=1.0,
        privileged_context="6 * 7 = 42.",
    )
    assert (
        request_cache_key(annotator.config_fingerprint, request)
        == "99b53c1d2dfcddab29411a5fac63767f6420aedfc66bf14fd1ff05c0ab849b29"
    )
    annotator = OpenAIAnnotator(
        "m", api_key="sk-test", max_key_spans=2, use_json_schema=False, temperature=0.3, span_format="quotes"
    )
    request = AnnotationRequest(prompt="Solve x + 1 = 3.", completion="x = 3 - 1 = 1", is_correct=False, reward=0.0)
    assert (
        request_cache_key(annotator.config_fingerprint, request)
        == "62af33e8e36422623af14a17052dafa46535cb53c15f867a5793c04f52625e9f"
    )


def test_quote_protocol_drops_an_error_label_on_a_correct_rollout():
    def quote_answer(rollout, is_correct, body):
        return {"spans": [{"quote": "x = 3", "kind": "key"}], "diagnosis": "arithmetic_error"}

    with FakeOpenAIServer(answer=quote_answer) as fake:
        annotator = annotator_for(fake, span_format="quotes")
        good, bad = annotator([make_request(CORRECT, True), make_request(WRONG, False)])
        assert fake.requests[0].body["messages"][0]["content"] == SYSTEM_PROMPT
    assert good.diagnosis is None and good.usage["dropped_labels"] == 1
    assert bad.diagnosis == "arithmetic_error" and "dropped_labels" not in bad.usage
    assert annotator.metrics()["annotator/dropped_labels"] == 1


class ScriptedSegmentSelfAnnotator(SelfAnnotator):
    def _generate(self, prompts, schemas=None):
        from fake_openai_server import extract_rollout

        self.prompts = prompts
        return [
            json.dumps(segment_answer(extract_rollout(p[-1]["content"]), "Verdict: CORRECT" in p[-1]["content"], {}))
            for p in prompts
        ]


def test_self_annotator_speaks_the_segment_protocol():
    annotator = ScriptedSegmentSelfAnnotator()
    annotator.bind(SimpleNamespace())
    good, bad = annotator([make_request(CORRECT, True), make_request(WRONG, False)])
    assert annotator.prompts[0][0]["content"] == SEGMENT_SYSTEM_PROMPT
    assert good.spans == (segment_span(CORRECT, SPAN_CANARY, "key"), segment_span(CORRECT, "Factor", "key"))
    assert bad.spans == (segment_span(WRONG, SPAN_CANARY, "error"),) and bad.diagnosis == "missed_case_analysis"


def _teacher_builder():
    def tokenize(prompts):
        return [[0] * len(json.dumps(p)) for p in prompts]

    return TeacherContextBuilder(DEFAULT_TEACHER_CONTEXT_TEMPLATE, tokenize, lambda t: list(t), "".join, None)


def test_span_text_and_positions_never_reach_the_teacher(server):
    """Canaries: whatever the annotator model answers, only a taxonomy label leaves the annotator for the teacher."""

    def leaky(rollout, is_correct, body):
        lines = numbered_lines(rollout)
        canary = next(n for n, text in lines.items() if SPAN_CANARY in text)
        return {"segments": [canary], "type": f"{lines[canary]} (segment [{canary}], characters 1043-1100)"}

    annotator = annotator_for(server)
    requests = [make_request(CORRECT, True), make_request(WRONG, False)]
    honest = annotator(requests)
    server.answer = leaky
    leaked = annotator_for(server)(requests)
    assert all(a.diagnosis is None for a in leaked), "free text in the label field is dropped, never passed on"

    builder = _teacher_builder()
    for request, annotation in zip(requests * 2, honest + leaked):
        assert (
            annotation.spans and SPAN_CANARY in request.completion[annotation.spans[0].start : annotation.spans[0].end]
        )
        label = annotation.diagnosis
        assert label is None or label in KEY_STEP_TYPES or label in ERROR_TYPES
        words = describe_type_label(label) if label else None
        prompt = builder.render(request.prompt, request.privileged_context, words)
        teacher_text = prompt[-1]["content"]
        assert SPAN_CANARY not in teacher_text and "Factor" not in teacher_text
        assert "[" not in teacher_text, "no segment numbers"
        for span in annotation.spans:
            assert str(span.start) not in teacher_text and str(span.end) not in teacher_text
        if words:
            assert words in teacher_text
    assert "missed case analysis" in builder.render("Find x.", "x = 3.", describe_type_label("missed_case_analysis"))


def test_segment_protocol_routes_tokens_in_a_real_trace_run(tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch):
    from trainer_helpers import make_trainer, trace_config

    from trace_trl.context import TeacherContextBuilder as Builder

    def first_segment(rollout, is_correct, body):
        numbers = sorted(numbered_lines(rollout))
        kind, label = ("key", "key_insight") if is_correct else ("error", "other")
        return {"segments": [{"id": n, "kind": kind} for n in numbers[:1]], "type": label}

    labels_seen = []
    original_build = Builder.build

    def spy(self, prompts, contexts, diagnoses, **kwargs):
        labels_seen.extend(diagnoses)
        return original_build(self, prompts, contexts, diagnoses, **kwargs)

    monkeypatch.setattr(Builder, "build", spy)
    with FakeOpenAIServer(answer=first_segment) as fake:
        annotator = annotator_for(fake)
        trainer = make_trainer(tiny_model_dir, tiny_tokenizer, trace_config(tmp_path, max_steps=2), annotator)
        trainer.train()
    logged = {key: [r[key] for r in trainer.state.log_history if key in r] for key in trainer.state.log_history[0]}
    assert all(f == 0.0 for f in logged["trace/annotation_failures"])
    assert annotator.metrics()["annotator/spans"] > 0 and annotator.metrics()["annotator/failures"] == 0
    assert any(v > 0 for v in logged["trace/key_label_frac"] + logged["trace/error_label_frac"])
    # The teacher gets the label in words, from the taxonomy only.
    assert labels_seen and set(labels_seen) <= {"key insight", "another kind of mistake", None}


def test_annotate_command_uses_the_segment_protocol_by_default(server, tmp_path):
    from trace_trl.inspection import read_jsonl
    from trace_trl.scripts.annotate import main as annotate_main

    rollouts = tmp_path / "rollouts.jsonl"
    rows = [{"prompt": "Find x.", "completion": CORRECT, "is_correct": True, "reference": "x = 3"}]
    rows.append({"prompt": "Find x.", "completion": WRONG, "is_correct": False, "reference": "x = 3"})
    rollouts.write_text("\n".join(json.dumps(row) for row in rows))
    output = tmp_path / "annotations.jsonl"
    argv = [
        str(rollouts),
        "-o",
        str(output),
        "--model",
        "fake",
        "--base-url",
        server.base_url,
        "--quiet",
        "--all-kinds",
    ]
    assert annotate_main(argv) == 0
    good, bad = read_jsonl(output)
    assert [span[2:] for span in good["spans"]] == [
        ["key", CORRECT[slice(*_bounds(CORRECT, SPAN_CANARY))]],
        ["key", CORRECT[slice(*_bounds(CORRECT, "Factor"))]],
    ]
    assert good["diagnosis"] == "case_analysis" and bad["diagnosis"] == "missed_case_analysis"
    assert server.requests[0].body["messages"][0]["content"] == SEGMENT_SYSTEM_PROMPT
    # `--span-format quotes` switches protocol: this server speaks segments only, so every quote answer fails (and
    # `trace-trl annotate` says so with exit status 1), but the requests were quote-protocol requests.
    assert annotate_main([*argv, "-o", str(tmp_path / "q.jsonl"), "--span-format", "quotes"]) == 1
    assert server.requests[-1].body["messages"][0]["content"] == SYSTEM_PROMPT


def _bounds(text, needle):
    span = segment_span(text, needle, "key")
    return span.start, span.end
