"""Character spans -> token labels on the real Qwen3 vocabulary, the exact fallback, and quote location."""

from __future__ import annotations

import random
import time

import pytest

from trace_trl.spans import (
    Span,
    _byte_level_token_char_offsets,
    _exact_token_char_offsets,
    labels_from_offsets,
    locate_quote,
    token_char_offsets,
    token_labels,
)


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True)


def _both_paths(tokenizer, ids):
    text = _decode(tokenizer, ids)
    fast = _byte_level_token_char_offsets(list(ids), tokenizer, text)
    exact = _exact_token_char_offsets(list(ids), tokenizer, text)
    return text, fast, exact


def _labels_for(tokenizer, text, start, end, kind="key"):
    ids = _ids(tokenizer, text)
    return ids, token_labels(ids, [Span(start, end, kind)], tokenizer)


def _covered_text(tokenizer, ids, labels, label=1):
    """The decoded text of the labelled tokens (contiguous runs joined)."""
    return _decode(tokenizer, [i for i, value in zip(ids, labels) if value == label])


# ---------------------------------------------------------------------------------------------------------------------
# token_char_offsets
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Let me compute 12 + 7 = 19.",
        "1234567890",
        "So \\frac{1}{2} + \\frac{1}{2} = 1, hence \\boxed{42}.",
        "中文数学题：三角形的面积是多少？",
        "emoji 🦜🦜 and 😀 plus 𝔸",
        "a  b\n\n\n   c\t\td   \n",
    ],
)
def test_offsets_fast_matches_exact_and_reconstructs_text(qwen_tokenizer, text):
    ids = _ids(qwen_tokenizer, text)
    decoded, fast, exact = _both_paths(qwen_tokenizer, ids)
    assert decoded == text
    assert fast is not None, "byte-level fast path should apply to Qwen"
    assert fast == exact
    assert token_char_offsets(ids, qwen_tokenizer) == fast
    # Ranges are non-decreasing, cover the whole text, and overlap only on a shared (split) character.
    assert fast[0][0] == 0 and fast[-1][1] == len(text)
    for (s0, e0), (s1, e1) in zip(fast, fast[1:]):
        assert s0 <= e0 and s1 <= e1
        assert s1 in (e0, e0 - 1)


def test_digits_are_single_tokens(qwen_tokenizer):
    ids = _ids(qwen_tokenizer, "x = 31415")
    offsets = token_char_offsets(ids, qwen_tokenizer)
    assert offsets[-5:] == [(4, 5), (5, 6), (6, 7), (7, 8), (8, 9)]
    # Span over "141" labels exactly the three digit tokens.
    labels = token_labels(ids, [Span(5, 8, "key")], qwen_tokenizer)
    assert labels[-5:] == [0, 1, 1, 1, 0]


def test_latex_spans(qwen_tokenizer):
    text = "We get \\frac{1}{2}, so \\boxed{42}."
    for target, kind, label in [("\\boxed{42}", "key", 1), ("\\frac{1}{2}", "error", 2)]:
        start = text.index(target)
        ids, labels = _labels_for(qwen_tokenizer, text, start, start + len(target), kind)
        covered = _covered_text(qwen_tokenizer, ids, labels, label)
        assert target in covered
        # Only the tokens touching the target: at most a merged neighbour character such as "}." on each side.
        assert len(covered.strip()) <= len(target) + 2
        assert set(labels) == {0, label}


def test_cjk(qwen_tokenizer):
    text = "答案是四十二。"
    ids, labels = _labels_for(qwen_tokenizer, text, 3, 6)  # 四十二
    covered = _covered_text(qwen_tokenizer, ids, labels)
    assert "四十二" in covered and "答" not in covered


def _split_emoji(tokenizer):
    for candidate in ["🦜", "🪐", "🧬", "𝔸", "🫠", "🥨"]:
        ids = _ids(tokenizer, candidate)
        if len(ids) > 1:
            return candidate, ids
    pytest.skip("no multi-token emoji found in the vocabulary")


def test_emoji_split_across_tokens_labels_every_piece(qwen_tokenizer):
    emoji, emoji_ids = _split_emoji(qwen_tokenizer)
    text = f"ok {emoji} done"
    ids = _ids(qwen_tokenizer, text)
    offsets = token_char_offsets(ids, qwen_tokenizer)
    position = text.index(emoji)
    sharing = [i for i, (s, e) in enumerate(offsets) if s <= position < e]
    assert len(sharing) >= 2, "the emoji should be shared by the byte-level tokens that hold its bytes"
    labels = token_labels(ids, [Span(position, position + len(emoji), "key")], qwen_tokenizer)
    assert [i for i, value in enumerate(labels) if value == 1] == sharing
    # A span that stops before the emoji (and the space its first piece carries) labels none of its pieces.
    labels = token_labels(ids, [Span(0, position - 1, "key")], qwen_tokenizer)
    assert all(labels[i] == 0 for i in sharing)


