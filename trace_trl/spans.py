"""Character spans of a completion and their mapping onto completion tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


SpanKind = Literal["key", "error"]
SPAN_KINDS: tuple[str, ...] = ("key", "error")


@dataclass(frozen=True, order=True)
class Span:
    """A half-open character range ``[start, end)`` of the completion text, marked ``"key"`` or ``"error"``.

    Offsets index the completion exactly as the annotator received it, i.e.
    ``tokenizer.decode(completion_ids, skip_special_tokens=True)``.
    """

    start: int
    end: int
    kind: SpanKind

    def __post_init__(self) -> None:
        if self.kind not in SPAN_KINDS:
            raise ValueError(f"Span kind must be one of {SPAN_KINDS}, got {self.kind!r}.")
        if not (isinstance(self.start, int) and isinstance(self.end, int)):
            raise TypeError(f"Span offsets must be integers, got start={self.start!r}, end={self.end!r}.")
        if self.start < 0 or self.end < self.start:
            raise ValueError(f"Span needs 0 <= start <= end, got start={self.start}, end={self.end}.")

    def __len__(self) -> int:
        return self.end - self.start
