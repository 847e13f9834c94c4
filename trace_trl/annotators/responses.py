"""What came back from an OpenAI-compatible server: a chat-completion body read defensively into a [`ChatAnswer`].

A server may answer HTTP 200 with anything: an empty body, HTML, a JSON error object, a text completion, content as a
list of typed parts, token counts as strings. [`read_chat_completion`] turns every body that is not a usable chat
completion into one [`BadResponseError`] whose message says what it was instead (with a short preview), so the
annotator fails that request with a cause a user can act on, never with a `KeyError` deep in a background thread.
Beside [`trace_trl.annotators.redaction`], which makes sure such messages never carry a secret.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class BadResponseError(ValueError):
    """An HTTP 200 whose body is not a chat completion; the message describes what it is instead."""


@dataclass(frozen=True)
class ChatAnswer:
    """What the annotator needs of a chat completion: the answer's text, why it ended, and the token counts."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def read_chat_completion(body: Any, content_type: str | None = None) -> ChatAnswer:
    """Read the first choice of a chat-completion response body, whatever the server sent; never anything but
    `BadResponseError` for a body that is not one.

    `body` is the raw HTTP body (`bytes` or `str`), an already decoded JSON value, or a pydantic model of the
    `openai` client. Content given as a list of typed parts is read as the concatenation of its text parts. Token
    counts that are strings are converted; any other odd value counts as 0 (usage never fails a request).

    Raises:
        `BadResponseError`: the body is empty, not JSON, not a JSON object, an error object, or has no first choice
        with a message whose content is text (the message says which, with a short preview of the body).
    """
    if hasattr(body, "model_dump"):
        body = body.model_dump()
    if isinstance(body, (bytes, bytearray)):
        body = bytes(body).decode("utf-8", errors="replace")
    if isinstance(body, str):
        if not body.strip():
            raise BadResponseError(f"an empty body{_content_type(content_type)}")
        try:
            body = json.loads(body)
        except (ValueError, RecursionError):
            preview = body.strip()[:80]
            raise BadResponseError(f"not valid JSON{_content_type(content_type)}, starting {preview!r}") from None
    if not isinstance(body, Mapping):
        raise BadResponseError(f"a JSON {_type_name(body)} instead of an object")
    choices = body.get("choices")
    if choices is None and isinstance(body.get("error"), (Mapping, str)):
        error = body["error"]
        message = error.get("message", "") if isinstance(error, Mapping) else error
        raise BadResponseError(f"an error object: {str(message)[:200]}")
    if not isinstance(choices, list):
        raise BadResponseError("no choices" if choices is None else f"choices is {_type_name(choices)}")
    if not choices:
        raise BadResponseError("no choices (an empty list)")
    choice = choices[0]
    if not isinstance(choice, Mapping):
        raise BadResponseError(f"choice is {_type_name(choice)}")
    finish_reason = choice.get("finish_reason")
    finish_reason = finish_reason if isinstance(finish_reason, str) else None
    message = choice.get("message")
    if isinstance(message, Mapping):
        content = message.get("content")
    elif isinstance(choice.get("text"), str):  # a text-completion choice: read it all the same
        content = choice["text"]
    else:
        raise BadResponseError("no message in choices[0]" if message is None else f"message is {_type_name(message)}")
    if content is None:
        refusal = message.get("refusal") if isinstance(message, Mapping) else None
        if refusal:
            raise BadResponseError(f"no content: the model refused ({str(refusal)[:200]})")
        ending = f" (finish_reason {finish_reason!r})" if finish_reason else ""
        raise BadResponseError(f"no content in the message{ending}")
    if isinstance(content, list):
        parts = [_part_text(part) for part in content]
        if not any(part is not None for part in parts):
            raise BadResponseError("content is a list of parts with no text part")
        content = "".join(part for part in parts if part is not None)
    if not isinstance(content, str):
        raise BadResponseError(f"content is {_type_name(content)}")
    usage = body.get("usage")
    usage = usage if isinstance(usage, Mapping) else {}
    return ChatAnswer(
        text=content,
        finish_reason=finish_reason,
        prompt_tokens=_count(usage.get("prompt_tokens")),
        completion_tokens=_count(usage.get("completion_tokens")),
    )


def _part_text(part: Any) -> str | None:
    if isinstance(part, str):
        return part
    if (
        isinstance(part, Mapping)
        and isinstance(part.get("text"), str)
        and part.get("type", "text") in ("text", "output_text")
    ):
        return part["text"]
    return None


def _count(value: Any) -> int:
    """A token count from whatever the server sent: `12`, `12.0`, `"12"`; anything else is 0."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return 0
    if isinstance(value, (int, float)) and value == value and abs(value) != float("inf"):
        return max(0, int(value))
    return 0


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _content_type(content_type: str | None) -> str:
    return f" (Content-Type {content_type.split(';')[0].strip()})" if content_type else ""