def test_emoji_cut_in_half_is_invalid_utf8_but_mapped(qwen_tokenizer):
    _, emoji_ids = _split_emoji(qwen_tokenizer)
    ids = _ids(qwen_tokenizer, "cut ") + emoji_ids[:1]
    text, fast, exact = _both_paths(qwen_tokenizer, ids)
    assert text.endswith("\ufffd")
    assert fast == exact
    assert fast[-1] == (len(text) - 1, len(text))
    assert token_labels(ids, [Span(len(text) - 1, len(text), "error")], qwen_tokenizer)[-1] == 2


def test_whitespace_runs_and_newlines(qwen_tokenizer):
    text = "step 1\n\n\n    step 2\t\t  end"
    ids = _ids(qwen_tokenizer, text)
    offsets = token_char_offsets(ids, qwen_tokenizer)
    assert "".join(text[s:e] for s, e in offsets) == text  # whitespace is not lost or duplicated
    start = text.index("step 2")
    labels = token_labels(ids, [Span(start, start + 6, "key")], qwen_tokenizer)
    assert _covered_text(qwen_tokenizer, ids, labels).strip() == "step 2"


def test_spans_at_start_and_end_and_clipping(qwen_tokenizer):
    text = "alpha beta gamma"
    ids = _ids(qwen_tokenizer, text)
    labels = token_labels(ids, [Span(0, 1, "key")], qwen_tokenizer)
    assert labels[0] == 1 and sum(labels) == 1
    labels = token_labels(ids, [Span(len(text) - 1, len(text) + 100, "key")], qwen_tokenizer)
    assert labels[-1] == 1 and sum(labels) == 1
    assert token_labels(ids, [Span(len(text) + 5, len(text) + 9, "key")], qwen_tokenizer) == [0] * len(ids)
    assert token_labels(ids, [Span(3, 3, "key")], qwen_tokenizer) == [0] * len(ids)  # empty span
    assert token_labels(ids, [], qwen_tokenizer) == [0] * len(ids)


def test_special_tokens_get_zero_even_when_covered(qwen_tokenizer):
    im_end = qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    eot = qwen_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    im_start = qwen_tokenizer.convert_tokens_to_ids("<|im_start|>")
    ids = [im_start, *_ids(qwen_tokenizer, "The answer is 4."), im_end, eot, eot]
    text = _decode(qwen_tokenizer, ids)
    assert text == "The answer is 4."
    offsets = token_char_offsets(ids, qwen_tokenizer)
    assert offsets[0] == (0, 0) and offsets[-3:] == [(len(text), len(text))] * 3
    labels = token_labels(ids, [Span(0, len(text) + 10, "key")], qwen_tokenizer)
    assert labels[0] == 0 and labels[-3:] == [0, 0, 0]
    assert all(value == 1 for value in labels[1:-3])


def test_think_tag_is_labelled_when_covered(qwen_tokenizer):
    think = qwen_tokenizer.convert_tokens_to_ids("<think>")
    end_think = qwen_tokenizer.convert_tokens_to_ids("</think>")
    ids = [think, *_ids(qwen_tokenizer, "\nhmm\n"), end_think, *_ids(qwen_tokenizer, "\n\n42")]
    text = _decode(qwen_tokenizer, ids)
    assert text == "<think>\nhmm\n</think>\n\n42"
    offsets = token_char_offsets(ids, qwen_tokenizer)
    assert offsets[0] == (0, 7)
    labels = token_labels(ids, [Span(0, 3, "key")], qwen_tokenizer)
    assert labels[0] == 1 and sum(labels) == 1
    start = text.index("</think>")
    labels = token_labels(ids, [Span(start + 2, start + 4, "error")], qwen_tokenizer)
    assert labels[ids.index(end_think)] == 2 and labels.count(2) == 1


def test_error_wins_over_key(qwen_tokenizer):
    text = "one two three four"
    ids = _ids(qwen_tokenizer, text)
    labels = token_labels(ids, [Span(0, 13, "key"), Span(4, 7, "error")], qwen_tokenizer)
    assert labels == [1, 2, 1, 0]
    labels = token_labels(ids, [Span(4, 7, "error"), Span(0, len(text), "key")], qwen_tokenizer)  # order-free
    assert labels == [1, 2, 1, 1]


