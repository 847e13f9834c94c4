"""Builders for the real-vLLM tier (`pytest -m vllm`): a tiny Qwen3 vLLM's CPU build accepts, warm-started to answer
the segment protocol, and the comparison of vLLM's weights with the policy's.

vLLM's CPU attention needs a head size of at least 32 (head size 16 is refused), so the model is the suite's tiny
Qwen3 at hidden size 128 (4 heads of 32).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable

import torch

from trace_trl.annotators import AnnotationRequest
from trace_trl.annotators.protocol import protocol_request
from trace_trl.annotators.segments import DEFAULT_MAX_SEGMENT_CHARS


VLLM_HIDDEN_SIZE = 128  # head size 32: the smallest vLLM's CPU attention accepts


def segment_answer(is_correct: bool) -> str:
    """The compact answer the warm-started model learns: segment 1, of the rollout's kind, no type label."""
    return json.dumps(
        {"segments": [{"id": 1, "kind": "key" if is_correct else "error"}], "type": None}, separators=(",", ":")
    )


def _training_requests(n: int, seed: int) -> list[AnnotationRequest]:
    rng = random.Random(seed)
    requests = []
    for i in range(n):
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        correct = i % 2 == 0
        result = a + b if correct else a + b + 1
        completion = f"We need {a} + {b}.\n{a} + {b} = {result}.\nThe answer is \\boxed{{{result}}}."
        prompt = [{"role": "user", "content": f"What is {a} + {b}?"}]
        requests.append(AnnotationRequest(prompt, completion, correct, float(correct), privileged_context=str(a + b)))
    return requests


def warm_start_annotator(model, tokenizer, *, steps: int = 60, lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Teach `model` (in place) to answer segment-protocol prompts with `segment_answer`: a few seconds of supervised
    training on the answer tokens of real annotation prompts. Returns the losses (first and last tell it learnt)."""
    examples = []
    for request in _training_requests(8, seed):
        built = protocol_request(
            request,
            "segments",
            template=None,
            system_prompt=None,
            max_key_spans=3,
            max_segment_chars=DEFAULT_MAX_SEGMENT_CHARS,
        )
        prompt = tokenizer.apply_chat_template(built.messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(segment_answer(request.is_correct), add_special_tokens=False)["input_ids"]
        ids = prompt_ids + answer_ids + [tokenizer.eos_token_id]
        labels = [-100] * len(prompt_ids) + answer_ids + [tokenizer.eos_token_id]
        examples.append((torch.tensor([ids]), torch.tensor([labels])))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        ids, labels = examples[step % len(examples)]
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def vllm_parameters(llm) -> dict[str, torch.Tensor]:
    """The colocated engine's parameters by vLLM name (TRL's colocate mode runs the model in this process)."""
    model = llm.llm_engine.model_executor.driver_worker.model_runner.model
    return dict(model.named_parameters())


# vLLM fuses some projections; each fused tensor is its parts concatenated along the output dimension.
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def expected_vllm_tensor(name: str, policy: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """What vLLM's parameter `name` must hold given the policy's weights (Hugging Face names), or None if the policy
    has no counterpart."""
    for fused, parts in _FUSED.items():
        if f".{fused}." in name:
            pieces = [policy.get(name.replace(fused, part)) for part in parts]
            return None if any(p is None for p in pieces) else torch.cat(pieces, dim=0)
    return policy.get(name)


def max_weight_difference(llm, policy: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between vLLM's weights and the policy's (vocabulary padding rows ignored).

    Raises if vLLM holds an empty (repacked and dropped) linear weight: it can then neither receive nor use a sync.
    """
    worst = 0.0
    compared = 0
    for name, value in vllm_parameters(llm).items():
        expected = expected_vllm_tensor(name, policy)
        if expected is None:
            continue
        if value.numel() == 0:
            raise AssertionError(f"vLLM dropped {name} (repacked for its CPU kernels): weight syncs cannot reach it")
        rows = expected.shape[0]
        worst = max(worst, float((value[:rows].detach().float() - expected.detach().float()).abs().max()))
        compared += 1
    assert compared > 0, "no vLLM parameter matched a policy parameter"
    return worst


def logged(history: Iterable[dict], key: str) -> list[float]:
    """Every value of `key` in the trainer's log history (NaN where nothing was measured, logged as None)."""
    return [float("nan") if entry[key] is None else float(entry[key]) for entry in history if key in entry]
