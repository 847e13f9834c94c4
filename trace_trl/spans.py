"""Character spans of a completion and their mapping onto completion tokens."""

from __future__ import annotations

import codecs
import re
import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Literal

import numpy as np


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


# ---------------------------------------------------------------------------------------------------------------------
# Token -> character offsets
# ---------------------------------------------------------------------------------------------------------------------
#
# `token_char_offsets` answers "which characters of `decode(completion_ids, skip_special_tokens=True)` does each token
# produce?". The fast path reproduces what a byte-level BPE decoder (🤗 tokenizers' `ByteLevel`) does:
#
#   1. each vocabulary token string is mapped back to its bytes through the inverse of GPT-2's `bytes_to_unicode`;
#   2. added tokens that are not special (e.g. Qwen3's `<think>`) are inserted literally, and the byte runs between
#      them are decoded separately (that is how `tokenizers.Tokenizer.decode` works since 0.20);
#   3. skipped special tokens produce nothing and do not split a byte run;
#   4. each byte run is decoded as UTF-8 with `errors="replace"` (maximal-subpart rule, as Rust's `from_utf8_lossy`),
#      remembering the byte range of every output character, and a token covers every character whose bytes it touches.
#
# The result is then checked against the tokenizer's own `decode`; on any mismatch the exact (slower) prefix-decoding
# method is used instead, so the answer never depends on the fast path's assumptions.

_REPLACE_ERRORS = "trace_trl.spans.record_replace"
_replacements = threading.local()


def _record_replacement(error: UnicodeError) -> tuple[str, int]:
    # Same output as errors="replace" (Python's UTF-8 decoder reports each maximal invalid subpart as one error), but
    # we also learn which bytes each U+FFFD stands for.
    if not isinstance(error, UnicodeDecodeError):
        raise error
    _replacements.events.append((error.start, error.end))
    return "\ufffd", error.end


codecs.register_error(_REPLACE_ERRORS, _record_replacement)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, used by every byte-level BPE vocabulary."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


_UNICODE_TO_BYTE: dict[str, int] = {char: byte for byte, char in _bytes_to_unicode().items()}


def _token_bytes(token: str) -> bytes:
    # Mirrors tokenizers' ByteLevel decoder: a token with a character outside the table contributes its UTF-8 bytes.
    try:
        return bytes(_UNICODE_TO_BYTE[char] for char in token)
    except KeyError:
        return token.encode("utf-8")


@dataclass
class _VocabularyInfo:
    """What the fast path needs to know about a tokenizer, filled lazily (only ids actually seen are converted)."""

    size: int
    skipped: frozenset[int]  # dropped by decode(skip_special_tokens=True)
    special: frozenset[int]  # labelled 0 and given an empty range: skipped ids plus `all_special_ids`
    added: dict[int, str]  # added tokens kept by decode: inserted literally
    byte_level: bool
    pieces: dict[int, bytes | None] = field(default_factory=dict)


_VOCABULARY_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _vocabulary_info(tokenizer: Any) -> _VocabularyInfo:
    size = len(tokenizer)
    try:
        info = _VOCABULARY_CACHE.get(tokenizer)
    except TypeError:  # not weak-referenceable / not hashable: no caching
        info = None
    if info is not None and info.size == size:
        return info
    added_tokens = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    skipped = {int(i) for i, token in added_tokens.items() if getattr(token, "special", False)}
    special = frozenset(skipped | {int(i) for i in getattr(tokenizer, "all_special_ids", ())})
    added = {int(i): str(token) for i, token in added_tokens.items() if int(i) not in skipped}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None) if backend is not None else None
    # Only a plain ByteLevel decoder is reproduced; anything else (Metaspace, WordPiece, sequences) goes exact.
    byte_level = backend is None or type(decoder).__name__ == "ByteLevel"
    info = _VocabularyInfo(size=size, skipped=frozenset(skipped), special=special, added=added, byte_level=byte_level)
    try:
        _VOCABULARY_CACHE[tokenizer] = info
    except TypeError:
        pass
    return info


