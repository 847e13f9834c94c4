"""Data loaders on local fixture files in the real Hub schemas, and the privileged-column checks."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from trace_trl.data import (
    DEFAULT_INSTRUCTION,
    check_solutions,
    extract_boxed,
    guess_source,
    load_math_dataset,
    make_prompt,
    split_gsm8k_answer,
    strip_think,
)


FIXTURES = Path(__file__).parent / "fixtures"
OUTPUT_COLUMNS = ["prompt", "problem", "answer", "solution"]


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"\boxed{42}", "42"),
        (r"so $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (r"\boxed{1} then \boxed{2}", "2"),
        (r"\fbox{7}", "7"),
        (r"\boxed{\left( 1, \{2\} \right)}", r"\left( 1, \{2\} \right)"),
        (r"answer \boxed 5$", "5"),
        (r"\boxed{3} and a truncated \boxed{4", "3"),
        (r"\boxed{}", ""),
        ("no box here", None),
        ("", None),
        (None, None),
        (r"\boxedx{3}", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_strip_think():
    assert strip_think("<think>\nscratch \\boxed{1}\n</think>\n\nThe answer is 2.") == "The answer is 2."
    # The template opened the block: only the closing tag is in the text.
    assert strip_think("scratch\n</think>\nfinal") == "final"
    assert strip_think("plain") == "plain"


def test_make_prompt():
    assert make_prompt("What is 1 + 1?") == [{"role": "user", "content": f"What is 1 + 1?\n\n{DEFAULT_INSTRUCTION}"}]
    with_system = make_prompt(" 2 + 2? ", system_prompt="Be brief.", instruction=None)
    assert with_system == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}]
    assert "<think>" not in make_prompt("x")[0]["content"]


def test_split_gsm8k_answer():
    assert split_gsm8k_answer("a = <<1+1=2>>2\n#### 1,234") == ("a = 2", "1234")
    assert split_gsm8k_answer("no marker") == ("no marker", "")


@pytest.mark.parametrize(
    "name, source",
    [
        ("DigitalLearningGmbH/MATH-lighteval", "math"),
        ("openai/gsm8k", "gsm8k"),
        ("AI-MO/NuminaMath-CoT", "numina"),
        ("open-r1/OpenR1-Math-220k", "openr1"),
        ("me/my-data", "custom"),
    ],
)
def test_guess_source(name, source):
    assert guess_source(name) == source


def test_math_lighteval():
    dataset = load_math_dataset(str(FIXTURES / "math_lighteval.jsonl"), source="math", keep_columns=("level", "type"))
    assert set(dataset.column_names) == {*OUTPUT_COLUMNS, "level", "type"}
    assert dataset["answer"] == [r"\frac{3}{4}", "(3, -1)", "4"]  # last box wins
    row = dataset[0]
    assert row["prompt"][-1]["role"] == "user"
    assert row["prompt"][-1]["content"].startswith(row["problem"])
    assert row["prompt"][-1]["content"].endswith(DEFAULT_INSTRUCTION)
    # The privileged solution never reaches the student's prompt.
    assert all(r["solution"] not in str(r["prompt"]) for r in dataset)


def test_gsm8k():
    dataset = load_math_dataset(str(FIXTURES / "gsm8k.jsonl"), source="gsm8k")
    assert set(dataset.column_names) == set(OUTPUT_COLUMNS)
    assert dataset["answer"] == ["72", "2000"]
    assert "####" not in dataset[0]["solution"] and "<<" not in dataset[0]["solution"]
    assert dataset[0]["solution"].endswith("72 clips altogether in April and May.")
    assert dataset[0]["problem"].startswith("Natalia sold clips")


def test_numina_drops_rows_without_answer(caplog):
    with caplog.at_level(logging.WARNING, logger="trace_trl.data"):
        dataset = load_math_dataset(str(FIXTURES / "numina_cot.jsonl"), source="numina")
    assert dataset["answer"] == ["1024"]  # the proof has no verifiable answer
    assert "without a verifiable answer" in caplog.text


def test_openr1_with_system_prompt_and_strip_thinking():
    dataset = load_math_dataset(
        str(FIXTURES / "openr1_math.jsonl"),
        source="openr1",
        system_prompt="You are a careful mathematician.",
        strip_thinking=True,
    )
    assert dataset["answer"] == ["4", r"\frac{1}{2}"]
    assert dataset[1]["solution"] == r"Half of 1 is $\frac{1}{2}$."
    assert dataset[0]["prompt"][0] == {"role": "system", "content": "You are a careful mathematician."}
    kept = load_math_dataset(str(FIXTURES / "openr1_math.jsonl"), source="openr1")
    assert kept[1]["solution"].startswith("<think>")


def test_custom_column_mapping_and_empty_solutions():
    path = str(FIXTURES / "custom.jsonl")
    kwargs = {"prompt_column": "question", "answer_column": "final", "solution_column": "worked"}
    with pytest.raises(ValueError, match=r"'worked'.*empty in 2 of 4 rows \(indices 2, 3\)"):
        load_math_dataset(path, **kwargs)
    dataset = load_math_dataset(path, drop_empty_solutions=True, **kwargs)
    assert dataset["answer"] == ["42", "7"]
    assert dataset["solution"] == ["6 * 7 = 42.", "10 - 3 = 7."]
    assert load_math_dataset(path, drop_empty_solutions=True, limit=1, **kwargs)["answer"] == ["42"]


def test_missing_privileged_column_names_it_and_the_available_columns():
    with pytest.raises(ValueError, match=r"'reference'.*privileged context.*\['question', 'final', 'worked'\]"):
        load_math_dataset(
            str(FIXTURES / "custom.jsonl"),
            prompt_column="question",
            answer_column="final",
            solution_column="reference",
        )
    with pytest.raises(ValueError, match=r"'problem'"):
        load_math_dataset(str(FIXTURES / "gsm8k.jsonl"), source="math")


def test_custom_answer_from_boxed_solution():
    dataset = load_math_dataset(str(FIXTURES / "math_lighteval.jsonl"), answer_column=None)
    assert dataset["answer"] == [r"\frac{3}{4}", "(3, -1)", "4"]


@pytest.mark.parametrize("extension", ["parquet", "csv", "json"])
def test_other_local_formats(tmp_path, extension):
    from datasets import Dataset

    rows = {"q": ["What is 1 + 2?", "What is 3 * 3?"], "a": [3, 9], "s": ["1 + 2 = 3", "3 * 3 = 9"]}
    path = tmp_path / f"data.{extension}"
    getattr(Dataset.from_dict(rows), f"to_{extension}")(str(path))
    dataset = load_math_dataset(str(path), prompt_column="q", answer_column="a", solution_column="s")
    assert dataset["answer"] == ["3", "9"]
    assert dataset[1]["prompt"][0]["content"].startswith("What is 3 * 3?")


def test_bad_source_and_extension(tmp_path):
    with pytest.raises(ValueError, match="`source` must be one of"):
        load_math_dataset(str(FIXTURES / "custom.jsonl"), source="mmlu")
    bad = tmp_path / "data.txt"
    bad.write_text("x")
    with pytest.raises(ValueError, match="must end in"):
        load_math_dataset(str(bad))


def test_check_solutions_on_a_dataset():
    from datasets import Dataset

    dataset = Dataset.from_dict({"solution": ["a", " ", "b"]})
    with pytest.raises(ValueError, match=r"empty in 1 of 3 rows \(indices 1\)"):
        check_solutions(dataset)
    assert check_solutions(dataset, drop_empty=True)["solution"] == ["a", "b"]
    with pytest.raises(ValueError, match="available columns"):
        check_solutions(dataset, "context")


def test_custom_conversational_prompt_column(tmp_path):
    from datasets import Dataset

    rows = {
        "prompt": [[{"role": "user", "content": "What is 1 + 2? Box it."}]],
        "answer": ["3"],
        "solution": ["1 + 2 = 3"],
    }
    path = tmp_path / "chat.jsonl"
    Dataset.from_dict(rows).to_json(str(path))
    dataset = load_math_dataset(str(path), prompt_column="prompt", system_prompt="Be careful.")
    assert dataset[0]["prompt"] == [
        {"role": "system", "content": "Be careful."},
        {"role": "user", "content": "What is 1 + 2? Box it."},
    ]
    assert dataset[0]["problem"] == "What is 1 + 2? Box it."


# ---------------------------------------------------------------------------------------------------------------------
# OpenThoughts-114k (config `metadata`), the paper's training set
# ---------------------------------------------------------------------------------------------------------------------

OPENTHOUGHTS = str(FIXTURES / "openthoughts_metadata.jsonl")
# The fixture: 20 math rows "What is $i + 10i$?" (answer 11i), a proof without any box, a row whose reference
# solution is empty (R1's answer 99 stands in), a repeat of problem 1 with other spacing, and 5 rows of the other
# domains (code, puzzle, chemistry, biology, physics), all with boxed answers so only the domain filter drops them.
OPENTHOUGHTS_USABLE = 21


def test_guess_source_openthoughts():
    assert guess_source("open-thoughts/OpenThoughts-114k") == "openthoughts"


def test_openthoughts_keeps_math_rows_and_drops_unverifiable(caplog):
    with caplog.at_level(logging.INFO, logger="trace_trl.data"):
        dataset = load_math_dataset(OPENTHOUGHTS, source="openthoughts")
    assert set(dataset.column_names) == set(OUTPUT_COLUMNS)
    assert "kept 23 math rows of 28 (dropped 5 of other domains)" in caplog.text
    assert "Dropping 1 of 23 rows without a verifiable answer" in caplog.text  # the proof
    assert len(dataset) == 22  # the repeated problem is only dropped by the split loader
    assert not any(word in " ".join(dataset["problem"]) for word in ("piano", "protons", "insect", "SI unit", "list"))
    first = dataset[0]
    assert first["problem"] == "What is $1 + 10$?" and first["answer"] == "11"
    # The privileged context is the reference solution, not R1's answer, and it never reaches the prompt.
    assert first["solution"] == "We add: $1 + 10 = 11$. Thus the answer is $\\boxed{11}$."
    assert first["prompt"] == make_prompt("What is $1 + 10$?")
    assert all(r["solution"] not in str(r["prompt"]) for r in dataset)
    fallback = dataset[dataset["problem"].index("Find $x$ if $2x = 198$.")]
    assert fallback["answer"] == "99" and fallback["solution"].startswith("Divide by 2")


def test_openthoughts_default_config_is_refused_with_the_fix(tmp_path):
    from datasets import Dataset

    path = tmp_path / "default.jsonl"
    Dataset.from_dict({"system": ["s"], "conversations": [[{"from": "user", "value": "q"}]]}).to_json(str(path))
    with pytest.raises(ValueError, match=r"`default` config.*`metadata` config"):
        load_math_dataset(str(path), source="openthoughts")


def test_openthoughts_splits_are_disjoint_capped_and_deterministic(caplog):
    from trace_trl.data import PAPER_MAX_TRAIN_SAMPLES, load_openthoughts_math

    with caplog.at_level(logging.WARNING, logger="trace_trl.data"):
        splits = load_openthoughts_math(OPENTHOUGHTS, validation_size=5, seed=3)
    assert "Dropping 1 of 22 rows that repeat an earlier problem" in caplog.text
    train, validation = splits["train"], splits["validation"]
    assert (len(train), len(validation)) == (OPENTHOUGHTS_USABLE - 5, 5)
    assert not set(train["problem"]) & set(validation["problem"])
    assert len(set(train["problem"]) | set(validation["problem"])) == OPENTHOUGHTS_USABLE
    assert set(train.column_names) == set(validation.column_names) == set(OUTPUT_COLUMNS)

    again = load_openthoughts_math(OPENTHOUGHTS, validation_size=5, seed=3)
    assert again["train"]["problem"] == train["problem"] and again["validation"]["problem"] == validation["problem"]
    other = load_openthoughts_math(OPENTHOUGHTS, validation_size=5, seed=4)
    assert other["validation"]["problem"] != validation["problem"]  # the seed does shuffle

    # The cap takes a prefix of the same shuffled training rows; the validation split does not move with it.
    capped = load_openthoughts_math(OPENTHOUGHTS, validation_size=5, seed=3, max_train_samples=4)
    assert capped["train"]["problem"] == train["problem"][:4]
    assert capped["validation"]["problem"] == validation["problem"]
    assert (
        load_openthoughts_math(OPENTHOUGHTS, validation_size=0, seed=3, max_train_samples=None)["train"].num_rows == 21
    )
    assert PAPER_MAX_TRAIN_SAMPLES == 30_000


def test_openthoughts_default_cap_is_the_papers(monkeypatch):
    import inspect

    from trace_trl import data

    signature = inspect.signature(data.load_openthoughts_math)
    assert signature.parameters["max_train_samples"].default == 30_000
    assert signature.parameters["validation_size"].default == 500
    with pytest.raises(ValueError, match="too few for a validation split of 500"):
        data.load_openthoughts_math(OPENTHOUGHTS)
    with pytest.raises(ValueError, match="`validation_size` must be >= 0"):
        data.load_openthoughts_math(OPENTHOUGHTS, validation_size=-1)
    with pytest.raises(ValueError, match="`max_train_samples` must be >= 1"):
        data.load_openthoughts_math(OPENTHOUGHTS, max_train_samples=0)
