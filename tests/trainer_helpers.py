"""Builders shared by the trainer tests: datasets, rewards, scripted annotators, configs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from datasets import Dataset

from trace_trl import TRACEConfig, TRACETrainer
from trace_trl.annotators import Annotation, AnnotationRequest
from trace_trl.spans import Span


def math_dataset(n: int = 8, conversational: bool = True, solution: str | None = "{a} + {b} = {c}") -> Dataset:
    rows = []
    for i in range(n):
        a, b = i + 2, 3 * i + 1
        question = f"What is {a} + {b}?"
        row = {"prompt": [{"role": "user", "content": question}] if conversational else question, "answer": str(a + b)}
        if solution is not None:
            row["solution"] = solution.format(a=a, b=b, c=a + b)
        rows.append(row)
    return Dataset.from_list(rows)


def completion_text(completion) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion


def parity_reward(completions, **kwargs) -> list[float]:
    """Varies across rollouts of a random model (so advantages are non-zero), half correct on average."""
    return [float(len(completion_text(c)) % 2) for c in completions]


def constant_reward(completions, **kwargs) -> list[float]:
    """Every rollout equally good: all GRPO advantages are zero."""
    return [1.0 for _ in completions]


class HalfSpanAnnotator:
    """Marks the first half of each completion: a key span if correct, an error span otherwise."""

    def __init__(self) -> None:
        self.calls: list[list[AnnotationRequest]] = []

    def __call__(self, requests: Sequence[AnnotationRequest]) -> list[Annotation]:
        self.calls.append(list(requests))
        out = []
        for r in requests:
            half = len(r.completion) // 2
            out.append(Annotation(spans=(Span(0, half, "key" if r.is_correct else "error"),) if half else ()))
        return out


def no_spans_annotator(requests):
    return [Annotation() for _ in requests]


# Training arguments GRPO and TRACE share in the tests: CPU, fp32, tiny batches, a learning rate that visibly moves
# a tiny model, no checkpoints, no reporting.
TRAINING_ARGS = dict(
    use_cpu=True,
    bf16=False,
    per_device_train_batch_size=4,
    num_generations=4,
    gradient_accumulation_steps=1,
    max_completion_length=10,
    max_steps=2,
    learning_rate=1e-2,
    logging_steps=1,
    report_to="none",
    save_strategy="no",
    seed=0,
    gradient_checkpointing=False,
)


def trace_config(tmp_path, **overrides) -> TRACEConfig:
    defaults = dict(output_dir=str(tmp_path / "out"), **TRAINING_ARGS, kl_warmup_steps=100, kl_decay_steps=0)
    return TRACEConfig(**{**defaults, **overrides})


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def make_trainer(model_dir, tokenizer, args, annotator=None, *, dataset=None, peft=False, reward=None) -> TRACETrainer:
    """A TRACETrainer on the math dataset, half-span annotations and the parity reward unless told otherwise."""
    return TRACETrainer(
        model=model_dir,
        reward_funcs=reward or parity_reward,
        args=args,
        train_dataset=dataset if dataset is not None else math_dataset(),
        processing_class=tokenizer,
        annotator=annotator if annotator is not None else HalfSpanAnnotator(),
        peft_config=lora_config() if peft else None,
    )
