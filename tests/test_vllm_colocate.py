"""`use_vllm=True, vllm_mode="colocate"` through TRL's real `VLLMGeneration`, with a TEST DOUBLE for the vLLM engine,
for what the real engine cannot do on CPU.

The real engine (vLLM's CPU build) is tested in `tests/test_vllm_engine.py` (`pytest -m vllm`, its own environment):
colocated GRPO and TRACE, weight syncs, LoRA merging, self-annotation. It refuses sleep mode on CPU, and tensor
parallelism needs several GPUs, so these stay here: `FakeLLM` below stands in for `vllm.LLM`, a plain Hugging Face
copy of the model that receives weights through the same `load_weights` call TRL's weight sync makes, samples with the
requested temperature, returns vLLM-shaped outputs with (processed) log-probabilities, and models sleep mode (level 2
discards the weights). Everything else is the real code path: `VLLMGeneration.__init__`, `sync_weights` (PEFT
merge/unmerge and name mapping), `generate` (colocate, sleep/wake), GRPO's importance-sampling correction, and TRACE's
teacher forward. The importance-sampling test checks TRACE's loss on a vLLM-shaped batch, so it runs here, in the
main suite, which has no vLLM. Nothing here says how real vLLM behaves on a GPU.
"""

from __future__ import annotations

import types

import pytest
import torch
from trainer_helpers import (
    constant_reward,
    make_trainer,
    math_dataset,
    parity_reward,
    trace_config,
)

from trace_trl.teacher import EMA_ADAPTER_NAME


class FakeSamplingParams:
    """Test double for `vllm.SamplingParams`."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class FakeLLM:
    """TEST DOUBLE for `vllm.LLM` in colocate mode (see the module docstring)."""

    instances: list[FakeLLM] = []

    def __init__(self, model: str, enable_sleep_mode: bool = False, seed: int = 0, **kwargs):
        from transformers import AutoModelForCausalLM

        self.hf = AutoModelForCausalLM.from_pretrained(model).eval()
        self.kwargs = kwargs
        self.enable_sleep_mode = enable_sleep_mode
        self.weights_asleep = False
        self.kv_asleep = False
        self.events: list[str] = []
        self.loaded: dict[str, torch.Tensor] = {}
        self.generator = torch.Generator().manual_seed(seed)
        executor = types.SimpleNamespace(
            driver_worker=types.SimpleNamespace(
                model_runner=types.SimpleNamespace(model=types.SimpleNamespace(load_weights=self._load_weights))
            )
        )
        self.llm_engine = types.SimpleNamespace(model_executor=executor)
        FakeLLM.instances.append(self)

    def _load_weights(self, weights):
        assert not self.weights_asleep, "weights pushed into a sleeping engine"
        params = dict(self.hf.named_parameters())
        for name, value in weights:
            assert "lora_" not in name and EMA_ADAPTER_NAME not in name, f"adapter tensor pushed to vLLM: {name}"
            assert name in params, f"vLLM has no parameter {name}"
            with torch.no_grad():
                params[name].copy_(value)
            self.loaded[name] = value.detach().clone()
        self.events.append("load_weights")

    def sleep(self, level: int = 1):
        self.events.append(f"sleep{level}")
        self.kv_asleep = True
        if level == 2:
            self.weights_asleep = True
            with torch.no_grad():  # level 2 discards the weights: a missed re-sync would generate garbage
                for p in self.hf.parameters():
                    p.fill_(float("nan"))

    def wake_up(self, tags=None):
        tags = tags or ["weights", "kv_cache"]
        self.events.append("wake:" + ",".join(tags))
        if "weights" in tags:
            self.weights_asleep = False
        if "kv_cache" in tags:
            self.kv_asleep = False

    def reset_prefix_cache(self):
        self.events.append("reset_prefix_cache")

    @torch.no_grad()
    def generate(self, prompts, sampling_params, use_tqdm=False):
        assert not self.weights_asleep and not self.kv_asleep, "generate() on a sleeping engine"
        self.events.append("generate")
        eos = self.hf.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        outputs = []
        for prompt in prompts:
            ids = list(prompt["prompt_token_ids"])
            completion, logprobs = [], []
            for _ in range(sampling_params.max_tokens):
                logits = self.hf(input_ids=torch.tensor([ids + completion])).logits[0, -1].float()
                log_probs = torch.log_softmax(logits / sampling_params.temperature, -1)
                token = int(torch.multinomial(log_probs.exp(), 1, generator=self.generator))
                completion.append(token)
                logprobs.append({token: types.SimpleNamespace(logprob=float(log_probs[token]), rank=1)})
                if token in eos:
                    break
            sample = types.SimpleNamespace(token_ids=completion, logprobs=logprobs)
            outputs.append(types.SimpleNamespace(prompt_token_ids=ids, outputs=[sample]))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    """Install the test double where TRL's `VLLMGeneration` looks for vLLM."""
    import trl.generation.vllm_generation as vllm_generation

    monkeypatch.setattr(vllm_generation, "is_vllm_available", lambda *a, **k: True)
    monkeypatch.setattr(vllm_generation, "LLM", FakeLLM, raising=False)
    monkeypatch.setattr(vllm_generation, "SamplingParams", FakeSamplingParams, raising=False)
    monkeypatch.setattr(vllm_generation, "ensure_master_addr_port", lambda *a, **k: None, raising=False)
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):  # VLLMGeneration writes them: record, unset, restore after
        monkeypatch.setenv(var, "0")
        monkeypatch.delenv(var)
    FakeLLM.instances.clear()
    yield FakeLLM
    FakeLLM.instances.clear()


