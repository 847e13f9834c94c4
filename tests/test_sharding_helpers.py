"""`trace_trl.sharding` and the kernel's sharded-head contract, in one process (the two-process runs are in
`test_sharded.py`)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from trace_trl.losses import routed_divergence
from trace_trl.sharding import copy_shards, full_tensor, gathered_state_dict, load_full_state_dict, local_shard


def test_plain_tensors_pass_through_unsharded():
    weight = torch.nn.Parameter(torch.randn(5, 3))
    assert local_shard(weight) is weight
    full = full_tensor(weight)
    assert not full.requires_grad and full.data_ptr() == weight.data_ptr()  # no copy when nothing is sharded
    assert full_tensor(weight, torch.float64).dtype == torch.float64
    assert full_tensor(None) is None


def test_copy_shards_refuses_different_layouts_and_unknown_parameters(tiny_model_dir, untied_tiny_model_dir):
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)
    copy_shards(teacher, policy)
    for (name, t), p in zip(teacher.named_parameters(), policy.parameters(), strict=True):
        assert torch.equal(t, p), name
    wider = AutoModelForCausalLM.from_config(
        policy.config.__class__(**{**policy.config.to_dict(), "hidden_size": 128})
    )
    with pytest.raises(RuntimeError, match=r"shards of model\.embed_tokens\.weight differ .*not sharded the same way"):
        copy_shards(wider, policy)
    untied = AutoModelForCausalLM.from_pretrained(untied_tiny_model_dir)
    with pytest.raises(KeyError, match="lm_head.weight"):
        copy_shards(untied, policy)  # the untied head has no counterpart in a tied policy


def test_teacher_states_load_across_formats(tiny_model_dir):
    """A state saved by a sharded run (`gathered_state_dict`: parameters by name, all buffers) and one saved by an
    unsharded run (`state_dict()`: tied duplicates, persistent buffers only) both load into either kind of model."""
    source = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in source.parameters():
            p.mul_(0.5)
    for state in (gathered_state_dict(source), source.state_dict()):
        target = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        load_full_state_dict(target, state)
        for (name, t), s in zip(target.named_parameters(), source.parameters(), strict=True):
            assert torch.equal(t, s), name
    # A process that does not write the checkpoint joins the gathers but keeps nothing.
    assert gathered_state_dict(source, keep=False) == {}
    with pytest.raises(KeyError, match="lacks parameters"):
        load_full_state_dict(target, {"model.norm.weight": torch.ones(64)})


@pytest.mark.parametrize("routed", [0, 3])
def test_a_zero3_head_is_gathered_once_per_pass_whatever_is_routed(monkeypatch, routed):
    """Under ZeRO-3 the kernel's head gathers are collectives: a process with nothing routed must make them too (one
    in the forward, one in the backward), or the processes that route tokens wait for it forever."""
    import trl.trainer.utils as trl_utils

    gathers: list[int] = []

    def counting_gather(*params):
        if params:  # an empty call is a no-op (nothing partitioned to gather)
            gathers.append(len(params))
        return contextlib.nullcontext()

    monkeypatch.setattr(trl_utils, "maybe_gather_lm_head_ctx", counting_gather)
    vocab, hidden = 11, 4
    head = torch.nn.Parameter(torch.randn(vocab, hidden))
    head.ds_tensor = head.data  # what DeepSpeed ZeRO-3 attaches to a partitioned parameter
    teacher_head = torch.randn(vocab, hidden)  # gathered beforehand into a plain tensor: never gathered again
    student = torch.randn(routed, hidden, requires_grad=True)
    divergence = routed_divergence(student, torch.randn(routed, hidden), (head, None), (teacher_head, None), "fkl")
    per_token = torch.zeros(2, 5).index_put((torch.zeros(routed, dtype=torch.long), torch.arange(routed)), divergence)
    assert gathers == [1], "one gather of the student head in the forward"
    per_token.sum().backward()
    assert gathers == [1, 1], "and one in the backward"
    assert student.grad is not None and student.grad.shape == (routed, hidden)
    if routed == 0:
        assert head.grad is None  # nothing routed: no gradient to add, but the gathers were joined
    else:
        assert head.grad is not None and head.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
def test_the_unclipped_zero3_divergence_runs_through_the_project_kernel(monkeypatch, kind):
    """Under ZeRO-3 the teacher head reaches the kernel gathered into a plain tensor. TRL's kernel (taken on CUDA for
    the unclipped divergence and the token clip) reads `.ds_status` on every head it is given and crashes on it; the
    project's kernel gathers only partitioned parameters. Reproduced on CPU with ZeRO-3 reported as enabled and the
    device reported as CUDA: the divergence must take the project's kernel and equal the dense reference."""
    import transformers.integrations.deepspeed as hf_deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from trace_trl import losses
    from trace_trl.losses import token_divergence

    torch.manual_seed(0)
    vocab, hidden, n = 37, 8, 5
    head = torch.nn.Parameter(torch.randn(vocab, hidden))
    head.ds_tensor, head.ds_status = head.data, ZeroParamStatus.AVAILABLE  # a gathered ZeRO-3 parameter
    teacher_head = torch.randn(vocab, hidden)  # `full_tensor` of the teacher's head: a plain tensor
    student, teacher = torch.randn(n, hidden, requires_grad=True), torch.randn(n, hidden)

    monkeypatch.setattr(hf_deepspeed, "is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(AttributeError, match="ds_status"):  # what TRL's kernel does with the teacher's head
        losses._trl_full_vocab(student, teacher, (head, None), (teacher_head, None), kind, 1.0, 1.0, None)

    real = losses._trl_kernel_applies
    monkeypatch.setattr(losses, "_trl_kernel_applies", lambda device_type: real("cuda"))
    trl_calls = []
    monkeypatch.setattr(losses, "_trl_full_vocab", lambda *a: trl_calls.append(a))
    for clip in (None, 0.05):
        divergence = routed_divergence(
            student, teacher, (head, None), (teacher_head, None), kind, term_clip=clip, clip_mode="token"
        )
        reference = token_divergence(student @ head.T, teacher @ teacher_head.T, kind, term_clip=clip)
        torch.testing.assert_close(divergence, reference.float(), rtol=1e-5, atol=1e-6)
        (grad,) = torch.autograd.grad(divergence.sum(), student)
        (want,) = torch.autograd.grad(reference.sum(), student)
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6)
    assert trl_calls == [], "under ZeRO-3 the divergence must not take TRL's kernel"
    # Without ZeRO-3, on CUDA, TRL's kernel is the one taken.
    monkeypatch.setattr(hf_deepspeed, "is_deepspeed_zero3_enabled", lambda: False)
    assert real("cuda") and not real("cpu")


