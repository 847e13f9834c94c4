"""`trace-trl eval`: avg@k of a model on MATH-500, AIME 2024/2025, AMC 2023 and GPQA-Diamond, with intervals.

`--paper` applies the paper's evaluation settings (`PAPER_SAMPLING`): Qwen3 thinking mode, temperature 0.6, top-p
0.95, top-k 20, 8 samples per problem (avg@8); a flag given explicitly still wins. The library behind it is
[`trace_trl.evaluation`] (benchmarks, generation, scoring, reports).

Example:
```bash
trace-trl eval --model Qwen/Qwen3-1.7B --paper --max-new-tokens 32768 \\
    --backend vllm --output-dir eval/qwen3-1.7b --compare eval/grpo/results.json
```
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from trace_trl.eval_data import BENCHMARKS, SCORERS, load_benchmarks
from trace_trl.evaluation import evaluate, write_results
from trace_trl.generation import (
    BACKENDS,
    DEFAULT_SAMPLING,
    PAPER_SAMPLING,
    Generate,
    SamplingSettings,
    VLLMGenerator,
    make_generator,
)
from trace_trl.scoring import BOOTSTRAP_CONFIDENCE, BOOTSTRAP_RESAMPLES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trace-trl eval",
        description="avg@k of a model on MATH-500, AIME 2024/2025, AMC 2023 and GPQA-Diamond.",
    )
    parser.add_argument("--model", required=True, help="Model id or local path.")
    parser.add_argument(
        "--benchmarks", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS), help="Benchmarks to run."
    )
    parser.add_argument(
        "--benchmark-file",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="Read a benchmark from a local json/jsonl/parquet/csv file in the Hub schema (repeatable).",
    )
    parser.add_argument(
        "--paper",
        action="store_true",
        help="The paper's evaluation settings: thinking mode on, temperature 0.6, top-p 0.95, top-k 20, 8 samples "
        "(avg@8). Flags given explicitly still win.",
    )
    parser.add_argument(
        "--num-samples", "-k", type=int, default=None, help="Samples per problem (k of avg@k); 1, or 8 with --paper."
    )
    parser.add_argument(
        "--temperature", type=float, default=None, help="Sampling temperature (default 0.6); 0 decodes greedily."
    )
    parser.add_argument("--top-p", type=float, default=None, help="Nucleus sampling (default 0.95).")
    parser.add_argument("--top-k", type=int, default=None, help="Top-k sampling; 0 or unset: none (20 with --paper).")
    parser.add_argument("--max-new-tokens", type=int, default=32768)
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="auto: vLLM when importable and on GPU.")
    parser.add_argument("--batch-size", type=int, default=8, help="HF backend: prompts per generate call.")
    parser.add_argument("--dtype", default="auto", help="HF backend: model dtype.")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM backend.")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vLLM backend.")
    parser.add_argument("--max-model-len", type=int, default=None, help="vLLM backend.")
    parser.add_argument(
        "--enable-thinking",
        choices=("true", "false"),
        default=None,
        help="Sets chat_template_kwargs['enable_thinking'] (Qwen3); unset keeps the template's default.",
    )
    parser.add_argument("--chat-template-kwargs", default="{}", help="JSON object passed to the chat template.")
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--scorer", choices=SCORERS, default="math_verify", help="Grader of the math benchmarks.")
    parser.add_argument("--limit", type=int, default=None, help="Only the first N problems of each benchmark.")
    parser.add_argument("--seed", type=int, default=0, help="Sampling, GPQA option-shuffle and bootstrap seed.")
    parser.add_argument(
        "--bootstrap-resamples",
        type=int,
        default=BOOTSTRAP_RESAMPLES,
        help="Resamples of the percentile bootstrap over problems for the avg@k intervals; 0: no intervals.",
    )
    parser.add_argument("--confidence", type=float, default=BOOTSTRAP_CONFIDENCE, help="Coverage of the intervals.")
    parser.add_argument("--output-dir", default="eval_results", help="Where results.json and results.md go.")
    parser.add_argument("--save-completions", action="store_true", help="Keep every completion in results.json.")
    parser.add_argument(
        "--compare", action="append", default=[], metavar="RESULTS_JSON", help="Add rows from earlier results."
    )
    return parser


def _parse_files(pairs: Sequence[str]) -> dict[str, str]:
    files = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not path:
            raise ValueError(f"--benchmark-file expects NAME=PATH, got {pair!r}.")
        files[name] = path
    return files


def resolve_sampling(args: argparse.Namespace) -> dict[str, Any]:
    """
    The sampling settings of a parsed command line: explicit flags, else `PAPER_SAMPLING` with `--paper`, else
    `DEFAULT_SAMPLING`. `--paper` also turns thinking on unless `--enable-thinking false` is given.
    """
    preset = PAPER_SAMPLING if args.paper else DEFAULT_SAMPLING
    resolved = {
        name: getattr(args, name) if getattr(args, name) is not None else preset[name] for name in DEFAULT_SAMPLING
    }
    if resolved["top_k"] == 0:
        resolved["top_k"] = None
    enable_thinking = args.enable_thinking
    if enable_thinking is None and args.paper:
        enable_thinking = "true"
    resolved["enable_thinking"] = None if enable_thinking is None else enable_thinking == "true"
    return resolved


def main(argv: Sequence[str] | None = None, *, generate: Generate | None = None) -> int:
    """
    Entry point of `trace-trl eval`. `generate` replaces the backend (tests pass a scripted double).

    Returns:
        `int`: The exit status (0 on success, 2 on bad arguments).
    """
    parser = _parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        files = _parse_files(args.benchmark_file)
        chat_template_kwargs = json.loads(args.chat_template_kwargs)
        if not isinstance(chat_template_kwargs, dict):
            raise ValueError("--chat-template-kwargs must be a JSON object.")
        sampling_args = resolve_sampling(args)
        if sampling_args["num_samples"] < 1:
            raise ValueError("--num-samples must be >= 1.")
        if sampling_args["top_k"] is not None and sampling_args["top_k"] < 0:
            raise ValueError("--top-k must be >= 0 (0: no top-k).")
        if args.bootstrap_resamples < 0:
            raise ValueError("--bootstrap-resamples must be >= 0 (0: no confidence intervals).")
        if not 0.0 < args.confidence < 1.0:
            raise ValueError("--confidence must be in (0, 1), e.g. 0.95.")
        compare = [json.loads(Path(path).read_text()) for path in args.compare]
        benchmarks = load_benchmarks(
            args.benchmarks, files=files, system_prompt=args.system_prompt, limit=args.limit, seed=args.seed
        )
    except (ValueError, OSError) as exc:
        parser.print_usage(sys.stderr)
        print(f"trace-trl eval: error: {exc}", file=sys.stderr)
        return 2
    if sampling_args["enable_thinking"] is not None:
        chat_template_kwargs["enable_thinking"] = sampling_args["enable_thinking"]
    num_samples = sampling_args["num_samples"]

    sampling = SamplingSettings(
        temperature=sampling_args["temperature"],
        top_p=sampling_args["top_p"],
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        chat_template_kwargs=chat_template_kwargs,
        top_k=sampling_args["top_k"],
    )
    backend = "custom" if generate is not None else args.backend
    if generate is None:
        llm_kwargs = {
            "tensor_parallel_size": args.tensor_parallel_size,
            "gpu_memory_utilization": args.gpu_memory_utilization,
        }
        if args.max_model_len is not None:
            llm_kwargs["max_model_len"] = args.max_model_len
        generate = make_generator(
            args.model,
            sampling,
            backend=args.backend,
            batch_size=args.batch_size,
            dtype=args.dtype,
            llm_kwargs=llm_kwargs,
        )
        backend = "vllm" if isinstance(generate, VLLMGenerator) else "hf"
    settings = {
        **asdict(sampling),
        "backend": backend,
        "system_prompt": args.system_prompt,
        "limit": args.limit,
        "benchmark_files": files,
        "preset": "paper" if args.paper else None,
    }
    results = evaluate(
        args.model,
        benchmarks,
        generate,
        num_samples=num_samples,
        settings=settings,
        scorer=args.scorer,
        keep_completions=args.save_completions,
        bootstrap_resamples=args.bootstrap_resamples,
        confidence=args.confidence,
        bootstrap_seed=args.seed,
    )
    table = write_results(results, args.output_dir, compare)
    print(table)
    print(f"Results written to {Path(args.output_dir) / 'results.json'} and {Path(args.output_dir) / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
