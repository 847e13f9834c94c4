"""`benchmarks/step_benchmark.py` at a tiny size, in-process: the result structure and the GRPO-relative ratios."""

from __future__ import annotations

import importlib.util
import math
import statistics
from pathlib import Path

import pytest


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_benchmark.py"


@pytest.fixture(scope="module")
def step_benchmark():
    spec = importlib.util.spec_from_file_location("step_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_ARGS = [
    "--tokenizer",
    "tiny",
    "--vocab-size",
    "512",
    "--hidden-size",
    "32",
    "--num-layers",
    "1",
    "--prompt-length",
    "8",
    "--teacher-prompt-length",
    "12",
    "--spans-per-row",
    "2",
    "--lengths",
    "16",
    "32",
    "--batch-sizes",
    "2",
    "1",
    "--repeats",
    "2",
    "--warmup",
    "0",
    "--in-process",
]


def test_step_benchmark_reports_every_method_with_ratios_against_this_runs_grpo(step_benchmark):
    report = step_benchmark.run_benchmark(step_benchmark.parse_args(TINY_ARGS))

    assert set(report) == {"config", "machine", "results"}
    assert report["config"]["vocab_size"] == 512 and report["config"]["lengths"] == [16, 32]
    assert report["machine"]["torch"]
    results = report["results"]
    assert [(r["length"], r["batch"], r["method"]) for r in results] == [
        (length, batch, method) for length, batch in ((16, 2), (32, 1)) for method in ("grpo", "trace", "dense")
    ]
    for r in results:
        assert r["status"] == "ok", r
        assert len(r["times_s"]) == 2 and r["time_s"] > 0
        assert r["time_s"] == pytest.approx(statistics.median(r["times_s"]))
        assert r["peak_mib"] >= 0 and math.isfinite(r["loss"])
        grpo = next(g for g in results if g["method"] == "grpo" and g["length"] == r["length"])
        assert r["time_ratio"] == pytest.approx(r["time_s"] / grpo["time_s"])
        assert r["cpu_ratio"] == pytest.approx(r["cpu_s"] / grpo["cpu_s"])
        if grpo["peak_mib"] > 0:
            assert r["memory_ratio"] == pytest.approx(r["peak_mib"] / grpo["peak_mib"])
        else:
            assert r["memory_ratio"] is None
    by_method = {(r["length"], r["method"]): r for r in results}
    assert by_method[(16, "grpo")]["time_ratio"] == pytest.approx(1.0)
    # TRACE routes a fraction of the tokens of some rows; dense distills every completion token of every row.
    trace, dense = by_method[(16, "trace")], by_method[(16, "dense")]
    assert 0 < trace["routed_tokens"] < dense["routed_tokens"] == dense["completion_tokens"]
    assert trace["teacher_rows"] == 1 and dense["teacher_rows"] == 2

    table = step_benchmark.format_table(results)
    assert table.splitlines()[0].startswith("| length | batch | method | time (s) | time vs GRPO |")
    assert len(table.splitlines()) == 2 + len(results)


def test_ratios_use_the_grpo_row_of_the_same_length_and_skipped_rows_get_none(step_benchmark):
    results = [
        {"length": 8, "batch": 1, "method": "grpo", "status": "ok", "time_s": 2.0, "peak_mib": 100.0},
        {"length": 8, "batch": 1, "method": "trace", "status": "ok", "time_s": 3.0, "peak_mib": 150.0},
        {"length": 16, "batch": 1, "method": "grpo", "status": "ok", "time_s": 4.0, "peak_mib": 200.0},
        {"length": 16, "batch": 1, "method": "dense", "status": "OOM-risk"},
        {"length": 16, "batch": 1, "method": "trace", "status": "ok", "time_s": 6.0, "peak_mib": 100.0},
    ]
    step_benchmark.add_ratios(results)
    assert [r["time_ratio"] for r in results] == [1.0, 1.5, 1.0, None, 1.5]
    assert [r["memory_ratio"] for r in results] == [1.0, 1.5, 1.0, None, 0.5]
    assert all(r["cpu_ratio"] is None for r in results)  # no CPU times given
    assert "| 16 | 1 | dense | OOM-risk |" in step_benchmark.format_table(results)


def test_oom_risk_configurations_are_skipped_not_run(step_benchmark):
    spec = {"batch": 1, "length": 4096, "kl_chunk_size": 1024}
    dense = step_benchmark.estimated_peak_gib("dense", spec, 151936)
    assert dense > step_benchmark.estimated_peak_gib("trace", spec, 151936)
    assert dense == pytest.approx(step_benchmark.DENSE_PEAK_COPIES * 4096 * 151936 * 4 / 2**30)