def test_labels_from_offsets_rules():
    offsets = [(0, 3), (3, 5), (5, 5), (5, 9), (8, 12)]
    assert labels_from_offsets(offsets, [Span(4, 6, "key")]) == [0, 1, 0, 1, 0]
    assert labels_from_offsets(offsets, [Span(3, 3, "key")]) == [0] * 5  # empty span
    assert labels_from_offsets(offsets, [Span(8, 9, "error"), Span(0, 100, "key")]) == [1, 1, 0, 2, 2]
    assert labels_from_offsets(offsets, [Span(12, 20, "error")]) == [0] * 5  # touching the end is no overlap
    assert labels_from_offsets([], [Span(0, 1, "key")]) == []


def test_labels_from_offsets_matches_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        offsets, position = [], 0
        for _ in range(rng.randint(1, 30)):
            start = max(0, position - rng.randint(0, 1))
            end = start + rng.randint(0, 4)
            offsets.append((start, end))
            position = max(position, end)
        spans = []
        for _ in range(rng.randint(0, 6)):
            a = rng.randint(0, position + 3)
            spans.append(Span(a, a + rng.randint(0, 6), rng.choice(["key", "error"])))
        expected = []
        for s, e in offsets:
            # Overlap rule; empty spans and empty token ranges label nothing (the formula alone would let an empty
            # range [a, a) hit a range that contains a).
            hits = [span for span in spans if s < span.end and span.start < e and span.start < span.end and s < e]
            kinds = {span.kind for span in hits}
            expected.append(2 if "error" in kinds else 1 if "key" in kinds else 0)
        assert labels_from_offsets(offsets, spans) == expected


def test_random_token_sequences_fast_equals_exact(qwen_tokenizer):
    """Random ids (byte fragments, CJK pieces, specials and added tokens mixed in): both paths agree everywhere."""
    rng = random.Random(1234)
    added = list(range(151643, 151669))
    byte_tokens = [qwen_tokenizer.convert_tokens_to_ids(c) for c in ["ð", "Ł", "¦", "ĺ", "Ģ", "ľ", "Ã", "¤", "Ġ"]]
    vocabulary_size = len(qwen_tokenizer)
    for _ in range(400):
        ids = []
        for _ in range(rng.randint(1, 24)):
            roll = rng.random()
            pool = added if roll < 0.2 else byte_tokens if roll < 0.45 else None
            ids.append(rng.choice(pool) if pool else rng.randrange(vocabulary_size))
        text, fast, exact = _both_paths(qwen_tokenizer, ids)
        assert fast is not None
        assert fast == exact, (ids, text)
        assert all(0 <= s <= e <= len(text) for s, e in fast)


def test_tensor_input(qwen_tokenizer):
    torch = pytest.importorskip("torch")
    ids = _ids(qwen_tokenizer, "tensor input 123")
    assert token_labels(torch.tensor(ids), [Span(0, 6, "key")], qwen_tokenizer) == token_labels(
        ids, [Span(0, 6, "key")], qwen_tokenizer
    )


def test_fast_path_is_fast(qwen_tokenizer):
    text = "Let x = 12. Then 3x + 5 = 41, 所以答案是 41 🦜.\n\n" * 400
    ids = _ids(qwen_tokenizer, text)[:4096]
    assert len(ids) == 4096
    token_char_offsets(ids, qwen_tokenizer)  # warm the vocabulary cache
    start = time.perf_counter()
    labels = token_labels(ids, [Span(10, 500, "key"), Span(2000, 2100, "error")], qwen_tokenizer)
    elapsed = time.perf_counter() - start
    assert len(labels) == 4096
    assert elapsed < 1.0, f"4096-token labelling took {elapsed:.3f} s"


# ---------------------------------------------------------------------------------------------------------------------
# Non-byte-level tokenizers: the exact fallback
# ---------------------------------------------------------------------------------------------------------------------


def _wordpiece_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[SEP]": 1, "the": 2, "answer": 3, "is": 4, "forty": 5, "##two": 6, "4": 7, "##2": 8, ".": 9}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", sep_token="[SEP]", clean_up_tokenization_spaces=True
    )


