"""Two CPU processes (gloo, DDP): no hang when one process routes nothing, metrics global, and the DDP loss and
gradients equal a single process's on the concatenated global batch."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from multiprocess_helpers import HERE, assert_matches_one_process, global_batch, launch_two_processes


def _launch(model_dir: str, out_dir: str, peft: bool) -> None:
    launch_two_processes("multiprocess_worker.py", [model_dir, out_dir, "1" if peft else "0"], out_dir)


@pytest.mark.multiprocess
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_two_processes_one_without_routed_tokens_match_one_process(tiny_model_dir, tmp_path, peft):
    out_dir = str(tmp_path)
    _launch(tiny_model_dir, out_dir, peft)
    dumps = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(2)]
    batches = [d["batch"] for d in dumps]
    assert (batches[0]["trace_route"] > 0).any(), "rank 0 should route tokens"
    assert not (batches[1]["trace_route"] > 0).any(), "rank 1 should route nothing"
    assert dumps[0]["logs"] and dumps[0]["logs"] == dumps[1]["logs"], "TRACE metrics must be global (equal on ranks)"
    assert any("trace/fkl_mean" in r or "trace/rkl_mean" in r for r in dumps[0]["logs"])
    for name, value in dumps[0]["weights"].items():
        assert torch.equal(value, dumps[1]["weights"][name]), f"DDP replicas diverged: {name}"

    # One process, the same weights, the concatenated global batch.
    sys.path.insert(0, HERE)
    import multiprocess_worker as worker

    trainer = worker.build(tiny_model_dir, os.path.join(out_dir, "single"), peft)
    trainer.annotator.rank = 0
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.load_state_dict(dumps[0]["weights"])
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    trainer.state.global_step = 2
    inputs = global_batch(batches, trainer.processing_class.pad_token_id)
    assert trainer.accelerator.num_processes == 1
    assert_matches_one_process(trainer, model, inputs, dumps, worker.CASES)
