"""`trace-trl annotate` / `trace-trl render`, the HTML page, the statistics and the Jupyter view."""

from __future__ import annotations

import json

import pytest
from fake_openai_server import FakeOpenAIServer

from trace_trl.annotators import Annotation, AnnotationRequest
from trace_trl.cli import main as cli_main
from trace_trl.inspection import (
    AnnotationView,
    annotation_row,
    annotation_statistics,
    read_jsonl,
    render_annotations_html,
)
from trace_trl.scripts.annotate import main as annotate_main
from trace_trl.scripts.render import main as render_main
from trace_trl.spans import Span


XSS = "<script>alert('pwned')</script>"
ROWS = [
    {"question": "What is 2 + 3?", "answer": "I add: 2 + 3 = 5. Done.", "ok": True, "solution": "5"},
    {"question": "What is 4 * 3?", "answer": f"4 * 3 = 7. {XSS}", "ok": 0.0, "solution": "12"},
    {"question": "What is 9 - 1?", "answer": "It is 8.", "ok": "true", "solution": ""},
]


def answer(rollout: str, is_correct: bool, body: dict) -> dict:
    if "2 + 3 = 5" in rollout:
        return {
            "spans": [{"quote": "2 + 3 = 5", "kind": "key"}, {"quote": "not there", "kind": "key"}],
            "diagnosis": None,
        }
    if "4 * 3 = 7" in rollout:
        return {"spans": [{"quote": "4 * 3 = 7", "kind": "error"}], "diagnosis": "arithmetic_error"}
    return {"spans": [{"quote": "It is 8", "kind": "error"}], "diagnosis": None}  # wrong kind for a correct rollout


