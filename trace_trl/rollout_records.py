"""What a user sees of a generation batch's rollouts: TRACE's columns of TRL's completions table, and the rollout dump.

Pure functions of the batch (no trainer state), so `TRACETrainer` keeps only the thin overrides that gather their
output across processes: [`completion_span_columns`] (`log_completions`: terminal, wandb, trackio, parquet),
[`rollout_dump_rows`] and [`append_jsonl`] (`dump_rollouts`, in `trace-trl annotate`'s input columns), and
[`rollout_rewards`], the reward that decides whether a rollout counts as correct.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .annotators.base import prompt_to_text
from .routing import mark_routed, privileged_contexts


# Columns TRACE adds to TRL's completions table (`log_completions`).
COMPLETION_SPAN_COLUMNS = ("trace_routed", "trace_kind", "trace_type_label", "trace_annotation")


def rollout_rewards(
    rewards_per_func: torch.Tensor,
    n_local: int,
    process_index: int,
    reward_weights: torch.Tensor,
    correctness_index: int | None,
) -> torch.Tensor:
    """This process's rollout rewards for correctness (NaN where unscored).

    `rewards_per_func` is GRPO's gathered `[num_processes * n_local, num_funcs]` table; a rollout's reward is the
    column `correctness_index` (the `correctness_reward_func`) when given, else the `reward_weights`-weighted sum of
    its scored columns.
    """
    start = process_index * n_local
    local = rewards_per_func[start : start + n_local]
    if correctness_index is not None:
        return local[:, correctness_index]
    weighted = (local * reward_weights.to(local.device).unsqueeze(0)).nansum(dim=1)
    return weighted.masked_fill(torch.isnan(local).all(dim=1), math.nan)


def completion_span_columns(
    last_batch: Sequence[Any], n_local: int, *, training: bool, routed: bool
) -> dict[str, list[str]]:
    """TRACE's columns of the completions table, one value per rollout of this process.

    `trace_routed` (the completion with its routed tokens in ⟦ ⟧, empty when nothing is routed), `trace_kind` (`key` /
    `error`), `trace_type_label` and `trace_annotation` (`ok`, `not sent (kind not routed)`, `failed: <cause>`,
    `KL off`, or `eval (not annotated)`). `last_batch` holds the routed batch's records (`RoutedBatchBuilder`) when
    `routed`.
    """
    columns: dict[str, list[str]] = {name: [""] * n_local for name in COMPLETION_SPAN_COLUMNS}
    columns["trace_annotation"] = ["KL off" if training else "eval (not annotated)"] * n_local
    if not routed:
        return columns
    for i, record in enumerate(last_batch[:n_local]):
        if record.routed_chars:
            columns["trace_routed"][i] = mark_routed(record.request.completion, record.routed_chars)
            columns["trace_kind"][i] = record.kind
        columns["trace_type_label"][i] = record.type_label or ""
        if not record.annotated:
            status = "not sent (kind not routed)"
        elif record.annotation.failed:
            status = f"failed: {record.annotation.error}"
        else:
            status = "ok"
        columns["trace_annotation"][i] = status
    return columns


def rollout_dump_rows(
    *,
    step: int,
    prompts: Sequence[Any],
    inputs: Sequence[Mapping[str, Any]],
    completions: Sequence[str],
    rewards: Sequence[float],
    correct_threshold: float,
    privileged_context_column: str,
) -> list[dict[str, Any]]:
    """One JSON-ready row per rollout, in `trace-trl annotate`'s input columns (plus `step` and `reward`)."""
    n = len(prompts)
    references = (
        privileged_contexts(inputs, privileged_context_column)
        if inputs and privileged_context_column in inputs[0]
        else [None] * n
    )
    return [
        {
            "step": step,
            "prompt": prompts[i],
            "problem": prompt_to_text(prompts[i]),
            "completion": completions[i],
            "is_correct": bool(rewards[i] >= correct_threshold),
            "reward": None if math.isnan(rewards[i]) else rewards[i],
            "reference": references[i],
        }
        for i in range(n)
    ]


def append_jsonl(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Append `rows` to the JSONL file `path` (its folder created if needed)."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
