"""Place an annotator's verbatim quotes in the completion text, one after another (see `locate_quotes`)."""

from __future__ import annotations

from collections.abc import Sequence

from ..spans import Span, locate_quote


def locate_quotes(text: str, quotes: Sequence[tuple[str, str]]) -> tuple[list[Span], int]:
    """Place `(quote, kind)` pairs in `text`; return the spans found and how many quotes were dropped.

    Annotators list quotes in reading order, so each quote is searched first after the end of the previous placed
    span (a repeated quote therefore takes the next occurrence), then from the start of the text. An occurrence
    already used by an earlier quote of the same kind is skipped. A quote that cannot be placed is dropped and
    counted, never guessed.
    """
    spans: list[Span] = []
    used: set[tuple[int, int, str]] = set()
    dropped = 0
    cursor = 0
    for quote, kind in quotes:
        position = _next_unused(text, quote, kind, cursor, used)
        if position is None:
            position = _next_unused(text, quote, kind, 0, used)
        if position is None or position[1] <= position[0]:
            dropped += 1
            continue
        used.add((*position, kind))
        spans.append(Span(position[0], position[1], kind))  # type: ignore[arg-type]
        cursor = position[1]
    return spans, dropped


def _next_unused(
    text: str, quote: str, kind: str, start: int, used: set[tuple[int, int, str]]
) -> tuple[int, int] | None:
    position = locate_quote(text, quote, start)
    while position is not None and (*position, kind) in used:
        position = locate_quote(text, quote, position[0] + 1)
    return position
