"""One process of the two-process FSDP2 CPU (gloo) tests in `test_sharded.py`; not a test module itself.

Accelerate 1.15 only turns an FSDP plugin on for accelerator-backed process groups: on CPU it silently falls back to
DDP (`AcceleratorState` keeps `MULTI_CPU`). `enable_fsdp_on_cpu` flips the state to FSDP after Accelerate built it,
so the real path runs: Accelerate's `fsdp2_prepare_model` (`fully_shard` per decoder layer and the root, parameters
as `DTensor` shards on a gloo mesh), TRL's generation and loss, and TRACE's sharded teacher and KL channel.

Modes:
- `parity`: only rank 0's rollouts get spans (rank 1 routes nothing), synced teacher, FKL on key and RKL on error
  spans. Trains two steps, then computes the loss and the FSDP2-reduced gradients on one more batch for each case of
  `multiprocess_worker.CASES`, and dumps them with the batch, the full weights, the teacher's full weights and logs.
- `train`: trains to `max_steps` (checkpoints every 2 steps), or resumes from `<out_dir>/../run/checkpoint-2` with
  `resume`, and dumps the full weights and the teacher's full weights at the end.
- `gpu`: on CUDA (NCCL), bf16 mixed precision, gradient checkpointing: two steps with the KL channel (synced
  teacher), then dumps the logs, the losses and the peak CUDA memory (the GPU tests in `test_gpu.py`).

The engine is `TRACE_TEST_ENGINE` (`fsdp2`, the default, or `zero3`); `TRACE_TEST_OVERRIDES` (JSON) adds config
fields to both sides.

Usage: python sharded_worker.py MODEL_DIR OUT_DIR MODE(parity|train|resume|gpu) PEFT(0|1) [TEACHER_KIND]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# First: the DDP worker sets the offline, single-thread environment before torch is imported.
from multiprocess_worker import BATCH_KEYS, RankZeroAnnotator, case_results  # noqa: E402, I001

import torch  # noqa: E402
from trainer_helpers import HalfSpanAnnotator, make_trainer, math_dataset, trace_config  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from trace_trl import TRACETrainer  # noqa: E402
from trace_trl.sharding import full_tensor, gathered_state_dict, is_dtensor, is_zero3_param  # noqa: E402
from trace_trl.train import save_final_model  # noqa: E402


# As in examples/accelerate/fsdp2.yaml: sharded checkpoints (resume reads them back), layers as units.
FSDP_CONFIG = {
    "version": 2,
    "transformer_layer_cls_to_wrap": ["Qwen3DecoderLayer"],
    "reshard_after_forward": True,
    "state_dict_type": "SHARDED_STATE_DICT",
}
# ZeRO-3 without offload, fp32, and every parameter partitioned (no persistence threshold: the tiny model's tensors
# would otherwise all stay gathered); a torch optimizer, since DeepSpeed's own would need compiled CPU ops.
ZERO3_CONFIG = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "zero_optimization": {
        "stage": 3,
        "stage3_gather_16bit_weights_on_model_save": True,  # as examples/accelerate/zero3.yaml: full final weights
        "stage3_param_persistence_threshold": 0,
        "stage3_max_reuse_distance": 0,
        "stage3_prefetch_bucket_size": 0,
    },
    "zero_force_ds_cpu_optimizer": False,
    "bf16": {"enabled": False},
    "fp16": {"enabled": False},
}
ENGINE = os.environ.get("TRACE_TEST_ENGINE", "fsdp2")


def enable_fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init


def build(model_dir: str, out_dir: str, peft: bool, annotator=None, **overrides) -> TRACETrainer:
    """The trainer both sides use: the engine when launched as a process group, a plain single process otherwise."""
    distributed = "WORLD_SIZE" in os.environ  # launched as a process group (of one or more processes)
    settings = dict(
        max_steps=2,
        kl_warmup_steps=100,
        error_span_action="rkl",
        teacher_kind="synced",
        teacher_sync_steps=10,
    )
    settings.update(json.loads(os.environ.get("TRACE_TEST_OVERRIDES", "{}")))  # e.g. gradient checkpointing
    if distributed and ENGINE == "fsdp2":
        settings.update(fsdp="full_shard", fsdp_config=FSDP_CONFIG)
    elif distributed:
        settings.update(deepspeed=ZERO3_CONFIG)
    settings.update(overrides)
    args = trace_config(Path(out_dir), **settings)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return make_trainer(model_dir, tokenizer, args, annotator or HalfSpanAnnotator(), peft=peft)


def is_sharded(param: torch.Tensor) -> bool:
    return is_dtensor(param) or is_zero3_param(param)


def gradients(trainer: TRACETrainer) -> dict[str, torch.Tensor]:
    """Every parameter's full, process-averaged gradient (DeepSpeed keeps ZeRO-3 gradients in its own partitions)."""
    unwrapped = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    if ENGINE == "zero3":
        from deepspeed.utils import safe_get_full_grad

        grads = {n: safe_get_full_grad(p) for n, p in unwrapped.named_parameters() if p.requires_grad}
        return {n: g.detach().clone() for n, g in grads.items() if g is not None}
    return {n: full_tensor(p.grad).clone() for n, p in unwrapped.named_parameters() if p.grad is not None}


