"""Annotators that need no model: all-token baseline, regex spans, random-span control."""

from __future__ import annotations

import re

import pytest

from trace_trl.annotators import AllTokensAnnotator, Annotation, AnnotationRequest, RandomSpanAnnotator, RegexAnnotator
from trace_trl.spans import Span


def _request(completion, correct=True, prompt="What is 6 * 7?"):
    return AnnotationRequest(prompt=prompt, completion=completion, is_correct=correct, reward=float(correct))


CORRECT = _request("We have 6 * 7 = 42, so the answer is \\boxed{42}.")
INCORRECT = _request("We have 6 * 7 = 48, so the answer is \\boxed{48}.", correct=False)
EMPTY = _request("", correct=True)


def _texts(request, annotation):
    return [request.completion[span.start : span.end] for span in annotation.spans]


def _check_in_range(requests, annotations):
    assert len(annotations) == len(requests)
    for request, annotation in zip(requests, annotations):
        for span in annotation.spans:
            assert 0 <= span.start <= span.end <= len(request.completion)


# --- AllTokensAnnotator ---------------------------------------------------------------------------------------------


def test_all_tokens_kinds_follow_correctness():
    annotations = AllTokensAnnotator()([CORRECT, INCORRECT, EMPTY])
    assert annotations[0].spans == (Span(0, len(CORRECT.completion), "key"),)
    assert annotations[1].spans == (Span(0, len(INCORRECT.completion), "error"),)
    assert annotations[2].spans == ()
    assert not any(a.failed for a in annotations)


def test_all_tokens_without_incorrect_kind():
    annotations = AllTokensAnnotator(kind_for_incorrect=None)([INCORRECT, CORRECT])
    assert annotations[0].spans == () and annotations[1].spans[0].kind == "key"


def test_all_tokens_validation():
    with pytest.raises(ValueError, match="kind_for_correct"):
        AllTokensAnnotator(kind_for_correct="important")
    with pytest.raises(ValueError, match="kind_for_incorrect"):
        AllTokensAnnotator(kind_for_incorrect="wrong")


# --- RegexAnnotator -------------------------------------------------------------------------------------------------


def test_regex_key_patterns_only_in_correct_error_only_in_incorrect():
    annotator = RegexAnnotator(key_patterns=[RegexAnnotator.BOXED], error_patterns=[RegexAnnotator.EQUATION])
    correct, incorrect = annotator([CORRECT, INCORRECT])
    assert _texts(CORRECT, correct) == ["\\boxed{42}"] and {s.kind for s in correct.spans} == {"key"}
    assert _texts(INCORRECT, incorrect) == ["6 * 7 = 48"] and {s.kind for s in incorrect.spans} == {"error"}
    _check_in_range([CORRECT, INCORRECT], [correct, incorrect])


def test_regex_capture_group_marks_group_one():
    annotator = RegexAnnotator(key_patterns=[r"answer is (\S+)"], error_patterns=r"= (\d+)")
    correct, incorrect = annotator([CORRECT, INCORRECT])
    assert _texts(CORRECT, correct) == ["\\boxed{42}."]
    assert _texts(INCORRECT, incorrect) == ["48"]  # a lone string is one pattern, not a list of characters


def test_regex_optional_group_that_did_not_match_is_skipped():
    annotator = RegexAnnotator(key_patterns=[r"x(y)?"])
    (annotation,) = annotator([_request("x xy")])
    assert _texts(_request("x xy"), annotation) == ["y"]


def test_boxed_nested_braces():
    request = _request(r"so \boxed{\frac{\sqrt{2}}{2}} and \boxed{x^{2}} and \boxed{7}")
    (whole,) = RegexAnnotator(key_patterns=RegexAnnotator.BOXED)([request])
    assert _texts(request, whole) == [r"\boxed{\frac{\sqrt{2}}{2}}", r"\boxed{x^{2}}", r"\boxed{7}"]
    (content,) = RegexAnnotator(key_patterns=RegexAnnotator.BOXED_CONTENT)([request])
    assert _texts(request, content) == [r"\frac{\sqrt{2}}{2}", "x^{2}", "7"]


def test_boxed_unbalanced_is_not_matched_and_stays_fast():
    request = _request(r"\boxed{" + "a{b" * 2000)
    (annotation,) = RegexAnnotator(key_patterns=RegexAnnotator.BOXED)([request])
    assert annotation.spans == ()


def test_equation_and_line_patterns():
    request = _request("First 12 + 7 = 19.\n  Then x = 3.5 * 2  \nThe final answer is: 7\nno equation here")
    (equation,) = RegexAnnotator(key_patterns=RegexAnnotator.EQUATION)([request])
    assert _texts(request, equation) == ["12 + 7 = 19"]
    (lines,) = RegexAnnotator(key_patterns=[RegexAnnotator.EQUALS_LINE])([request])
    assert _texts(request, lines) == ["First 12 + 7 = 19.", "Then x = 3.5 * 2"]
    (answer,) = RegexAnnotator(key_patterns=[RegexAnnotator.ANSWER_LINE])([request])
    assert _texts(request, answer) == ["7"]