def _unigram_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    corpus = ["the answer is forty two", "so the total is 42 apples", "compute the answer carefully"] * 20
    backend.train_from_iterator(
        corpus, trainers.UnigramTrainer(vocab_size=60, special_tokens=["<unk>", "</s>"], unk_token="<unk>")
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


def test_wordpiece_fallback(monkeypatch):
    import trace_trl.spans as spans_module

    tokenizer = _wordpiece_tokenizer()
    ids = _ids(tokenizer, "The answer is fortytwo .") + [tokenizer.sep_token_id]
    text = _decode(tokenizer, ids)
    assert text == "the answer is fortytwo."  # clean-up removed the space before "."
    calls = []
    original = spans_module._exact_token_char_offsets
    monkeypatch.setattr(spans_module, "_exact_token_char_offsets", lambda *a: calls.append(1) or original(*a))
    offsets = token_char_offsets(ids, tokenizer)
    assert calls, "a WordPiece tokenizer must take the exact path"
    assert [text[s:e] for s, e in offsets] == ["the", " answer", " is", " forty", "two", ".", ""]
    start = text.index("two")
    assert token_labels(ids, [Span(start, start + 3, "key")], tokenizer) == [0, 0, 0, 0, 1, 0, 0]


def test_unigram_metaspace_fallback():
    tokenizer = _unigram_tokenizer()
    text = "the answer is 42"
    ids = _ids(tokenizer, text) + [tokenizer.eos_token_id]
    decoded = _decode(tokenizer, ids)
    assert decoded == text
    assert _byte_level_token_char_offsets(ids, tokenizer, decoded) is None
    offsets = token_char_offsets(ids, tokenizer)
    assert offsets[-1][0] == offsets[-1][1]  # </s>
    assert "".join(decoded[s:e] for s, e in offsets) == decoded
    labels = token_labels(ids, [Span(text.index("42"), len(text), "error")], tokenizer)
    assert _decode(tokenizer, [i for i, v in zip(ids, labels) if v == 2]).strip() == "42"
    assert labels[-1] == 0


def test_byte_level_with_cleanup_falls_back(qwen_tokenizer, monkeypatch):
    """If the decode does anything the fast path does not model, verification catches it."""
    calls = []
    original_decode = type(qwen_tokenizer).decode

    def squashing_decode(self, ids, **kwargs):  # a tokenizer that post-processes its text
        return original_decode(self, ids, **kwargs).replace(" ,", ",")

    monkeypatch.setattr(type(qwen_tokenizer), "decode", squashing_decode)
    import trace_trl.spans as spans_module

    original = spans_module._exact_token_char_offsets
    monkeypatch.setattr(spans_module, "_exact_token_char_offsets", lambda *a: calls.append(1) or original(*a))
    ids = _ids(qwen_tokenizer, "a , b")
    text = _decode(qwen_tokenizer, ids)
    assert text == "a, b"
    offsets = token_char_offsets(ids, qwen_tokenizer)
    assert calls
    assert offsets[-1][1] == len(text)
    assert token_labels(ids, [Span(3, 4, "key")], qwen_tokenizer)[-1] == 1


# ---------------------------------------------------------------------------------------------------------------------
# locate_quote
# ---------------------------------------------------------------------------------------------------------------------


def test_locate_quote_exact():
    text = "First 2 + 2 = 5, then 5 * 2 = 10."
    assert locate_quote(text, "2 + 2 = 5") == (6, 15)
    assert text[slice(*locate_quote(text, "5 * 2"))] == "5 * 2"


def test_locate_quote_next_occurrence_after_start():
    text = "x = 1. x = 1. x = 1."
    first = locate_quote(text, "x = 1")
    second = locate_quote(text, "x = 1", start=first[1])
    third = locate_quote(text, "x = 1", start=second[1])
    assert (first, second, third) == ((0, 5), (7, 12), (14, 19))
    assert locate_quote(text, "x = 1", start=third[1]) is None


def test_locate_quote_whitespace_normalized():
    text = "so we get\n   x  =\t3\nand stop"
    span = locate_quote(text, "  x = 3 ")
    assert span is not None and text[span[0] : span[1]] == "x  =\t3"
    span = locate_quote(text, "get x = 3 and")
    assert text[span[0] : span[1]] == "get\n   x  =\t3\nand"
    assert locate_quote(text, "x = 3", start=span[0] + 10) is None


def test_locate_quote_not_found_and_empty():
    assert locate_quote("abc", "abd") is None
    assert locate_quote("abc", "") is None
    assert locate_quote("a b", "   \n") is None
    assert locate_quote("ab", "a b") is None  # whitespace must match whitespace
