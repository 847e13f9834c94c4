"""Place an annotator's verbatim quotes in the completion text.

PRIVATE, TEMPORARY: `_locate_quote` duplicates `trace_trl.spans.locate_quote` (written concurrently on another
branch) so that this branch runs on its own. At merge time, delete `_locate_quote` and point `locate_quotes` at
`trace_trl.spans.locate_quote`, which has the same signature and semantics.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..spans import Span


_WHITESPACE = re.compile(r"\s+")


def _normalize_with_offsets(text: str) -> tuple[str, list[int]]:
    """Collapse each whitespace run to one space; return the result and, per character, its offset in `text`."""
    chars: list[str] = []
    offsets: list[int] = []
    previous_space = False
    for i, char in enumerate(text):
        if char.isspace():
            if previous_space:
                continue
            chars.append(" ")
            previous_space = True
        else:
            chars.append(char)
            previous_space = False
        offsets.append(i)
    return "".join(chars), offsets


def _locate_quote(text: str, quote: str, start: int = 0) -> tuple[int, int] | None:
    """`[start, end)` of the first occurrence of `quote` in `text` at or after `start`, or `None`.

    Exact match first; then a match that ignores differences in whitespace (a run of spaces, tabs or newlines equals
    any other run), mapped back to offsets of the original text. Leading and trailing whitespace of the quote is
    ignored in the second pass.
    """
    if not quote:
        return None
    index = text.find(quote, start)
    if index >= 0:
        return index, index + len(quote)
    needle = _WHITESPACE.sub(" ", quote).strip()
    if not needle:
        return None
    normalized, offsets = _normalize_with_offsets(text)
    # First normalized position whose original offset is at or after `start`.
    normalized_start = next((i for i, offset in enumerate(offsets) if offset >= start), len(offsets))
    index = normalized.find(needle, normalized_start)
    if index < 0:
        return None
    return offsets[index], offsets[index + len(needle) - 1] + 1


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
    position = _locate_quote(text, quote, start)
    while position is not None and (*position, kind) in used:
        position = _locate_quote(text, quote, position[0] + 1)
    return position
