"""TRACE reduces to GRPO exactly when its KL channel has nothing to do, and adds signal where GRPO has none."""

from __future__ import annotations

import pytest
import torch
from trainer_helpers import (
    TRAINING_ARGS,
    HalfSpanAnnotator,
    constant_reward,
    lora_config,
    math_dataset,
    no_spans_annotator,
    parity_reward,
    trace_config,
    trainable_state,
)
from trl import GRPOConfig, GRPOTrainer

from trace_trl import TRACETrainer


SHARED = {**TRAINING_ARGS, "gradient_accumulation_steps": 2, "steps_per_generation": 2, "max_steps": 3}


def _grpo_params(model_dir, tokenizer, tmp_path, peft):
    args = GRPOConfig(output_dir=str(tmp_path / "grpo"), **SHARED)
    trainer = GRPOTrainer(
        model=model_dir,
        reward_funcs=parity_reward,
        args=args,
        train_dataset=math_dataset(),
        processing_class=tokenizer,
        peft_config=lora_config() if peft else None,
    )
    before = trainable_state(trainer.model)
    trainer.train()
    after = trainable_state(trainer.model)
    assert any(not torch.equal(before[k], after[k]) for k in before), "GRPO must train in this setting"
    return after


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("variant", ["kl_coef_zero", "no_spans"])
def test_three_steps_leave_exactly_grpo_parameters(tiny_model_dir, tiny_tokenizer, tmp_path, peft, variant):
    expected = _grpo_params(tiny_model_dir, tiny_tokenizer, tmp_path, peft)
    if variant == "kl_coef_zero":
        overrides, annotator = {"kl_coef": 0.0}, HalfSpanAnnotator()
    else:
        overrides, annotator = {}, no_spans_annotator
    args = trace_config(tmp_path, **{**SHARED, **overrides})
    trainer = TRACETrainer(
        model=tiny_model_dir,
        reward_funcs=parity_reward,
        args=args,
        train_dataset=math_dataset(),
        processing_class=tiny_tokenizer,
        peft_config=lora_config() if peft else None,
        annotator=annotator,
    )
    trainer.train()
    actual = trainable_state(trainer.model)
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), f"{name} differs from GRPO"
    if variant == "kl_coef_zero":
        assert annotator.calls == [], "with kl_coef=0 the annotator must not be called (no API cost)"


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_trace_moves_parameters_where_grpo_is_silent(tiny_model_dir, tiny_tokenizer, tmp_path, peft):
    """All rollouts rewarded equally: GRPO's advantages vanish and it changes nothing; TRACE's KL channel still learns."""
    common = dict(max_steps=2, per_device_train_batch_size=4, num_generations=4, learning_rate=1e-2)
    grpo = GRPOTrainer(
        model=tiny_model_dir,
        reward_funcs=constant_reward,
        args=GRPOConfig(
            output_dir=str(tmp_path / "g"),
            use_cpu=True,
            bf16=False,
            report_to="none",
            save_strategy="no",
            gradient_checkpointing=False,
            max_completion_length=10,
            seed=0,
            **common,
        ),
        train_dataset=math_dataset(),
        processing_class=tiny_tokenizer,
        peft_config=lora_config() if peft else None,
    )
    before = trainable_state(grpo.model)
    grpo.train()
    after = trainable_state(grpo.model)
    assert all(torch.equal(before[k], after[k]) for k in before), "GRPO with zero advantages must not move"

    trace = TRACETrainer(
        model=tiny_model_dir,
        reward_funcs=constant_reward,
        args=trace_config(tmp_path, teacher_kind="base", **common),
        train_dataset=math_dataset(),
        processing_class=tiny_tokenizer,
        peft_config=lora_config() if peft else None,
        annotator=HalfSpanAnnotator(),
    )
    before = trainable_state(trace.model)
    trace.train()
    after = trainable_state(trace.model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before), f"only {len(changed)}/{len(before)} trainable tensors moved"
    fkl = [r["trace/fkl_mean"] for r in trace.state.log_history if "trace/fkl_mean" in r]
    assert fkl and all(v >= 0 for v in fkl)