def test_the_zero3_teacher_engine_has_the_policys_zero_settings():
    """TRL's `prepare_deepspeed` sets its inference settings as dotted top-level keys, which DeepSpeed's config never
    reads: an engine built with them silently keeps the run's persistence threshold and prefetch. The teacher's
    engine takes the run's ZeRO-3 settings on purpose (the same gathers as the policy's forward, its persistent
    parameters refreshed after every write), without the training-only blocks."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from trace_trl.sharding import zero3_inference_config

    zero = {"stage": 3, "stage3_param_persistence_threshold": 640, "stage3_prefetch_bucket_size": 0}
    run = {
        "train_batch_size": 2,
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}},
        "scheduler": {"type": "WarmupLR"},
        "zero_optimization": {**zero, "offload_optimizer": {"device": "cpu"}},
    }
    dotted = {**run, "zero_optimization.stage3_param_persistence_threshold": 0}
    assert DeepSpeedConfig(dotted).zero_config.param_persistence_threshold == 640, "DeepSpeed reads dotted keys now"
    config = zero3_inference_config(run)
    assert "optimizer" not in config and "scheduler" not in config
    assert config["zero_optimization"] == zero
    assert run["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}, "the run's config must not change"
    parsed = DeepSpeedConfig(config).zero_config
    assert parsed.param_persistence_threshold == 640 and parsed.prefetch_bucket_size == 0
