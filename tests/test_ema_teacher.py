"""The EMA teacher: update rule and direction, a frozen adapter outside the optimizer, checkpoint save and restore."""

from __future__ import annotations

import os

import pytest
import torch
from trainer_helpers import HalfSpanAnnotator, lora_config, make_trainer, math_dataset, parity_reward, trace_config

from trace_trl import TRACETrainer
from trace_trl.teacher import EMA_ADAPTER_NAME, TEACHER_STATE_FILE, Teacher


def _make(tiny_model_dir, tiny_tokenizer, tmp_path, peft=False, **overrides):
    overrides.setdefault("teacher_kind", "ema")
    return make_trainer(tiny_model_dir, tiny_tokenizer, trace_config(tmp_path, **overrides), peft=peft)


def _ema_params(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if f".{EMA_ADAPTER_NAME}." in n}


def _student_name(name: str, trained: str = "default") -> str:
    return name.replace(f".{EMA_ADAPTER_NAME}.", f".{trained}.")


def _perturb(params, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("rate", [0.05, 0.5, 1.0])
def test_full_finetuning_update_is_one_minus_r_teacher_plus_r_student(tiny_model_dir, rate):
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    teacher = Teacher("ema", policy, ema_rate=rate)
    copy = teacher.copy
    assert copy is not None and not any(p.requires_grad for p in copy.parameters())
    # Make teacher and student differ in every parameter, then check the rule parameter by parameter.
    _perturb(policy.parameters(), seed=1)
    _perturb(copy.parameters(), seed=2)
    old_teacher = {n: p.detach().clone() for n, p in copy.named_parameters()}
    student = {n: p.detach().clone() for n, p in policy.named_parameters()}
    teacher.update(policy)
    for name, p in copy.named_parameters():
        expected = (1 - rate) * old_teacher[name] + rate * student[name]
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-6, msg=name)
    # The student is untouched by the teacher's update (direction: teacher moves towards student, not back).
    for name, p in policy.named_parameters():
        assert torch.equal(p, student[name]), name


@pytest.mark.parametrize("rate", [0.05, 0.5])
def test_lora_update_is_one_minus_r_teacher_plus_r_student(tiny_model_dir, rate):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_config())
    teacher = Teacher("ema", policy, ema_rate=rate)
    ema = _ema_params(policy)
    params = dict(policy.named_parameters())
    assert ema and len(ema) == sum(1 for n in params if ".default." in n)
    # Starts equal to the trained adapter (not zeros), and frozen.
    for name, p in ema.items():
        assert torch.equal(p, params[_student_name(name)]), name
        assert not p.requires_grad
    assert all(p.requires_grad for n, p in params.items() if ".default." in n)
    _perturb([p for n, p in params.items() if ".default." in n], seed=3)
    _perturb(ema.values(), seed=4)
    old = {n: p.detach().clone() for n, p in ema.items()}
    student = {n: p.detach().clone() for n, p in params.items() if ".default." in n}
    base = {n: p.detach().clone() for n, p in params.items() if "lora_" not in n}
    teacher.update(policy)
    for name, p in ema.items():
        expected = (1 - rate) * old[name] + rate * student[_student_name(name)]
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-6, msg=name)
    for name, value in student.items():
        assert torch.equal(params[name], value), f"the student adapter changed: {name}"
    for name, value in base.items():
        assert torch.equal(params[name], value), f"a base weight changed: {name}"