def test_gradient_comes_only_from_routed_tokens(tiny_model_dir, tiny_tokenizer, tmp_path):
    """With zero advantages the TRACE gradient equals a dense, independent KL over exactly the routed tokens."""
    trainer = TRACETrainer(
        model=tiny_model_dir,
        reward_funcs=constant_reward,
        args=trace_config(
            tmp_path,
            teacher_kind="base",
            per_device_train_batch_size=8,
            num_generations=4,
            kl_coef=1.0,
            kl_normalization="grpo",  # the reference below normalizes like GRPO's dapo loss, unclipped and uncapped
            kl_term_clip=None,
            max_routed_fraction=None,
        ),
        train_dataset=math_dataset(),
        processing_class=tiny_tokenizer,
        annotator=HalfSpanAnnotator(),
    )
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    rows = [math_dataset()[i // 4] for i in range(8)]
    inputs = trainer._generate_and_score_completions(rows)
    assert torch.all(inputs["advantages"] == 0)
    route = inputs["trace_route"]
    mask = inputs["completion_mask"]
    assert (route > 0).any() and ((route > 0) & (mask == 0)).sum() == 0

    model.zero_grad()
    trainer._compute_loss(model, inputs).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    # Independent dense reference: full logits from ordinary forwards, KL(teacher || student) on routed tokens.
    model.zero_grad()
    prompt_width, width = inputs["prompt_ids"].size(1), inputs["completion_ids"].size(1)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    student = model(input_ids=ids, attention_mask=attn).logits[:, prompt_width - 1 : -1] / trainer.temperature
    teacher_model = trainer.teacher.copy
    with torch.no_grad():
        t_ids, t_attn = inputs["teacher_input_ids"], inputs["teacher_attention_mask"]
        teacher = (
            teacher_model(input_ids=t_ids, attention_mask=t_attn).logits[:, -width - 1 : -1] / trainer.temperature
        )
    log_s, log_t = student.log_softmax(-1), teacher.log_softmax(-1)
    per_token = (log_t.exp() * (log_t - log_s)).sum(-1)
    routed = (route > 0).float() * mask
    reference = (per_token * routed).sum() / inputs["num_items_in_batch"]  # dapo, one process, no accumulation
    reference.backward()
    for name, grad in ours.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, rtol=2e-3, atol=1e-6, msg=name)


def test_kl_coef_zero_trains_prompt_tuning_exactly_like_grpo(tiny_model_dir, tiny_tokenizer, tmp_path):
    """Prompt-learning PEFT methods bypass the decoder call the KL channel makes, so TRACE refuses them with the KL
    channel on; with `kl_coef=0` TRACE is GRPO and must train them as GRPO does."""
    from peft import PromptTuningConfig

    def prompt_tuning():
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)

    common = dict(
        reward_funcs=parity_reward, train_dataset=math_dataset(), processing_class=tiny_tokenizer, model=tiny_model_dir
    )
    grpo = GRPOTrainer(
        args=GRPOConfig(output_dir=str(tmp_path / "grpo"), **SHARED), peft_config=prompt_tuning(), **common
    )
    before = trainable_state(grpo.model)
    grpo.train()
    expected = trainable_state(grpo.model)
    assert any(not torch.equal(before[k], expected[k]) for k in before), "GRPO must train the prompt embeddings"

    args = trace_config(tmp_path, **{**SHARED, "kl_coef": 0.0})
    trace = TRACETrainer(args=args, peft_config=prompt_tuning(), annotator=HalfSpanAnnotator(), **common)
    trace.train()
    actual = trainable_state(trace.model)
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), f"{name} differs from GRPO"

    with pytest.raises(ValueError, match="prompt-learning PEFT methods"):
        TRACETrainer(args=trace_config(tmp_path), peft_config=prompt_tuning(), annotator=HalfSpanAnnotator(), **common)