@pytest.fixture
def rollouts_file(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    return path


def run_annotate(server, rollouts_file, output, *extra):
    argv = [
        str(rollouts_file), "-o", str(output), "--annotator", "openai", "--span-format", "quotes", "--model", "fake", "--base-url", server.base_url,
        "--prompt-column", "question", "--completion-column", "answer", "--correct-column", "ok",
        "--reference-column", "solution", "--batch-size", "2", "--max-retries", "0", "--quiet", *extra,
    ]  # fmt: skip
    return annotate_main(argv)


def test_annotate_then_render(tmp_path, rollouts_file, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    output = tmp_path / "annotations.jsonl"
    with FakeOpenAIServer(answer=answer) as server:
        assert run_annotate(server, rollouts_file, output, "--cache-dir", str(tmp_path / "cache"), "--all-kinds") == 0
        assert server.count == 3
        assert "Rollout:\n<<<ROLLOUT" in server.requests[1].user_message
        assert "Reference solution:\n<<<REFERENCE" in server.requests[0].user_message
    assert "Wrote 3 annotations" in capsys.readouterr().out

    rows = read_jsonl(output)
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert [r["is_correct"] for r in rows] == [True, False, True]
    first, second, third = rows
    start = ROWS[0]["answer"].index("2 + 3 = 5")
    assert first["spans"] == [[start, start + 9, "key", "2 + 3 = 5"]] and first["dropped_spans"] == 1
    assert first["prompt"] == "What is 2 + 3?" and first["reference"] == "5" and first["error"] is None
    assert second["spans"][0][2:] == ["error", "4 * 3 = 7"] and second["diagnosis"] == "arithmetic_error"
    assert third["reference"] is None and third["spans"][0][2] == "error"

    page = tmp_path / "page.html"
    assert render_main([str(output), "-o", str(page)]) == 0
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "<style>" in text
    assert "<script>" not in text and "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;" in text
    assert '<mark class="span-key" title="key span">2 + 3 = 5</mark>' in text
    assert '<mark class="span-error" title="error span">4 * 3 = 7</mark>' in text
    assert 'class="span-ignored"' in text  # the wrong-kind span on the third rollout
    assert "arithmetic_error" in text and "badge correct" in text and "badge incorrect" in text
    assert "span char fraction" in text and "dropped quote rate" in text and "failure rate" in text
    # Self-contained: no external assets.
    assert "http://" not in text and "https://" not in text and "<link" not in text and "src=" not in text


@pytest.mark.parametrize(
    ("flags", "sent"),
    [([], [0, 2]), (["--key-span-action", "grpo", "--error-span-action", "rkl"], [1]), (["--all-kinds"], [0, 1, 2])],
    ids=["trace-fkl", "trace-rkl", "all-kinds"],
)
def test_annotate_sends_only_the_kinds_the_actions_route(tmp_path, rollouts_file, capsys, flags, sent):
    output = tmp_path / "annotations.jsonl"
    with FakeOpenAIServer(answer=answer) as server:
        assert run_annotate(server, rollouts_file, output, *flags) == 0
        assert server.count == len(sent)
    rows = read_jsonl(output)
    assert len(rows) == 3, "every rollout gets a row"
    assert [r["index"] for r in rows if r["annotated"]] == sent
    assert all(r["spans"] == [] and r["error"] is None for r in rows if not r["annotated"])
    out = capsys.readouterr().out
    assert f'"annotated": {len(sent)}' in out
    if len(sent) < 3:
        assert f"{3 - len(sent)} not sent because their kind is not routed" in out


def test_annotate_with_failures_and_rerun_from_cache(tmp_path, rollouts_file):
    output = tmp_path / "annotations.jsonl"
    cache = str(tmp_path / "cache")
    with FakeOpenAIServer(answer=answer, default="500") as server:
        run_annotate(server, rollouts_file, output, "--cache-dir", cache)
        assert all(r["error"] and "HTTP 500" in r["error"] for r in read_jsonl(output) if r["annotated"])
        server.default = "ok"
        run_annotate(server, rollouts_file, output, "--cache-dir", cache)
        run_annotate(server, rollouts_file, output, "--cache-dir", cache)
        assert server.count == 4  # 2 correct rollouts sent per run (TRACE-FKL); the third run is served from the cache
    assert all(r["error"] is None for r in read_jsonl(output))


def test_cli_dispatches_to_inspection(tmp_path, rollouts_file):
    output = tmp_path / "out.jsonl"
    with FakeOpenAIServer(answer=answer) as server:
        argv = ["annotate", str(rollouts_file), "-o", str(output), "--model", "fake", "--base-url", server.base_url]
        argv += ["--span-format", "quotes"]
        argv += ["--prompt-column", "question", "--completion-column", "answer", "--correct-column", "ok", "--quiet"]
        assert cli_main(argv) == 0
    assert cli_main(["render", str(output)]) == 0
    assert (tmp_path / "out.html").exists()


def test_heuristic_annotator_from_the_cli(tmp_path, rollouts_file):
    pytest.importorskip("trace_trl.annotators.heuristic", reason="heuristic annotators are on another branch")
    output = tmp_path / "out.jsonl"
    argv = [str(rollouts_file), "-o", str(output), "--annotator", "all-tokens", "--quiet"]
    argv += ["--prompt-column", "question", "--completion-column", "answer", "--correct-column", "ok"]
    assert annotate_main(argv) == 0
    assert len(read_jsonl(output)) == 3


def statistics_rows() -> list[dict]:
    request_ok = AnnotationRequest("p", "abcdefghij", True, 1.0)
    request_bad = AnnotationRequest("p", "0123456789", False, 0.0)
    return [
        # Overlapping key spans cover 6 characters; the error span in a correct rollout is ignored.
        annotation_row(
            request_ok, Annotation(spans=(Span(0, 4, "key"), Span(2, 6, "key"), Span(8, 9, "error")), dropped_spans=1)
        ),
        annotation_row(request_bad, Annotation(spans=(Span(5, 7, "error"),), diagnosis="logical_gap")),
        annotation_row(request_bad, Annotation.failure("timeout")),
        annotation_row(request_ok, Annotation()),
    ]


def test_annotation_statistics():
    stats = annotation_statistics(statistics_rows())
    assert stats["rollouts"] == 4 and stats["failure_rate"] == 0.25 and stats["correct_fraction"] == 0.5
    assert stats["spans_per_rollout"] == 1.0 and stats["key_spans"] == 2 and stats["error_spans"] == 2
    assert stats["wrong_kind_spans"] == 1
    assert stats["dropped_quote_rate"] == 1 / 5
    assert stats["span_char_fraction"] == (6 + 2) / 40
    assert stats["diagnoses"] == {"logical_gap": 1}
    assert annotation_statistics([])["rollouts"] == 0


def test_span_token_fraction(tiny_tokenizer, monkeypatch):
    import trace_trl.spans

    if not hasattr(trace_trl.spans, "token_labels"):
        # Until the spans branch lands: a test double with the documented contract (prefix-decoding offsets).
        def token_labels(completion_ids, spans, tokenizer):
            labels, previous = [], 0
            for k in range(1, len(completion_ids) + 1):
                end = len(tokenizer.decode(completion_ids[:k], skip_special_tokens=True))
                kinds = {s.kind for s in spans if s.start < end and previous < s.end}
                labels.append(2 if "error" in kinds else 1 if "key" in kinds else 0)
                previous = end
            return labels

        monkeypatch.setattr(trace_trl.spans, "token_labels", token_labels, raising=False)
    text = "Compute 6 * 7. We have 6 * 7 = 42"
    rows = [
        annotation_row(AnnotationRequest("p", text, True, 1.0), Annotation(spans=(Span(0, len(text), "key"),))),
        annotation_row(AnnotationRequest("p", text, False, 0.0), Annotation.failure("x")),
    ]
    assert annotation_statistics(rows, tokenizer=tiny_tokenizer)["span_token_fraction"] == 0.5
    assert "span token fraction" in render_annotations_html(rows, tokenizer=tiny_tokenizer)


def test_jupyter_view_and_fragment():
    rows = statistics_rows()
    view = AnnotationView(rows, max_rows=2)
    fragment = view._repr_html_()
    assert fragment.startswith("<style>") and "<html" not in fragment
    assert fragment.count('<div class="rollout">') == 2 and "2 more rollouts not shown" in fragment
    assert "annotation failed: timeout" in render_annotations_html(rows)
    assert view.statistics()["rollouts"] == 4
    requests = [AnnotationRequest("p", "abc", True, 1.0)]
    assert AnnotationView.from_annotations(requests, [Annotation(spans=(Span(0, 1, "key"),))]).rows[0]["spans"] == [
        [0, 1, "key", "a"]
    ]