def test_lora_ema_adapter_is_frozen_outside_the_optimizer_and_moves_only_by_ema(
    tiny_model_dir, tiny_tokenizer, tmp_path
):
    trainer = _make(tiny_model_dir, tiny_tokenizer, tmp_path, peft=True, max_steps=2, teacher_ema_rate=0.5)
    model = trainer.model
    ema = _ema_params(model)
    steps = []

    class Watch:
        """Records, around every optimizer step, whether the EMA adapter was trainable or got a gradient."""

        def __init__(self):
            self.optimizer_ids = None

        def check(self):
            ids = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
            self.optimizer_ids = ids
            steps.append(
                {
                    "ema_in_optimizer": any(id(p) in ids for p in ema.values()),
                    "ema_trainable": any(p.requires_grad for p in ema.values()),
                    "ema_grad": any(p.grad is not None for p in ema.values()),
                    "student_trainable": all(p.requires_grad for n, p in model.named_parameters() if ".default." in n),
                    "ema_before_step": {n: p.detach().clone() for n, p in ema.items()},
                }
            )

    from transformers import TrainerCallback

    watch = Watch()

    class Callback(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            watch.check()

        def on_optimizer_step(self, args, state, control, **kwargs):
            # After optimizer.step(), before the EMA update (on_step_end): the EMA adapter did not move.
            for name, p in ema.items():
                assert torch.equal(p, steps[-1]["ema_before_step"][name]), f"optimizer.step moved {name}"

    trainer.add_callback(Callback())
    trainer.train()
    assert len(steps) == 2
    for record in steps:
        assert not record["ema_in_optimizer"]
        assert not record["ema_trainable"]
        assert not record["ema_grad"]
        assert record["student_trainable"]
    assert any("trace/fkl_mean" in r or "trace/rkl_mean" in r for r in trainer.state.log_history)
    # And the EMA did move, towards the trained adapter.
    params = dict(model.named_parameters())
    moved = [n for n, p in ema.items() if not torch.equal(p, steps[-1]["ema_before_step"][n])]
    assert moved
    for name in moved:
        before = steps[-1]["ema_before_step"][name]
        expected = 0.5 * before + 0.5 * params[_student_name(name)].detach()
        torch.testing.assert_close(ema[name].detach(), expected, rtol=0, atol=1e-6)


def test_full_finetuning_ema_copy_is_outside_the_optimizer(tiny_model_dir, tiny_tokenizer, tmp_path):
    trainer = _make(tiny_model_dir, tiny_tokenizer, tmp_path, max_steps=1)
    trainer.train()
    ids = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    copy = trainer.teacher.copy
    assert copy is not None
    assert not any(id(p) in ids for p in copy.parameters())
    assert not any(p.requires_grad for p in copy.parameters())
    assert trainer.teacher.memory_bytes() == sum(p.numel() * p.element_size() for p in trainer.model.parameters())


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_ema_state_is_saved_and_restored_on_resume(tiny_model_dir, tiny_tokenizer, tmp_path, peft):
    common = dict(max_steps=3, save_strategy="steps", save_steps=2, teacher_ema_rate=0.3)
    first = _make(tiny_model_dir, tiny_tokenizer, tmp_path / "a", peft=peft, **common)
    saved = {}

    from transformers import TrainerCallback

    class Snapshot(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            state_dict = first.teacher.state_dict(first.accelerator.unwrap_model(first.model))
            saved[state.global_step] = {k: v.clone() for k, v in state_dict.items()}

    first.add_callback(Snapshot())
    first.train()
    checkpoint = os.path.join(first.args.output_dir, "checkpoint-2")
    assert os.path.exists(os.path.join(checkpoint, TEACHER_STATE_FILE))
    on_disk = torch.load(os.path.join(checkpoint, TEACHER_STATE_FILE), weights_only=True)
    assert on_disk.keys() == saved[2].keys() and on_disk
    for name, value in saved[2].items():
        assert torch.equal(on_disk[name], value), name
    if peft:
        # PEFT saves the extra adapter in a sub-folder; Trainer reloads it on resume next to ours.
        assert os.path.isdir(os.path.join(checkpoint, EMA_ADAPTER_NAME))

    resumed = _make(tiny_model_dir, tiny_tokenizer, tmp_path / "b", peft=peft, **common)
    restored = {}

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            state_dict = resumed.teacher.state_dict(resumed.accelerator.unwrap_model(resumed.model))
            restored.update({k: v.clone() for k, v in state_dict.items()})

    resumed.add_callback(Capture())
    resumed.train(resume_from_checkpoint=checkpoint)
    assert restored.keys() == saved[2].keys()
    for name, value in saved[2].items():
        assert torch.equal(restored[name], value), f"EMA teacher not restored: {name}"
    model = resumed.accelerator.unwrap_model(resumed.model)
    if peft:
        assert not any(p.requires_grad for p in _ema_params(model).values())
        assert all(p.requires_grad for n, p in model.named_parameters() if ".default." in n)
        ids = {id(p) for group in resumed.optimizer.param_groups for p in group["params"]}
        assert not any(id(p) in ids for p in _ema_params(model).values())
    assert resumed.state.global_step == 3


def test_frozen_peft_model_is_a_clear_error(tiny_model_dir, tiny_tokenizer, tmp_path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    frozen = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_config())
    frozen.requires_grad_(False)  # e.g. PeftModel.from_pretrained(...) without is_trainable=True
    with pytest.raises(ValueError, match="no trainable parameter.*is_trainable=True"):
        TRACETrainer(
            model=frozen,
            reward_funcs=parity_reward,
            args=trace_config(tmp_path, teacher_kind="ema"),
            train_dataset=math_dataset(),
            processing_class=tiny_tokenizer,
            annotator=HalfSpanAnnotator(),
        )
