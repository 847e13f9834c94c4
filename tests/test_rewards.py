"""Reward functions on a table of tricky answers; the same table is documented in docs/rlvr.md."""

from __future__ import annotations

import threading

import pytest

from trace_trl.rewards import (
    REWARD_FUNCTIONS,
    accuracy_reward,
    answer_region,
    boxed_match_reward,
    completion_text,
    extract_choice,
    format_reward,
    multiple_choice_reward,
    normalize_answer,
)


def chat(content: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": content}]


# (completion, gold answer, accuracy_reward, boxed_match_reward)
MATH_TABLE = [
    pytest.param(r"The answer is $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}", 1.0, 1.0, id="same-fraction"),
    pytest.param(r"\boxed{0.5}", r"\frac{1}{2}", 1.0, 0.0, id="decimal-vs-frac"),
    pytest.param(r"\boxed{1/2}", r"\frac{1}{2}", 1.0, 0.0, id="slash-vs-frac"),
    pytest.param(r"\boxed{\frac{1}{2}}", "0.5", 1.0, 0.0, id="frac-vs-decimal-gold"),
    pytest.param(r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}", 1.0, 1.0, id="dfrac"),
    pytest.param(r"\boxed{\tfrac{1}{2}}", "0.5", 1.0, 0.0, id="tfrac"),
    pytest.param(r"\boxed{\left( 3, -1 \right)}", "(3, -1)", 1.0, 1.0, id="left-right-pair"),
    pytest.param(r"\boxed{5\text{ cm}}", "5", 1.0, 0.0, id="units-in-prediction"),
    pytest.param(r"\boxed{5}", r"5\text{ cm}", 1.0, 0.0, id="units-in-gold"),
    pytest.param(r"\boxed{1,000}", "1000", 1.0, 1.0, id="thousands-separator"),
    pytest.param(r"\boxed{27}", "27.0", 1.0, 1.0, id="float-gold"),
    pytest.param(r"\boxed{x^2+1}", "1+x^2", 1.0, 0.0, id="commuted-expression"),
    pytest.param(r"\boxed{\frac{1}{3}}", r"\frac{1}{2}", 0.0, 0.0, id="wrong"),
    pytest.param(r"<think>It is \boxed{2}.</think> I am not sure.", "2", 0.0, 0.0, id="box-only-in-think"),
    pytest.param(r"<think>maybe \boxed{3}</think> Final: \boxed{2}", "2", 1.0, 1.0, id="think-then-box"),
    pytest.param(r"<think>long reasoning \boxed{2} never closed", "2", 0.0, 0.0, id="unclosed-think"),
    pytest.param(r"reasoning </think> \boxed{2}", "2", 1.0, 1.0, id="template-opened-think"),
    pytest.param(r"\boxed{3} no wait, \boxed{2}", "2", 1.0, 1.0, id="last-box-counts"),
    pytest.param(r"\boxed{2} no wait, \boxed{3}", "2", 0.0, 0.0, id="earlier-box-ignored"),
    pytest.param(r"\boxed{2} and a truncated \boxed{3", "2", 1.0, 1.0, id="truncated-last-box"),
    pytest.param("The answer is 2.", "2", 0.0, 0.0, id="no-box"),
    pytest.param("", "2", 0.0, 0.0, id="empty-output"),
    pytest.param(chat(r"So \boxed{\frac{3}{4}}."), "0.75", 1.0, 0.0, id="conversational"),
    pytest.param(chat(""), "2", 0.0, 0.0, id="conversational-empty"),
    pytest.param(r"\boxed{2}", "", None, None, id="empty-gold-skipped"),
]


@pytest.mark.parametrize("completion, gold, expected, _", MATH_TABLE)
def test_accuracy_reward_table(completion, gold, expected, _):
    assert accuracy_reward([completion], answer=[gold]) == [expected]


@pytest.mark.parametrize("completion, gold, _, expected", MATH_TABLE)
def test_boxed_match_reward_table(completion, gold, _, expected):
    assert boxed_match_reward([completion], answer=[gold]) == [expected]


def test_accuracy_reward_batch_and_log_extra():
    logged = {}
    rewards = accuracy_reward(
        [r"\boxed{2}", chat(r"\boxed{4}"), "nothing"],
        answer=["2", "5", "1"],
        log_extra=lambda name, values: logged.__setitem__(name, values),
        solution=["ignored"] * 3,
    )
    assert rewards == [1.0, 0.0, 0.0]
    assert logged["answer_parsed"][2] == "[no box]"


def test_accuracy_reward_unparseable_gold_is_skipped():
    assert accuracy_reward([r"\boxed{2}"], answer=[r"\frac{"]) == [None]


def test_accuracy_reward_off_main_thread():
    # math-verify's signal-based timeouts only work in the main thread; TRL may call rewards from a worker thread.
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=accuracy_reward([r"\boxed{0.5}"], answer=[r"\frac12"])))
    thread.start()
    thread.join()
    assert result["r"] == [1.0]


