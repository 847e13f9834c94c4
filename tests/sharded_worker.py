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
- `teacher`: trains three steps with a teacher synced (or EMA-updated) after every optimizer step and the KL channel
  on for steps 0-1 only; at train begin and after every step of the KL phase, the teacher's forward on a fixed probe
  is compared with a dense one-process model built from the policy's current (or EMA-averaged) gathered weights, and
  after `train()` weak references show whether the teacher copy and its shards are still alive. Dumps the comparisons,
  the logged `trace/teacher_memory_bytes` and the bytes alive when they were logged.
- `gpu`: on CUDA (NCCL), bf16 mixed precision, gradient checkpointing: two steps with the KL channel (synced
  teacher), then dumps the logs, the losses and the peak CUDA memory (the GPU tests in `test_gpu.py`).

The engine is `TRACE_TEST_ENGINE` (`fsdp2`, the default, or `zero3`); `TRACE_TEST_OVERRIDES` (JSON) adds config
fields to both sides.

Usage: python sharded_worker.py MODEL_DIR OUT_DIR MODE(parity|train|resume|teacher|gpu) PEFT(0|1) [TEACHER_KIND]
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
from trace_trl.scripts.train import save_final_model  # noqa: E402


# As in examples/accelerate/fsdp2.yaml: sharded checkpoints (resume reads them back), layers as units.
FSDP_CONFIG = {
    "version": 2,
    "transformer_layer_cls_to_wrap": ["Qwen3DecoderLayer"],
    "reshard_after_forward": True,
    "state_dict_type": "SHARDED_STATE_DICT",
}
# ZeRO-3 without offload, fp32, with TRL's persistence threshold (`10 x hidden_size` = 640 for the tiny model: its
# norms, q/k norms and LoRA matrices stay gathered after their first forward, its projections and embeddings are
# partitioned); a torch optimizer, since DeepSpeed's own would need compiled CPU ops.
ZERO3_CONFIG = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "zero_optimization": {
        "stage": 3,
        "stage3_gather_16bit_weights_on_model_save": True,  # as examples/accelerate/zero3.yaml: full final weights
        "stage3_param_persistence_threshold": 640,
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
            trainer.teacher.copy.parameters()
            if trainer.teacher.copy is not None
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


def train(trainer: TRACETrainer, out_dir: str, resume: str | None, model_dir: str) -> None:
    trainer.train(resume_from_checkpoint=resume)
    final_dir = os.path.join(out_dir, "final-model")
    save_final_model(trainer, final_dir)  # what `trace-trl train` saves: full weights, whatever the engine
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    state = trainer.teacher.state_dict(unwrapped) if not trainer.teacher.released else {}
    # The teacher's forward against a dense model of its gathered partitions (what a checkpoint holds): a gathered
    # value left stale by a sync or a load would differ.
    probe_diff = None
    if state:
        probe_diff = (teacher_probe_logits(trainer) - dense_probe_logits(model_dir, state, False)).abs().max().item()
    dump = {
        "weights": gathered_state_dict(trainer.model_wrapped),
        "teacher": state,
        "step": trainer.state.global_step,
        "teacher_probe_diff": probe_diff,
    }
    if trainer.accelerator.is_main_process:
        torch.save(dump, os.path.join(out_dir, "final.pt"))
    trainer.accelerator.wait_for_everyone()


PROBE_IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 250, 61, 7, 12, 140, 33]])


def teacher_probe_logits(trainer: TRACETrainer) -> torch.Tensor:
    """The teacher's logits on `PROBE_IDS`, run as the KL channel runs it (through the engine, head gathered)."""
    from trace_trl.sharding import forward_through, reshard

    model = trainer.model_wrapped
    unwrapped = trainer.accelerator.unwrap_model(model)
    ids = PROBE_IDS.to(trainer.accelerator.device)

    def decoder(view):
        return view.backbone(input_ids=ids, use_cache=False).last_hidden_state

    with torch.no_grad(), trainer.teacher.activate(unwrapped, wrapper=model) as view:
        hidden = forward_through(view.wrapper, view.root, decoder, view)
        reshard(view.wrapper)
        weight, bias = view.head()
        return torch.nn.functional.linear(hidden, full_tensor(weight), full_tensor(bias)).detach().cpu()


