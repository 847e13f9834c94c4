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
