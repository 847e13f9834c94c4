"""The annotator protocol: the one deliberate extension point of trace-trl.

An annotator reads rollouts and marks where the privileged teacher should speak: key spans in correct rollouts,
error spans in incorrect ones, and optionally a coarse type label (`Annotation.diagnosis`, see `taxonomy`) that is
shown to the teacher (the span text and positions never are). Any callable ``annotator(requests) -> annotations`` works; classes may also implement ``bind(trainer)``
to reach the policy, its tokenizer or its generation backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..spans import Span


if TYPE_CHECKING:
    from ..trainer import TRACETrainer

Prompt = str | list[dict[str, Any]]


@dataclass(frozen=True)
class AnnotationRequest:
    """One rollout to annotate.

    Args:
        prompt (`str` or `list[dict]`):
            The problem as the student saw it: plain text, or a list of chat messages.
        completion (`str`):
            The rollout text exactly as ``tokenizer.decode(completion_ids, skip_special_tokens=True)`` gives it.
            Span offsets refer to this string.
        is_correct (`bool`):
            Whether the rollout's reward reached ``correct_reward_threshold``.
        reward (`float`):
            The rollout's total (weighted) reward; NaN when no reward function scored it.
        privileged_context (`str`, *optional*):
            The privileged context of the problem (e.g. a reference solution); never shown to the student.
        metadata (`dict`, *optional*):
            Free-form extras (e.g. the dataset row's answer, the group index).
        token_offsets (`tuple[tuple[int, int], ...]`, *optional*):
            The character range of `completion` that each completion token covers (`trace_trl.spans.token_char_offsets`
            of the rollout's own ids), set by the trainer. The trainer labels every token a span touches, so an
            annotator that must keep clear of some tokens (the inverted control) reads token boundaries here.
    """

    prompt: Prompt
    completion: str
    is_correct: bool
    reward: float
    privileged_context: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    token_offsets: tuple[tuple[int, int], ...] | None = None

    @property
    def problem_text(self) -> str:
        """The problem as plain text: the prompt string, or the content of the last user message."""
        return prompt_to_text(self.prompt)


@dataclass(frozen=True)
class Annotation:
    """What an annotator says about one rollout.

    Args:
        spans (`tuple[Span, ...]`):
            Character spans of the completion text, each ``"key"`` or ``"error"``.
        diagnosis (`str`, *optional*):
            The coarse **type label** of the rollout, from the taxonomy of its kind (`annotators.taxonomy`:
            ``KEY_STEP_TYPES`` for a correct rollout, e.g. ``"case_analysis"``; ``ERROR_TYPES`` for an incorrect one,
            e.g. ``"arithmetic_error"``). The only part of the annotation shown to the teacher, in the words of
            `describe_type_label`; check it with `check_type_label`.
        error (`str`, *optional*):
            Set when annotation failed; the rollout then trains as pure GRPO (see ``annotation_failure``).
        dropped_spans (`int`):
            Spans the annotator proposed but could not place in the completion (e.g. a quote not found).
        usage (`dict`, *optional*):
            Cost accounting (tokens, latency) for metrics.
    """

    spans: tuple[Span, ...] = ()
    diagnosis: str | None = None
    error: str | None = None
    dropped_spans: int = 0
    usage: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Accept any iterable of spans but store an immutable tuple so annotations can be cached and compared.
        object.__setattr__(self, "spans", tuple(self.spans))

    @property
    def failed(self) -> bool:
        return self.error is not None

    @classmethod
    def failure(cls, error: str, **kwargs: Any) -> Annotation:
        return cls(spans=(), diagnosis=None, error=error, **kwargs)


@runtime_checkable
class Annotator(Protocol):
    """Anything called with a batch of requests that returns one annotation per request, in order."""

    def __call__(self, requests: Sequence[AnnotationRequest]) -> list[Annotation]: ...


def prompt_to_text(prompt: Prompt) -> str:
    """Plain text of a prompt: the string itself, or the last user message of a conversation."""
    if isinstance(prompt, str):
        return prompt
    for message in reversed(prompt):
        if message.get("role") == "user":
            return content_to_text(message.get("content", ""))
    return "\n".join(content_to_text(m.get("content", "")) for m in prompt)


def content_to_text(content: Any) -> str:
    """Text of a chat message's content, which is a string or a list of typed parts (text, image, ...)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return str(content)


def bind_annotator(annotator: Any, trainer: TRACETrainer) -> None:
    """Give an annotator that wants it a handle on the trainer (policy, tokenizer, generation backend)."""
    bind = getattr(annotator, "bind", None)
    if callable(bind):
        bind(trainer)


class AnnotatorPreflightError(RuntimeError):
    """The annotator's server failed the one-request check before training (unreachable, not a chat-completions
    endpoint, or it rejected the request); the message says why and what to do."""


# Attributes under which the built-in wrappers keep the annotator they build on (`RandomSpanAnnotator(like=...)`,
# `InvertedSpanAnnotator(base)`), so that a preflight reaches the server behind them.
_WRAPPED_ANNOTATOR_ATTRIBUTES = ("like", "base")


def preflight_annotator(annotator: Any) -> bool:
    """Run the annotator's `preflight()` (or that of the annotator it wraps); `False` when it has none (no server).

    Raises:
        `AnnotatorPreflightError`: the server is unreachable, answers something that is not a chat completion, or
        rejects the request.
    """
    seen: set[int] = set()
    while annotator is not None and id(annotator) not in seen:
        seen.add(id(annotator))
        preflight = getattr(annotator, "preflight", None)
        if callable(preflight):
            preflight()
            return True
        annotator = next(
            (getattr(annotator, name) for name in _WRAPPED_ANNOTATOR_ATTRIBUTES if getattr(annotator, name, None)),
            None,
        )
    return False
