"""Two CPU processes (gloo, DDP): no hang when one process routes nothing, metrics global, and the DDP loss and
gradients equal a single process's on the concatenated global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import types

import pytest
import torch


HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(model_dir: str, out_dir: str, peft: bool) -> None:
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), HERE]),
        }
        log = open(os.path.join(out_dir, f"log{rank}.txt"), "w")
        procs.append(
            (
                subprocess.Popen(
                    [
                        sys.executable,
                        os.path.join(HERE, "multiprocess_worker.py"),
                        model_dir,
                        out_dir,
                        "1" if peft else "0",
                    ],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    try:
        for proc, _ in procs:
            proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the two-process run did not finish in {TIMEOUT_S}s (a collective reached by one process only?)")
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


def _pad_cat(tensors: list[torch.Tensor], value, side: str) -> torch.Tensor:
    width = max(t.size(1) for t in tensors)
    out = []
    for t in tensors:
        pad = t.new_full((t.size(0), width - t.size(1)), value)
        out.append(torch.cat([pad, t] if side == "left" else [t, pad], dim=1))
    return torch.cat(out)


def _global_batch(batches: list[dict], pad_id: int) -> dict:
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


@pytest.mark.slow
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
    inputs = _global_batch(batches, trainer.processing_class.pad_token_id)
    assert trainer.accelerator.num_processes == 1
    for case in worker.CASES:
        loss_type, trainer.args.kl_normalization = case
        trainer.loss_type = loss_type
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        ddp = [d["results"][case] for d in dumps]
        # DDP averages the two processes' losses and gradients; the global normalizers make that the full-batch value.
        mean_loss = (ddp[0]["loss"] + ddp[1]["loss"]) / 2
        assert loss.item() == pytest.approx(mean_loss, abs=1e-6), loss_type
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert grads.keys() == ddp[0]["grads"].keys()
        worst = max((ddp[0]["grads"][n] - g).abs().max().item() for n, g in grads.items())
        print(f"{case}: |loss diff| {abs(loss.item() - mean_loss):.2e}, max |grad diff| {worst:.2e}")
        for name, grad in grads.items():
            assert torch.equal(ddp[0]["grads"][name], ddp[1]["grads"][name])
            torch.testing.assert_close(ddp[0]["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=f"{case} {name}")


@pytest.mark.parametrize(("zero3", "fsdp"), [(True, False), (False, True)])
def test_kl_channel_under_sharding_is_refused_for_full_finetuning_and_lora(tiny_model_dir, zero3, fsdp):
    from peft import get_peft_model
    from trainer_helpers import lora_config
    from transformers import AutoModelForCausalLM

    from trace_trl.trainer import _check_sharded_training

    def fake_trainer(model):
        plugin = types.SimpleNamespace(zero_stage=3 if zero3 else 2)
        accelerator = types.SimpleNamespace(
            state=types.SimpleNamespace(deepspeed_plugin=plugin), unwrap_model=lambda m: m
        )
        return types.SimpleNamespace(
            is_deepspeed_enabled=zero3, is_fsdp_enabled=fsdp, accelerator=accelerator, model=model
        )

    args = types.SimpleNamespace(kl_coef=0.5)
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(NotImplementedError, match=r"under (DeepSpeed ZeRO-3|FSDP) \(full fine-tuning\)"):
        _check_sharded_training(fake_trainer(full), args)
    _check_sharded_training(fake_trainer(full), types.SimpleNamespace(kl_coef=0.0))  # plain GRPO is fine
    # LoRA too: uneven routing would make uneven weight-gathering collectives (a deadlock).
    with pytest.raises(NotImplementedError, match=r"\(LoRA\) is not supported yet: .*collectives .*ZeRO-1/2"):
        _check_sharded_training(fake_trainer(get_peft_model(full, lora_config())), args)
