"""The synced teacher (the paper's): snapshot rule, frozen, eval mode, release after the KL phase, exact resume; and
what every teacher copy must be: independent of the policy, on its device and dtype, without dropout; a final LoRA
save without the teacher adapter."""

from __future__ import annotations

import os

import pytest
import torch
from trainer_helpers import make_trainer, trace_config
from transformers import AutoModelForCausalLM, TrainerCallback

from trace_trl.teacher import EMA_ADAPTER_NAME, SYNCED_ADAPTER_NAME, TEACHER_STATE_FILE, Teacher


# N = 2; the KL weight is 0.5 at steps 0-2, 0.25 at step 3 (linear decay from step 2 over 2 steps), 0 from step 4 on.
SCHEDULE = dict(
    teacher_kind="synced",
    teacher_sync_steps=2,
    kl_warmup_steps=2,
    kl_decay_steps=2,
    kl_term_clip=None,
    max_routed_fraction=None,
    kl_normalization="grpo",
)
RELEASE_STEP = 4


def _make(model_dir, tokenizer, tmp_path, peft=False, **overrides):
    return make_trainer(model_dir, tokenizer, trace_config(tmp_path, **{**SCHEDULE, **overrides}), peft=peft)


def _teacher_weights(trainer) -> dict[str, torch.Tensor]:
    """The synced teacher's tensors, keyed like the policy's trained tensors they snapshot."""
    teacher = trainer.teacher
    if teacher.copy is not None:
        return {n: p.detach().clone() for n, p in teacher.copy.named_parameters()}
    model = trainer.accelerator.unwrap_model(trainer.model)
    tag = f".{SYNCED_ADAPTER_NAME}."
    return {n.replace(tag, ".default."): p.detach().clone() for n, p in model.named_parameters() if tag in n}


def _policy_weights(trainer, peft: bool) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if not peft or ".default." in n}


def _policy_and_dropout_model(tiny_model_dir, **config):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager", **config)


# ---------------------------------------------------------------------------------------------------------------------
# The sync rule, frozen, eval mode, release (real trainer)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_teacher_is_the_snapshot_of_the_last_sync_step_and_is_released_after_the_kl_phase(
    tiny_model_dir, tiny_tokenizer, tmp_path, peft
):
    trainer = _make(tiny_model_dir, tiny_tokenizer, tmp_path, peft=peft, max_steps=6)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not peft:
        assert trainer.teacher.copy is None, "the full fine-tuning copy must be made after accelerator.prepare"
    policy_at, teacher_at, checks = {}, {}, {}

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            policy_at[0] = _policy_weights(trainer, peft)
            teacher_at[0] = _teacher_weights(trainer)

        def on_step_end(self, args, state, control, **kwargs):
            step = state.global_step
            policy_at[step] = _policy_weights(trainer, peft)
            teacher_at[step] = _teacher_weights(trainer)
            optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
            if trainer.teacher.copy is not None:
                frozen = list(trainer.teacher.copy.parameters())
                assert all(not m.training for m in trainer.teacher.copy.modules()), "the copy left eval mode"
            else:
                frozen = [p for n, p in model.named_parameters() if f".{SYNCED_ADAPTER_NAME}." in n]
            checks[step] = dict(
                frozen=not any(p.requires_grad or p.grad is not None for p in frozen),
                outside_optimizer=not any(id(p) in optimized for p in frozen),
                memory=trainer.teacher.memory_bytes(),
                adapters=set(getattr(model, "peft_config", {})),
            )

    trainer.add_callback(Record())
    trainer.train()

    assert teacher_at[0].keys() == policy_at[0].keys() and teacher_at[0]
    for step in range(RELEASE_STEP):
        synced = step - step % 2
        for name, value in teacher_at[step].items():
            assert torch.equal(value, policy_at[synced][name]), f"step {step}: {name} is not the step-{synced} policy"
    # The policy does move between syncs, so the rule above is not vacuous.
    assert any(not torch.equal(teacher_at[3][n], policy_at[3][n]) for n in teacher_at[3])
    for step in range(1, RELEASE_STEP):
        assert checks[step]["frozen"] and checks[step]["outside_optimizer"], step
        assert checks[step]["memory"] > 0
    for step in range(RELEASE_STEP, 7):
        assert checks[step]["memory"] == 0, f"teacher memory still held at step {step}"
        assert teacher_at[step] == {}
        assert SYNCED_ADAPTER_NAME not in checks[step]["adapters"]
    assert trainer.teacher.released and trainer.teacher.copy is None
    if peft:
        assert all(p.requires_grad for n, p in model.named_parameters() if ".default." in n)
    logged = [r["trace/teacher_memory_bytes"] for r in trainer.state.log_history if "trace/teacher_memory_bytes" in r]
    assert len(logged) == 6 and all(v > 0 for v in logged[:3]) and all(v == 0 for v in logged[3:])


