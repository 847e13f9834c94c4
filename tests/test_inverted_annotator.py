"""The controls: the inverted 25% outside the base annotator's spans, the random 25%, and how recipes build them."""

import pytest

from trace_trl.annotators import (
    Annotation,
    AnnotationRequest,
    InvertedSpanAnnotator,
    RandomSpanAnnotator,
    RegexAnnotator,
)
from trace_trl.spans import Span


def _request(completion, correct=True, problem="p"):
    return AnnotationRequest(prompt=problem, completion=completion, is_correct=correct, reward=float(correct))


REQUESTS = [
    _request(
        f"Step {i}: we have {i} * 7 = {7 * i}. " * (3 + i % 5) + f"So the answer is \\boxed{{{7 * i}}}.", i % 3 != 0
    )
    for i in range(24)
]


class Fixed:
    """A base annotator that returns the annotations it is given, and records its calls and binding."""

    def __init__(self, annotations):
        self.annotations = list(annotations)
        self.bound = None
        self.calls = 0

    def __call__(self, requests):
        self.calls += 1
        return self.annotations[: len(requests)]

    def bind(self, trainer):
        self.bound = trainer

    def metrics(self):
        return {"annotator/requests": 7.0}


def _covered(spans):
    return {i for span in spans for i in range(span.start, span.end)}


def test_inverted_spans_avoid_the_base_spans_and_hit_the_target_coverage():
    base = RegexAnnotator(key_patterns=[RegexAnnotator.EQUATION], error_patterns=[RegexAnnotator.BOXED])
    references = base(REQUESTS)
    annotations = InvertedSpanAnnotator(base, seed=3)(REQUESTS)
    for request, reference, annotation in zip(REQUESTS, references, annotations):
        kind = "key" if request.is_correct else "error"
        assert reference.spans, "the test needs base spans to avoid"
        assert all(span.kind == kind for span in annotation.spans)
        assert all(0 <= s.start < s.end <= len(request.completion) for s in annotation.spans)
        assert not _covered(annotation.spans) & _covered(reference.spans), "never overlaps a base span"
        target = round(0.25 * len(request.completion))
        assert len(_covered(annotation.spans)) == sum(len(s) for s in annotation.spans) == target
        assert annotation.usage.get("inverted_shortfall_chars", 0) == 0


def test_inverted_takes_all_of_a_small_outside_and_counts_the_shortfall():
    text = "a" * 100
    base = Fixed(
        [Annotation(spans=(Span(0, 50, "key"), Span(55, 95, "key"), Span(50, 100, "error")), diagnosis="key_insight")]
    )
    annotator = InvertedSpanAnnotator(base, fraction=0.25)
    (annotation,) = annotator([_request(text)])
    # Outside the key spans: [50, 55) and [95, 100) = 10 characters (the error span does not count for a correct
    # rollout); the target is 25.
    assert annotation.spans == (Span(50, 55, "key"), Span(95, 100, "key"))
    assert annotation.usage["inverted_shortfall_chars"] == 15
    assert annotation.diagnosis == "key_insight", "the base's label and bookkeeping are kept"
    metrics = annotator.metrics()
    assert metrics["annotator/inverted_short_rollouts"] == 1 and metrics["annotator/inverted_shortfall_chars"] == 15
    assert metrics["annotator/requests"] == 7.0, "the base's metrics are included"


def test_inverted_window_crosses_base_spans_without_touching_them():
    text = "abcdefghij" * 4
    base = Fixed([Annotation(spans=(Span(5, 10, "error"), Span(12, 30, "error")))] * 50)
    seen = set()
    for seed in range(50):
        (annotation,) = InvertedSpanAnnotator(base, fraction=0.25, seed=seed)([_request(text, correct=False)])
        assert sum(len(s) for s in annotation.spans) == 10
        assert not _covered(annotation.spans) & (set(range(5, 10)) | set(range(12, 30)))
        seen.add(annotation.spans)
    assert len(seen) > 3, "the offset is random"


def test_inverted_is_deterministic_per_request_and_seed():
    base = RegexAnnotator(key_patterns=[RegexAnnotator.EQUATION], error_patterns=[RegexAnnotator.BOXED])
    first = InvertedSpanAnnotator(base, seed=5)(REQUESTS)
    again = InvertedSpanAnnotator(base, seed=5)(list(reversed(REQUESTS)))[::-1]
    other = InvertedSpanAnnotator(base, seed=6)(REQUESTS)
    assert first == again
    assert first != other


