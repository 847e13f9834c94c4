"""Issue 9: a hostile or broken annotation server fails only the requests it answered badly, counted, never the batch.

Every test talks to the real HTTP server of tests/fake_openai_server.py (or checks one parsing unit against an
adversarial input with a time bound). No failure text may carry the API key or a fragment of it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time

import pytest
from fake_openai_server import FakeOpenAIServer

from trace_trl.annotators import AnnotationRequest, OpenAIAnnotator
from trace_trl.annotators._quotes import locate_quotes
from trace_trl.annotators.openai_api import BadResponseError, read_chat_completion
from trace_trl.annotators.parsing import (
    MAX_ANSWER_CHARS,
    AnnotationParseError,
    AnswerTooLongError,
    extract_json,
    parse_annotation,
)
from trace_trl.annotators.redaction import REDACTED, redact
from trace_trl.inspection import read_jsonl
from trace_trl.scripts.annotate import main as annotate_main
from trace_trl.scripts.render import main as render_main
from trace_trl.spans import Span, locate_quote


CANARY = "sk-test-CANARY-9d71c3e8a2b4f605"
TAIL8 = CANARY[-8:]
ROLLOUT = "Let x = 2.\nThen 3 * x = 6.\nSo the answer is 6."


def make_request(completion: str = ROLLOUT, is_correct: bool = True) -> AnnotationRequest:
    return AnnotationRequest(
        prompt="If x = 2, what is 3x?", completion=completion, is_correct=is_correct, reward=float(is_correct)
    )


def distinct_requests(n: int) -> list[AnnotationRequest]:
    return [make_request(f"Step {i}: 3 * x = 6.\nSo the answer is 6.") for i in range(n)]


def fast_annotator(server: FakeOpenAIServer, **kwargs) -> OpenAIAnnotator:
    # The quote protocol: the fake server answers it by default; these tests are about the transport, not the format.
    kwargs = {
        "api_key": CANARY,
        "timeout": 5.0,
        "max_retries": 0,
        "backoff_base": 0.01,
        "span_format": "quotes",
        **kwargs,
    }
    return OpenAIAnnotator("fake-model", base_url=server.base_url, **kwargs)


def annotate_argv(rollouts, output, server: FakeOpenAIServer) -> list[str]:
    """`trace-trl annotate` against the fake server in the quote protocol it answers by default."""
    return [
        str(rollouts),
        "-o",
        str(output),
        "--model",
        "fake",
        "--base-url",
        server.base_url,
        "--span-format",
        "quotes",
    ]


def assert_no_secret(text: str, where: str) -> None:
    assert CANARY not in text, f"the API key leaked into {where}"
    assert TAIL8 not in text, f"the API key's last 8 characters leaked into {where}"
    assert CANARY[-4:] not in text, f"the API key's last 4 characters leaked into {where}"


# --- 1. a 200 that is not a chat completion fails alone -----------------------------------------------------------

BAD_200 = {
    "html_200": "text/html",
    "empty_200": "empty body",
    "invalid_200": "not valid JSON",
    "json_list": "JSON list",
    "no_choices": "no choices",
    "message_null": "no message",
    "numeric_content": "content is int",
}


@pytest.mark.parametrize("behaviour", sorted(BAD_200))
def test_a_bad_200_fails_only_its_own_request(behaviour):
    with FakeOpenAIServer(huge_chars=1000) as server:
        server.plan = [behaviour]
        annotator = fast_annotator(server, max_concurrency=1)  # the first request sent gets the bad answer
        annotations = annotator(distinct_requests(4))
    failed = [a for a in annotations if a.failed]
    assert len(failed) == 1 and all(len(a.spans) == 1 for a in annotations if not a.failed)
    error = failed[0].error
    assert error.startswith("server answered HTTP 200 with a body that is not a chat completion: "), error
    assert BAD_200[behaviour] in error, error
    assert "check --base-url" in error or "base_url" in error  # names the fix
    metrics = annotator.metrics()
    assert metrics["annotator/failures"] == 1 and metrics["annotator/invalid_responses"] == 1
    assert metrics["annotator/requests"] == 4 and metrics["annotator/spans"] == 3


def test_list_of_parts_content_is_read_and_string_usage_is_coerced():
    with FakeOpenAIServer() as server:
        server.plan = ["parts_content", "string_usage"]
        annotator = fast_annotator(server, max_concurrency=1)
        first, second = annotator(distinct_requests(2))
    assert not first.failed and not second.failed
    assert len(first.spans) == 1 and len(second.spans) == 1
    assert isinstance(second.usage["prompt_tokens"], int) and second.usage["prompt_tokens"] > 0
    assert (
        annotator.metrics()["annotator/prompt_tokens"] == first.usage["prompt_tokens"] + second.usage["prompt_tokens"]
    )


@pytest.mark.parametrize(
    ("body", "expect"),
    [
        (b"<html><body>login</body></html>", "not valid JSON"),
        (b"", "empty body"),
        (b"[1, 2]", "JSON list"),
        (b'"text"', "JSON str"),
        (b'{"choices": "x"}', "choices is str"),
        (b'{"choices": [7]}', "choice is int"),
        (b'{"choices": [{"message": {"content": null}}]}', "no content"),
        (b'{"choices": [{"message": {"content": [{"type": "image_url"}]}}]}', "no text part"),
        (b'{"error": {"message": "quota exceeded"}}', "an error object: quota exceeded"),
    ],
)
def test_read_chat_completion_rejects_what_is_not_a_completion(body, expect):
    with pytest.raises(BadResponseError, match=re.escape(expect)):
        read_chat_completion(body)


def test_read_chat_completion_reads_what_it_can():
    body = {
        "choices": [{"message": {"content": [{"type": "text", "text": "a"}, "b", {"text": "c"}]}, "finish_reason": 5}],
        "usage": {"prompt_tokens": "12", "completion_tokens": 3.0, "total_tokens": "many"},
    }
    answer = read_chat_completion(json.dumps(body).encode())
    assert answer.text == "abc" and answer.finish_reason is None
    assert answer.prompt_tokens == 12 and answer.completion_tokens == 3
    weird = read_chat_completion({"choices": [{"message": {"content": "x"}}], "usage": {"prompt_tokens": [1]}})
    assert weird.text == "x" and weird.prompt_tokens == 0 and weird.completion_tokens == 0


def test_no_exception_of_one_request_escapes_the_batch(monkeypatch):
    with FakeOpenAIServer() as server:
        annotator = fast_annotator(server)
        original = OpenAIAnnotator._annotate_one

        async def flaky(self, client, semaphore, request):
            if request.completion.startswith("Step 1:"):
                raise TypeError("a bug in one request's handling")
            return await original(self, client, semaphore, request)

        monkeypatch.setattr(OpenAIAnnotator, "_annotate_one", flaky)
        annotations = annotator(distinct_requests(3))
        assert [a.failed for a in annotations] == [False, True, False]
        assert "TypeError: a bug in one request's handling" in annotations[1].error
        assert annotator.metrics()["annotator/failures"] == 1

        async def interrupted(self, client, semaphore, request):
            raise KeyboardInterrupt

        monkeypatch.setattr(OpenAIAnnotator, "_annotate_one", interrupted)
        with pytest.raises(KeyboardInterrupt):
            annotator(distinct_requests(2))

        async def cancelled(self, client, semaphore, request):
            raise asyncio.CancelledError

        monkeypatch.setattr(OpenAIAnnotator, "_annotate_one", cancelled)
        with pytest.raises(asyncio.CancelledError):
            asyncio.run(annotator.acall(distinct_requests(1)))


# --- 2/3. deep nesting, huge answers, linear JSON extraction ------------------------------------------------------


def test_deeply_nested_answer_is_a_failure_not_a_crash():
    with FakeOpenAIServer() as server:
        server.plan = ["deep"]
        annotator = fast_annotator(server, max_concurrency=1)
        annotations = annotator(distinct_requests(2))
    assert annotations[0].failed and not annotations[1].failed
    assert annotations[0].error.startswith("malformed annotation: ")
    for text in ("[" * 5000, "{" * 5000 + "}" * 5000, '{"spans": ' + "[" * 50_000 + "]" * 50_000 + "}"):
        with pytest.raises(AnnotationParseError):  # RecursionError before the fix
            parse_annotation(text, make_request())


def test_huge_answer_is_refused_and_counted_then_parsed_fast_when_allowed():
    with FakeOpenAIServer(huge_chars=2_000_000) as server:
        server.default = "huge"
        annotator = fast_annotator(server)
        (refused,) = annotator(distinct_requests(1))
        assert refused.failed and "answer_too_long" in refused.error and str(MAX_ANSWER_CHARS) in refused.error
        assert "max_answer_chars" in refused.error  # names the fix
        assert annotator.metrics()["annotator/answers_too_long"] == 1
        allowed = fast_annotator(server, max_answer_chars=3_000_000)
        started = time.perf_counter()
        (annotation,) = allowed(distinct_requests(1))
        assert time.perf_counter() - started < 5.0
    assert not annotation.failed and len(annotation.spans) == 1
    with pytest.raises(AnswerTooLongError):
        extract_json("x" * (MAX_ANSWER_CHARS + 1))


def _timed(function, *args, **kwargs) -> float:
    started = time.perf_counter()
    try:
        function(*args, **kwargs)
    except AnnotationParseError:
        pass
    return time.perf_counter() - started


@pytest.mark.parametrize(
    "text",
    [
        "{" * 100_000,
        '{"' * 50_000,
        "<think>" * 20_000,
        "```" + " " * 100_000,
        "```json\n" * 20_000,
        '{"spans": [], "x": "' + "\\" * 100_000,
        ",}" * 50_000,
        "{}" * 50_000,
    ],
    ids=["braces", "brace-quote", "think", "fence-space", "fences", "backslashes", "commas", "empty-objects"],
)
def test_extract_json_is_fast_on_adversarial_answers(text):
    assert _timed(extract_json, text) < 0.5


def test_extract_json_time_is_linear_in_the_answer():
    payload = '{"spans": [{"quote": "x", "kind": "key"}], "diagnosis": null}'
    text = "Some thoughts about {braces} and \\(x\\) before the answer. " * 35_000 + payload  # ~2 MB
    started = time.perf_counter()
    assert extract_json(text, max_chars=None)["spans"] == [{"quote": "x", "kind": "key"}]
    assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"spans": [], "diagnosis": null}', {"spans": [], "diagnosis": None}),
        ('Note {"a": 1} then {"spans": [1],}', {"spans": [1]}),
        ('{"result": {"spans": [2]}}', {"spans": [2]}),
        ('Set {1, 2 and "quote. Answer: {"spans": [3]}', {"spans": [3]}),
        ('Let S = {x : x > 0. Answer: {"spans": [4]}', {"spans": [4]}),
        ('```json\n{"spans": [5]}\n```\n{"spans": [6]}', {"spans": [5]}),
        ('{"spans": [{"quote": "\\(x\\)"}]}', {"spans": [{"quote": "\\(x\\)"}]}),
        ('{"other": 1}', {"other": 1}),
        ('<think>{"spans": [0]}</think>{"spans": [7]}', {"spans": [7]}),
        ('{"spans": ["a}b{c"]}', {"spans": ["a}b{c"]}),
        ('{"spans": ["say \\"}\\" here"]}', {"spans": ['say "}" here']}),
    ],
)
def test_extract_json_keeps_its_tolerance(text, expected):
    assert extract_json(text) == expected


# --- 4. quote placement ---------------------------------------------------------------------------------------------


def reference_locate_quotes(text, quotes):
    """The previous quadratic algorithm, kept as the specification of the result."""
    spans, used, dropped, cursor = [], set(), 0, 0

    def next_unused(quote, kind, start):
        position = locate_quote(text, quote, start)
        while position is not None and (*position, kind) in used:
            position = locate_quote(text, quote, position[0] + 1)
        return position

    for quote, kind in quotes:
        position = next_unused(quote, kind, cursor)
        if position is None:
            position = next_unused(quote, kind, 0)
        if position is None or position[1] <= position[0]:
            dropped += 1
            continue
        used.add((*position, kind))
        spans.append(Span(position[0], position[1], kind))
        cursor = position[1]
    return spans, dropped


def test_locate_quotes_matches_the_reference_on_random_cases():
    rng = random.Random(0)
    alphabet = ["a", "b", "ab", " ", "\n", "  ", "ba", "x = 1"]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        quotes = []
        for _ in range(rng.randint(0, 8)):
            if text and rng.random() < 0.7:
                start = rng.randint(0, len(text) - 1)
                quote = text[start : start + rng.randint(1, 6)]
                if rng.random() < 0.3:
                    quote = quote.replace(" ", "\n").replace("\n\n", " ")
            else:
                quote = rng.choice(["a", "b a", " ", "zz", "ab  ab", ""])
            quotes.append((quote, rng.choice(["key", "error"])))
        assert locate_quotes(text, quotes) == reference_locate_quotes(text, quotes), (text, quotes)


def test_locate_quotes_is_near_linear_on_a_looping_rollout():
    line = "So we compute 3 * x = 6 again.\n"
    text = line * (12_000 // len(line))
    quotes = [("3 * x = 6", "key")] * 10_000 + [("compute  3 * x", "error")] * 200 + [("nowhere", "key")] * 100
    started = time.perf_counter()
    spans, dropped = locate_quotes(text, quotes)
    elapsed = time.perf_counter() - started
    occurrences = text.count("3 * x = 6")
    assert len(spans) == occurrences + 200 and dropped == 10_000 - occurrences + 100
    assert elapsed < 0.5, elapsed


# --- 5. redaction ---------------------------------------------------------------------------------------------------


def test_redact_removes_the_key_its_fragments_and_bearer_values():
    masked = CANARY[:3] + "*" * 20 + CANARY[-4:]
    text = (
        f"Error code: 401 - Incorrect API key provided: {masked}. You sent {CANARY}, i.e. ...{TAIL8} "
        f"or {CANARY[:14]}..., headers {{'Authorization': 'Bearer {CANARY}'}} authorization=xyz123 "
        "and another sk-proj-ABCDEFGHIJKLMNOPQRSTUV key; api_key: hunter22."
    )
    clean = redact(text, [CANARY])
    assert_no_secret(clean, "redact()")
    assert CANARY[:14] not in clean and "ABCDEFGHIJKLMNOP" not in clean and "xyz123" not in clean
    assert "hunter22" not in clean and REDACTED in clean
    assert clean.startswith("Error code: 401 - Incorrect API key provided: ")
    # Ordinary text stays readable; no secret and the placeholder change nothing.
    assert redact("HTTP 500 from the annotator server: Internal server error", [CANARY, "EMPTY", None]) == (
        "HTTP 500 from the annotator server: Internal server error"
    )


@pytest.mark.parametrize(
    "text", ["a" * 100_000, "a-" * 50_000, "api_key " * 20_000, "Bearer " * 20_000, "a b " * 25_000]
)
def test_redact_is_linear(text):
    started = time.perf_counter()
    redact(text, [CANARY])
    assert time.perf_counter() - started < 0.5


def test_key_echoed_by_the_server_reaches_no_error_log_file_or_page(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    for name in ("openai", "httpx", "httpx2", "httpcore", "trace_trl"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    monkeypatch.setenv("MY_KEY", CANARY)
    rollouts = tmp_path / "rollouts.jsonl"
    rows = [{"prompt": "What is 3x?", "completion": f"Step {i}: 3 * x = 6.", "is_correct": True} for i in range(3)]
    rollouts.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    output, page, cache = tmp_path / "out.jsonl", tmp_path / "out.html", tmp_path / "cache"
    with FakeOpenAIServer() as server:
        server.plan = ["401_echo", "echo_200"]
        argv = annotate_argv(rollouts, output, server)
        argv += ["--api-key-env", "MY_KEY", "--cache-dir", str(cache), "--quiet", "--max-concurrency", "1"]
        assert annotate_main(argv) == 0  # one of three annotated: a partial failure
        server.plan = ["401_echo", "echo_200"]
        annotator = fast_annotator(server, cache_dir=cache, max_concurrency=1)
        annotations = annotator([make_request("fresh one"), make_request("fresh two")])
    assert render_main([str(output), "-o", str(page)]) == 0
    written = read_jsonl(output)
    assert [row["error"] is None for row in written].count(False) == 2
    assert "HTTP 401" in written[0]["error"] and "Incorrect API key provided" in written[0]["error"]
    assert "put the right API key in $MY_KEY" in written[0]["error"]  # names the fix
    assert all(a.failed for a in annotations)
    for annotation in annotations:
        assert_no_secret(annotation.error, "Annotation.error")
    assert_no_secret(caplog.text, "the log")
    assert_no_secret(output.read_text(encoding="utf-8"), "the annotate JSONL")
    assert_no_secret(page.read_text(encoding="utf-8"), "the HTML page")
    for path in cache.rglob("*"):
        assert CANARY.encode() not in path.read_bytes() and TAIL8.encode() not in path.read_bytes(), path


# --- 7. structured output not honoured ------------------------------------------------------------------------------


def test_server_that_ignores_response_format_is_reported_once_and_never_cached(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="trace_trl")
    with FakeOpenAIServer() as server:
        server.default = "ignores_schema"
        annotator = fast_annotator(server, cache_dir=tmp_path)
        first = annotator(distinct_requests(3))
        second = annotator(distinct_requests(3))
        assert server.count == 6, "failed annotations are not cached: the rerun asks again"
        assert all(a.failed for a in first + second)
        assert "response_format" in first[0].error
        metrics = annotator.metrics()
        assert metrics["annotator/structured_output_ignored"] == 1
        assert metrics["annotator/format_failures"] == 6 and metrics["annotator/failures"] == 6
        warnings = [r for r in caplog.records if "does not honour" in r.getMessage()]
        assert len(warnings) == 1 and "response_format" in warnings[0].getMessage()
        server.default = "ok"
        assert not any(a.failed for a in annotator(distinct_requests(3)))
        assert server.count == 9
        # A server that honours the schema but answers malformed JSON is a format failure, not "ignored".
        honest = fast_annotator(server)
        server.plan = ["deep"]  # starts as the schema says, then is not valid JSON
        honest(distinct_requests(1))
        assert honest.metrics()["annotator/format_failures"] == 1
        assert honest.metrics()["annotator/structured_output_ignored"] == 0


# --- 8. trace-trl annotate exit code --------------------------------------------------------------------------------


def _rollouts(tmp_path, n=3):
    path = tmp_path / "rollouts.jsonl"
    rows = [{"prompt": "What is 3x?", "completion": f"Step {i}: 3 * x = 6.", "is_correct": True} for i in range(n)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_annotate_exits_non_zero_when_every_annotation_failed(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MY_KEY", CANARY)
    rollouts, output = _rollouts(tmp_path), tmp_path / "out.jsonl"
    with FakeOpenAIServer(default="401_echo") as server:
        argv = annotate_argv(rollouts, output, server)
        code = annotate_main([*argv, "--api-key-env", "MY_KEY", "--quiet", "--max-retries", "0"])
    captured = capsys.readouterr()
    assert code == 1
    assert len(read_jsonl(output)) == 3, "the rows are still written"
    assert "all 3 annotations failed" in captured.err and "HTTP 401" in captured.err
    assert_no_secret(captured.err + captured.out, "the console")

    with FakeOpenAIServer() as server:
        server.plan = ["500"]
        argv = annotate_argv(rollouts, output, server)
        code = annotate_main([*argv, "--quiet", "--max-retries", "0", "--max-concurrency", "1"])
    assert code == 0
    assert "1 of 3 annotations failed" in capsys.readouterr().err


def test_annotate_keeps_going_when_the_annotator_raises(tmp_path, capsys, monkeypatch):
    from trace_trl.scripts import annotate as annotate_script

    def broken(args):
        def annotate(requests):
            raise RuntimeError(f"boom with Bearer {CANARY}")

        return annotate

    monkeypatch.setitem(annotate_script.ANNOTATORS, "openai", broken)
    rollouts, output = _rollouts(tmp_path, n=5), tmp_path / "out.jsonl"
    code = annotate_main([str(rollouts), "-o", str(output), "--quiet", "--batch-size", "2"])
    rows = read_jsonl(output)
    assert code == 1 and len(rows) == 5 and all("RuntimeError: boom" in row["error"] for row in rows)
    assert_no_secret(output.read_text(encoding="utf-8") + capsys.readouterr().err, "annotate output")


# --- parse_annotation keeps its contract ----------------------------------------------------------------------------


def test_parse_annotation_refuses_too_long_answers():
    with pytest.raises(AnswerTooLongError, match="answer_too_long"):
        parse_annotation("x" * 20, make_request(), max_chars=10)


# --- in training ----------------------------------------------------------------------------------------------------


def test_training_goes_on_when_the_server_answers_html_for_some_requests(tiny_model_dir, tiny_tokenizer, tmp_path):
    from trainer_helpers import make_trainer, trace_config

    with FakeOpenAIServer() as server:
        # The preflight, then one request at a time: the first and third get a proxy page.
        server.plan = ["ok", "html_200", "ok", "html_200"]
        annotator = fast_annotator(server, max_concurrency=1)
        args = trace_config(tmp_path, max_steps=1, teacher_kind="live", annotate_unrouted_kinds=True)
        trainer = make_trainer(tiny_model_dir, tiny_tokenizer, args, annotator)
        trainer.train()
        asked = server.count
    assert trainer.state.global_step == 1
    (record,) = [r for r in trainer.state.log_history if "annotator/requests" in r]
    assert record["annotator/requests"] == 4 and asked >= 3
    assert record["annotator/invalid_responses"] == 2 and record["annotator/failures"] == 2
    assert record["trace/annotation_failures"] == 2, "the two failures are counted, the other rollouts annotated"
    assert record["annotator/spans"] + record["annotator/dropped_spans"] >= 1


def test_the_annotator_survives_an_interrupt_inside_its_own_event_loop(monkeypatch):
    """A KeyboardInterrupt in a request reaches the caller, and the annotator's loop thread still serves later calls."""
    with FakeOpenAIServer() as server:
        annotator = fast_annotator(server)
        original = OpenAIAnnotator._annotate_one

        async def interrupted(self, client, semaphore, request):
            raise KeyboardInterrupt

        monkeypatch.setattr(OpenAIAnnotator, "_annotate_one", interrupted)
        with pytest.raises(KeyboardInterrupt):
            annotator(distinct_requests(2))
        monkeypatch.setattr(OpenAIAnnotator, "_annotate_one", original)
        assert [a.failed for a in annotator(distinct_requests(2))] == [False, False]
        annotator.close()
