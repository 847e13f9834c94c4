"""`trace-trl eval`: benchmark loaders on fixtures, pure scoring, a scripted backend, and the tiny model end to end."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from trace_trl.evaluation import (
    BENCHMARKS,
    PAPER_SAMPLING,
    HFGenerator,
    Problem,
    SamplingSettings,
    benchmark_mean_ci,
    bootstrap_ci,
    bootstrap_means,
    evaluate,
    evaluate_benchmark,
    load_benchmarks,
    load_gpqa_diamond,
    make_generator,
    per_problem_scores,
    results_table,
    score_samples,
    vllm_available,
)
from trace_trl.scripts.eval import main, resolve_sampling


FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_FILES = {
    "math500": FIXTURES / "math500.jsonl",
    "aime24": FIXTURES / "aime24.jsonl",
    "aime25": FIXTURES / "aime25.jsonl",
    "amc23": FIXTURES / "amc23.jsonl",
    "gpqa_diamond": FIXTURES / "gpqa_diamond.jsonl",
}
FILE_ARGS = [arg for name, path in FIXTURE_FILES.items() for arg in ("--benchmark-file", f"{name}={path}")]


class ScriptedGenerator:
    """Test double: returns scripted completions per problem text (matched by substring), recording its calls."""

    def __init__(self, script: dict[str, list[str]], default: str = "I do not know."):
        self.script = script
        self.default = default
        self.calls: list[tuple[int, int]] = []

    def __call__(self, prompts, num_samples):
        self.calls.append((len(prompts), num_samples))
        outputs = []
        for messages in prompts:
            content = messages[-1]["content"]
            scripted = next((v for key, v in self.script.items() if key in content), [self.default] * num_samples)
            outputs.append(list(scripted[:num_samples]))
        return outputs


@pytest.mark.parametrize(
    "correct, expected",
    [
        ([[True, True, False, False]], {"avg@k": 0.5, "pass@k": 1.0}),
        ([[True, False, True, False], [False] * 4], {"avg@k": 0.25, "pass@k": 0.5}),
        ([[True] * 4, [True, False, False, False], [False] * 4], {"avg@k": 1.25 / 3, "pass@k": 2 / 3}),
        ([[True], [False]], {"avg@k": 0.5, "pass@k": 0.5}),
    ],
)
def test_score_samples(correct, expected):
    scores = score_samples(correct)
    assert scores.keys() == expected.keys()
    for key in expected:
        assert scores[key] == pytest.approx(expected[key])


def test_score_samples_edge_cases():
    assert all(math.isnan(v) for v in score_samples([]).values())
    with pytest.raises(ValueError, match="at least one sample"):
        score_samples([[True], []])


def test_loaders_read_fixtures_in_hub_schemas():
    problems = load_benchmarks(list(BENCHMARKS), files={k: str(v) for k, v in FIXTURE_FILES.items()})
    assert list(problems) == list(BENCHMARKS)
    assert [p.answer for p in problems["math500"]] == ["2", r"\frac{1}{2}"]
    assert problems["math500"][0].id == "test/prealgebra/1.json"
    assert [p.answer for p in problems["aime24"]] == ["24", "1001"]
    assert [p.answer for p in problems["aime25"]] == ["12", "81"]
    assert [p.answer for p in problems["amc23"]] == ["27", "3"]  # float answers read as integers
    assert problems["amc23"][0].prompt[-1]["content"].startswith(r"What is $5 \cdot 5 + 2$?")
    assert all(p.kind == "math" and "\\boxed{}" in p.prompt[-1]["content"] for p in problems["aime24"])
    gpqa = problems["gpqa_diamond"]
    assert [p.id for p in gpqa] == ["rec1", "rec2", "rec3"]
    assert all(p.kind == "choice" and p.answer in "ABCD" for p in gpqa)
    with_limit = load_benchmarks(["math500"], files={"math500": str(FIXTURE_FILES["math500"])}, limit=1)
    assert len(with_limit["math500"]) == 1


def test_gpqa_options_shuffled_reproducibly():
    path = str(FIXTURE_FILES["gpqa_diamond"])
    first, again = load_gpqa_diamond(path), load_gpqa_diamond(path)
    assert [p.answer for p in first] == [p.answer for p in again]
    assert [p.prompt for p in first] == [p.prompt for p in again]
    for problem, correct in zip(first, ["Photon", "Na", "Mitochondrion"]):
        content = problem.prompt[-1]["content"]
        assert f"{problem.answer}) {correct}\n" in content + "\n"
        assert sorted(re.findall(r"^([A-D])\) ", content, re.MULTILINE)) == ["A", "B", "C", "D"]
        assert "letter of your final answer" in content
    letters_by_seed = {tuple(p.answer for p in load_gpqa_diamond(path, seed=seed)) for seed in range(8)}
    assert len(letters_by_seed) > 1  # the seed does move the options


def test_unknown_benchmark():
    with pytest.raises(ValueError, match="Unknown benchmark"):
        load_benchmarks(["mmlu"])


def test_evaluate_benchmark_with_scripted_backend():
    problems = load_benchmarks(["math500"], files={"math500": str(FIXTURE_FILES["math500"])})["math500"]
    generate = ScriptedGenerator(
        {
            "What is $1+1$?": [r"\boxed{2}", r"\boxed{3}", r"<think>\boxed{2}</think> 2", r"so \boxed{2}."],
            "Simplify": [r"\boxed{0.5}", "", r"\boxed{2/4}", r"\boxed{1}"],
        }
    )
    result = evaluate_benchmark(problems, generate, 4)
    assert result["correct"] == [[True, False, False, True], [True, False, True, False]]
    assert result["avg@k"] == pytest.approx(0.5)
    assert result["pass@k"] == pytest.approx(1.0)
    assert generate.calls == [(2, 4)]
    boxed = evaluate_benchmark(problems, generate, 4, scorer="boxed_match")
    assert boxed["correct"][1] == [False, False, False, False]  # exact match misses 0.5 and 2/4


def test_generator_must_return_k_samples():
    problems = [Problem(id="0", prompt=[{"role": "user", "content": "x"}], answer="1")]
    with pytest.raises(RuntimeError, match="must return 2 completions"):
        evaluate_benchmark(problems, lambda prompts, k: [["only one"]], 2)


def test_main_with_scripted_backend_writes_json_and_table(tmp_path):
    generate = ScriptedGenerator(
        {
            "What is $1+1$?": [r"\boxed{2}"] * 2 + ["no"] * 2,  # 2 of 4
            "Simplify": [r"\boxed{\dfrac{1}{2}}"] * 4,  # 4 of 4
            "divisors of $6$": [r"\boxed{12}", "x", "x", "x"],  # 1 of 4
            "electromagnetic": [],  # filled below with the gold letter
        }
    )
    gold = load_gpqa_diamond(str(FIXTURE_FILES["gpqa_diamond"]))[0].answer
    generate.script["electromagnetic"] = [f"\\boxed{{{gold}}}"] * 4
    output = tmp_path / "run"
    argv = ["--model", "scripted", "--num-samples", "4", "--output-dir", str(output), *FILE_ARGS]
    assert main(argv, generate=generate) == 0
    results = json.loads((output / "results.json").read_text())
    scores = {name: (b["avg@k"], b["pass@k"]) for name, b in results["benchmarks"].items()}
    assert scores == {
        "math500": (pytest.approx(0.75), 1.0),
        "aime24": (0.0, 0.0),
        "aime25": (pytest.approx(0.125), 0.5),
        "amc23": (0.0, 0.0),
        "gpqa_diamond": (pytest.approx(1 / 3), pytest.approx(1 / 3)),
    }
    assert results["benchmarks"]["math500"]["correct"] == [[True, True, False, False], [True] * 4]
    assert results["benchmarks"]["gpqa_diamond"]["ids"] == ["rec1", "rec2", "rec3"]
    assert results["average"]["avg@k"] == pytest.approx((0.75 + 0.125 + 1 / 3) / 5)
    assert results["model"] == "scripted"
    assert results["settings"]["num_samples"] == 4 and results["settings"]["backend"] == "custom"
    assert results["timestamp"].endswith("+00:00")
    assert "completions" not in results["benchmarks"]["math500"]
    table = (output / "results.md").read_text()
    assert "| Model | k | MATH-500 | AIME 2024 | AIME 2025 | AMC 2023 | GPQA-Diamond | Average |" in table
    # Intervals by hand: MATH-500's per-problem scores (0.5, 1) resample to means {0.5, 0.75, 1} -> [0.5, 1];
    # AIME 2025's (0.25, 0) -> [0, 0.25]; GPQA's (1, 0, 0) reach the mean 1 with probability 1/27 > 2.5% -> [0, 1].
    row = next(line for line in table.splitlines() if line.startswith("| scripted | 4 | 75.00"))
    assert row.startswith(
        "| scripted | 4 | 75.00 [50.00, 100.00] | 0.00 [0.00, 0.00] | 12.50 [0.00, 25.00] | 0.00 [0.00, 0.00] "
        "| 33.33 [0.00, 100.00] | 24.17 ["
    )
    assert results["benchmarks"]["math500"]["avg@k_ci"] == [0.5, 1.0]
    low, high = results["average"]["avg@k_ci"]
    assert low < results["average"]["avg@k"] < high and 0.0 <= low and high <= 0.5
    assert results["bootstrap"] == {
        "method": "percentile bootstrap over problems (stratified by benchmark for the mean)",
        "num_resamples": 1000,
        "confidence": 0.95,
        "seed": 0,
    }
    assert "95% percentile-bootstrap interval over problems (1000 resamples, seed 0)" in table
    assert "## pass@4 (%)" in table and "| scripted | 4 | 100.00 | 0.00 | 50.00 | 0.00 | 33.33 | 36.67 |" in table


def test_compare_table_lines_up_columns(tmp_path):
    def result(model, scores):
        benchmarks = {name: {"avg@k": v, "pass@k": v} for name, v in scores.items()}
        return {"model": model, "settings": {"num_samples": 4}, "benchmarks": benchmarks}

    current = result("trace", {"gpqa_diamond": 0.5, "math500": 0.8})
    earlier = result("grpo", {"math500": 0.7, "aime24": 0.1})
    lines = results_table(current, [earlier]).splitlines()
    assert lines[0] == "| Model | k | MATH-500 | AIME 2024 | GPQA-Diamond | Average |"
    assert lines[2] == "| trace | 4 | 80.00 | - | 50.00 | - |"
    assert lines[3] == "| grpo | 4 | 70.00 | 10.00 | - | - |"

    # Through the CLI: --compare reads an earlier results.json.
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(earlier))
    argv = ["--model", "m", "--benchmarks", "math500", "--output-dir", str(tmp_path / "out"), "--compare", str(path)]
    assert (
        main([*argv, "--benchmark-file", f"math500={FIXTURE_FILES['math500']}"], generate=ScriptedGenerator({})) == 0
    )
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| m | 1 | 0.00 | - | - |" in table and "| grpo | 4 | 70.00 | 10.00 | 40.00 |" in table


def test_main_bad_arguments(capsys):
    assert main(["--model", "m", "--benchmark-file", "nonsense"], generate=ScriptedGenerator({})) == 2
    assert "NAME=PATH" in capsys.readouterr().err
    assert main(["--model", "m", "--benchmark-file", "mmlu=x.jsonl"], generate=ScriptedGenerator({})) == 2
    with pytest.raises(SystemExit):
        main(["--model", "m", "--benchmarks", "mmlu"])


def test_cli_dispatches_to_eval(capsys):
    from trace_trl.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["eval", "--help"])
    assert exit_info.value.code == 0
    assert "--num-samples" in capsys.readouterr().out


def test_eval_on_tiny_model_end_to_end(tiny_model_dir, tmp_path):
    output = tmp_path / "tiny"
    argv = [
        "--model", tiny_model_dir, "--backend", "hf", "--num-samples", "2", "--max-new-tokens", "6",
        "--batch-size", "3", "--enable-thinking", "false", "--output-dir", str(output), "--save-completions",
        *FILE_ARGS,
    ]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((output / "results.json").read_text())
    assert list(results["benchmarks"]) == list(BENCHMARKS)
    assert results["settings"]["backend"] == "hf"
    assert results["settings"]["chat_template_kwargs"] == {"enable_thinking": False}
    for benchmark in results["benchmarks"].values():
        assert len(benchmark["correct"]) == benchmark["num_problems"] == len(benchmark["completions"])
        assert all(len(samples) == 2 for samples in benchmark["correct"])
        assert 0.0 <= benchmark["avg@k"] <= benchmark["pass@k"] <= 1.0
    table_lines = (output / "results.md").read_text().splitlines()
    row = next(line for line in table_lines if line.startswith(f"| {tiny_model_dir} |"))
    assert re.fullmatch(r"\| .+ \| 2( \| \d+\.\d\d \[\d+\.\d\d, \d+\.\d\d\]){6} \|", row)


def test_hf_generator_greedy_repeats_one_completion(tiny_model_dir):
    generate = HFGenerator(tiny_model_dir, SamplingSettings(temperature=0.0, max_new_tokens=4), batch_size=2)
    prompts = [[{"role": "user", "content": "What is 12 + 7?"}], [{"role": "user", "content": "Compute 6 * 7."}]]
    outputs = generate(prompts, 3)
    assert len(outputs) == 2 and all(len(samples) == 3 and len(set(samples)) == 1 for samples in outputs)
    sampled = HFGenerator(generate.model, SamplingSettings(max_new_tokens=4), tokenizer=generate.tokenizer)(prompts, 2)
    assert [len(samples) for samples in sampled] == [2, 2]


def test_auto_backend_is_hf_without_vllm_or_gpu(tiny_model_dir):
    import torch

    if vllm_available() and torch.cuda.is_available():
        pytest.skip("vLLM and a GPU are present: auto picks vLLM")
    assert isinstance(make_generator(tiny_model_dir, SamplingSettings(), backend="auto"), HFGenerator)
    with pytest.raises(ValueError, match="`backend` must be one of"):
        make_generator(tiny_model_dir, SamplingSettings(), backend="tgi")


@pytest.mark.gpu
@pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed (pip install 'trace-trl[vllm]')")
def test_vllm_backend_on_tiny_model(tiny_model_dir):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("the vLLM backend needs a CUDA device")
    from trace_trl.evaluation import VLLMGenerator

    generate = VLLMGenerator(tiny_model_dir, SamplingSettings(max_new_tokens=4), gpu_memory_utilization=0.3)
    outputs = generate([[{"role": "user", "content": "What is 12 + 7?"}]], 3)
    assert len(outputs) == 1 and len(outputs[0]) == 3


def test_evaluate_records_settings():
    problems = {"amc23": load_benchmarks(["amc23"], files={"amc23": str(FIXTURE_FILES["amc23"])})["amc23"]}
    results = evaluate(
        "m", problems, ScriptedGenerator({"5 \\cdot 5": [r"\boxed{27}"]}), settings={"temperature": 1.0}
    )
    assert results["settings"] == {"num_samples": 1, "scorer": "math_verify", "temperature": 1.0}
    assert results["benchmarks"]["amc23"]["correct"] == [[True], [False]]
    assert results["benchmarks"]["amc23"]["name"] == "AMC 2023"


# ---------------------------------------------------------------------------------------------------------------------
# Bootstrap confidence intervals
# ---------------------------------------------------------------------------------------------------------------------


def test_bootstrap_constant_scores_give_a_zero_width_interval():
    assert bootstrap_ci([0.75] * 40) == (0.75, 0.75)
    assert bootstrap_ci([0.0]) == (0.0, 0.0)
    assert benchmark_mean_ci({"a": [1.0] * 5, "b": [0.0] * 9}) == (0.5, 0.5)


def test_bootstrap_hand_computed_two_problem_case():
    # Two problems scoring 0 and 1: a resample's mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the
    # 2.5% and 97.5% quantiles of 1000 resamples are 0 and 1 (with overwhelming probability, and exactly for seed 0).
    means = bootstrap_means([0.0, 1.0], num_resamples=1000, seed=0)
    assert set(means.tolist()) == {0.0, 0.5, 1.0}
    assert abs((means == 0.5).mean() - 0.5) < 0.05
    assert bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    # One problem cannot vary.
    assert bootstrap_ci([1.0 / 3.0]) == pytest.approx((1 / 3, 1 / 3))


def test_bootstrap_interval_contains_the_mean_and_shrinks_with_n():
    small = [1.0, 0.0] * 10  # mean 0.5, n = 20
    large = [1.0, 0.0] * 200  # mean 0.5, n = 400
    low_small, high_small = bootstrap_ci(small, seed=1)
    low_large, high_large = bootstrap_ci(large, seed=1)
    assert low_small < 0.5 < high_small and low_large < 0.5 < high_large
    assert high_large - low_large < high_small - low_small
    # The normal approximation: half-width 1.96 * sqrt(0.25 / 400) = 0.049.
    assert high_large - 0.5 == pytest.approx(0.049, abs=0.01) and 0.5 - low_large == pytest.approx(0.049, abs=0.01)
    # A lower confidence gives a narrower interval inside the wider one.
    low_80, high_80 = bootstrap_ci(large, seed=1, confidence=0.8)
    assert low_large <= low_80 < high_80 <= high_large


def test_bootstrap_is_seeded():
    scores = [i / 7 for i in range(30)]
    assert bootstrap_ci(scores, seed=5) == bootstrap_ci(scores, seed=5)
    assert bootstrap_ci(scores, seed=5) != bootstrap_ci(scores, seed=6)
    # A benchmark's resamples do not depend on which other benchmarks are in the mean.
    alone = bootstrap_means(scores, seed=5, stream="aime24")
    assert (alone == bootstrap_means(scores, seed=5, stream="aime24")).all()
    assert not (alone == bootstrap_means(scores, seed=5, stream="aime25")).all()


def test_benchmark_mean_ci_is_the_unweighted_mean_of_the_benchmark_resamples():
    import numpy as np

    scores = {"a": [1.0, 0.0, 1.0, 1.0], "b": [0.0] * 50 + [1.0] * 50}
    expected = (
        bootstrap_means(scores["a"], seed=2, stream="a") + bootstrap_means(scores["b"], seed=2, stream="b")
    ) / 2
    assert benchmark_mean_ci(scores, seed=2) == pytest.approx(tuple(np.percentile(expected, [2.5, 97.5])))
    low, high = benchmark_mean_ci(scores, seed=2)
    assert low < (0.75 + 0.5) / 2 < high  # unweighted: the 4-problem benchmark counts as much as the 100-problem one


def test_bootstrap_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="num_resamples"):
        bootstrap_ci([1.0], num_resamples=0)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0], confidence=1.0)


def test_per_problem_scores():
    assert per_problem_scores([[True, False, True, True], [False, False]]) == [0.75, 0.0]


# ---------------------------------------------------------------------------------------------------------------------
# The paper's evaluation preset
# ---------------------------------------------------------------------------------------------------------------------


def _parsed(*argv):
    from trace_trl.scripts.eval import _parser

    return resolve_sampling(_parser().parse_args(["--model", "m", *argv]))


def test_paper_preset_values_and_overrides():
    assert PAPER_SAMPLING == {
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": 20,
        "num_samples": 8,
        "enable_thinking": True,
    }
    assert _parsed("--paper") == PAPER_SAMPLING
    assert _parsed() == {"temperature": 0.6, "top_p": 0.95, "top_k": None, "num_samples": 1, "enable_thinking": None}
    overridden = _parsed("--paper", "-k", "16", "--top-k", "0", "--enable-thinking", "false", "--temperature", "1")
    assert overridden == {
        "temperature": 1.0,
        "top_p": 0.95,
        "top_k": None,
        "num_samples": 16,
        "enable_thinking": False,
    }


def test_main_with_paper_preset_records_the_settings(tmp_path):
    generate = ScriptedGenerator({"What is $1+1$?": [r"\boxed{2}"] * 8})
    output = tmp_path / "paper"
    argv = ["--model", "m", "--paper", "--benchmarks", "math500", "--output-dir", str(output)]
    assert main([*argv, "--benchmark-file", f"math500={FIXTURE_FILES['math500']}"], generate=generate) == 0
    assert generate.calls == [(2, 8)]
    results = json.loads((output / "results.json").read_text())
    settings = results["settings"]
    assert (settings["temperature"], settings["top_p"], settings["top_k"], settings["num_samples"]) == (
        0.6,
        0.95,
        20,
        8,
    )
    assert settings["chat_template_kwargs"] == {"enable_thinking": True} and settings["preset"] == "paper"
    assert results["benchmarks"]["math500"]["avg@k"] == 0.5 and results["benchmarks"]["math500"]["avg@k_ci"] == [0, 1]
    text = (output / "results.md").read_text()
    assert "temperature 0.6, top-p 0.95, top-k 20, thinking True" in text and "## avg@8 (%)" in text
    assert "| m | 8 | 50.00 [0.00, 100.00] | 50.00 [0.00, 100.00] |" in text


def test_no_bootstrap_and_bad_bootstrap_flags(tmp_path, capsys):
    argv = ["--model", "m", "--benchmarks", "math500", "--benchmark-file", f"math500={FIXTURE_FILES['math500']}"]
    assert (
        main([*argv, "--output-dir", str(tmp_path), "--bootstrap-resamples", "0"], generate=ScriptedGenerator({})) == 0
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert "avg@k_ci" not in results["benchmarks"]["math500"] and "bootstrap" not in results
    assert "| m | 1 | 0.00 | 0.00 |" in (tmp_path / "results.md").read_text()
    assert main([*argv, "--confidence", "95"], generate=ScriptedGenerator({})) == 2
    assert "--confidence must be in (0, 1)" in capsys.readouterr().err
    assert main([*argv, "--top-k", "-1"], generate=ScriptedGenerator({})) == 2


def test_hf_generator_passes_top_k(tiny_model_dir):
    prompts = [[{"role": "user", "content": "What is 12 + 7?"}]]
    greedy = HFGenerator(tiny_model_dir, SamplingSettings(temperature=0.0, max_new_tokens=5))
    top1 = HFGenerator(
        greedy.model, SamplingSettings(temperature=5.0, top_k=1, max_new_tokens=5), tokenizer=greedy.tokenizer
    )
    # top-k 1 keeps only the most likely token: every sample is the greedy completion, even at temperature 5.
    assert top1(prompts, 4) == [greedy(prompts, 1)[0] * 4]
    # Without top-k, the same temperature samples different completions, so the check above does test top-k.
    free = HFGenerator(greedy.model, SamplingSettings(temperature=5.0, max_new_tokens=5), tokenizer=greedy.tokenizer)
    assert len(set(free(prompts, 4)[0])) > 1


def test_vllm_generator_passes_top_k(monkeypatch):
    import sys
    import types

    captured = {}

    class FakeLLM:
        def __init__(self, model, seed, **kwargs):
            pass

        def get_tokenizer(self):
            return types.SimpleNamespace(apply_chat_template=lambda messages, **kwargs: messages[-1]["content"])

        def generate(self, texts, params, use_tqdm):
            captured["params"] = params
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text="x")] * params.n) for _ in texts]

    fake = types.ModuleType("vllm")
    fake.LLM = FakeLLM
    fake.SamplingParams = lambda **kwargs: types.SimpleNamespace(**kwargs)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    from trace_trl.evaluation import VLLMGenerator

    VLLMGenerator("m", SamplingSettings(top_k=20))([[{"role": "user", "content": "q"}]], 8)
    params = captured["params"]
    assert (params.n, params.temperature, params.top_p, params.top_k) == (8, 0.6, 0.95, 20)
    VLLMGenerator("m", SamplingSettings())([[{"role": "user", "content": "q"}]], 2)
    assert captured["params"].top_k == -1