def _make(tiny_model_dir, tiny_tokenizer, tmp_path, peft, reward=parity_reward, **overrides):
    args = trace_config(
        tmp_path, use_vllm=True, vllm_mode="colocate", vllm_importance_sampling_correction=True, **overrides
    )
    return make_trainer(tiny_model_dir, tiny_tokenizer, args, peft=peft, reward=reward)


def _merged_default_weights(model) -> dict[str, torch.Tensor]:
    """The student's weights as vLLM should hold them: base + the trained adapter only (never the EMA one)."""
    import copy

    clone = copy.deepcopy(model)
    if EMA_ADAPTER_NAME in clone.peft_config:
        clone.delete_adapter(EMA_ADAPTER_NAME)
    merged = clone.merge_and_unload()
    return {n: p.detach() for n, p in merged.named_parameters()}


@pytest.mark.parametrize(
    ("peft", "teacher_kind", "sleep"),
    [(False, "live", True), (False, "ema", True), (True, "ema", True), (True, "base", True)],
    ids=["full-live-sleep", "full-ema-sleep", "lora-ema-sleep", "lora-base-sleep"],
)
def test_colocate_path_trains_with_every_teacher(
    fake_vllm, tiny_model_dir, tiny_tokenizer, tmp_path, peft, teacher_kind, sleep
):
    trainer = _make(
        tiny_model_dir,
        tiny_tokenizer,
        tmp_path,
        peft,
        teacher_kind=teacher_kind,
        vllm_enable_sleep_mode=sleep,
        max_steps=2,
    )
    assert isinstance(trainer.vllm_generation.llm, FakeLLM)
    engine = trainer.vllm_generation.llm
    states = []
    original = trainer._compute_loss

    def watched(model, inputs):
        policy = trainer.accelerator.unwrap_model(model)
        states.append(
            {
                "engine_asleep": engine.weights_asleep,
                "has_is_ratio": "importance_sampling_ratio" in inputs,
                "active": getattr(policy, "active_adapter", None),
            }
        )
        return original(model, inputs)

    trainer._compute_loss = watched
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert all(not torch.equal(v, trainer.model.get_parameter(n)) for n, v in before.items())
    assert any("trace/fkl_mean" in r or "trace/rkl_mean" in r for r in trainer.state.log_history)
    assert engine.events.count("generate") >= 2 and "load_weights" in engine.events
    assert states and all(s["has_is_ratio"] for s in states)
    if sleep:
        # The engine sleeps (weights discarded) while the loss and the HF teacher run, and is re-synced before each
        # generation.
        assert all(s["engine_asleep"] for s in states)
        assert engine.events[0] == "sleep2"
    if peft:
        assert all(s["active"] == "default" for s in states), "a teacher adapter context leaked into the loss"
        assert trainer.accelerator.unwrap_model(trainer.model).active_adapter == "default"
        # A fresh sync pushes exactly base + trained adapter (the EMA adapter is never merged into vLLM).
        trainer.vllm_generation.sync_weights()
        expected = _merged_default_weights(trainer.accelerator.unwrap_model(trainer.model))
        for name, value in engine.loaded.items():
            torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6, msg=name)


def test_importance_sampling_ratio_multiplies_only_the_grpo_channel(
    fake_vllm, tiny_model_dir, tiny_tokenizer, tmp_path
):
    """With zero advantages the GRPO channel is zero, so the loss is the KL channel alone: it must not see the ratio."""
    trainer = _make(tiny_model_dir, tiny_tokenizer, tmp_path, False, reward=constant_reward, teacher_kind="base")
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = trainer._generate_and_score_completions([math_dataset()[i // 4] for i in range(4)])
    assert "importance_sampling_ratio" in batch and "old_per_token_logps" in batch
    assert (batch["trace_route"] > 0).any() and torch.all(batch["advantages"] == 0)
    kl_only = trainer._compute_loss(trainer.model, batch)
    scaled = {**batch, "importance_sampling_ratio": batch["importance_sampling_ratio"] * 2.5}
    assert kl_only.item() > 0
    assert trainer._compute_loss(trainer.model, scaled).item() == pytest.approx(kl_only.item(), rel=1e-6)
    # And the ratio does act on GRPO tokens: with advantages and nothing routed, scaling it scales the loss.
    grpo = {**batch, "advantages": torch.ones(4), "trace_route": torch.zeros_like(batch["trace_route"])}
    grpo_scaled = {**grpo, "importance_sampling_ratio": grpo["importance_sampling_ratio"] * 2.5}
    plain = trainer._compute_loss(trainer.model, grpo).item()
    assert plain != 0.0
    assert trainer._compute_loss(trainer.model, grpo_scaled).item() == pytest.approx(2.5 * plain, rel=1e-5)


@pytest.mark.parametrize("name", ["vllm_colocate_24gb", "vllm_colocate_80gb"])
def test_colocate_recipes_are_valid_trace_configs(name, tmp_path):
    import dataclasses
    import os

    import yaml

    from trace_trl import TRACEConfig

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "recipes", f"{name}.yaml")
    with open(path) as f:
        recipe = yaml.safe_load(f)
    fields = {f.name for f in dataclasses.fields(TRACEConfig)}
    assert recipe["use_vllm"] and recipe["vllm_mode"] == "colocate" and recipe["vllm_enable_sleep_mode"]
    assert recipe["gradient_checkpointing"] and "vllm_gpu_memory_utilization" in recipe
    if name.endswith("24gb"):
        assert recipe["use_peft"]
    kwargs = {k: v for k, v in recipe.items() if k in fields}
    kwargs.update(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to="none")
    args = TRACEConfig(**kwargs)
    # One generation per optimizer step, so every checkpoint resumes exactly.
    assert args.steps_per_generation * args.num_iterations == args.gradient_accumulation_steps