def test_grpo_run_builds_no_teacher(tiny_model_dir, tiny_tokenizer, tmp_path):
    """kl_coef=0 (GRPO): no copy, no adapter, nothing to free."""
    full = make_trainer(tiny_model_dir, tiny_tokenizer, trace_config(tmp_path / "a", kl_coef=0.0, teacher_kind="ema"))
    assert full.teacher.released and full.teacher.copy is None and full.teacher.memory_bytes() == 0
    lora = _make(tiny_model_dir, tiny_tokenizer, tmp_path / "b", peft=True, kl_coef=0.0)
    model = lora.accelerator.unwrap_model(lora.model)
    assert set(model.peft_config) == {"default"}


def test_release_follows_the_schedule(tiny_model_dir, tiny_tokenizer, tmp_path):
    trainer = _make(tiny_model_dir, tiny_tokenizer, tmp_path / "a")
    finished = trainer.teacher._kl_finished
    assert [finished(s) for s in range(6)] == [False] * RELEASE_STEP + [True] * 2
    forever = _make(tiny_model_dir, tiny_tokenizer, tmp_path / "b", kl_decay="none", routed_token_grpo="additive")
    assert not forever.teacher._kl_finished(10**6), "kl_decay='none' never reaches zero"


# ---------------------------------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_resume_between_two_syncs_equals_the_uninterrupted_run(tiny_model_dir, tiny_tokenizer, tmp_path, peft):
    common = dict(max_steps=6, save_strategy="steps", save_steps=3)
    teacher_at = {}

    class Record(TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer

        def on_step_end(self, args, state, control, **kwargs):
            teacher_at[state.global_step] = _teacher_weights(self.trainer)

    uninterrupted = _make(tiny_model_dir, tiny_tokenizer, tmp_path / "full", peft=peft, **common)
    uninterrupted.add_callback(Record(uninterrupted))
    uninterrupted.train()
    expected = _policy_weights(uninterrupted, peft=False)
    output = uninterrupted.args.output_dir
    # Step 3 is between the syncs of steps 2 and 4: the teacher differs from the policy and must be saved.
    assert os.path.exists(os.path.join(output, "checkpoint-3", TEACHER_STATE_FILE))
    # Step 6 is past the KL phase: nothing of the teacher is saved.
    assert not os.path.exists(os.path.join(output, "checkpoint-6", TEACHER_STATE_FILE))

    resumed = _make(tiny_model_dir, tiny_tokenizer, tmp_path / "resumed", peft=peft, **common)
    restored = {}

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            restored.update(_teacher_weights(resumed))

    resumed.add_callback(Capture())
    resumed.train(resume_from_checkpoint=os.path.join(output, "checkpoint-3"))
    assert restored.keys() == teacher_at[3].keys()
    for name, value in teacher_at[3].items():
        assert torch.equal(restored[name], value), f"synced teacher not restored: {name}"
    actual = _policy_weights(resumed, peft=False)
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), f"{name} differs after resume"
    assert resumed.teacher.released and resumed.teacher.memory_bytes() == 0

    # Resuming past the KL phase builds nothing.
    past = _make(tiny_model_dir, tiny_tokenizer, tmp_path / "past", peft=peft, **common)
    past.train(resume_from_checkpoint=os.path.join(output, "checkpoint-6"))
    assert past.teacher.released and past.teacher.copy is None and past.teacher.memory_bytes() == 0
    if peft:
        assert SYNCED_ADAPTER_NAME not in past.accelerator.unwrap_model(past.model).peft_config


