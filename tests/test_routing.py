"""The generation-side routing: spans per rollout, the coverage cap, the annotator's answer checks, the vocabularies."""

from __future__ import annotations

import random

import pytest

from trace_trl.annotators import Annotation
from trace_trl.routing import (
    Route,
    _checked_answer,
    capped_token_labels,
    routed_token_budget,
    spans_for_rollout,
)
from trace_trl.spans import Span, TokenLabel, labels_from_offsets


def _offsets(n: int, width: int = 2) -> list[tuple[int, int]]:
    """`n` tokens of `width` characters each: token i covers characters [width*i, width*(i+1))."""
    return [(width * i, width * (i + 1)) for i in range(n)]


def test_route_and_label_codes_are_disjoint():
    assert {int(r) for r in Route} & {int(t) for t in TokenLabel} == {0}  # only "nothing" is shared
    assert Route.GRPO == 0 and TokenLabel.NONE == 0


@pytest.mark.parametrize(
    ("n", "fraction", "expected"), [(10, 0.25, 2), (12, 0.25, 3), (3, 0.25, 0), (100, 0.29, 29), (7, 1.0, 7)]
)
def test_routed_token_budget_is_the_floor_of_the_fraction(n, fraction, expected):
    assert routed_token_budget(n, fraction) == expected
    assert routed_token_budget(n, None) is None


def test_cap_keeps_spans_in_the_annotators_order_and_cuts_the_crossing_one():
    offsets = _offsets(20)  # 40 characters, 20 tokens
    first = Span(20, 30, "key")  # tokens 10..14
    second = Span(0, 8, "key")  # tokens 0..3
    labels, removed = capped_token_labels(offsets, [first, second], [True] * 20, budget=7)
    key = [i for i, label in enumerate(labels) if label == TokenLabel.KEY]
    assert key == [0, 1, 10, 11, 12, 13, 14]  # the first span whole, then the second cut after its first 2 tokens
    assert removed == 2


def test_cap_counts_only_eligible_tokens_and_never_labels_masked_ones():
    offsets = _offsets(10)
    eligible = [i % 2 == 0 for i in range(10)]  # tool-output tokens (odd) are outside the loss mask
    labels, removed = capped_token_labels(offsets, [Span(0, 20, "error")], eligible, budget=3)
    assert [i for i, label in enumerate(labels) if label] == [0, 2, 4]
    assert all(labels[i] == TokenLabel.ERROR for i in (0, 2, 4))
    assert removed == 2  # eligible tokens 6 and 8 were cut; the masked ones never counted


def test_no_cap_equals_plain_token_labels_on_random_cases():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 40)
        offsets = _offsets(n, width=3)
        spans = []
        for _ in range(rng.randint(0, 4)):
            a = rng.randint(0, 3 * n)
            spans.append(Span(a, rng.randint(a, 3 * n + 5), rng.choice(["key", "error"])))
        labels, removed = capped_token_labels(offsets, spans, [True] * n, budget=None)
        assert labels == labels_from_offsets(offsets, spans) and removed == 0
        budget = rng.randint(0, n)
        capped, removed = capped_token_labels(offsets, spans, [True] * n, budget=budget)
        uncapped = [x != 0 for x in labels]
        kept = [x != 0 for x in capped]
        assert sum(kept) == min(budget, sum(uncapped))
        assert removed == sum(uncapped) - sum(kept)
        assert all(u or not k for u, k in zip(uncapped, kept)), "the cap only removes labels, never adds"


def test_spans_follow_correctness_and_keep_the_annotators_order():
    annotation = Annotation(
        spans=(Span(10, 12, "key"), Span(0, 4, "error"), Span(2, 3, "key"), Span(50, 60, "key"), Span(5, 5, "key"))
    )
    kept, dropped = spans_for_rollout(annotation, is_correct=True, text_length=20)
    assert kept == [Span(10, 12, "key"), Span(2, 3, "key")]
    assert dropped == 3  # the error span, the one past the text, the empty one
    assert spans_for_rollout(Annotation.failure("boom"), True, 20) == ([], 0)


@pytest.mark.parametrize(
    ("answer", "needle"),
    [
        (None, "returned NoneType"),
        (Annotation(), "returned Annotation"),
        ([(0, 3, "key"), (4, 5, "key")], "items of type tuple"),
        ([Annotation()], "returned 1 items"),
        (42, "not a sequence"),
    ],
)
def test_malformed_annotator_answers_say_what_to_return(answer, needle):
    annotations, problem = _checked_answer(answer, 2)
    assert annotations == [] and needle in problem
    assert "Annotation()" in problem and "exactly 2" in problem


def test_a_generator_of_annotations_is_read_once():
    annotations, problem = _checked_answer((Annotation() for _ in range(3)), 3)
    assert problem is None and annotations == [Annotation()] * 3


def test_span_is_importable_from_the_annotators_package():
    from trace_trl.annotators import Span as AnnotatorsSpan

    assert AnnotatorsSpan is Span
