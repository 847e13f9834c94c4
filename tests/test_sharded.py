"""TRACE under sharded engines, proven on two CPU processes (gloo).

FSDP2 full fine-tuning with the KL channel (FKL and RKL) and the synced teacher sharded like the policy: the loss
and every parameter's gradient equal one process's on the concatenated global batch, with one process routing
nothing (so it must still join every collective); and a run stopped at a checkpoint between two teacher syncs and
resumed ends where the uninterrupted run ends. See `sharded_worker.py` for how FSDP2 is enabled on CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import types

import pytest
import torch
from multiprocess_helpers import HERE, assert_matches_one_process, global_batch, launch_two_processes

from trace_trl.sharding import load_full_state_dict


sys.path.insert(0, HERE)


def _reference_trainer(model_dir: str, out_dir: str, peft: bool, dump: dict, teacher_kind: str = "synced"):
    """One process (no FSDP) with rank 0's final weights and the sharded run's teacher weights."""
    import sharded_worker as worker
    from multiprocess_worker import RankZeroAnnotator

    trainer = worker.build(model_dir, out_dir, peft, annotator=RankZeroAnnotator(), teacher_kind=teacher_kind)
    trainer.annotator.rank = 0
    assert trainer.accelerator.num_processes == 1 and trainer.sharding_engine is None
    model = trainer.accelerator.unwrap_model(trainer.model)
    load_full_state_dict(model, dump["weights"])
    trainer.teacher.load_state_dict(model, dump["teacher"])
    trainer.teacher.begin(model, 2)
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    trainer.state.global_step = 2
    return trainer, model


def _deepspeed_runs_here() -> str | None:
    """Why DeepSpeed ZeRO-3 cannot run on this machine's CPU, or None. On CPU DeepSpeed compiles its shared-memory
    communication op with g++ on first use (about 45 s, cached in ~/.cache/torch_extensions)."""
    try:
        import deepspeed  # noqa: F401
    except Exception as error:  # not installed, or broken against this torch
        return f"deepspeed is not importable ({type(error).__name__}: {error}); pip install deepspeed"
    if shutil.which("g++") is None and shutil.which("c++") is None:
        return "DeepSpeed's CPU communication op needs a C++ compiler (g++)"
    return None


_NO_DEEPSPEED = _deepspeed_runs_here()
ENGINES = [
    pytest.param("fsdp2", id="fsdp2"),
    pytest.param("zero3", id="zero3", marks=pytest.mark.skipif(_NO_DEEPSPEED is not None, reason=str(_NO_DEEPSPEED))),
]


@pytest.mark.sharded
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("peft", "tied"), [(False, False), (False, True), (True, True)], ids=["full-untied", "full-tied", "lora"]
)
def test_sharded_engine_matches_one_process_with_uneven_routing(
    tiny_model_dir, untied_tiny_model_dir, tmp_path, engine, peft, tied
):
    """Untied embeddings give the LM head its own parameter (Qwen3-8B); tied ones share it with the input embeddings,
    which FSDP2 then shards as one unit with the final norm (the teacher copy must mirror that grouping)."""
    model_dir = tiny_model_dir if tied else untied_tiny_model_dir
    dumps = _run_parity(model_dir, tmp_path, engine, peft)
    batches = [d["batch"] for d in dumps]
    assert (batches[0]["trace_route"] > 0).any(), "rank 0 should route tokens"
    assert not (batches[1]["trace_route"] > 0).any(), "rank 1 should route nothing"
    routes = batches[0]["trace_route"]
    assert (routes == 3).any() and (routes == 4).any(), "both FKL (key spans) and RKL (error spans) should be routed"
    assert dumps[0]["logs"] and dumps[0]["logs"] == dumps[1]["logs"], "TRACE metrics must be global (equal on ranks)"
    for name, value in dumps[0]["weights"].items():
        assert torch.equal(value, dumps[1]["weights"][name]), f"gathered weights differ across ranks: {name}"

    _check_synced_teacher(dumps, model_dir, peft)
    _check_against_one_process(dumps, model_dir, tmp_path, peft)


def _run_parity(model_dir, tmp_path, engine: str, peft: bool, teacher_kind: str = "synced", **overrides) -> list[dict]:
    out_dir = str(tmp_path / engine)
    args = [model_dir, out_dir, "parity", "1" if peft else "0", teacher_kind]
    env = {"TRACE_TEST_ENGINE": engine, "TRACE_TEST_OVERRIDES": json.dumps(overrides)}
    launch_two_processes("sharded_worker.py", args, out_dir, env=env, timeout=600)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(2)]


def _check_synced_teacher(dumps: list[dict], model_dir: str, peft: bool) -> None:
    # The synced teacher is the snapshot of step 0 (sync every 10 steps): the initial weights (full fine-tuning) or
    # the initial adapter (LoRA), not the trained policy; each process holds only its shards of a full copy.
    teacher = dumps[0]["teacher"]
    assert teacher and all(torch.equal(teacher[n], dumps[1]["teacher"][n]) for n in teacher)
    trained_name = (lambda n: n.replace(".trace_synced_teacher.", ".default.")) if peft else (lambda n: n)
    assert any(
        not torch.equal(v, dumps[0]["weights"][trained_name(n)]) for n, v in teacher.items() if "inv_freq" not in n
    )
    if not peft:
        from transformers import AutoModelForCausalLM

        initial = dict(AutoModelForCausalLM.from_pretrained(model_dir).named_parameters())
        assert teacher.keys() >= initial.keys()
        for name, value in initial.items():
            assert torch.equal(teacher[name], value.detach()), f"teacher {name} is not the step-0 snapshot"
        full_bytes = sum(v.numel() * v.element_size() for v in initial.values())
        for d in dumps:
            assert 0 < d["teacher_bytes"] <= 0.6 * full_bytes, "the teacher must be sharded, not a replicated copy"


def _check_against_one_process(dumps, model_dir, tmp_path, peft: bool, teacher_kind: str = "synced") -> None:
    batches = [d["batch"] for d in dumps]
    trainer, model = _reference_trainer(model_dir, str(tmp_path / "single"), peft, dumps[0], teacher_kind)
    inputs = global_batch(batches, trainer.processing_class.pad_token_id)
    from multiprocess_worker import CASES

    assert_matches_one_process(trainer, model, inputs, dumps, CASES)


@pytest.mark.sharded
@pytest.mark.parametrize("engine", ENGINES)
def test_sharded_engine_resumes_exactly_between_two_teacher_syncs(untied_tiny_model_dir, tmp_path, engine):
    """4 steps in one go vs. stopped at checkpoint-2 (the synced teacher syncs at steps 0 and 3, so the checkpoint
    holds the teacher's gathered snapshot of step 0) and resumed: bit-identical weights and teacher, with ZeRO-3's
    non-zero persistence threshold, and the teacher's forward running exactly its saved weights at the end."""
    env = {"TRACE_TEST_ENGINE": engine}
    finals = []
    for mode in ("train", "resume"):
        out_dir = str(tmp_path / mode)
        launch_two_processes("sharded_worker.py", [untied_tiny_model_dir, out_dir, mode, "0"], out_dir, 600, env)
        finals.append(torch.load(os.path.join(out_dir, "final.pt"), weights_only=False))
    checkpoint = tmp_path / "run" / "out" / "checkpoint-2"
    assert (checkpoint / "trace_teacher_state.pt").exists(), "a checkpoint between two syncs must hold the teacher"
    uninterrupted, resumed = finals
    assert uninterrupted["step"] == resumed["step"] == 4
    # The final folder holds full weights equal to the trained ones (not engine shards), as `trace-trl train` saves.
    from transformers import AutoModelForCausalLM

    saved = dict(AutoModelForCausalLM.from_pretrained(str(tmp_path / "train" / "final-model")).named_parameters())
    for name, value in saved.items():
        assert torch.equal(value.detach(), uninterrupted["weights"][name]), f"saved final weights differ: {name}"
    for name, value in uninterrupted["weights"].items():
        assert torch.equal(value, resumed["weights"][name]), f"resumed weights differ: {name}"
    # At step 4 the teacher is the snapshot of step 3, which differs from the policy: it is saved and compared too.
    assert uninterrupted["teacher"] and uninterrupted["teacher"].keys() == resumed["teacher"].keys()
    for name, value in uninterrupted["teacher"].items():
        assert torch.equal(value, resumed["teacher"][name]), f"resumed teacher differs: {name}"
    # And the teacher runs those weights (ZeRO-3 keeps the norms gathered: each sync and load must refresh them).
    for final in finals:
        assert final["teacher_probe_diff"] is not None and final["teacher_probe_diff"] < 1e-5, final[
            "teacher_probe_diff"
        ]


def _fake_trainer(fsdp_version: int | None = None, zero_stage: int | None = None):
    fsdp = types.SimpleNamespace(fsdp_version=fsdp_version, cpu_offload=None) if fsdp_version else None
    deepspeed = types.SimpleNamespace(zero_stage=zero_stage) if zero_stage else None
    state = types.SimpleNamespace(fsdp_plugin=fsdp, deepspeed_plugin=deepspeed)
    return types.SimpleNamespace(accelerator=types.SimpleNamespace(state=state))


def test_sharded_engines_are_accepted_and_what_cannot_run_is_refused_with_advice():
    from trace_trl.config import _check_sharded_training

    args = types.SimpleNamespace(kl_coef=0.5, kl_topk=None)
    assert _check_sharded_training(_fake_trainer(fsdp_version=2), args) == "fsdp2"
    assert _check_sharded_training(_fake_trainer(zero_stage=3), args) == "zero3"
    assert _check_sharded_training(_fake_trainer(zero_stage=2), args) is None  # ZeRO-1/2 replicate the weights
    assert _check_sharded_training(_fake_trainer(), args) is None
    with pytest.raises(NotImplementedError, match=r"needs FSDP2: set `fsdp_version: 2`"):
        _check_sharded_training(_fake_trainer(fsdp_version=1), args)
    # The top-k ablation reads the head outside ZeRO-3's gather; FSDP2 gathers it inside the forward.
    topk = types.SimpleNamespace(kl_coef=0.5, kl_topk=16)
    with pytest.raises(NotImplementedError, match=r"`kl_topk`.*ZeRO-3.*`kl_topk=None`"):
        _check_sharded_training(_fake_trainer(zero_stage=3), topk)
    assert _check_sharded_training(_fake_trainer(fsdp_version=2), topk) == "fsdp2"
    # Plain GRPO (no KL channel) runs under any engine.
    grpo = types.SimpleNamespace(kl_coef=0.0, kl_topk=16)
    assert _check_sharded_training(_fake_trainer(fsdp_version=1), grpo) is None


@pytest.mark.sharded
@pytest.mark.parametrize("teacher_kind", ["ema", "base", "live"])
def test_fsdp2_other_teacher_kinds_match_one_process(untied_tiny_model_dir, tmp_path, teacher_kind):
    """The EMA teacher (updated shard by shard), the base teacher (a sharded snapshot of the initial weights) and
    the live teacher (the policy, through its own FSDP2 root) under FSDP2 full fine-tuning."""
    dumps = _run_parity(untied_tiny_model_dir, tmp_path, "fsdp2", False, teacher_kind)
    assert not (dumps[1]["batch"]["trace_route"] > 0).any()
    if teacher_kind != "live":
        from transformers import AutoModelForCausalLM

        teacher, policy = dumps[0]["teacher"], dumps[0]["weights"]
        initial = dict(AutoModelForCausalLM.from_pretrained(untied_tiny_model_dir).named_parameters())
        assert teacher.keys() >= initial.keys(), "a sharded ema/base copy is saved as gathered full weights"
        for name, value in initial.items():
            if teacher_kind == "base":
                assert torch.equal(teacher[name], value.detach()), f"base teacher {name} is not the initial weights"
            elif not torch.equal(value.detach(), policy[name]):
                # r = 0.05 over two steps: strictly between the initial weights and the policy, shard by shard.
                moved = (teacher[name] - value.detach()).abs().sum()
                lag = (policy[name] - teacher[name]).abs().sum()
                assert 0 < moved < lag, f"EMA teacher {name} did not follow the policy with rate 0.05"
    _check_against_one_process(dumps, untied_tiny_model_dir, tmp_path, False, teacher_kind)


@pytest.mark.sharded
def test_fsdp2_with_gradient_checkpointing_matches_one_process(untied_tiny_model_dir, tmp_path, monkeypatch):
    """The recipes' setting: the decoder layers are recomputed in the backward; the KL hook runs once, in the forward."""
    dumps = _run_parity(untied_tiny_model_dir, tmp_path, "fsdp2", False, gradient_checkpointing=True)
    monkeypatch.setenv("TRACE_TEST_OVERRIDES", json.dumps({"gradient_checkpointing": True}))
    _check_against_one_process(dumps, untied_tiny_model_dir, tmp_path, False)


TEACHER_CASES = [
    pytest.param("synced", False, False, id="synced-full-untied"),
    pytest.param("synced", False, True, id="synced-full-tied"),
    pytest.param("synced", True, True, id="synced-lora"),
    pytest.param("ema", False, False, id="ema-full-untied"),
    pytest.param("ema", True, True, id="ema-lora"),
]


@pytest.mark.sharded
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("teacher_kind", "peft", "tied"), TEACHER_CASES)
def test_sharded_teacher_forward_is_the_policy_after_every_update_and_freed_after_the_kl_phase(
    tiny_model_dir, untied_tiny_model_dir, tmp_path, engine, teacher_kind, peft, tied
):
    """With TRL's persistence threshold (ZeRO-3 keeps the norms and LoRA matrices gathered after their first forward)
    the teacher's forward must equal a dense model built from the policy's current weights (synced after every step)
    or their EMA, at train begin and after every update of the KL phase; nothing of the teacher copy (engine, modules,
    parameters, shards) may outlive the KL phase, and `trace/teacher_memory_bytes` counts what the teacher holds
    (shards plus ZeRO-3's gathered persistent parameters), 0 once it is released."""
    model_dir = tiny_model_dir if tied else untied_tiny_model_dir
    out_dir = str(tmp_path / engine)
    args = [model_dir, out_dir, "teacher", "1" if peft else "0", teacher_kind]
    launch_two_processes("sharded_worker.py", args, out_dir, 600, {"TRACE_TEST_ENGINE": engine})
    for rank in range(2):
        dump = torch.load(os.path.join(out_dir, f"teacher{rank}.pt"), weights_only=False)
        checks = dump["checks"]
        assert [c["step"] for c in checks] == [0, 1], checks
        for c in checks:
            assert c["max_abs_diff"] < 1e-5, f"rank {rank}: the teacher's forward is not the expected model: {checks}"
        assert dump["released"] and dump["bytes_after"] == 0
        logged = dump["logged_bytes"]
        assert logged[0] == dump["held"][1] > 0, f"logged {logged} vs held {dump['held']}"
        assert all(b == 0 for b in logged[1:]), logged
        if not peft:  # a LoRA teacher adapter stays in the engine's units (never used again), a copy must go
            assert dump["refs"] > 0 and dump["alive"] == 0, f"{dump['alive']} of the teacher copy's objects are alive"