# ---------------------------------------------------------------------------------------------------------------------
# Final save (issue 9.19)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "adapter"), [("synced", SYNCED_ADAPTER_NAME), ("ema", EMA_ADAPTER_NAME)])
def test_final_lora_save_holds_only_the_trained_adapter(tiny_model_dir, tiny_tokenizer, tmp_path, kind, adapter):
    trainer = _make(
        tiny_model_dir,
        tiny_tokenizer,
        tmp_path,
        peft=True,
        teacher_kind=kind,
        max_steps=1,
        kl_warmup_steps=100,
        save_strategy="steps",
        save_steps=1,
    )
    trainer.train()
    assert trainer.teacher.adapter_name == adapter  # still alive: the save must leave it out itself
    output = trainer.args.output_dir
    assert os.path.isfile(os.path.join(output, "checkpoint-1", adapter, "adapter_config.json")), "resume needs it"
    for internal in (False, True):  # a user's save_model, and push_to_hub's internal save into the run folder
        trainer.save_model(_internal_call=internal)
        assert os.path.isfile(os.path.join(output, "adapter_config.json"))
        assert os.path.isfile(os.path.join(output, "adapter_model.safetensors"))
        assert not os.path.exists(os.path.join(output, adapter))
    other = str(tmp_path / "elsewhere")
    trainer.save_model(other)
    assert os.path.isfile(os.path.join(other, "adapter_config.json")) and not os.path.exists(
        os.path.join(other, adapter)
    )
    # The model still has its teacher: only the saved folder leaves it out.
    assert adapter in trainer.accelerator.unwrap_model(trainer.model).peft_config


# ---------------------------------------------------------------------------------------------------------------------
# Copies: independent (issue 9.11), on the policy's device and dtype (issue 9.10), no dropout
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["base", "ema", "synced"])
def test_copy_forward_runs_the_copy_not_the_policy(tiny_model_dir, kind):
    from trl.trainer.utils import add_fused_lm_head

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    add_fused_lm_head(policy)  # what GRPOTrainer does: an instance-level forward closing over the policy's
    teacher = Teacher(kind, policy)
    teacher.begin(policy, 0)
    copy = teacher.copy
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    before = copy(input_ids=ids).logits.clone()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p))
    after = copy(input_ids=ids).logits
    assert torch.equal(before, after), "the copy's forward follows the policy's weights"
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    fresh.load_state_dict(copy.state_dict())
    torch.testing.assert_close(after, fresh(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["base", "ema", "synced"])
def test_copy_follows_the_policy_device_and_dtype(tiny_model_dir, kind):
    """Stand-in for DeepSpeed moving the policy after the trainer's __init__: cast it after the Teacher is built."""
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    teacher = Teacher(kind, policy, sync_steps=1)
    policy.to(torch.float64)
    with torch.no_grad(), teacher.activate(policy) as view:
        hidden = view.backbone(input_ids=torch.tensor([[5, 6, 7]])).last_hidden_state
    assert hidden.dtype == torch.float64 and view.head()[0].dtype == torch.float64
    assert {p.dtype for p in teacher.copy.parameters()} == {torch.float64}
    assert {b.dtype for b in teacher.copy.buffers()} == {b.dtype for b in policy.buffers()}
    teacher.update(policy, step=1)  # EMA step / sync in the new dtype
    assert {p.dtype for p in teacher.copy.parameters()} == {torch.float64}
    assert not any(p.requires_grad for p in teacher.copy.parameters())


@pytest.mark.parametrize(
    ("kind", "peft"),
    [
        ("live", False),
        ("synced", False),
        ("ema", False),
        ("base", False),
        ("live", True),
        ("synced", True),
        ("ema", True),
        ("base", True),
    ],
)
def test_teacher_forward_has_no_dropout_and_restores_train_mode(tiny_model_dir, kind, peft):
    from peft import LoraConfig, get_peft_model

    policy = _policy_and_dropout_model(tiny_model_dir, attention_dropout=0.5)
    if peft:
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"])
        policy = get_peft_model(policy, config)
        with torch.no_grad():  # non-zero LoRA B, so the adapter (and its dropout) matters
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.normal_()
    teacher = Teacher(kind, policy)
    policy.train()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    outputs = []
    for _ in range(2):
        with torch.no_grad(), teacher.activate(policy) as view:
            outputs.append(view.backbone(input_ids=ids).last_hidden_state)
        assert all(m.training for m in policy.modules()), "train mode not restored after the teacher forward"
    assert torch.equal(outputs[0], outputs[1]), "the teacher forward ran dropout"
    # The student forward in train mode does drop out, so the check above is not vacuous.
    with torch.no_grad():
        student = [policy(input_ids=ids).logits for _ in range(2)]
    assert not torch.equal(student[0], student[1])
