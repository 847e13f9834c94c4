# Copyright 2026 The trace-trl authors. Licensed under the Apache License, Version 2.0.
"""Memory a TRACE run holds after its KL phase, against a GRPO run (`kl_coef=0`) on the same model.

Each run is a real `TRACETrainer` on a tiny Qwen3 (full fine-tuning, CPU, fp32) trained across the whole KL schedule
(`kl_warmup_steps + kl_decay_steps` steps) and a few plain-GRPO steps after it, in its own subprocess. Measured:

- `tensor_bytes`: the bytes of every live torch tensor's storage (a `gc` walk over tensors and modules, deduplicated by
  storage pointer), taken after `train()` returns with the trainer (model, optimizer state, teacher) still alive;
- `teacher_bytes`: `trainer.teacher.memory_bytes()` during the KL phase (at step 1) and at the end.

With the `synced` teacher (and `ema`, and `base` without a reference model) the teacher copy is freed once the KL
weight is zero for good, so the TRACE run ends holding what the GRPO run holds: the ratio is 1.00.

Usage:

```bash
PYTHONPATH=. python benchmarks/teacher_memory.py                   # synced teacher, hidden 256, 4 layers
PYTHONPATH=. python benchmarks/teacher_memory.py --teacher-kind ema --hidden-size 128
```
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def live_tensor_bytes() -> int:
    """Bytes of the storages of every tensor reachable by the garbage collector (each storage counted once)."""
    import torch

    gc.collect()
    storages: dict[int, int] = {}

    def add(tensor) -> None:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()

    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor):
                add(obj)
            elif isinstance(obj, torch.nn.Module):
                for t in (*obj.parameters(recurse=False), *obj.buffers(recurse=False)):
                    add(t)
        except Exception:  # noqa: BLE001 - objects that cannot be inspected hold no tensor we can count
            continue
    storages.pop(0, None)
    return sum(storages.values())


def run_one(kind: str, args: argparse.Namespace) -> dict[str, float]:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from trace_trl import TRACEConfig, TRACETrainer
    from trace_trl.annotators import AllTokensAnnotator
    from trace_trl.tiny import build_tiny_qwen3, build_tiny_tokenizer, save_tiny_model

    torch.manual_seed(0)
    tmp = tempfile.mkdtemp()
    corpus = ["What is 2 + 3? The answer is 5.", "Compute 7 + 8 = 15.", "Ten plus one is eleven."]
    tokenizer = build_tiny_tokenizer(corpus, vocab_size=400)
    model_dir = save_tiny_model(
        build_tiny_qwen3(tokenizer, hidden_size=args.hidden_size, num_layers=args.num_layers), tokenizer, tmp
    )
    rows = [
        {"prompt": [{"role": "user", "content": f"What is {i} + {i + 1}?"}], "solution": str(2 * i + 1)}
        for i in range(8)
    ]
    dataset = Dataset.from_list(rows)
    trace = kind != "grpo"
    config = TRACEConfig(
        output_dir=os.path.join(tmp, "out"),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=args.warmup_steps + args.decay_steps + args.grpo_steps,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
        kl_coef=0.5 if trace else 0.0,
        kl_warmup_steps=args.warmup_steps,
        kl_decay_steps=args.decay_steps,
        teacher_kind=args.teacher_kind,
        teacher_sync_steps=args.sync_steps,
    )
    trainer = TRACETrainer(
        model=str(model_dir),
        reward_funcs=lambda completions, **kw: [float(len(str(c)) % 2) for c in completions],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        annotator=AllTokensAnnotator() if trace else None,
    )
    during = {}

    class Probe(TrainerCallback):
        def on_step_end(self, a, state, control, **kwargs):
            if state.global_step == 1:
                during["teacher_bytes"] = trainer.teacher.memory_bytes()
                during["tensor_bytes"] = live_tensor_bytes()

    trainer.add_callback(Probe())
    trainer.train()
    model_bytes = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    return {
        "model_bytes": model_bytes,
        "teacher_bytes_during_kl": during["teacher_bytes"],
        "tensor_bytes_during_kl": during["tensor_bytes"],
        "teacher_bytes_end": trainer.teacher.memory_bytes(),
        "tensor_bytes_end": live_tensor_bytes(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher-kind", default="synced", choices=["synced", "ema", "base"])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--decay-steps", type=int, default=2)
    parser.add_argument("--grpo-steps", type=int, default=2)
    parser.add_argument("--sync-steps", type=int, default=2)
    parser.add_argument("--child", choices=["trace", "grpo"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args)))
        return
    results = {}
    for kind in ("grpo", "trace"):
        out = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--child", kind], check=True, capture_output=True, text=True
        ).stdout
        results[kind] = json.loads(out.strip().splitlines()[-1])
    grpo, trace = results["grpo"], results["trace"]
    mib = 2**20
    print(f"teacher_kind={args.teacher_kind}, model parameters {trace['model_bytes'] / mib:.2f} MiB")
    print(f"{'':28s}{'GRPO':>12s}{'TRACE':>12s}{'TRACE/GRPO':>12s}")
    for label, key in (
        ("live tensors, KL phase", "tensor_bytes_during_kl"),
        ("live tensors, end", "tensor_bytes_end"),
    ):
        print(f"{label:28s}{grpo[key] / mib:10.2f}Mi{trace[key] / mib:10.2f}Mi{trace[key] / grpo[key]:12.3f}")
    print(
        f"teacher memory_bytes(): KL phase {trace['teacher_bytes_during_kl'] / mib:.2f} MiB, end {trace['teacher_bytes_end']}"
    )


if __name__ == "__main__":
    main()
