"""The type-label taxonomy: labels are checked against the taxonomy of the rollout's own kind."""

import pytest

from trace_trl.annotators import (
    ERROR_TYPES,
    KEY_STEP_TYPES,
    AllTokensAnnotator,
    AnnotationRequest,
    check_type_label,
    describe_type_label,
    type_label_dropped,
)
from trace_trl.annotators.prompts import DIAGNOSIS_LABELS
from trace_trl.annotators.taxonomy import normalize_type_label


def test_taxonomies_are_documented_disjoint_and_cover_the_quote_diagnoses():
    assert KEY_STEP_TYPES and ERROR_TYPES
    assert not set(KEY_STEP_TYPES) & set(ERROR_TYPES), "a label must say which kind of rollout it belongs to"
    assert set(DIAGNOSIS_LABELS) <= set(ERROR_TYPES), "quote-protocol diagnoses stay valid error labels"
    for label, description in {**KEY_STEP_TYPES, **ERROR_TYPES}.items():
        assert label == normalize_type_label(label), label
        assert len(description) > 20, label


def test_check_type_label_uses_the_rollouts_own_taxonomy():
    assert check_type_label("missed_case_analysis", is_correct=False) == "missed_case_analysis"
    assert check_type_label("Missed case-analysis ", is_correct=False) == "missed_case_analysis"
    assert check_type_label("key_insight", is_correct=True) == "key_insight"
    # The bug of issue 9 item 6: a correct rollout must not keep a mistake label, nor an incorrect one a key label.
    assert check_type_label("arithmetic_error", is_correct=True) is None
    assert check_type_label("key_insight", is_correct=False) is None
    assert check_type_label("made up", is_correct=False) is None
    assert check_type_label(None, is_correct=True) is None
    assert check_type_label(7, is_correct=False) is None
    # Aliases models use for the same label.
    assert check_type_label("logic error", is_correct=False) == "logical_gap"
    assert check_type_label("setup", is_correct=True) == "problem_setup"


def test_dropped_means_given_but_invalid():
    assert type_label_dropped("arithmetic_error", is_correct=True)
    assert type_label_dropped("nonsense", is_correct=False)
    assert not type_label_dropped("arithmetic_error", is_correct=False)
    for nothing in (None, "", "null", "None", " "):
        assert not type_label_dropped(nothing, is_correct=True)


def test_describe_type_label_gives_words_for_the_teacher():
    assert describe_type_label("missed_case_analysis") == "missed case analysis"
    assert describe_type_label("arithmetic_error") == "arithmetic error"
    assert describe_type_label("other") == "another kind of mistake"
    for label in (*KEY_STEP_TYPES, *ERROR_TYPES):
        words = describe_type_label(label)
        assert "_" not in words and words.strip() == words and words
    with pytest.raises(ValueError, match="check_type_label"):
        describe_type_label("not_a_label")


def test_all_tokens_annotator_gives_no_label():
    request = AnnotationRequest(prompt="p", completion="abc", is_correct=True, reward=1.0)
    assert AllTokensAnnotator()([request])[0].diagnosis is None
