"""What a user sees of the annotation while training: the routed spans in TRL's completions table (`log_completions`),
the last annotated batch on the trainer for the HTML viewer, and the rollouts dumped for `trace-trl annotate`."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from trainer_helpers import HalfSpanAnnotator, make_trainer, math_dataset, trace_config

from trace_trl.inspection import AnnotationView, read_jsonl
from trace_trl.routing import mark_routed, routed_char_ranges
from trace_trl.scripts.annotate import main as annotate_main
from trace_trl.trainer import COMPLETION_SPAN_COLUMNS


def _half_correct(completions, **kwargs):
    return [1.0 if i % 2 == 0 else 0.0 for i in range(len(completions))]


def test_routed_spans_reach_trls_completions_table(tiny_model_dir, tiny_tokenizer, tmp_path):
    """TRL's own table logging (parquet, and the same frame goes to wandb / trackio) carries the routed spans."""
    args = trace_config(tmp_path, max_steps=2, log_completions=True, num_completions_to_print=2)
    trainer = make_trainer(tiny_model_dir, tiny_tokenizer, args, HalfSpanAnnotator(), reward=_half_correct)
    trainer.train()
    tables = sorted((Path(args.output_dir) / "completions").glob("completions_*.parquet"))
    assert tables, "TRL wrote no completions table"
    frame = pd.read_parquet(tables[-1])
    assert set(COMPLETION_SPAN_COLUMNS) <= set(frame.columns)
    assert len(frame) == 4
    routed = frame[frame["trace_routed"] != ""]
    assert len(routed) > 0, "some rollout had routed tokens"
    for _, row in frame.iterrows():
        text = row["completion"][0]["content"] if not isinstance(row["completion"], str) else row["completion"]
        if row["trace_routed"]:
            assert "⟦" in row["trace_routed"] and row["trace_routed"].replace("⟦", "").replace("⟧", "") == text
            assert row["trace_kind"] == "key", "TRACE-FKL routes key spans of correct rollouts only"
        if row["trace_annotation"] == "not sent (kind not routed)":
            assert row["trace_routed"] == "" and row["trace_kind"] == ""
    assert set(frame["trace_annotation"]) <= {"ok", "not sent (kind not routed)"}
    assert "not sent (kind not routed)" in set(frame["trace_annotation"]), "incorrect rollouts are not annotated"


def test_columns_stay_aligned_after_the_kl_phase(tiny_model_dir, tiny_tokenizer, tmp_path):
    """Once the KL weight is zero every rollout still gets a value, so TRL's table keeps one row per completion."""
    args = trace_config(
        tmp_path, max_steps=3, log_completions=True, kl_warmup_steps=1, kl_decay_steps=0, kl_decay="linear"
    )
    trainer = make_trainer(tiny_model_dir, tiny_tokenizer, args, HalfSpanAnnotator(), reward=_half_correct)
    trainer.train()
    frame = pd.read_parquet(sorted((Path(args.output_dir) / "completions").glob("*.parquet"))[-1])
    assert len(frame) == 4 and set(frame["trace_annotation"]) == {"KL off"}
    assert (frame["trace_routed"] == "").all()


def test_last_annotated_batch_is_kept_for_the_html_viewer(tiny_model_dir, tiny_tokenizer, tmp_path):
    trainer = make_trainer(
        tiny_model_dir, tiny_tokenizer, trace_config(tmp_path), HalfSpanAnnotator(), reward=_half_correct
    )
    trainer.model.train()
    batch = trainer._generate_and_score_completions([math_dataset()[0]] * 4)
    rows = trainer.last_annotations
    assert len(rows) == 4
    for i, row in enumerate(rows):
        routed_tokens = int((batch["trace_route"][i] != 0).sum())
        assert bool(row["routed_spans"]) == (routed_tokens > 0)
        assert row["annotated"] == row["is_correct"], "TRACE-FKL asks only about correct rollouts"
        for start, end, kind, text in row["routed_spans"]:
            assert row["completion"][start:end] == text and kind == "key"
    html = AnnotationView(rows)._repr_html_()
    assert "span-key" in html and "not annotated (its kind is not routed)" in html


def test_routed_char_ranges_merge_runs_and_mark_them():
    import torch

    offsets = [(0, 2), (2, 5), (5, 6), (6, 9), (8, 10)]  # the last two share a character
    route = torch.tensor([3, 3, 0, 3, 0])
    assert routed_char_ranges(offsets, route) == [(0, 5), (6, 9)]
    assert routed_char_ranges(offsets, torch.tensor([0, 0, 0, 3, 3])) == [(6, 10)]
    assert mark_routed("abcdefghij", [(0, 5), (6, 9)]) == "⟦abcde⟧f⟦ghi⟧j"


def test_dumped_rollouts_feed_trace_trl_annotate(tiny_model_dir, tiny_tokenizer, tmp_path, capsys):
    dump = tmp_path / "dump" / "rollouts.jsonl"
    args = trace_config(tmp_path, max_steps=2, dump_rollouts=str(dump), kl_coef=0.0)
    trainer = make_trainer(tiny_model_dir, tiny_tokenizer, args, HalfSpanAnnotator(), reward=_half_correct)
    trainer.train()
    rows = read_jsonl(dump)
    assert len(rows) == 8, "two generation batches of four rollouts, also in plain GRPO"
    assert {"prompt", "completion", "is_correct", "reward", "reference", "step"} <= set(rows[0])
    assert [r["is_correct"] for r in rows[:4]] == [True, False, True, False]
    for row in rows:  # each rollout's own problem and privileged context ("What is a + b?" -> "a + b = c")
        assert row["reference"].startswith(row["problem"].removeprefix("What is ").rstrip("?") + " = ")
    out = tmp_path / "annotations.jsonl"
    assert annotate_main([str(dump), "-o", str(out), "--annotator", "regex", "--limit", "5", "--quiet"]) == 0
    assert len(read_jsonl(out)) == 5