def parity(trainer: TRACETrainer, out_dir: str) -> None:
    rank = trainer.accelerator.process_index
    trainer.train()  # must not hang although rank 1 never routes a token
    logs = [{k: v for k, v in r.items() if k.startswith("trace/")} for r in trainer.state.log_history]
    model = trainer.model_wrapped
    assert trainer.sharding_engine == ENGINE, trainer.sharding_engine
    assert is_sharded(next(model.parameters())), "the policy should be sharded"
    unwrapped = trainer.accelerator.unwrap_model(model)
    if trainer.teacher.kind != "live":
        teacher_params = (
            trainer.teacher._copy.parameters()
            if trainer.teacher._copy is not None
            else (p for n, p in unwrapped.named_parameters() if f".{trainer.teacher.adapter_name}." in n)
        )
        assert is_sharded(next(teacher_params)), "the teacher should be sharded"
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    rows = [math_dataset()[rank] for _ in range(4)]  # one prompt group per process
    batch = trainer._generate_and_score_completions(rows)
    dump = {
        "rank": rank,
        "batch": {k: batch[k].detach().cpu() for k in BATCH_KEYS},
        "results": case_results(trainer, model, batch, lambda: gradients(trainer)),
        "weights": gathered_state_dict(model),
        "teacher": trainer.teacher.state_dict(unwrapped),
        "logs": logs,
        "teacher_bytes": trainer.teacher.memory_bytes(),
    }
    torch.save(dump, os.path.join(out_dir, f"rank{rank}.pt"))
    trainer.accelerator.wait_for_everyone()


def train(trainer: TRACETrainer, out_dir: str, resume: str | None) -> None:
    trainer.train(resume_from_checkpoint=resume)
    final_dir = os.path.join(out_dir, "final-model")
    save_final_model(trainer, final_dir)  # what `trace-trl train` saves: full weights, whatever the engine
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    state = trainer.teacher.state_dict(unwrapped) if not trainer.teacher.released else {}
    dump = {"weights": gathered_state_dict(trainer.model_wrapped), "teacher": state, "step": trainer.state.global_step}
    if trainer.accelerator.is_main_process:
        torch.save(dump, os.path.join(out_dir, "final.pt"))
    trainer.accelerator.wait_for_everyone()


def gpu(model_dir: str, out_dir: str, peft: bool) -> None:
    """bf16 steps on CUDA: the KL channel runs, its metrics and the loss are finite, the teacher is sharded."""
    import math

    settings = dict(use_cpu=False, bf16=True, gradient_checkpointing=True, max_completion_length=64)
    if ENGINE == "zero3":
        settings["deepspeed"] = {**ZERO3_CONFIG, "bf16": {"enabled": True}}
    trainer = build(model_dir, out_dir, peft, **settings)
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    rank = trainer.accelerator.process_index
    logs = trainer.state.log_history
    losses = [r["loss"] for r in logs if "loss" in r]
    kl = [r["trace/fkl_mean"] for r in logs if "trace/fkl_mean" in r]
    assert trainer.sharding_engine == ENGINE, trainer.sharding_engine
    assert losses and all(math.isfinite(x) for x in losses), losses
    assert kl and all(math.isfinite(x) for x in kl if not math.isnan(x)), kl
    dump = {
        "losses": losses,
        "kl": kl,
        "peak_bytes": torch.cuda.max_memory_allocated(),
        "world": trainer.accelerator.num_processes,
    }
    torch.save(dump, os.path.join(out_dir, f"gpu{rank}.pt"))
    trainer.accelerator.wait_for_everyone()


def main(model_dir: str, out_dir: str, mode: str, peft: bool, teacher_kind: str = "synced") -> None:
    cuda = mode == "gpu"
    if ENGINE == "zero3":
        import deepspeed

        # Before the config: DeepSpeed's `zero.Init` (inside `from_pretrained`) needs its process group up.
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    elif not cuda:
        enable_fsdp_on_cpu()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        gpu(model_dir, out_dir, peft)
        return
    if mode == "parity":
        trainer = build(model_dir, out_dir, peft, annotator=RankZeroAnnotator(), teacher_kind=teacher_kind)
        assert trainer.accelerator.num_processes == 2
        parity(trainer, out_dir)
        return
    # Resume: checkpoints every 2 steps; the synced teacher syncs every 3, so checkpoint-2 lies between two syncs.
    overrides = dict(max_steps=4, save_strategy="steps", save_steps=2, teacher_sync_steps=3, kl_warmup_steps=100)
    run_dir = os.path.join(os.path.dirname(out_dir), "run")
    trainer = build(model_dir, run_dir if mode == "train" else out_dir, peft, **overrides)
    train(trainer, out_dir, os.path.join(run_dir, "out", "checkpoint-2") if mode == "resume" else None)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1", *sys.argv[5:])
    # Tear the process group down before the interpreter does (gloo and checkpoint threads otherwise abort at exit).
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
