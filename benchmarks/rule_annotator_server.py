"""The replication study's "strong API": a rule-based grader behind a local OpenAI-compatible HTTP server.

`OpenAIAnnotator(span_format="segments")` sends it exactly what it would send a real model: a system prompt and a
user message holding the fenced problem, the fenced reference solution, the verdict and the rollout as numbered
segments. The server reads the reference solution and the numbered rollout out of that message and answers the JSON
the segment schema asks for, so the whole annotation path (HTTP, concurrency, parsing, segment-to-span mapping, the
type-label check) runs as it would against a real API.

The rules, for the chain-arithmetic task of `replication.py` (one step per line, `"7 + 5 = 12"`, then
`"\\boxed{12}"`):

- **correct rollout**: the key segments are the step that obtains the final value (the last equation) and the
  segment stating the boxed answer, in that order; type `computation`.
- **incorrect rollout**: the first segment that departs from the reference, with the error's type: an equation
  whose operands match the reference step but whose result is wrong (`arithmetic_error`); an equation on other
  operands (`misread_problem`); a line that is not an equation where a step was due (`wrong_method`); every step
  right but the boxed answer wrong (`format_error`); the rollout stops before its answer (`incomplete`, on the last
  segment).

Start it with `RuleAnnotatorServer().start()` (or as a context manager); `base_url` is what `OpenAIAnnotator` needs.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


_FENCED = r"<<<{name} (\w+)>>>\n(.*?)\n<<<END {name} \1>>>"
_ROLLOUT = re.compile(_FENCED.format(name="ROLLOUT"), re.DOTALL)
_REFERENCE = re.compile(_FENCED.format(name="REFERENCE"), re.DOTALL)
_VERDICT = re.compile(r"^Verdict: (CORRECT|INCORRECT)$", re.MULTILINE)
_NUMBERED = re.compile(r"^\[(\d+)\] (.*)$")
_EQUATION = re.compile(r"^\s*(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")

Step = tuple[int, str, int, int]  # (left operand, operator, right operand, result)


def parse_steps(text: str) -> tuple[list[Step], str | None]:
    """The equations of a reference solution, in order, and its boxed answer (or `None`)."""
    steps = []
    for line in text.split("\n"):
        match = _EQUATION.match(line)
        if match:
            steps.append((int(match[1]), match[2], int(match[3]), int(match[4])))
    boxed = _BOXED.search(text)
    return steps, (boxed[1].strip() if boxed else None)


def _apply(left: int, op: str, right: int) -> int:
    return left + right if op == "+" else left - right if op == "-" else left * right


def grade_segments(reference: str, segments: list[tuple[int, str]], is_correct: bool) -> dict[str, Any]:
    """The segment answer for one rollout: `{"segments": [{"id", "kind"}], "type": label}`.

    `segments` are `(number, text)` in reading order, as the annotator numbered them. A pure function; see the module
    docstring for the rules.
    """
    ref_steps, ref_answer = parse_steps(reference)
    if is_correct:
        chosen = []
        equations = [number for number, text in segments if _EQUATION.match(text)]
        if equations:
            chosen.append(equations[-1])
        boxed = [number for number, text in segments if _BOXED.search(text)]
        if boxed and boxed[-1] not in chosen:
            chosen.append(boxed[-1])
        return {"segments": [{"id": n, "kind": "key"} for n in chosen], "type": "computation"}

    def error(number: int, label: str) -> dict[str, Any]:
        return {"segments": [{"id": number, "kind": "error"}], "type": label}

    if not segments:
        return {"segments": [], "type": "incomplete"}
    step = 0
    for number, text in segments:
        boxed = _BOXED.search(text)
        match = _EQUATION.match(text)
        if match:
            left, op, right, result = int(match[1]), match[2], int(match[3]), int(match[4])
            if step >= len(ref_steps):
                return error(number, "wrong_method")  # a step more than the reference needs
            ref_left, ref_op, ref_right, _ = ref_steps[step]
            if (left, op, right) != (ref_left, ref_op, ref_right):
                return error(number, "misread_problem")
            if result != _apply(left, op, right):
                return error(number, "arithmetic_error")
            step += 1
            continue
        if boxed:
            if step < len(ref_steps):
                return error(number, "wrong_method")  # answered before doing every step
            if boxed[1].strip() != ref_answer:
                return error(number, "format_error")  # every step right, the stated answer is not their result
            continue
        return error(number, "wrong_method")  # prose or garbage where a step was due
    return error(segments[-1][0], "incomplete")


def answer_for_message(user_message: str) -> dict[str, Any]:
    """Read the reference, the verdict and the numbered rollout out of the segment prompt, and grade them."""
    reference = _REFERENCE.search(user_message)
    verdict = _VERDICT.search(user_message)
    rollout = _ROLLOUT.search(user_message)
    segments = []
    if rollout:
        for line in rollout[2].split("\n"):
            numbered = _NUMBERED.match(line)
            if numbered:
                segments.append((int(numbered[1]), numbered[2]))
    return grade_segments(reference[2] if reference else "", segments, verdict is not None and verdict[1] == "CORRECT")


class RuleAnnotatorServer:
    """`/v1/chat/completions` on 127.0.0.1 (a free port), answering with `answer_for_message`; counts requests."""

    def __init__(self) -> None:
        self.requests = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> RuleAnnotatorServer:
        self._server = _Server(("127.0.0.1", 0), _make_handler(self))
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> RuleAnnotatorServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("start() the server first")
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"


class _Server(ThreadingHTTPServer):
    request_queue_size = 256
    daemon_threads = True
    block_on_close = False


def _make_handler(owner: RuleAnnotatorServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the stderr access log
            pass

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if not self.path.endswith("/chat/completions"):
                self._send(404, {"error": {"message": "not found"}})
                return
            with owner._lock:
                owner.requests += 1
            user = next((m["content"] for m in body.get("messages", []) if m.get("role") == "user"), "")
            content = json.dumps(answer_for_message(user))
            self._send(
                200,
                {
                    "id": f"chatcmpl-{owner.requests}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", "rule-annotator"),
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                    ],
                    "usage": {
                        "prompt_tokens": len(user) // 4,
                        "completion_tokens": len(content) // 4,
                        "total_tokens": (len(user) + len(content)) // 4,
                    },
                },
            )

    return Handler
