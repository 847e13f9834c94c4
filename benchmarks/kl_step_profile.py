r"""Where a KL-phase step's time goes, in the replication study's setting (`replication.py`'s `Settings`).

One seed's data and warm start (as the study makes them), then a few optimizer steps of each arm, all inside the KL
warm-up (steps 0-9, KL weight 0.5), with timers around each part of a TRACE step:

- `generation`: GRPO's rollout generation (`GRPOTrainer._generate`), the same for every arm;
- `annotation_client`: the annotator call as the trainer sees it (for the API arms: the `OpenAIAnnotator` client,
  the HTTP round trips and the server, which shares the same CPUs); `annotation_server`: the rule server's grading
  alone (summed over its threads);
- `span_offsets`: the character offsets of the tokens of annotated rollouts (`spans.token_char_offsets`);
- `teacher_prompts`: rendering and tokenizing the teacher prompts (`TeacherContextBuilder.build`);
- `routing_other`: the rest of `RoutedBatchBuilder.build` (labels, the coverage cap, padding, one reduce);
- `teacher_forward`: the teacher's forward over the routed rows (`TRACETrainer._teacher_hidden_states`);
- `divergence_forward`: the routed divergence's forward inside the student's forward (its backward is part of the
  optimizer step's backward, not separable here);
- `teacher_sync`: the synced teacher's copies (`Teacher.begin` / `Teacher.update`);
- `step`: the whole optimizer step (between `on_step_begin` and `on_step_end`).

Reported per step (seconds) and as ratios to the GRPO arm's step measured in the same run; the machine's load average
is recorded, since the CPUs may be shared. Not a study: a profile (one seed, a few steps).

    python benchmarks/kl_step_profile.py                       # 8 KL-phase steps of GRPO, TRACE-FKL, random 25%
    python benchmarks/kl_step_profile.py --steps 4 --json out.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any


sys.path.insert(0, str(Path(__file__).resolve().parent))
import replication  # noqa: E402  (sets the offline environment first)
import rule_annotator_server  # noqa: E402
import torch  # noqa: E402


PARTS = (
    "generation",
    "annotation_client",
    "annotation_server",
    "span_offsets",
    "teacher_prompts",
    "routing_other",
    "teacher_forward",
    "divergence_forward",
    "teacher_sync",
    "step",
)


class Timers:
    """Seconds per part, summed; thread-safe (the rule server grades in its own threads)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] += seconds

    def wrap(self, owner: Any, attribute: str, name: str) -> None:
        """Time every call of `owner.attribute` (a function or method) under `name`, for the whole process."""
        original = getattr(owner, attribute)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - started)

        setattr(owner, attribute, timed)


def instrument(timers: Timers) -> None:
    from trl import GRPOTrainer

    import trace_trl.kl_channel as kl_channel
    import trace_trl.routing as routing
    from trace_trl.annotators import OpenAIAnnotator, RandomSpanAnnotator
    from trace_trl.context import TeacherContextBuilder
    from trace_trl.teacher import Teacher

    timers.wrap(GRPOTrainer, "_generate", "generation")
    timers.wrap(OpenAIAnnotator, "__call__", "annotation_client")
    timers.wrap(RandomSpanAnnotator, "__call__", "annotation_client")
    timers.wrap(rule_annotator_server, "answer_for_message", "annotation_server")
    timers.wrap(routing, "token_char_offsets", "span_offsets")
    timers.wrap(TeacherContextBuilder, "build", "teacher_prompts")
    timers.wrap(routing.RoutedBatchBuilder, "build", "routing_total")
    timers.wrap(kl_channel.KLChannel, "teacher_hidden_states", "teacher_forward")
    timers.wrap(kl_channel, "routed_divergence", "divergence_forward")
    timers.wrap(Teacher, "begin", "teacher_sync")
    timers.wrap(Teacher, "update", "teacher_sync")


def step_timer(timers: Timers):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            timers.add("step", time.perf_counter() - self.started)

    return StepTimer()


