"""The two annotation protocols of `OpenAIAnnotator` and `SelfAnnotator`, chosen by `span_format`.

- `"segments"` (default, the paper's): the rollout is shown as numbered segments (`segments.split_segments`), the model
  answers segment numbers, a kind and a type label (`prompts.segment_response_schema`), and the numbers map back to
  exact spans (`parsing.parse_segment_annotation`). Prompt version `trace-annotator-segments-v1`.
- `"quotes"`: the model quotes the rollout verbatim and the quotes are placed in it (`parsing.parse_annotation`).
  Prompt version `trace-annotator-v1`, its prompt, parsing and cache keys unchanged; its diagnosis is checked against
  the taxonomy of the rollout's kind afterwards (`parsing.enforce_type_label`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .base import Annotation, AnnotationRequest
from .parsing import enforce_type_label, parse_annotation, parse_segment_annotation
from .prompts import build_messages, build_segment_messages
from .segments import Segment, render_numbered, split_segments


SPAN_FORMATS: tuple[str, ...] = ("segments", "quotes")

SEGMENT_REASK_MESSAGE = (
    "Your answer was not a valid JSON object of the requested form. Answer again with only the JSON object: "
    '{"segments": [{"id": <segment number>, "kind": "key" or "error"}], "type": "<label>" or null}'
)


def check_span_format(span_format: str) -> str:
    """`span_format` itself when it is `"segments"` or `"quotes"`; otherwise a `ValueError` naming the choices."""
    if span_format not in SPAN_FORMATS:
        raise ValueError(
            f"`span_format` must be 'segments' (numbered segments, the paper's protocol) or 'quotes' (verbatim "
            f"quotes), got {span_format!r}."
        )
    return span_format


@dataclass(frozen=True)
class ProtocolRequest:
    """The messages for one rollout and, for the segment protocol, the segments they number."""

    messages: list[dict[str, str]]
    segments: tuple[Segment, ...] | None


def protocol_request(
    request: AnnotationRequest,
    span_format: str,
    *,
    template: str | None,
    system_prompt: str | None,
    max_key_spans: int,
    max_segment_chars: int,
) -> ProtocolRequest:
    """Build the annotation prompt of `request` in the given protocol."""
    if span_format == "quotes":
        messages = build_messages(request, template=template, system_prompt=system_prompt, max_key_spans=max_key_spans)
        return ProtocolRequest(messages, None)
    segments = tuple(split_segments(request.completion, max_segment_chars))
    messages = build_segment_messages(
        request,
        render_numbered(request.completion, segments),
        template=template,
        system_prompt=system_prompt,
        max_key_spans=max_key_spans,
    )
    return ProtocolRequest(messages, segments)


def parse_protocol_answer(
    text: str, request: AnnotationRequest, built: ProtocolRequest, usage: Mapping[str, float] | None = None
) -> Annotation:
    """Parse an answer in the protocol `built` was made for; raises `AnnotationParseError` like the parsers."""
    if built.segments is None:
        return enforce_type_label(parse_annotation(text, request, usage=usage), request.is_correct)
    return parse_segment_annotation(text, request, built.segments, usage=usage)