def test_accuracy_reward_without_math_verify(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("math_verify"):
            raise ImportError("no math_verify")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install 'trace-trl\[math\]'"):
        accuracy_reward([r"\boxed{1}"], answer=["1"])


@pytest.mark.parametrize(
    "completion, expected",
    [
        (r"\boxed{2}", 1.0),
        (r"<think>try \boxed{1}</think> so \boxed{2}", 1.0),
        (r"\boxed{1} or \boxed{2}", 0.0),
        ("no box", 0.0),
        (r"<think>\boxed{2}", 0.0),
        (r"<think>\boxed{2}</think>", 0.0),
        (r"\boxed{\frac{1}{2}", 0.0),
        ("", 0.0),
        (chat(r"\boxed{\frac{1}{2}}"), 1.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward([completion]) == [expected]


@pytest.mark.parametrize(
    "completion, expected",
    [
        (r"\boxed{C}", 1.0),
        (r"\boxed{\text{C}}", 1.0),
        (r"$\boxed{(C)}$", 1.0),
        ("Answer: C", 1.0),
        ("The answer is (C).", 1.0),
        ("**Answer:** C", 1.0),
        ("Options (A) and (B) fail, so (C)", 1.0),
        ("After checking everything, C", 1.0),
        ("I pick C.", 1.0),
        ("Answer: B. On reflection, Answer: C", 1.0),
        (r"\boxed{C} although (A) was tempting", 1.0),
        ("Answer: B", 0.0),
        (r"<think>\boxed{C}</think> Answer: A", 0.0),
        (r"<think>\boxed{C}", 0.0),
        ("I cannot decide.", 0.0),
        ("The answer is a bit unclear, but (C)", 1.0),
        ("ANSWER IS C", 1.0),
        ("Answer: I think it is B", 0.0),
        ("", 0.0),
        (chat(r"\boxed{C}"), 1.0),
    ],
)
def test_multiple_choice_reward(completion, expected):
    assert multiple_choice_reward([completion], answer=["C"]) == [expected]


def test_multiple_choice_gold_forms():
    assert multiple_choice_reward([r"\boxed{c}", "x", "x"], answer=["(C)", "E", None]) == [1.0, None, None]


def test_extract_choice():
    assert extract_choice("A cat sat. The answer is D") == "D"
    assert extract_choice("nothing here") is None


def test_helpers():
    assert completion_text(chat("hi")) == "hi"
    assert completion_text([]) == ""
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"}]}]) == "a"
    assert answer_region("<think>x</think>y") == "y"
    assert answer_region("<think>x") == ""
    assert normalize_answer(r"$\dfrac{1}{2}$.") == r"\frac{1}{2}"
    assert normalize_answer(r"\text{(B)}") == "(B)"


def test_names_for_trl_logs():
    for name, function in REWARD_FUNCTIONS.items():
        assert function.__name__ == name


def test_dataset_and_rewards_plug_into_grpo_trainer(tiny_model_dir, tmp_path):
    """The loader's columns reach TRL's reward functions, and each reward is logged under its own name."""
    from pathlib import Path

    from trl import GRPOConfig, GRPOTrainer

    from trace_trl.data import load_math_dataset

    dataset = load_math_dataset(str(Path(__file__).parent / "fixtures" / "math_lighteval.jsonl"), source="math")
    seen = {}

    def spy_reward(completions, answer, solution, **kwargs):
        seen.update(answer=answer, solution=solution, completion=completions[0])
        return [0.0] * len(completions)

    args = GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=3,
        num_generations=3,
        max_completion_length=8,
        max_steps=1,
        report_to="none",
        chat_template_kwargs={"enable_thinking": False},
    )
    rewards = [accuracy_reward, boxed_match_reward, format_reward, spy_reward]
    trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=rewards, args=args, train_dataset=dataset)
    trainer.train()
    logged = trainer.state.log_history[0]
    for name in ("accuracy_reward", "boxed_match_reward", "format_reward"):
        assert f"rewards/{name}/mean" in logged
    assert set(seen["answer"]) <= set(dataset["answer"])
    assert set(seen["solution"]) <= set(dataset["solution"])
    assert seen["completion"][0]["role"] == "assistant"  # conversational completions
