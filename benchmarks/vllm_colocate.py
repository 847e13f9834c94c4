# Copyright 2026 The trace-trl authors. Licensed under the Apache License, Version 2.0.
"""vLLM colocate vs `transformers` generate on CPU: generation throughput, and a whole TRACE run's wall time.

Needs vLLM's CPU build in its own environment (install lines in docs/scaling.md). One process, one tiny Qwen3
(random weights, head size 32: the smallest vLLM's CPU attention accepts), the same seed, prompts and step budget
for both backends; ratios are vLLM over `transformers`, measured in the same run:

1. generation: `--prompts` prompts, `--new-tokens` sampled tokens each (no early stop, temperature 1), all prompts in
   one batch; Hugging Face `model.generate` vs `vllm.LLM.generate` with `trace_trl.vllm_cpu.use_live_weights()`
   applied (what TRACETrainer runs). Median of `--repeats` after one warm-up; tokens per second.
2. training: `TRACETrainer.train()` for `--steps` optimizer steps (TRACE-RKL on random spans: the random model's
   rollouts are all incorrect; synced teacher, fp32),
   `use_vllm=False` vs `use_vllm=True, vllm_mode="colocate"`; the engine's start-up is reported apart (it is paid
   once per run, about 20 s once vLLM's compile cache is warm, about 2 minutes the first time).

The machine is shared: run it when nothing else is busy and read the ratio, not the absolute numbers.

Usage (in the vLLM environment):

```bash
OMP_NUM_THREADS=2 PYTHONPATH=. python benchmarks/vllm_colocate.py --json vllm_colocate.json
```
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-size", type=int, default=128, help="head size is hidden/4; vLLM needs >= 32")
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=32, help="generation benchmark: prompts per batch")
    parser.add_argument("--new-tokens", type=int, default=64, help="generation benchmark: tokens per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="training benchmark: optimizer steps per backend")
    parser.add_argument("--batch-size", type=int, default=8, help="training: rollouts per step")
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=64)
    parser.add_argument("--vllm-dtype", default="float32", help="engine dtype ('auto' is bf16 on CPU)")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    return parser.parse_args(argv)


def build_model(args: argparse.Namespace, folder: str) -> str:
    from trace_trl.scripts.demo import make_problems
    from trace_trl.tiny import build_tiny_qwen3, build_tiny_tokenizer, save_tiny_model

    corpus = [f"{p.question} {p.solution}" for p in make_problems(400, seed=args.seed)]
    tokenizer = build_tiny_tokenizer(corpus + ["<|im_start|>user\n<|im_start|>assistant\n"], vocab_size=400)
    model = build_tiny_qwen3(tokenizer, hidden_size=args.hidden_size, num_layers=args.num_layers, seed=args.seed)
    return save_tiny_model(model, tokenizer, folder)


def prompt_ids(tokenizer, n: int, seed: int) -> list[list[int]]:
    from trace_trl.scripts.demo import chat, make_problems

    return [
        tokenizer.apply_chat_template(chat(p.question), add_generation_prompt=True, tokenize=True, return_dict=False)
        for p in make_problems(n, seed=seed)
    ]


def time_hf_generation(model_dir: str, args: argparse.Namespace) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = prompt_ids(tokenizer, args.prompts, args.seed)
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    attention_mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()

    def run() -> float:
        torch.manual_seed(args.seed)
        started = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                pad_token_id=tokenizer.pad_token_id,
            )
        elapsed = time.perf_counter() - started
        assert out.shape[1] - width == args.new_tokens
        return elapsed

    run()
    seconds = statistics.median(run() for _ in range(args.repeats))
    return {"seconds": seconds, "tokens_per_s": args.prompts * args.new_tokens / seconds}


def time_vllm_generation(llm, tokenizer, args: argparse.Namespace) -> dict[str, float]:
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": p} for p in prompt_ids(tokenizer, args.prompts, args.seed)]
    params = SamplingParams(
        temperature=1.0, max_tokens=args.new_tokens, min_tokens=args.new_tokens, ignore_eos=True, seed=args.seed
    )

    def run() -> float:
        started = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - started
        assert all(len(o.outputs[0].token_ids) == args.new_tokens for o in outputs)
        return elapsed

    run()
    seconds = statistics.median(run() for _ in range(args.repeats))
    return {"seconds": seconds, "tokens_per_s": args.prompts * args.new_tokens / seconds}


def time_training(model_dir: str, args: argparse.Namespace, use_vllm: bool, output_dir: str) -> dict[str, float]:
    import trl.generation.vllm_generation as vllm_generation
    from datasets import Dataset

    from trace_trl import TRACEConfig, TRACETrainer
    from trace_trl.annotators import RandomSpanAnnotator
    from trace_trl.rewards import accuracy_reward
    from trace_trl.scripts.demo import chat, make_problems

    problems = make_problems(args.steps * args.batch_size // args.num_generations + 8, seed=args.seed)
    dataset = Dataset.from_list(
        [{"prompt": chat(p.question), "answer": p.answer, "solution": p.solution} for p in problems]
    )
    vllm_fields = {}
    if use_vllm:
        vllm_fields = dict(
            use_vllm=True,
            vllm_mode="colocate",
            vllm_gpu_memory_utilization=0.1,
            vllm_max_model_length=1024,
        )
        # TRL builds the engine with vLLM's default dtype (bf16 on CPU); the benchmark pins it like the policy's.
        original = vllm_generation.LLM
        vllm_generation.LLM = lambda **kw: original(**{**kw, "dtype": args.vllm_dtype})
    config = TRACEConfig(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        seed=args.seed,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        learning_rate=1e-4,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        teacher_kind="synced",
        # TRACE-RKL: a random model's rollouts are all incorrect, so the KL channel runs on their error spans.
        key_span_action="grpo",
        error_span_action="rkl",
        kl_warmup_steps=args.steps,
        **vllm_fields,
    )
    started = time.perf_counter()
    trainer = TRACETrainer(
        model=model_dir,
        reward_funcs=accuracy_reward,
        args=config,
        train_dataset=dataset,
        annotator=RandomSpanAnnotator(seed=args.seed),
    )
    init_s = time.perf_counter() - started
    started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - started
    history = trainer.state.log_history
    logp = [
        e["sampling/sampling_logp_difference/max"] for e in history if "sampling/sampling_logp_difference/max" in e
    ]
    lengths = [e["completions/mean_length"] for e in history if "completions/mean_length" in e]
    routed = [e["trace/routed_token_frac"] for e in history if e.get("trace/routed_token_frac") is not None]
    if use_vllm:
        vllm_generation.LLM = original
    return {
        "init_s": init_s,
        "train_s": train_s,
        "s_per_step": train_s / args.steps,
        "mean_completion_length": statistics.mean(lengths) if lengths else float("nan"),
        "sampling_logp_difference_max": max(logp) if logp else None,
        "routed_token_frac": statistics.mean(routed) if routed else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    import vllm
    from transformers import AutoTokenizer
    from vllm import LLM

    from trace_trl.vllm_cpu import use_live_weights

    torch.manual_seed(args.seed)
    results: dict = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "vllm": vllm.__version__,
            "torch": torch.__version__,
        },
        "args": vars(args),
    }
    with tempfile.TemporaryDirectory() as folder:
        model_dir = build_model(args, os.path.join(folder, "model"))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        hf = time_hf_generation(model_dir, args)
        print(f"generation, transformers: {hf['tokens_per_s']:.0f} tokens/s ({hf['seconds']:.2f} s)", flush=True)
        use_live_weights()
        started = time.perf_counter()
        llm = LLM(
            model=model_dir,
            dtype=args.vllm_dtype,
            gpu_memory_utilization=0.1,
            max_model_len=1024,
            seed=args.seed,
            max_num_batched_tokens=4096,
        )
        engine_s = time.perf_counter() - started
        fast = time_vllm_generation(llm, tokenizer, args)
        print(f"generation, vLLM:         {fast['tokens_per_s']:.0f} tokens/s ({fast['seconds']:.2f} s)", flush=True)
        llm.llm_engine.engine_core.shutdown() if hasattr(llm.llm_engine, "engine_core") else None
        del llm
        results["generation"] = {
            "transformers": hf,
            "vllm": {**fast, "engine_start_s": engine_s},
            "ratio_tokens_per_s": fast["tokens_per_s"] / hf["tokens_per_s"],
        }
        print(
            f"generation ratio (vLLM / transformers tokens per s): {results['generation']['ratio_tokens_per_s']:.2f}"
        )
        if not args.skip_training:
            plain = time_training(model_dir, args, False, os.path.join(folder, "hf"))
            print(f"training, transformers: {plain}", flush=True)
            colocated = time_training(model_dir, args, True, os.path.join(folder, "vllm"))
            print(f"training, vLLM colocate: {colocated}", flush=True)
            results["training"] = {
                "transformers": plain,
                "vllm": colocated,
                "ratio_train_s": colocated["train_s"] / plain["train_s"],
                "ratio_with_startup": (colocated["train_s"] + colocated["init_s"])
                / (plain["train_s"] + plain["init_s"]),
            }
            print(
                f"training ratio (vLLM / transformers wall time): {results['training']['ratio_train_s']:.2f} "
                f"({results['training']['ratio_with_startup']:.2f} with start-up)"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
