"""The segmentation rule of the segment protocol: a completion as numbered segments with exact character offsets.

The paper's annotator sees the rollout split into numbered segments and answers segment numbers, which map back to
the token mask (DESIGN §2.9). The rule is ours, deterministic and linear in the length of the text:

1. **Lines.** The text is split at `"\\n"` (only there: `"\\r"`, form feeds and Unicode line separators stay inside a
   line). Each line is trimmed of leading and trailing whitespace (so `"\\r"` of `"\\r\\n"`, indentation and trailing
   spaces belong to no segment); a line that is empty or whitespace only is not a segment.
2. **Sentences.** A trimmed line longer than `max_segment_chars` characters is split at sentence ends: `.`, `?` or
   `!` followed by whitespace (so `3.14`, `x.y` and `1,000.5` never split, while `"e.g. x"` does), and `。`, `？`, `！`
   followed by anything. The punctuation stays with its sentence; the whitespace after it belongs to no segment.
3. **Words.** A sentence still longer than `max_segment_chars` is wrapped greedily at whitespace into pieces of at
   most `max_segment_chars` characters; a run without whitespace longer than that is cut every `max_segment_chars`
   characters.

So every segment is a non-empty `text[start:end]` that starts and ends with a non-whitespace character and holds no
`"\\n"`; segments do not overlap, are in reading order, and are numbered from 1. Whitespace between segments is in
none of them: a span of a segment labels the tokens that overlap its characters (`trace_trl.spans.token_labels`), so
a token like `" The"` whose space lies outside still counts through its letters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass


DEFAULT_MAX_SEGMENT_CHARS = 300

_LINE = re.compile(r"[^\n]+")
# A sentence end inside a long line: ASCII punctuation then whitespace (the whitespace is the match), or CJK
# full-width punctuation then optional whitespace.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])\s*(?=\S)")
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Segment:
    """One numbered segment: `text[start:end]` of the completion, numbered from 1 in reading order."""

    index: int
    start: int
    end: int

    def text(self, completion: str) -> str:
        return completion[self.start : self.end]

    def __len__(self) -> int:
        return self.end - self.start


def check_max_segment_chars(max_segment_chars: int) -> None:
    if not isinstance(max_segment_chars, int) or isinstance(max_segment_chars, bool) or max_segment_chars < 1:
        raise ValueError(f"`max_segment_chars` must be an int >= 1, got {max_segment_chars!r}.")


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    """`(start, end)` moved inwards past leading and trailing whitespace; `start >= end` when only whitespace."""
    piece = text[start:end]
    stripped_left = piece.lstrip()
    if not stripped_left:
        return end, end
    start += len(piece) - len(stripped_left)
    return start, end - (len(stripped_left) - len(stripped_left.rstrip()))


def _sentences(text: str, start: int, end: int) -> list[tuple[int, int]]:
    pieces = []
    for match in _SENTENCE_END.finditer(text, start, end):
        if match.start() > start:
            pieces.append((start, match.start()))
        start = match.end()
    if end > start:
        pieces.append((start, end))
    return pieces


def _wrap(text: str, start: int, end: int, width: int) -> list[tuple[int, int]]:
    """Greedy word wrap of `text[start:end]` (trimmed, no newline) into pieces of at most `width` characters.

    Each pass looks at the whitespace runs between the piece's start and its limit once, and the one run past the
    limit at most twice, so the whole wrap is linear in the length.
    """
    runs = [(match.start(), match.end()) for match in _WHITESPACE.finditer(text, start, end)]
    pieces = []
    first = 0  # index of the first run not yet behind the piece start
    while end - start > width:
        limit = start + width
        while first < len(runs) and runs[first][0] < start:
            first += 1
        best = None
        probe = first
        while probe < len(runs) and runs[probe][0] <= limit:
            best = probe
            probe += 1
        if best is None:  # no whitespace within reach: cut inside the word
            pieces.append((start, limit))
            start = limit
        else:
            pieces.append((start, runs[best][0]))
            start = runs[best][1]
            first = best + 1
    pieces.append((start, end))
    return pieces


def split_segments(text: str, max_segment_chars: int = DEFAULT_MAX_SEGMENT_CHARS) -> list[Segment]:
    """Split `text` into numbered segments by the rule in this module's docstring (linear time).

    Example:

    ```python
    >>> text = "Let x = 2.\\r\\n\\n  Then 3.14 * x = 6.28. So the answer is 6.28."
    >>> [text[s.start : s.end] for s in split_segments(text)]
    ['Let x = 2.', 'Then 3.14 * x = 6.28. So the answer is 6.28.']
    >>> [text[s.start : s.end] for s in split_segments(text, max_segment_chars=30)]
    ['Let x = 2.', 'Then 3.14 * x = 6.28.', 'So the answer is 6.28.']
    ```
    """
    check_max_segment_chars(max_segment_chars)
    bounds: list[tuple[int, int]] = []
    for line in _LINE.finditer(text):
        start, end = _trim(text, line.start(), line.end())
        if start >= end:
            continue
        if end - start <= max_segment_chars:
            bounds.append((start, end))
            continue
        for sentence_start, sentence_end in _sentences(text, start, end):
            if sentence_end - sentence_start <= max_segment_chars:
                bounds.append((sentence_start, sentence_end))
            else:
                bounds.extend(_wrap(text, sentence_start, sentence_end, max_segment_chars))
    return [Segment(index, start, end) for index, (start, end) in enumerate(bounds, start=1)]


def render_numbered(text: str, segments: Sequence[Segment]) -> str:
    """The segments as the annotator sees them, one per line: `[1] first segment`, `[2] ...`.

    The caller fences the result as data (`prompts.fence`), which also neutralizes marker-like text inside it.
    """
    return "\n".join(f"[{segment.index}] {text[segment.start : segment.end]}" for segment in segments)
