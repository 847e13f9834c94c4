"""Launching two CPU (gloo) processes of a worker script, and rebuilding their global batch in one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch


HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_processes(
    worker: str,
    args: list[str],
    out_dir: str,
    world: int,
    timeout: int = TIMEOUT_S,
    env: dict[str, str] | None = None,
) -> None:
    """Run `python <worker> <args>` as ranks 0..world-1 of one process group (with `env` added to the environment);
    fail with a log tail on error or hang."""
    os.makedirs(out_dir, exist_ok=True)
    port = str(_free_port())
    procs = []
    for rank in range(world):
        rank_env = {
            **os.environ,
            **(env or {}),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), HERE]),
        }
        log = open(os.path.join(out_dir, f"log{rank}.txt"), "w")
        command = [sys.executable, os.path.join(HERE, worker), *args]
        procs.append((subprocess.Popen(command, env=rank_env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        for proc, _ in procs:
            proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"the {world}-process run did not finish in {timeout}s (a collective reached by one process only?)"
        )
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    for rank, (proc, _) in enumerate(procs):
        if proc.returncode != 0:
            with open(os.path.join(out_dir, f"log{rank}.txt")) as f:
                tail = f.read()[-4000:]
            pytest.fail(f"rank {rank} exited with {proc.returncode}:\n{tail}")


def launch_two_processes(
    worker: str, args: list[str], out_dir: str, timeout: int = TIMEOUT_S, env: dict[str, str] | None = None
) -> None:
    """Two CPU (gloo) processes of `worker`, see `launch_processes`."""
    launch_processes(worker, args, out_dir, 2, timeout, env)


def _pad_cat(tensors: list[torch.Tensor], value, side: str) -> torch.Tensor:
    width = max(t.size(1) for t in tensors)
    out = []
    for t in tensors:
        pad = t.new_full((t.size(0), width - t.size(1)), value)
        out.append(torch.cat([pad, t] if side == "left" else [t, pad], dim=1))
    return torch.cat(out)


def global_batch(batches: list[dict], pad_id: int) -> dict:
    """The two processes' batches as one, re-padded like GRPO (prompts left, completions right)."""
    widths = [b["completion_ids"].size(1) for b in batches]
    teacher_prompts = [b["teacher_input_ids"][:, :-w] for b, w in zip(batches, widths)]
    teacher_prompt_masks = [b["teacher_attention_mask"][:, :-w] for b, w in zip(batches, widths)]
    completion_ids = _pad_cat([b["completion_ids"] for b in batches], pad_id, "right")
    completion_mask = _pad_cat([b["completion_mask"] for b in batches], 0, "right")
    return {
        "prompt_ids": _pad_cat([b["prompt_ids"] for b in batches], pad_id, "left"),
        "prompt_mask": _pad_cat([b["prompt_mask"] for b in batches], 0, "left"),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.cat([b["advantages"] for b in batches]),
        "num_items_in_batch": batches[0]["num_items_in_batch"],
        "trace_route": _pad_cat([b["trace_route"] for b in batches], 0, "right"),
        "trace_labels": _pad_cat([b["trace_labels"] for b in batches], 0, "right"),
        "teacher_input_ids": torch.cat([_pad_cat(teacher_prompts, pad_id, "left"), completion_ids], 1),
        "teacher_attention_mask": torch.cat([_pad_cat(teacher_prompt_masks, 0, "left"), completion_mask], 1),
    }


def assert_matches_one_process(trainer, model, inputs: dict, dumps: list[dict], cases) -> None:
    """For each `(loss_type, kl_normalization)` case: one process's loss and gradients on the global batch equal the
    two processes' (the mean of their losses; their averaged gradients, identical on both). DDP, FSDP2 and ZeRO-3
    average gradients over processes; the global normalizers make that the full-batch value."""
    for case in cases:
        loss_type, trainer.args.kl_normalization = case
        trainer.loss_type = loss_type
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        ranks = [d["results"][case] for d in dumps]
        mean_loss = (ranks[0]["loss"] + ranks[1]["loss"]) / 2
        assert loss.item() == pytest.approx(mean_loss, abs=1e-6), case
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert grads.keys() == ranks[0]["grads"].keys(), case
        worst = max((ranks[0]["grads"][n] - g).abs().max().item() for n, g in grads.items())
        print(f"{case}: |loss diff| {abs(loss.item() - mean_loss):.2e}, max |grad diff| {worst:.2e}")
        for name, grad in grads.items():
            assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), f"{case} {name}: ranks differ"
            torch.testing.assert_close(ranks[0]["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=f"{case} {name}")
