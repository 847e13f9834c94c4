"""TRACE under sharded engines, proven on two CPU processes (gloo).

FSDP2 full fine-tuning with the KL channel (FKL and RKL) and the synced teacher sharded like the policy: the loss
and every parameter's gradient equal one process's on the concatenated global batch, with one process routing
nothing (so it must still join every collective); and a run stopped at a checkpoint between two teacher syncs and
resumed ends where the uninterrupted run ends. See `sharded_worker.py` for how FSDP2 is enabled on CPU.
"""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch
from multiprocess_helpers import HERE, global_batch, launch_two_processes

from trace_trl.sharding import load_full_state_dict


sys.path.insert(0, HERE)


def _reference_trainer(model_dir: str, out_dir: str, peft: bool, dump: dict):
    """One process (no FSDP) with rank 0's final weights and the sharded run's teacher weights."""
    import sharded_worker as worker
    from multiprocess_worker import RankZeroAnnotator

    trainer = worker.build(model_dir, out_dir, peft, annotator=RankZeroAnnotator())
    trainer.annotator.rank = 0
    assert trainer.accelerator.num_processes == 1 and trainer.sharding_engine is None
    model = trainer.accelerator.unwrap_model(trainer.model)
    load_full_state_dict(model, dump["weights"])
    trainer.teacher.load_state_dict(model, dump["teacher"])
    trainer.teacher.begin(model, 2)
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    trainer.state.global_step = 2
    return trainer, model


@pytest.mark.slow
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_fsdp2_matches_one_process_with_uneven_routing(tiny_model_dir, tmp_path, peft):
    out_dir = str(tmp_path / "fsdp2")
    launch_two_processes("sharded_worker.py", [tiny_model_dir, out_dir, "parity", "1" if peft else "0"], out_dir)
    dumps = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(2)]
    batches = [d["batch"] for d in dumps]
    assert (batches[0]["trace_route"] > 0).any(), "rank 0 should route tokens"
    assert not (batches[1]["trace_route"] > 0).any(), "rank 1 should route nothing"
    routes = batches[0]["trace_route"]
    assert (routes == 3).any() and (routes == 4).any(), "both FKL (key spans) and RKL (error spans) should be routed"
    assert dumps[0]["logs"] and dumps[0]["logs"] == dumps[1]["logs"], "TRACE metrics must be global (equal on ranks)"
    for name, value in dumps[0]["weights"].items():
        assert torch.equal(value, dumps[1]["weights"][name]), f"gathered weights differ across ranks: {name}"

    # The synced teacher is the snapshot of step 0 (sync every 10 steps): the initial weights (full fine-tuning) or
    # the initial adapter (LoRA), not the trained policy; each process holds only its shards of a full copy.
    teacher = dumps[0]["teacher"]
    assert teacher and all(torch.equal(teacher[n], dumps[1]["teacher"][n]) for n in teacher)
    trained_name = (lambda n: n.replace(".trace_synced_teacher.", ".default.")) if peft else (lambda n: n)
    assert any(not torch.equal(v, dumps[0]["weights"][trained_name(n)]) for n, v in teacher.items() if "inv_freq" not in n)
    if not peft:
        from transformers import AutoModelForCausalLM

        initial = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
        assert teacher.keys() >= initial.keys()
        for name, value in initial.items():
            assert torch.equal(teacher[name], value.detach()), f"teacher {name} is not the step-0 snapshot"
        full_bytes = sum(v.numel() * v.element_size() for v in initial.values())
        for d in dumps:
            assert 0 < d["teacher_bytes"] <= 0.6 * full_bytes, "the teacher must be sharded, not a replicated copy"

    trainer, model = _reference_trainer(tiny_model_dir, str(tmp_path / "single"), peft, dumps[0])
    inputs = global_batch(batches, trainer.processing_class.pad_token_id)
    from multiprocess_worker import CASES

    for case in CASES:
        loss_type, trainer.args.kl_normalization = case
        trainer.loss_type = loss_type
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        sharded = [d["results"][case] for d in dumps]
        # FSDP2 averages the two processes' gradients (reduce-scatter); the global normalizers make that the
        # full-batch value. Each process's loss is its own; their mean is the full-batch loss.
        mean_loss = (sharded[0]["loss"] + sharded[1]["loss"]) / 2
        assert loss.item() == pytest.approx(mean_loss, abs=1e-6), case
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert grads.keys() == sharded[0]["grads"].keys(), case
        worst = max((sharded[0]["grads"][n] - g).abs().max().item() for n, g in grads.items())
        print(f"{case}: |loss diff| {abs(loss.item() - mean_loss):.2e}, max |grad diff| {worst:.2e}")
        for name, grad in grads.items():
            assert torch.equal(sharded[0]["grads"][name], sharded[1]["grads"][name])
            torch.testing.assert_close(sharded[0]["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=f"{case} {name}")
