"""`trace-trl demo`: a complete TRACE run on CPU in a couple of minutes, with nothing to download.

What happens, top to bottom:

1. synthetic math-like problems ("What is 7 + 5?") with a reference solution as privileged context;
2. a byte-level BPE tokenizer and a tiny Qwen3 built on the spot, warm-started with a few seconds of supervised
   training so that it answers in `\\boxed{}` and is right some of the time (a random model is never right, and then
   neither GRPO nor TRACE has anything to learn from);
3. TRACE: GRPO with the exact-match reward `boxed_match_reward`, a `RegexAnnotator` marking the equation and the boxed
   answer (key spans of correct rollouts, error spans of incorrect ones), the policy as its own teacher under the
   reference solution, and the KL weight held for a warm-up then annealed to zero;
4. a report: rewards, routed-token fractions, FKL/RKL and KL weight per step, and greedy accuracy before and after.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass


# The demo never touches the network.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str
    solution: str


def make_problems(n: int, seed: int) -> list[Problem]:
    """One-digit additions and subtractions with a worked reference solution: small enough for a tiny model."""
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        if rng.random() < 0.5:
            problems.append(Problem(f"What is {a} + {b}?", str(a + b), f"{a} + {b} = {a + b}. \\boxed{{{a + b}}}"))
        else:
            a, b = max(a, b), min(a, b)
            problems.append(Problem(f"What is {a} - {b}?", str(a - b), f"{a} - {b} = {a - b}. \\boxed{{{a - b}}}"))
    return problems


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def build_policy(problems: Sequence[Problem], output_dir: str, sft_steps: int, seed: int):
    """Tokenizer and tiny Qwen3, warm-started on the reference solutions, saved to `output_dir/base-model`.

    The warm start sees each problem twice: as the student will (the question alone) and as the teacher will (the
    question with the reference solution, rendered by TRACE's teacher template). A large pretrained model reads a
    reference solution out of the box; a tiny one has to be shown that it can, or its "privileged" predictions are
    noise and the KL channel would teach noise.
    """
    import jinja2

    from trace_trl.config import DEFAULT_TEACHER_CONTEXT_TEMPLATE
    from trace_trl.tiny import build_tiny_qwen3, build_tiny_tokenizer, save_tiny_model

    teacher_template = jinja2.Environment().from_string(DEFAULT_TEACHER_CONTEXT_TEMPLATE)
    student_prompts = [chat(p.question) for p in problems]
    teacher_prompts = [
        chat(teacher_template.render(problem=p.question, privileged_context=p.solution, diagnosis=None))
        for p in problems
    ]
    corpus = [m[0]["content"] + " " + p.solution for m, p in zip(teacher_prompts, problems, strict=True)]
    tokenizer = build_tiny_tokenizer(corpus + ["<|im_start|>user\n<|im_start|>assistant\n"], vocab_size=400)
    model = build_tiny_qwen3(tokenizer, hidden_size=96, num_layers=2, seed=seed)
    texts, prompt_lengths = [], []
    for prompt, problem in zip(student_prompts + teacher_prompts, list(problems) * 2, strict=True):
        answer = [{"role": "assistant", "content": problem.solution}]
        texts.append(tokenizer.apply_chat_template(prompt + answer, tokenize=False))
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        prompt_lengths.append(len(prompt_ids["input_ids"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(sft_steps):
        index = torch.randint(len(texts), (32,), generator=generator).tolist()
        batch = tokenizer([texts[i] for i in index], return_tensors="pt", padding=True, padding_side="right")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        for row, i in enumerate(index):
            labels[row, : prompt_lengths[i]] = -100  # learn the answer, not the question
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    path = save_tiny_model(model, tokenizer, os.path.join(output_dir, "base-model"))
    return path, tokenizer


@torch.no_grad()
def greedy_accuracy(model, tokenizer, problems: Sequence[Problem], max_new_tokens: int) -> float:
    from trace_trl.rewards import boxed_match_reward

    model.eval()
    prompts = [
        tokenizer.apply_chat_template(chat(p.question), add_generation_prompt=True, tokenize=False) for p in problems
    ]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    completions = tokenizer.batch_decode(out[:, batch["input_ids"].size(1) :], skip_special_tokens=True)
    rewards = boxed_match_reward(completions, answer=[p.answer for p in problems])
    return sum(r or 0.0 for r in rewards) / len(problems)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="trace-trl demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="trace-demo-output", help="where the model, logs and checkpoints go")
    parser.add_argument("--steps", type=int, default=100, help="TRACE optimizer steps")
    parser.add_argument("--sft-steps", type=int, default=200, help="warm-start steps before TRACE")
    parser.add_argument("--kl-warmup-steps", type=int, default=20)
    parser.add_argument("--kl-decay-steps", type=int, default=40)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--prompts-per-step", type=int, default=4, help="problems per step (8 rollouts each)")
    parser.add_argument("--teacher-kind", default="live", choices=["live", "base", "ema"])
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    warnings.filterwarnings("ignore")
    for name in ("transformers", "trl", "accelerate", "datasets", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from datasets import Dataset
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    from trace_trl import TRACEConfig, TRACETrainer
    from trace_trl.annotators import RegexAnnotator
    from trace_trl.rewards import boxed_match_reward

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    ##### 1. Data: problems with a reference solution (the privileged context the student never sees)
    train_problems = make_problems(512, seed=args.seed)
    test_problems = make_problems(64, seed=args.seed + 1)
    dataset = Dataset.from_list(
        [{"prompt": chat(p.question), "answer": p.answer, "solution": p.solution} for p in train_problems]
    )
    print(
        f"[1/4] {len(train_problems)} synthetic problems, e.g. {train_problems[0].question!r} -> {train_problems[0].solution!r}"
    )

    ##### 2. Policy: a tiny Qwen3, warm-started so that it is sometimes right
    model_path, tokenizer = build_policy(train_problems, args.output_dir, args.sft_steps, args.seed)
    print(
        f"[2/4] tiny Qwen3 ({len(tokenizer)}-token vocabulary) warm-started for {args.sft_steps} steps -> {model_path}"
        f" ({time.perf_counter() - started:.0f} s)"
    )

    ##### 3. TRACE
    config = TRACEConfig(
        output_dir=os.path.join(args.output_dir, "trace"),
        use_cpu=True,
        bf16=False,
        seed=args.seed,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=8 * args.prompts_per_step,
        num_generations=8,
        max_completion_length=20,
        temperature=1.0,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        kl_coef=1.0,
        kl_warmup_steps=args.kl_warmup_steps,
        kl_decay_steps=args.kl_decay_steps,
        key_span_action="fkl",
        error_span_action="rkl",
        teacher_kind=args.teacher_kind,
    )
    # Where it matters in "7 + 5 = 12. \boxed{12}": the computed result and the boxed answer. In correct rollouts
    # they are key spans (forward KL to the teacher), in incorrect ones the error spans (reverse KL).
    result = r"=\s*(-?\d+)"
    annotator = RegexAnnotator(
        key_patterns=[result, RegexAnnotator.BOXED_CONTENT], error_patterns=[result, RegexAnnotator.BOXED_CONTENT]
    )
    trainer = TRACETrainer(
        model=model_path,
        reward_funcs=boxed_match_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        annotator=annotator,
    )
    before = greedy_accuracy(trainer.model, tokenizer, test_problems, config.max_completion_length)
    print(
        f"[3/4] TRACE for {args.steps} steps (KL held for {args.kl_warmup_steps}, annealed over {args.kl_decay_steps})"
    )
    print()
    print("  step  reward  correct  key tok  err tok   FKL      RKL      KL weight  entropy")
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # our own one-line-per-step table replaces the raw dicts
    trainer.add_callback(_PrintCallback())
    trace_started = time.perf_counter()
    trainer.train()
    trace_seconds = time.perf_counter() - trace_started
    after = greedy_accuracy(trainer.model, tokenizer, test_problems, config.max_completion_length)

    ##### 4. Report
    history = [r for r in trainer.state.log_history if "reward" in r]
    routed = [r for r in trainer.state.log_history if "trace/routed_token_frac" in r]
    print()
    print("[4/4] what happened")
    print(f"  greedy accuracy on {len(test_problems)} held-out problems: {before:.1%} before -> {after:.1%} after")
    if len(history) >= 20:
        first, last = history[:10], history[-10:]
        print(
            f"  mean rollout reward (sampled at temperature 1): {sum(r['reward'] for r in first) / 10:.3f} over the first"
            f" 10 steps -> {sum(r['reward'] for r in last) / 10:.3f} over the last 10"
        )
    if routed:
        mean_routed = sum(r["trace/routed_token_frac"] for r in routed) / len(routed)
        print(f"  tokens routed to the KL channel while it was on: {mean_routed:.1%} (the rest trained with GRPO)")
    print(f"  cumulative privileged exposure (KL weight x routed tokens): {trainer.privileged_exposure:.0f}")
    print(
        f"  annotation failures: {sum(r.get('trace/annotation_failures', 0) for r in trainer.state.log_history):.0f}"
    )
    print(
        f"  TRACE took {trace_seconds:.0f} s; everything {time.perf_counter() - started:.0f} s. Outputs in {args.output_dir}/"
    )
    return 0


def _fmt(value: float | None, width: int, digits: int = 3) -> str:
    if value is None or value != value:  # None or NaN
        return "-".rjust(width)
    return f"{value:.{digits}f}".rjust(width)


class _PrintCallback:
    """One line per optimizer step, from the metrics TRACE logs through TRL."""

    def __getattr__(self, name):  # TrainerCallback hooks we do not use
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:
            return
        print(
            f"  {state.global_step:4d}  {_fmt(logs.get('reward'), 6)}  {_fmt(logs.get('trace/correct_frac'), 7)}"
            f"  {_fmt(logs.get('trace/key_token_frac'), 7)}  {_fmt(logs.get('trace/error_token_frac'), 7)}"
            f"  {_fmt(logs.get('trace/fkl_mean'), 7, 4)}  {_fmt(logs.get('trace/rkl_mean'), 7, 4)}"
            f"  {_fmt(logs.get('trace/kl_weight'), 9, 2)}  {_fmt(logs.get('entropy'), 7)}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