def run_arm(arm: str, steps: int, base_path: str, tokenizer, data, base_url: str, settings, out_dir: Path):
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback

    from trace_trl import TRACETrainer
    from trace_trl.rewards import boxed_match_reward

    overrides, annotator = replication.make_arm(arm, 0, base_url, settings)
    config = replication.arm_config(settings, overrides, output_dir=out_dir / arm, seed=0, steps=steps)
    dataset = Dataset.from_list(
        [{"prompt": replication.chat(p.question), "answer": p.answer, "solution": p.solution} for p in data.train]
    )
    trainer = TRACETrainer(
        model=base_path,
        reward_funcs=boxed_match_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        annotator=annotator,
    )
    trainer.remove_callback(PrinterCallback)
    timers = Timers()
    trainer.add_callback(step_timer(timers))
    global _ACTIVE
    _ACTIVE = timers
    torch.manual_seed(0)
    trainer.train()
    logs = trainer.state.log_history
    requests = max([r.get("annotator/requests", 0.0) for r in logs] or [0.0])  # the annotator's running total
    failures = sum(r.get("trace/annotation_failures", 0.0) for r in logs)
    return timers.seconds, {"annotation_requests": requests, "annotation_failures": failures}


class _Dispatch(Timers):
    """The process-wide wrappers report to the arm being run."""

    def add(self, name: str, seconds: float) -> None:
        if _ACTIVE is not None:
            _ACTIVE.add(name, seconds)


_ACTIVE: Timers | None = None


def per_step(seconds: dict[str, float], steps: int) -> dict[str, float]:
    row = {part: seconds.get(part, 0.0) / steps for part in PARTS}
    routing_total = seconds.get("routing_total", 0.0)
    inner = sum(seconds.get(p, 0.0) for p in ("annotation_client", "span_offsets", "teacher_prompts"))
    row["routing_other"] = max(0.0, routing_total - inner) / steps
    accounted = sum(row[p] for p in PARTS if p not in ("step", "annotation_server"))
    row["rest"] = max(0.0, row["step"] - accounted)  # the student's forward/backward, GRPO's loss, the optimizer
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per arm (all in the KL warm-up)")
    parser.add_argument("--arms", nargs="+", default=["grpo", "trace_fkl", "random_25"])
    parser.add_argument("--sft-steps", type=int, default=None, help="warm-start steps (default: the study's)")
    parser.add_argument("--json", default=None, help="write the measurements here")
    args = parser.parse_args(argv)
    settings = replication.Settings(seeds=(0,))
    if args.sft_steps is not None:
        import dataclasses

        settings = dataclasses.replace(settings, sft_steps=args.sft_steps)
    if args.steps > settings.kl_warmup_steps:
        raise SystemExit(f"--steps must be at most {settings.kl_warmup_steps} (the KL warm-up), got {args.steps}.")
    instrument(_Dispatch())
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp, rule_annotator_server.RuleAnnotatorServer() as server:
        out = Path(tmp)
        data = replication.seed_data(settings, 0)
        base_path, tokenizer = replication.warm_start(settings, data, 0, out / "base")
        results: dict[str, Any] = {}
        for arm in args.arms:
            started = time.perf_counter()
            seconds, counts = run_arm(arm, args.steps, base_path, tokenizer, data, server.base_url, settings, out)
            results[arm] = {**per_step(seconds, args.steps), **counts, "wall_s": time.perf_counter() - started}
            print(f"{arm}: {results[arm]['step']:.3f} s/step", file=sys.stderr)
    load_after = os.getloadavg()
    base = results.get("grpo", {}).get("step")
    import trace_trl

    report = {
        "steps": args.steps,
        "code": str(Path(trace_trl.__file__).parent),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "cpus": os.cpu_count(),
        "results": results,
    }
    columns = [*PARTS, "rest"]
    print("| part (s/step) | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    for part in columns:
        print(f"| {part} | " + " | ".join(f"{results[a][part]:.3f}" for a in results) + " |")
    if base:
        print("| step / GRPO step | " + " | ".join(f"{results[a]['step'] / base:.2f}" for a in results) + " |")
    print("| annotation requests | " + " | ".join(f"{results[a]['annotation_requests']:.0f}" for a in results) + " |")
    print(f"load average before/after: {load_before} / {load_after}; {os.cpu_count()} CPUs; code: {report['code']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