def _as_id_list(completion_ids: Sequence[int]) -> list[int]:
    if hasattr(completion_ids, "tolist"):  # torch / numpy
        completion_ids = completion_ids.tolist()
    return [int(i) for i in completion_ids]


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def _char_byte_starts(text: str, events: list[tuple[int, int]]) -> np.ndarray:
    """Byte offset at which each character of `text` starts in the bytes it was decoded from."""
    if not events:
        # Valid UTF-8: a character's byte length follows from its code point (vectorized).
        code_points = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        lengths = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
        starts = np.zeros(len(text), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        return starts
    # Some bytes were replaced: a U+FFFD decoded where a replacement event starts spans that event's bytes, any other
    # character (a genuine U+FFFD included) spans its UTF-8 length.
    starts = np.empty(len(text), dtype=np.int64)
    position, event = 0, 0
    for index, char in enumerate(text):
        starts[index] = position
        if event < len(events) and events[event][0] == position:
            position = events[event][1]
            event += 1
        else:
            position += len(char.encode("utf-8"))
    return starts


def _byte_level_token_char_offsets(ids: list[int], tokenizer: Any, text: str) -> list[tuple[int, int]] | None:
    """Fast path for byte-level BPE tokenizers, O(n) in tokens plus bytes; `None` when it cannot reproduce `text`."""
    info = _vocabulary_info(tokenizer)
    if not info.byte_level:
        return None
    unseen = sorted({i for i in ids if i not in info.pieces and i not in info.added and i not in info.skipped})
    if unseen:
        try:
            tokens = tokenizer.convert_ids_to_tokens(unseen)
        except Exception:  # e.g. negative ids; let the exact path (and decode itself) decide
            return None
        for token_id, token in zip(unseen, tokens):
            info.pieces[token_id] = None if token is None else _token_bytes(token)

    offsets: list[tuple[int, int]] = [(0, 0)] * len(ids)
    parts: list[str] = []
    position = 0  # characters produced so far
    run = bytearray()  # the current byte run between literal added tokens
    run_tokens: list[tuple[int, int, int]] = []  # (token index, first byte, end byte) within `run`

    def flush() -> None:
        nonlocal position
        if not run_tokens:
            return
        _replacements.events = []
        chunk = bytes(run).decode("utf-8", errors=_REPLACE_ERRORS)
        starts = _char_byte_starts(chunk, _replacements.events)
        first = np.array([t[1] for t in run_tokens], dtype=np.int64)
        end = np.array([t[2] for t in run_tokens], dtype=np.int64)
        # A token covers the character holding its first byte through the last character starting before its end.
        low = np.searchsorted(starts, first, side="right") - 1
        high = np.searchsorted(starts, end, side="left")
        # A zero-byte token (skipped special, unknown id) sits before the character its position falls in, i.e. after
        # the characters complete before it, which is where prefix decoding puts it too.
        char_ends = np.append(starts[1:], len(run)) if len(starts) else starts
        empty = first == end
        before = np.searchsorted(char_ends, first, side="right")
        low[empty] = before[empty]
        high[empty] = before[empty]
        for (index, _, _), lo, hi in zip(run_tokens, (low + position).tolist(), (high + position).tolist()):
            offsets[index] = (lo, hi)
        parts.append(chunk)
        position += len(chunk)
        run.clear()
        run_tokens.clear()

    for index, token_id in enumerate(ids):
        if token_id in info.added:
            flush()
            content = info.added[token_id]
            offsets[index] = (position, position + len(content))
            parts.append(content)
            position += len(content)
            continue
        piece = b"" if token_id in info.skipped else info.pieces[token_id]
        piece = piece or b""  # unknown ids decode to nothing, like skipped ones
        run_tokens.append((index, len(run), len(run) + len(piece)))
        run += piece
    flush()

    if "".join(parts) != text:
        return None
    return [(lo, lo) if token_id in info.special else (lo, hi) for token_id, (lo, hi) in zip(ids, offsets)]


def _common_prefix_length(a: str, b: str) -> int:
    if b.startswith(a):
        return len(a)
    low, high = 0, min(len(a), len(b))  # binary search on C-speed slice comparisons
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def _common_suffix_length(a: str, b: str) -> int:
    if b.endswith(a):
        return len(a)
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[len(a) - middle :] == b[len(b) - middle :]:
            low = middle
        else:
            high = middle - 1
    return low


def _exact_token_char_offsets(ids: list[int], tokenizer: Any, text: str) -> list[tuple[int, int]]:
    """Tokenizer-agnostic offsets from prefix and suffix decoding: O(n²) decode work for n tokens.

    With `P_i = decode(ids[:i])`, `S_i = decode(ids[i:])` and `L_i = lcp(P_i, text)`, token `i` starts at
    `max(L_i - 1, min(L_i, len(text) - lcs(S_i, text)))` (the suffix bound catches a token whose first bytes extend an
    unfinished character of the previous ones) and ends at `L_{i+1}`, plus one when `P_{i+1}` has characters beyond
    the common prefix, i.e. the token stops inside a character that the next tokens complete. A special token sits
    empty at `L_i`, or where the next token starts if that is earlier.
    """
    info = _vocabulary_info(tokenizer)
    n = len(ids)
    prefixes = [_decode(tokenizer, ids[:i]) for i in range(n + 1)]
    prefix_common = [_common_prefix_length(prefix, text) for prefix in prefixes]
    offsets: list[tuple[int, int]] = []
    for i, token_id in enumerate(ids):
        if token_id in info.special:
            offsets.append((prefix_common[i], prefix_common[i]))  # refined below
            continue
        # A token extends at most one unfinished character, so the suffix bound moves the start back by at most one
        # character (which also guards against a coincidental U+FFFD match).
        suffix_bound = len(text) - _common_suffix_length(_decode(tokenizer, ids[i:]), text)
        low = max(prefix_common[i] - 1, min(prefix_common[i], suffix_bound))
        high = prefix_common[i + 1]
        if len(prefixes[i + 1]) > high and high < len(text):
            high += 1
        offsets.append((low, max(low, high)))
    # A special token inside an unfinished character sits before that character (where the next token starts), even
    # when the prefix decoded so far happens to end in a U+FFFD that matches the text.
    next_start = None
    for i in range(n - 1, -1, -1):
        if ids[i] in info.special:
            if next_start is not None and next_start < offsets[i][0]:
                offsets[i] = (next_start, next_start)
        else:
            next_start = offsets[i][0]
    return offsets


def token_char_offsets(completion_ids: Sequence[int], tokenizer: Any) -> list[tuple[int, int]]:
    """Character range of the decoded completion that each completion token covers.

    The text is `text = tokenizer.decode(completion_ids, skip_special_tokens=True)`, the string annotators see. Token
    `i` gets the half-open range `[start_i, end_i)` of `text` that it produces:

    - a byte-level token holding part of a multi-byte UTF-8 character covers that whole character, so neighbouring
      tokens can share a character (ranges may overlap by one character, and are non-decreasing);
    - bytes that are not valid UTF-8 decode to U+FFFD per maximal invalid subpart, as in `errors="replace"`; every
      token contributing bytes to such a U+FFFD covers it;
    - special tokens (skipped by the decode, or listed in `tokenizer.all_special_ids`) get an empty range `(p, p)`;
    - added tokens that are not special (e.g. Qwen3's `<think>`) cover their literal content.

    Complexity: O(n + bytes) for byte-level BPE tokenizers (Qwen, Llama-3, GPT-2 style), plus one call to
    `tokenizer.decode` to verify the result. When verification fails (SentencePiece, WordPiece, a tokenizer that cleans
    up spaces, ...), an exact tokenizer-agnostic method based on prefix decoding is used instead: O(n²) decode work, a
    fraction of a second for a few thousand tokens.

    Args:
        completion_ids (`Sequence[int]`):
            Completion token ids (a list, or a 1-D tensor / array).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The tokenizer that produced the completion.

    Returns:
        `list[tuple[int, int]]`: One `(start, end)` per completion token.
    """
    ids = _as_id_list(completion_ids)
    if not ids:
        return []
    text = _decode(tokenizer, ids)
    offsets = _byte_level_token_char_offsets(ids, tokenizer, text)
    if offsets is None:
        offsets = _exact_token_char_offsets(ids, tokenizer, text)
    return offsets


# ---------------------------------------------------------------------------------------------------------------------
# Spans -> token labels
# ---------------------------------------------------------------------------------------------------------------------


class TokenLabel(IntEnum):
    """What the annotator marked on a completion token (`token_labels`' values). Which loss the token gets is a
    separate vocabulary, `trace_trl.routing.Route`."""

    NONE = 0
    KEY = 1
    ERROR = 2


LABEL_NONE, LABEL_KEY, LABEL_ERROR = TokenLabel.NONE, TokenLabel.KEY, TokenLabel.ERROR
_KIND_LABELS = {"key": LABEL_KEY, "error": LABEL_ERROR}


def labels_from_offsets(offsets: Sequence[tuple[int, int]], spans: Iterable[Span]) -> list[int]:
    """Token labels from per-token character ranges (see [`token_char_offsets`]) and character spans.

    Token `i` with range `[s, e)` gets label `2` (error) if it overlaps an error span, else `1` (key) if it overlaps a
    key span, else `0`, where `[s, e)` overlaps `[a, b)` iff `s < b and a < e`. Empty ranges (special tokens) and empty
    spans label nothing; spans reaching past the last character are clipped.

    Cost O(tokens + spans + characters): per kind, a difference array over characters gives how many spans cover each
    character, and a prefix sum of "covered" lets each token test its whole range in O(1).

    Args:
        offsets (`Sequence[tuple[int, int]]`):
            One `(start, end)` character range per token.
        spans (`Iterable[Span]`):
            Spans of kind `"key"` or `"error"` (anything with `start`, `end` and `kind` attributes).

    Returns:
        `list[int]`: One label per token.
    """
    if len(offsets) == 0:
        return []
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = bounds[:, 0], bounds[:, 1]
    num_chars = int(ends.max(initial=0))
    labels = np.zeros(len(bounds), dtype=np.int64)
    if num_chars == 0:
        return labels.tolist()
    by_kind: dict[int, list[tuple[int, int]]] = {LABEL_KEY: [], LABEL_ERROR: []}
    for span in spans:
        label = _KIND_LABELS.get(span.kind)
        if label is None:
            raise ValueError(f"Span kind must be one of {SPAN_KINDS}, got {span.kind!r}.")
        start, end = max(int(span.start), 0), min(int(span.end), num_chars)
        if start < end:
            by_kind[label].append((start, end))
    # Key first, so that error overwrites it where both apply.
    for label in (LABEL_KEY, LABEL_ERROR):
        if not by_kind[label]:
            continue
        ranges = np.asarray(by_kind[label], dtype=np.int64)
        difference = np.zeros(num_chars + 1, dtype=np.int64)
        np.add.at(difference, ranges[:, 0], 1)
        np.add.at(difference, ranges[:, 1], -1)
        covered = np.cumsum(difference[:-1]) > 0
        covered_before = np.zeros(num_chars + 1, dtype=np.int64)
        np.cumsum(covered, out=covered_before[1:])
        hit = (covered_before[ends] - covered_before[starts]) > 0
        labels[hit & (ends > starts)] = label
    return labels.tolist()


def token_labels(completion_ids: Sequence[int], spans: Iterable[Span], tokenizer: Any) -> list[int]:
    """One label per completion token: `1` key, `2` error, `0` otherwise.

    Spans are half-open character offsets into `tokenizer.decode(completion_ids, skip_special_tokens=True)`. A token is
    labelled when any character it covers (see [`token_char_offsets`]; a byte-level token holding part of a multi-byte
    character covers that character) overlaps a span of that kind. Special tokens are `0`. A token overlapping both a
    key and an error span is `2` (error wins). Empty spans label nothing; spans past the end of the text are clipped.

    Args:
        completion_ids (`Sequence[int]`):
            Completion token ids (a list, or a 1-D tensor / array).
        spans (`Iterable[Span]`):
            The annotator's spans.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The tokenizer that produced the completion.

    Returns:
        `list[int]`: One label per completion token.

    Example:

    ```python
    >>> ids = tokenizer("So 6 * 7 = 42.")["input_ids"]  # Qwen: So, Ġ, 6, Ġ*, Ġ, 7, Ġ=, Ġ, 4, 2, .
    >>> token_labels(ids, [Span(3, 13, "key")], tokenizer)  # "6 * 7 = 42"
    [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0]
    ```
    """
    spans = list(spans)
    ids = _as_id_list(completion_ids)
    if not spans:
        return [LABEL_NONE] * len(ids)
    return labels_from_offsets(token_char_offsets(ids, tokenizer), spans)


# ---------------------------------------------------------------------------------------------------------------------
# Quotes -> spans
# ---------------------------------------------------------------------------------------------------------------------


def locate_quote(text: str, quote: str, start: int = 0) -> tuple[int, int] | None:
    """Find an annotator's verbatim quote in the completion, at or after character `start`.

    Tried in order: an exact match; then a whitespace-normalized match, where any run of whitespace in the quote
    matches any non-empty run of whitespace in the text and the quote's leading and trailing whitespace is ignored. The
    returned offsets refer to the original `text`. Occurrences before `start` are never returned, so a caller can give
    a repeated quote the next occurrence after the previous span (and retry from `0` if it wants to).

    Args:
        text (`str`):
            The completion text.
        quote (`str`):
            The quoted excerpt.
        start (`int`, *optional*, defaults to `0`):
            First character where the match may begin.

    Returns:
        `tuple[int, int]` or `None`: The half-open character range of the first match, or `None` when there is none
        (including an empty or whitespace-only quote).
    """
    words = quote.split()
    if not words:
        return None
    start = max(start, 0)
    index = text.find(quote, start)
    if index >= 0:
        return index, index + len(quote)
    match = re.compile(r"\s+".join(map(re.escape, words))).search(text, start)
    if match is None:
        return None
    return match.start(), match.end()
