"""A real OpenAI-compatible HTTP server on 127.0.0.1 for offline tests and benchmarks, scriptable per request.

    with FakeOpenAIServer(latency=0.2) as server:
        server.plan = ["429", "ok"]            # first request: HTTP 429, then success; afterwards `server.default`
        annotator = OpenAIAnnotator("fake", base_url=server.base_url)

Behaviours: `"ok"` (JSON answer), `"prose"` (the JSON inside prose, a code fence and with a trailing comma),
`"malformed"`, `"missing"` (quotes that are not in the rollout), `"429"` (with `Retry-After`), `"500"`,
`"400_schema"` (rejects `response_format`), `"hang"` (answers after `hang_s`), `"close"` (closes the connection
without answering).

Hostile servers (`HOSTILE_BEHAVIOURS`), each answering HTTP 200 unless said otherwise: `"html_200"` (an HTML page),
`"empty_200"` (an empty JSON-typed body), `"invalid_200"` (truncated JSON), `"json_list"` (a JSON list),
`"no_choices"` (`choices: []`), `"message_null"`, `"numeric_content"` (`content: 42`), `"parts_content"` (the answer as
a list of typed parts, read as text), `"string_usage"` (usage counts as strings, answer fine), `"deep"` (a few KB of
nested brackets), `"huge"` (`huge_chars` of prose, then the JSON), `"401_echo"` (HTTP 401 that echoes the API key, in
full and masked as OpenAI does), `"echo_200"` (a prose answer that echoes the Authorization header),
`"ignores_schema"` (prose without JSON whatever `response_format` says, as `transformers serve` does).
Not hostile: `"reasoning_400"` (HTTP 400, as OpenAI's reasoning models answer a request with `max_tokens` or a temperature other
than 1; a request without them is answered normally). The answer's content comes from `server.answer(rollout, is_correct, body) -> dict`; by default
it quotes the rollout's first line.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


_ROLLOUT = re.compile(r"<<<ROLLOUT (\w+)>>>\n(.*)\n<<<END ROLLOUT \1>>>", re.DOTALL)
_VERDICT = re.compile(r"Verdict: (CORRECT|INCORRECT)")
HOSTILE_BEHAVIOURS = (
    "html_200",
    "empty_200",
    "invalid_200",
    "json_list",
    "no_choices",
    "message_null",
    "numeric_content",
    "parts_content",
    "string_usage",
    "deep",
    "huge",
    "401_echo",
    "echo_200",
    "ignores_schema",
)


@dataclass
class RecordedRequest:
    path: str
    headers: dict[str, str]
    raw_body: bytes

    @property
    def body(self) -> dict[str, Any]:
        return json.loads(self.raw_body)

    @property
    def user_message(self) -> str:
        return next(m["content"] for m in self.body["messages"] if m["role"] == "user")


def extract_rollout(user_message: str) -> str | None:
    match = _ROLLOUT.search(user_message)
    return match.group(2) if match else None


def default_answer(rollout: str, is_correct: bool, body: dict[str, Any]) -> dict[str, Any]:
    first_line = rollout.strip().split("\n")[0][:40].strip()
    return {
        "spans": [{"quote": first_line, "kind": "key" if is_correct else "error"}],
        "diagnosis": None if is_correct else "arithmetic_error",
    }


class FakeOpenAIServer:
    def __init__(
        self,
        *,
        latency: float = 0.0,
        default: str = "ok",
        retry_after: str | None = "0",
        hang_s: float = 3.0,
        huge_chars: int = 2_000_000,
        answer: Callable[[str, bool, dict[str, Any]], dict[str, Any]] = default_answer,
    ) -> None:
        self.latency = latency
        self.default = default
        self.retry_after = retry_after
        self.hang_s = hang_s
        self.huge_chars = huge_chars
        self.answer = answer
        self.plan: list[str] = []
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------------------------------

    def start(self) -> FakeOpenAIServer:
        handler = _make_handler(self)
        self._server = _Server(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._server is not None, "start() the server first"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    # --- scripting -----------------------------------------------------------------------------------------------

    def _next_behaviour(self) -> str:
        with self._lock:
            return self.plan.pop(0) if self.plan else self.default

    def _content(self, request: RecordedRequest, behaviour: str) -> str:
        user = request.user_message
        rollout = extract_rollout(user) or ""
        verdict = _VERDICT.search(user)
        is_correct = verdict is not None and verdict.group(1) == "CORRECT"
        if behaviour == "malformed":
            return "Sure! Here are the spans: spans = [quote: the first step"
        if behaviour == "ignores_schema":
            return "The rollout's key step is where it computes 3 * x. Overall the reasoning is sound and complete."
        if behaviour == "deep":
            return '{"spans": ' + "[" * 3000 + "]" * 3000 + ', "diagnosis": null}'
        if behaviour == "echo_200":
            return f"I was called with the header Authorization: {request.headers.get('authorization', '')}. No JSON."
        if behaviour == "missing":
            return json.dumps(
                {"spans": [{"quote": "this text is nowhere in the rollout", "kind": "key"}], "diagnosis": None}
            )
        payload = json.dumps(self.answer(rollout, is_correct, request.body), indent=1)
        if behaviour == "prose":
            payload = payload[:-1].rstrip() + ",\n}"  # a trailing comma
            return f"Here is my analysis.\n```json\n{payload}\n```\nHope this helps."
        if behaviour == "huge":
            filler = "The model thinks about {this} and {that} step at length. "
            return (filler * (self.huge_chars // len(filler) + 1))[: self.huge_chars] + "\n" + payload
        return payload


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # many concurrent connects must not overflow the listen backlog
    daemon_threads = True
    block_on_close = False


def _make_handler(server: FakeOpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like real servers
        disable_nagle_algorithm = (
            True  # headers and body go out in two writes: no 40 ms delayed-ACK stall between them
        )

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the default stderr log
            pass

        def _send_json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            try:
                self.wfile.write(data)
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _send_raw(self, status: int, data: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data)
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            recorded = RecordedRequest(self.path, {k.lower(): v for k, v in self.headers.items()}, raw)
            with server._lock:
                server.requests.append(recorded)
                server.in_flight += 1
                server.max_in_flight = max(server.max_in_flight, server.in_flight)
            try:
                self._answer(recorded)
            finally:
                with server._lock:
                    server.in_flight -= 1

        def _answer(self, recorded: RecordedRequest) -> None:
            if not self.path.endswith("/chat/completions"):
                self._send_json(404, {"error": {"message": "not found"}})
                return
            behaviour = server._next_behaviour()
            if server.latency:
                time.sleep(server.latency)
            if behaviour == "close":
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            if behaviour == "hang":
                server._stopping.wait(server.hang_s)
            if behaviour == "429":
                headers = {"Retry-After": server.retry_after} if server.retry_after is not None else {}
                self._send_json(429, {"error": {"message": "Rate limit reached", "type": "rate_limit"}}, headers)
                return
            if behaviour == "500":
                self._send_json(500, {"error": {"message": "Internal server error", "type": "server_error"}})
                return
            if behaviour == "400_schema" and "response_format" in recorded.body:
                message = "response_format of type json_schema is not supported by this model"
                self._send_json(400, {"error": {"message": message, "type": "invalid_request_error"}})
                return
            if behaviour == "reasoning_400" and self._reject_like_a_reasoning_model(recorded):
                return
            if self._answer_hostile(recorded, behaviour):
                return
            content = server._content(recorded, behaviour)
            prompt_chars = sum(len(m["content"]) for m in recorded.body["messages"])
            usage: dict[str, Any] = {"prompt_tokens": prompt_chars // 4, "completion_tokens": len(content) // 4}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            message: Any = {"role": "assistant", "content": content}
            if behaviour == "string_usage":
                usage = {name: str(value) for name, value in usage.items()}
            elif behaviour == "parts_content":
                message["content"] = [
                    {"type": "text", "text": content[:10]},
                    {"type": "image_url", "image_url": {"url": "data:,"}},
                    {"type": "text", "text": content[10:]},
                ]
            elif behaviour == "numeric_content":
                message["content"] = 42
            elif behaviour == "message_null":
                message = None
            choices = [] if behaviour == "no_choices" else [{"index": 0, "message": message, "finish_reason": "stop"}]
            self._send_json(
                200,
                {
                    "id": f"chatcmpl-{len(server.requests)}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": recorded.body.get("model", "fake"),
                    "choices": choices,
                    "usage": usage,
                },
            )

        def _reject_like_a_reasoning_model(self, recorded: RecordedRequest) -> bool:
            """OpenAI's answers to what its reasoning models do not accept; `False` when the request is acceptable."""
            body = recorded.body
            if "max_tokens" in body:
                message = (
                    "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
                    "'max_completion_tokens' instead."
                )
            elif body.get("temperature", 1) != 1:
                message = (
                    "Unsupported value: 'temperature' does not support 0.0 with this model. Only the default (1) "
                    "value is supported."
                )
            else:
                return False
            self._send_json(400, {"error": {"message": message, "type": "invalid_request_error", "param": None}})
            return True

        def _answer_hostile(self, recorded: RecordedRequest, behaviour: str) -> bool:
            """Answers that are not a chat completion at all; `False` when `behaviour` is not one of them."""
            if behaviour == "html_200":
                page = b"<!DOCTYPE html><html><head><title>Bad gateway</title></head><body><h1>Proxy login</h1></body></html>"
                self._send_raw(200, page, "text/html; charset=utf-8")
            elif behaviour == "empty_200":
                self._send_raw(200, b"", "application/json")
            elif behaviour == "invalid_200":
                self._send_raw(200, b'{"id": "chatcmpl-1", "choices": [{"message": {"content": "{', "application/json")
            elif behaviour == "json_list":
                self._send_raw(200, b'[{"choices": []}, 1, "two"]', "application/json")
            elif behaviour == "401_echo":
                key = recorded.headers.get("authorization", "").removeprefix("Bearer ")
                masked = key[:3] + "*" * max(0, len(key) - 7) + key[-4:]
                message = f"Incorrect API key provided: {masked}. You sent {key}. Find your key in your account."
                self._send_json(401, {"error": {"message": message, "type": "invalid_request_error"}})
            else:
                return False
            return True

    return Handler