def test_regex_flags_compiled_patterns_and_diagnosis():
    annotator = RegexAnnotator(
        error_patterns=[re.compile("ANSWER"), "we HAVE"], flags=re.IGNORECASE, diagnosis=lambda r: "arithmetic_error"
    )
    (annotation,) = annotator([INCORRECT])
    assert _texts(INCORRECT, annotation) == ["We have", "answer"]
    assert annotation.diagnosis == "arithmetic_error"
    # A fixed label must come from the taxonomy and goes only to rollouts of its kind.
    fixed = RegexAnnotator(key_patterns="x", diagnosis="Key insight")
    assert [a.diagnosis for a in fixed([CORRECT, INCORRECT])] == ["key_insight", None]
    with pytest.raises(ValueError, match="taxonomy"):
        RegexAnnotator(key_patterns="x", diagnosis="fixed")
    # A computed label of the wrong kind is dropped and counted.
    (wrong,) = annotator([CORRECT])
    assert wrong.diagnosis is None and wrong.usage["dropped_labels"] == 1


def test_regex_validation():
    with pytest.raises(ValueError, match="key_patterns"):
        RegexAnnotator(key_patterns=["(unclosed"])
    with pytest.raises(ValueError, match="error_patterns"):
        RegexAnnotator(error_patterns=["[a-"])
    with pytest.raises(ValueError, match="at least one pattern"):
        RegexAnnotator()
    with pytest.raises(ValueError, match="key_patterns"):
        RegexAnnotator(key_patterns=[42])
    with pytest.raises(ValueError, match="diagnosis"):
        RegexAnnotator(key_patterns="x", diagnosis=3)


# --- RandomSpanAnnotator --------------------------------------------------------------------------------------------

REQUESTS = [
    _request("".join(f"step {i}: {i} + {i} = {2 * i}. " for i in range(30)), correct=i % 2 == 0, prompt=f"p{i}")
    for i in range(8)
] + [EMPTY, _request("ab", correct=False)]


def test_random_spans_fraction_count_kinds_and_range():
    annotator = RandomSpanAnnotator(seed=3, span_fraction=0.2, num_spans=3)
    annotations = annotator(REQUESTS)
    _check_in_range(REQUESTS, annotations)
    for request, annotation in zip(REQUESTS[:8], annotations[:8]):
        assert len(annotation.spans) == 3
        assert {s.kind for s in annotation.spans} == {"key" if request.is_correct else "error"}
        assert sum(len(s) for s in annotation.spans) == round(0.2 * len(request.completion))
        ordered = sorted(annotation.spans)
        assert all(a.end <= b.start for a, b in zip(ordered, ordered[1:]))  # non-overlapping
    assert annotations[8].spans == ()  # empty completion
    assert len(annotations[9].spans) == 0  # round(0.2 * 2) = 0 characters to cover


def test_random_spans_deterministic_and_seed_dependent():
    first = RandomSpanAnnotator(seed=5)(REQUESTS)
    again = RandomSpanAnnotator(seed=5)(list(reversed(REQUESTS)))[::-1]  # independent of batch order
    other = RandomSpanAnnotator(seed=6)(REQUESTS)
    assert first == again
    assert [a.spans for a in first[:8]] != [a.spans for a in other[:8]]
    # Different rollouts get different places (the request content seeds the generator).
    assert len({a.spans[0].start for a in first[:8]}) > 1


def test_random_spans_matched_to_another_annotator():
    like = RegexAnnotator(
        key_patterns=[r"\d+ \+ \d+"], error_patterns=[RegexAnnotator.EQUATION], diagnosis="logical_gap"
    )
    reference = like(REQUESTS)
    annotations = RandomSpanAnnotator(seed=1, like=like)(REQUESTS)
    _check_in_range(REQUESTS, annotations)
    for ref, annotation in zip(reference, annotations):
        assert sorted((len(s), s.kind) for s in annotation.spans) == sorted((len(s), s.kind) for s in ref.spans)
        assert annotation.diagnosis == ref.diagnosis
        ordered = sorted(annotation.spans)
        assert all(a.end <= b.start for a, b in zip(ordered, ordered[1:]))
    assert any(a.spans != r.spans for a, r in zip(annotations[:8], reference[:8]))  # placement actually moved


def test_random_spans_like_failures_pass_through_and_bind_forwards():
    bound = []

    class Flaky:
        def __call__(self, requests):
            return [
                Annotation.failure("timeout") if i % 2 else Annotation(spans=(Span(0, 1, "key"),))
                for i, _ in enumerate(requests)
            ]

        def bind(self, trainer):
            bound.append(trainer)

    annotator = RandomSpanAnnotator(like=Flaky())
    annotations = annotator(REQUESTS[:4])
    assert [a.failed for a in annotations] == [False, True, False, True]
    assert annotations[1].error == "timeout" and annotations[1].spans == ()
    assert len(annotations[0].spans) == 1 and len(annotations[0].spans[0]) == 1
    annotator.bind("trainer")
    assert bound == ["trainer"]


def test_random_spans_that_do_not_fit_stay_in_range():
    request = _request("abcdef")
    spans = (Span(0, 5, "key"), Span(1, 6, "key"), Span(0, 60, "key"))  # 16 characters for a 6-character text

    def like(requests):
        return [Annotation(spans=spans)]

    (annotation,) = RandomSpanAnnotator(like=like)([request])
    _check_in_range([request], [annotation])
    assert sorted(len(s) for s in annotation.spans) == [5, 5, 6]


def test_random_spans_validation():
    with pytest.raises(ValueError, match="span_fraction"):
        RandomSpanAnnotator(span_fraction=1.5)
    with pytest.raises(ValueError, match="num_spans"):
        RandomSpanAnnotator(num_spans=0)
    with pytest.raises(ValueError, match="seed"):
        RandomSpanAnnotator(seed="0")
    with pytest.raises(ValueError, match="like"):
        RandomSpanAnnotator(like="regex")
    with pytest.raises(ValueError, match="like"):
        RandomSpanAnnotator(like=lambda requests: [])(REQUESTS[:2])