def test_divergence_mode_times_trls_kernel_and_ours_in_one_run_with_ratios(step_benchmark):
    args = step_benchmark.parse_args(
        ["--divergence", "--divergence-tokens", "5", "12", "--vocab-size", "3000", "--hidden-size", "16"]
        + ["--kl-chunk-size", "8", "--warmup", "0", "--repeats", "2"]
    )
    report = step_benchmark.run_divergence_benchmark(args)
    results = report["results"]
    assert report["config"]["kl_term_clip"] == 0.05 and report["config"]["head_trained"] is True
    assert [(r["tokens"], r["method"]) for r in results] == [
        (n, m) for n in (5, 12) for m in ("trl", "token", "element", "unclipped")
    ]
    for n in (5, 12):
        rows = {r["method"]: r for r in results if r["tokens"] == n}
        for r in rows.values():
            assert len(r["times_s"]) == 2 and r["time_s"] > 0 and r["forward_s"] <= max(r["times_s"])
            assert r["time_ratio"] == pytest.approx(r["time_s"] / rows["trl"]["time_s"])
            assert r["cpu_ratio"] == pytest.approx(r["cpu_s"] / rows["trl"]["cpu_s"])
        # Same problem for every kernel: ours unclipped equals TRL's, and the clip can only lower the sum.
        assert rows["unclipped"]["divergence_sum"] == pytest.approx(rows["trl"]["divergence_sum"], rel=1e-5)
        for clipped in ("token", "element"):
            assert rows[clipped]["divergence_sum"] < rows["trl"]["divergence_sum"]
        assert rows["element"]["second_pass_rows"] == 0  # LM-like rows need no second pass
    table = step_benchmark.format_divergence_table(results)
    assert table.splitlines()[0].startswith("| routed tokens | kernel | time (s) |")
    assert len(table.splitlines()) == 2 + len(results)


def test_divergence_mode_max_ratio_fails_loudly(step_benchmark, monkeypatch):
    fake = {
        "config": {},
        "machine": {},
        "results": [
            {"tokens": 4, "method": m, "time_s": t, "forward_s": t / 2, "time_ratio": t, "peak_mib": 1.0,
             "memory_ratio": 1.0, "cpu_s": t, "cpu_ratio": t, "second_pass_rows": 0}
            for m, t in (("trl", 1.0), ("token", 1.1), ("element", 1.5), ("unclipped", 0.9))
        ],
    }  # fmt: skip
    monkeypatch.setattr(step_benchmark, "run_divergence_benchmark", lambda args: fake)
    step_benchmark.main(["--divergence", "--max-ratio", "2.0"])
    with pytest.raises(SystemExit, match="1.50x"):
        step_benchmark.main(["--divergence", "--max-ratio", "1.2"])


@pytest.mark.parametrize(
    ("clip", "mode"), [("0.05", "token"), ("0.05", "element"), ("-1", "token")], ids=["token", "element", "unclipped"]
)
def test_check_mode_trace_equals_dense_on_a_fully_routed_batch(step_benchmark, clip, mode):
    args = step_benchmark.parse_args([*TINY_ARGS, "--check", "--kl-term-clip", clip, "--kl-clip-mode", mode])
    report = step_benchmark.sanity_check(args)
    assert math.isfinite(report["dense_loss_fully_routed"])
    assert report["max_abs_grad_diff"] <= 1e-4 * max(report["max_abs_grad"], 1e-8)


def test_the_real_api_page_shows_the_benchmarks_arithmetic():
    """docs/real-api.md's token counts and worked cost example are what `annotation_output_tokens.py` computes."""
    import re

    spec = importlib.util.spec_from_file_location(
        "annotation_output_tokens", SCRIPT.with_name("annotation_output_tokens.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from trace_trl.tiny import build_qwen_tokenizer

    summary = module.measure(build_qwen_tokenizer())
    example = module.worked_example(summary)
    page = (SCRIPT.parents[1] / "docs" / "real-api.md").read_text()
    overhead = [round(summary[k]["segments_overhead"]["mean"]) for k in ("correct", "incorrect")]
    output = [f"{summary[k]['segments']['mean']:.1f}" for k in ("correct", "incorrect")]
    assert f"| {overhead[0]} | {overhead[1]} |" in page and f"| {output[0]} | {output[1]} |" in page
    for name in ("every_rollout", "trace_fkl", "trace_rkl"):
        row = example[name]
        cells = (
            f"| {row['requests']:,.0f} | {row['input_tokens'] / 1e6:.2f}M | {row['output_tokens'] / 1e3:.0f}k | "
            f"${row['dollars']:.2f} |"
        )
        assert cells in page, cells
    correct = example["per_request"]["correct"]
    assert f"about {correct['input_tokens']:,.0f} input" in page and f"(${correct['dollars']:.5f})" in page
    assert f"({example['segments_per_rollout']:.0f} segments per rollout)" in page
    # Halving: each preset sends only its kind.
    assert example["trace_fkl"]["requests"] + example["trace_rkl"]["requests"] == example["every_rollout"]["requests"]
    assert re.search(r"8 requests before, 4 after", page)
