"""Place an annotator's verbatim quotes in the completion text, one after another (see `locate_quotes`)."""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Sequence

from ..spans import Span


def locate_quotes(text: str, quotes: Sequence[tuple[str, str]]) -> tuple[list[Span], int]:
    """Place `(quote, kind)` pairs in `text`; return the spans found and how many quotes were dropped.

    Annotators list quotes in reading order, so each quote is searched first after the end of the previous placed
    span (a repeated quote therefore takes the next occurrence), then from the start of the text. An occurrence
    already used by an earlier quote of the same kind is skipped. A quote that cannot be placed is dropped and
    counted, never guessed. Matching follows `spans.locate_quote` (exact first, then whitespace-normalized).

    Near-linear: the occurrences of each distinct quote are listed once, and used ones are skipped through a
    next-unused pointer per quote and kind, so a looping rollout quoted thousands of times costs about one scan of
    the text per distinct quote (the obvious search-and-skip loop is quadratic in the number of repeats).
    """
    spans: list[Span] = []
    used: set[tuple[int, int, str]] = set()
    occurrences: dict[str, _Occurrences] = {}
    pointers: dict[tuple[str, str, bool], _NextUnused] = {}
    dropped = 0
    cursor = 0
    for quote, kind in quotes:
        found = occurrences.get(quote)
        if found is None:
            found = occurrences[quote] = _Occurrences(text, quote)
        position = _next_unused(found, quote, kind, cursor, used, pointers)
        if position is None:
            position = _next_unused(found, quote, kind, 0, used, pointers)
        if position is None or position[1] <= position[0]:
            dropped += 1
            continue
        used.add((*position, kind))
        spans.append(Span(position[0], position[1], kind))  # type: ignore[arg-type]
        cursor = position[1]
    return spans, dropped


class _Occurrences:
    """Every place `spans.locate_quote(text, quote, start)` can return, for any `start`, in text order.

    `locate_quote` answers with the first exact occurrence at or after `start`, and only when there is none with the
    first whitespace-normalized match at or after `start`. So its answers are the exact occurrences (`exact`), then,
    once those are exhausted, the whitespace-normalized matches (`fuzzy`, listed on first need).
    """

    def __init__(self, text: str, quote: str) -> None:
        self.text = text
        self.words = quote.split()
        self.exact: list[tuple[int, int]] = []
        if not self.words:  # `locate_quote` finds nothing for an empty or whitespace-only quote
            return
        index = text.find(quote)
        while index >= 0:
            self.exact.append((index, index + len(quote)))
            index = text.find(quote, index + 1)
        self.exact_starts = [start for start, _ in self.exact]
        self._fuzzy: list[tuple[int, int]] | None = None

    @property
    def fuzzy(self) -> list[tuple[int, int]]:
        if self._fuzzy is None:
            self._fuzzy = []
            if self.words:
                pattern = re.compile(r"\s+".join(map(re.escape, self.words)))
                match = pattern.search(self.text)
                while match is not None:
                    self._fuzzy.append((match.start(), match.end()))
                    match = pattern.search(self.text, match.start() + 1)
            self.fuzzy_starts = [start for start, _ in self._fuzzy]
        return self._fuzzy


class _NextUnused:
    """The first not-yet-used index at or after `i` of a list, with path compression (amortized near O(1))."""

    def __init__(self, size: int) -> None:
        self.parent = list(range(size + 1))  # `size` is the sentinel: nothing left

    def find(self, index: int) -> int:
        root = index
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[index] != root:
            self.parent[index], index = root, self.parent[index]
        return root

    def remove(self, index: int) -> None:
        self.parent[index] = index + 1


def _next_unused(
    found: _Occurrences,
    quote: str,
    kind: str,
    start: int,
    used: set[tuple[int, int, str]],
    pointers: dict[tuple[str, str, bool], _NextUnused],
) -> tuple[int, int] | None:
    """The first occurrence `locate_quote` would reach from `start`, skipping those used by this kind."""
    if not found.words:
        return None
    position = _first_unused(found.exact, found.exact_starts, start, kind, used, pointers, (quote, kind, True))
    if position is not None:
        return position
    # Past the last exact occurrence, `locate_quote` falls back to the whitespace-normalized search.
    fuzzy_from = max(start, found.exact[-1][0] + 1) if found.exact else start
    return _first_unused(found.fuzzy, found.fuzzy_starts, fuzzy_from, kind, used, pointers, (quote, kind, False))


def _first_unused(
    positions: list[tuple[int, int]],
    starts: list[int],
    start: int,
    kind: str,
    used: set[tuple[int, int, str]],
    pointers: dict[tuple[str, str, bool], _NextUnused],
    key: tuple[str, str, bool],
) -> tuple[int, int] | None:
    if not positions:
        return None
    pointer = pointers.get(key)
    if pointer is None:
        pointer = pointers[key] = _NextUnused(len(positions))
    index = pointer.find(bisect_left(starts, start))
    while index < len(positions):
        position = positions[index]
        if (*position, kind) not in used:
            return position
        pointer.remove(index)  # used (by this quote or another of the same kind): never a candidate again
        index = pointer.find(index)
    return None