def dense_probe_logits(model_dir: str, state: dict[str, torch.Tensor], peft: bool) -> torch.Tensor:
    """The logits on `PROBE_IDS` of a plain one-process model (LoRA: with the default adapter) holding `state`."""
    import transformers.integrations.deepspeed as hf_deepspeed
    from transformers import AutoModelForCausalLM

    # Outside ZeRO-3's reach: Transformers would otherwise partition a model loaded in a DeepSpeed process.
    ds_config, hf_deepspeed._hf_deepspeed_config_weak_ref = hf_deepspeed._hf_deepspeed_config_weak_ref, None
    try:
        dense = AutoModelForCausalLM.from_pretrained(model_dir)
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = ds_config
    if peft:
        from peft import get_peft_model
        from trainer_helpers import lora_config

        dense = get_peft_model(dense, lora_config())
    params = dict(dense.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            if name in params:
                params[name].copy_(value)
    dense.eval()
    with torch.no_grad():
        return dense(input_ids=PROBE_IDS).logits.detach()


def teacher_tensors(trainer: TRACETrainer) -> tuple[list[torch.Tensor], list[object]]:
    """The teacher's own parameters (its copy's, or its adapter's) and what holds them (modules, engine)."""
    teacher = trainer.teacher
    if teacher.copy is not None:
        copy = teacher.copy
        from trace_trl.sharding import unwrap_engine

        return list(unwrap_engine(copy).parameters()), [copy, unwrap_engine(copy)]
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    return [p for n, p in unwrapped.named_parameters() if f".{teacher.adapter_name}." in n], []


def held_bytes(params: list[torch.Tensor]) -> int:
    """Bytes these parameters hold on this process: the local shard, plus the full value a ZeRO-3 parameter keeps
    gathered between forwards."""
    from trace_trl.sharding import local_shard

    total = 0
    for p in params:
        shard = local_shard(p)
        total += shard.numel() * shard.element_size()
        if is_zero3_param(p) and p.data.numel():
            total += p.data.numel() * p.data.element_size()
    return total


def _print_holders(target) -> None:
    import gc
    import types
    from collections import deque

    module_dicts = {id(vars(m)): name for name, m in list(sys.modules.items()) if m is not None}
    queue, seen, found = deque([(target, [])]), {id(target)}, 0
    while queue and found < 8:
        obj, path = queue.popleft()
        for ref in gc.get_referrers(obj):
            if isinstance(ref, types.FrameType) or id(ref) in seen or ref is queue:
                continue
            seen.add(id(ref))
            desc = type(ref).__name__
            if isinstance(ref, dict) and id(ref) in module_dicts:
                print(
                    "HOLDER",
                    module_dicts[id(ref)],
                    [k for k, v in ref.items() if v is obj][:3],
                    path[-10:],
                    flush=True,
                )
                found += 1
                continue
            if isinstance(ref, dict):
                desc += "[" + ",".join(str(k) for k, v in list(ref.items()) if v is obj)[:50] + "]"
            if isinstance(ref, types.FunctionType | types.MethodType):
                desc += ":" + getattr(ref, "__qualname__", "")
            if len(path) < 30:
                queue.append((ref, [*path, desc]))


def teacher_checks(trainer: TRACETrainer, model_dir: str, out_dir: str, peft: bool) -> None:
    import gc
    import weakref

    from transformers import TrainerCallback

    rank = trainer.accelerator.process_index
    kind = trainer.teacher.kind
    rate = trainer.args.teacher_ema_rate
    checks, held, refs = [], [], []
    ema: dict[str, torch.Tensor] = {}

    def policy_state() -> dict[str, torch.Tensor]:
        # The policy's weights (with LoRA: the base weights and the trained adapter), gathered without touching the
        # teacher's adapter: a gather re-partitions what it gathers, which would hide a stale gathered value.
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        return {n: full_tensor(p).cpu() for n, p in unwrapped.named_parameters() if ".trace_" not in n}

    def check(step: int, where: str) -> None:
        nonlocal ema
        params, holders = teacher_tensors(trainer)
        held.append(held_bytes(params))  # first: what the teacher holds as the step's metric was logged
        state = policy_state()
        if kind == "ema":
            ema = state if not ema else {n: ema[n].lerp(v, rate) for n, v in state.items()}
            state = ema
        got = teacher_probe_logits(trainer)
        want = dense_probe_logits(model_dir, state, peft)
        checks.append({"step": step, "where": where, "max_abs_diff": (got - want).abs().max().item()})
        if not peft:
            from trace_trl.sharding import local_shard

            refs[:] = [weakref.ref(x) for x in [*holders, *params, *(local_shard(p) for p in params)]]

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            check(0, "train begin")

        def on_step_end(self, args, state, control, **kwargs):
            if not trainer.teacher.released:
                check(state.global_step, "after the teacher's update")

    trainer.add_callback(Probe())  # after the teacher's own callback: sees the teacher each step trains with
    trainer.train()
    gc.collect()
    if os.environ.get("TRACE_DEBUG_REFS"):
        alive = [r() for r in refs if r() is not None]
        if alive:
            _print_holders(alive[1] if len(alive) > 1 else alive[0])
    logs = [r["trace/teacher_memory_bytes"] for r in trainer.state.log_history if "trace/teacher_memory_bytes" in r]
    dump = {
        "checks": checks,
        "held": held,
        "logged_bytes": logs,
        "released": trainer.teacher.released,
        "refs": len(refs),
        "alive": sum(r() is not None for r in refs),
        "bytes_after": trainer.teacher.memory_bytes(),
    }
    torch.save(dump, os.path.join(out_dir, f"teacher{rank}.pt"))
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
    if mode == "teacher":
        # The teacher is synced (or EMA-updated) after every step; the KL weight is 0 from step 2 on (released).
        settings = dict(max_steps=3, teacher_sync_steps=1, kl_warmup_steps=2, kl_decay_steps=0)
        trainer = build(model_dir, out_dir, peft, teacher_kind=teacher_kind, **settings)
        teacher_checks(trainer, model_dir, out_dir, peft)
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
    train(trainer, out_dir, os.path.join(run_dir, "out", "checkpoint-2") if mode == "resume" else None, model_dir)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1", *sys.argv[5:])
    # Tear the process group down before the interpreter does (gloo and checkpoint threads otherwise abort at exit).
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
