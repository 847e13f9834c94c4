"""One process of the two-process CPU (gloo) test in `test_multiprocess.py`; not a test module itself.

Run with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set: `TRACEConfig(use_cpu=True)` then makes
Accelerate build a gloo process group and TRL wraps the policy in DDP. Only rank 0's rollouts get spans, so rank 1
routes nothing while rank 0 does (it must still join every collective). The process trains two steps, then builds
one more batch and computes the loss and the DDP-averaged gradients on it for each loss type, and dumps the batch,
losses, gradients, weights and logs to `<out_dir>/rank<r>.pt`.

Usage: python multiprocess_worker.py MODEL_DIR OUT_DIR PEFT(0|1)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


for key, value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRL_EXPERIMENTAL_SILENCE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
}.items():
    os.environ.setdefault(key, value)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from trainer_helpers import HalfSpanAnnotator, make_trainer, math_dataset, trace_config  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from trace_trl import TRACETrainer  # noqa: E402
from trace_trl.annotators import Annotation  # noqa: E402


LOSS_TYPES = ("dapo", "grpo", "dr_grpo")
# The KL channel's reduction under each GRPO loss type: the paper's sequence normalization and GRPO's normalizer.
CASES = [(loss_type, kl_normalization) for loss_type in LOSS_TYPES for kl_normalization in ("sequence", "grpo")]
BATCH_KEYS = (
    "prompt_ids",
    "prompt_mask",
    "completion_ids",
    "completion_mask",
    "advantages",
    "num_items_in_batch",
    "trace_route",
    "trace_labels",
    "teacher_input_ids",
    "teacher_attention_mask",
)


class RankZeroAnnotator(HalfSpanAnnotator):
    """Spans on rank 0's rollouts only; rank 1's rollouts train as plain GRPO."""

    def bind(self, trainer) -> None:
        self.rank = trainer.accelerator.process_index

    def __call__(self, requests):
        if self.rank == 0:
            return super().__call__(requests)
        return [Annotation() for _ in requests]


def build(model_dir: str, out_dir: str, peft: bool, **overrides) -> TRACETrainer:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = trace_config(
        Path(out_dir),
        max_steps=2,
        kl_warmup_steps=100,
        error_span_action="rkl",
        # The one-process reference loads the DDP run's final weights: its teacher must be those weights too.
        teacher_kind="live",
        **overrides,
    )
    return make_trainer(model_dir, tokenizer, args, RankZeroAnnotator(), peft=peft)


def case_results(trainer: TRACETrainer, model, batch: dict, gradients) -> dict:
    """For each case of `CASES`: the loss of `batch` and, after the engine's backward (DDP's all-reduce, FSDP2's
    reduce-scatter, ZeRO-3's partitioned reduction: gradients averaged over the processes), `gradients()`."""
    results = {}
    for loss_type, kl_normalization in CASES:
        trainer.loss_type = loss_type
        trainer.args.kl_normalization = kl_normalization
        model.zero_grad()  # a DeepSpeed engine's takes no arguments
        loss = trainer.compute_loss(model, batch)
        trainer.accelerator.backward(loss)
        results[(loss_type, kl_normalization)] = {"loss": loss.detach().item(), "grads": gradients()}
    return results


def main(model_dir: str, out_dir: str, peft: bool) -> None:
    trainer = build(model_dir, out_dir, peft)
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    assert world == 2, f"expected 2 processes, got {world}"
    trainer.train()  # must not hang although rank 1 never routes a token
    logs = [{k: v for k, v in r.items() if k.startswith("trace/")} for r in trainer.state.log_history]

    model = trainer.model_wrapped
    assert isinstance(model, torch.nn.parallel.DistributedDataParallel), type(model)
    unwrapped = trainer.accelerator.unwrap_model(model)
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    rows = [math_dataset()[rank] for _ in range(4)]  # one prompt group per process
    batch = trainer._generate_and_score_completions(rows)
    results = case_results(
        trainer,
        model,
        batch,
        lambda: {n: p.grad.detach().clone() for n, p in unwrapped.named_parameters() if p.grad is not None},
    )
    torch.save(
        {
            "rank": rank,
            "batch": {k: batch[k].detach().cpu() for k in BATCH_KEYS},
            "results": results,
            "weights": {n: p.detach().clone() for n, p in unwrapped.state_dict().items()},
            "logs": logs,
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] == "1")