def test_inverted_passes_base_failures_through_and_forwards_bind():
    failure = Annotation.failure("HTTP 500")
    base = Fixed([failure, Annotation(spans=())])
    annotator = InvertedSpanAnnotator(base)
    annotations = annotator([_request("x" * 40), _request("y" * 40, correct=False)])
    assert annotations[0] is failure
    assert annotations[1].spans == (Span(annotations[1].spans[0].start, annotations[1].spans[0].start + 10, "error"),)
    trainer = object()
    annotator.bind(trainer)
    assert base.bound is trainer
    with pytest.raises(ValueError, match="base annotator returned 1"):
        InvertedSpanAnnotator(Fixed([failure]))([_request("a"), _request("b")])


def test_inverted_edge_cases_and_validation():
    base = Fixed([Annotation()] * 3)
    empty, four, one = InvertedSpanAnnotator(base)([_request(""), _request("abcd"), _request("a")])
    assert empty.spans == () and "inverted_shortfall_chars" not in empty.usage
    assert sum(len(s) for s in four.spans) == 1  # round(0.25 * 4)
    assert one.spans == ()  # round(0.25 * 1) == 0
    assert InvertedSpanAnnotator(base, fraction=1.0)([_request("abcd")])[0].spans == (Span(0, 4, "key"),)
    assert InvertedSpanAnnotator(base, fraction=0.0)([_request("abcd")])[0].spans == ()
    with pytest.raises(ValueError, match="fraction"):
        InvertedSpanAnnotator(base, fraction=1.5)
    with pytest.raises(ValueError, match="seed"):
        InvertedSpanAnnotator(base, seed="1")
    with pytest.raises(ValueError, match="base"):
        InvertedSpanAnnotator("openai")


def test_random_span_annotator_defaults_to_a_quarter():
    assert RandomSpanAnnotator().span_fraction == 0.25
    for request, annotation in zip(REQUESTS, RandomSpanAnnotator(seed=2)(REQUESTS)):
        assert sum(len(s) for s in annotation.spans) == round(0.25 * len(request.completion))


def test_recipe_arguments_build_the_controls_and_pass_the_span_format():
    from trace_trl.scripts.train import TraceScriptArguments, build_annotator

    assert TraceScriptArguments().random_span_fraction == 0.25
    assert TraceScriptArguments().annotator_span_format == "segments"
    inverted = build_annotator(TraceScriptArguments(annotator="inverted_regex", random_seed=4))
    assert isinstance(inverted, InvertedSpanAnnotator) and isinstance(inverted.base, RegexAnnotator)
    assert inverted.fraction == 0.25 and inverted.seed == 4
    api = {"annotator_model": "gpt-test", "annotator_base_url": "http://127.0.0.1:9/v1"}
    for span_format in ("segments", "quotes"):
        built = build_annotator(
            TraceScriptArguments(annotator="inverted_openai", annotator_span_format=span_format, **api)
        )
        assert type(built.base).__name__ == "OpenAIAnnotator" and built.base.span_format == span_format
        assert (
            build_annotator(
                TraceScriptArguments(annotator="openai", annotator_span_format=span_format, **api)
            ).span_format
            == span_format
        )
        self_built = build_annotator(
            TraceScriptArguments(annotator="inverted_self", annotator_span_format=span_format)
        )
        assert type(self_built.base).__name__ == "SelfAnnotator" and self_built.base.span_format == span_format
    random = build_annotator(TraceScriptArguments(annotator="random"))
    assert random.span_fraction == 0.25
    with pytest.raises(ValueError, match="annotator_span_format"):
        TraceScriptArguments(annotator="openai", annotator_span_format="tokens")


def test_span_format_is_validated_by_the_annotators():
    from trace_trl.annotators import OpenAIAnnotator, SelfAnnotator

    for make in (lambda **kw: OpenAIAnnotator("m", api_key="k", **kw), lambda **kw: SelfAnnotator(**kw)):
        assert make().span_format == "segments"
        with pytest.raises(ValueError, match="span_format.*'segments'.*'quotes'"):
            make(span_format="quote")
        with pytest.raises(ValueError, match="max_segment_chars"):
            make(max_segment_chars=0)
