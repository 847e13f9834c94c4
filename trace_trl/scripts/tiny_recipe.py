"""`trace-trl train <recipe> --tiny`: any recipe as a CPU smoke run of a few seconds, offline.

The recipe keeps its method (actions, schedule, clipping, cap, teacher, rewards, LoRA); what needs a GPU, a download or
a server is swapped out:

- the model: a tiny randomly initialised Qwen3 with a small BPE tokenizer, built on the spot ([`~trace_trl.tiny`]);
- the dataset: `TINY_NUM_PROBLEMS` one-digit additions and subtractions with worked solutions (the demo's), written as a
  JSONL file in the recipe's schema (`problem`, `answer`, `solution`);
- the annotator, when the recipe's needs a server: `openai` -> `regex`, `random_like_openai` -> `random`,
  `inverted_openai` -> `inverted_regex`; the regex patterns mark every word (`\\S+`), so a random tiny model's rollouts
  have spans and the KL channel really runs;
- correctness: a random tiny model is never right, so the rollouts of each batch alternate correct / incorrect
  (`alternating_correctness_reward`, added with weight 0 and made the `correctness_reward_func`): key spans of correct
  rollouts and error spans of incorrect ones both occur, whichever channel the recipe routes; GRPO's reward is still
  the recipe's;
- the hardware: CPU, fp32, no vLLM, no gradient checkpointing, 2 optimizer steps of 4 rollouts, 8 new tokens (truncated
  rollouts not masked, or nothing would be left to route), no evaluation, checkpoints, trackers or Hub push.

Flags after `--tiny` still win, e.g. `trace-trl train qwen3-8b-trace-fkl --tiny --max_steps 4`.
"""

from __future__ import annotations

import json
import secrets
import tempfile
from pathlib import Path
from typing import Any


TINY_NUM_PROBLEMS = 16
# Annotators that need a server, and the offline annotator of the same family that replaces each.
OFFLINE_ANNOTATOR: dict[str, str] = {
    "openai": "regex",
    "random_like_openai": "random",
    "inverted_openai": "inverted_regex",
}
# Command-line overrides that make any recipe a CPU run of a few seconds.
TINY_SETTINGS: dict[str, str] = {
    "dtype": "float32",
    "attn_implementation": "sdpa",
    "dataset_source": "custom",
    "prompt_column": "problem",
    "answer_column": "answer",
    "solution_column": "solution",
    "privileged_context_column": "solution",
    "max_train_samples": str(TINY_NUM_PROBLEMS),
    "use_vllm": "false",
    "use_cpu": "true",
    "bf16": "false",
    "gradient_checkpointing": "false",
    "per_device_train_batch_size": "4",
    "num_generations": "4",
    "gradient_accumulation_steps": "1",
    "max_completion_length": "8",
    # Nearly every 8-token rollout is truncated: masking them (the paper recipes do) would leave no token to route.
    "mask_truncated_completions": "false",
    "max_steps": "2",
    "learning_rate": "1e-3",
    "logging_steps": "1",
    "report_to": "none",
    "log_completions": "false",
    "save_strategy": "no",
    "eval_strategy": "no",
    "load_best_model_at_end": "false",
    "push_to_hub": "false",
    "self_annotator_max_new_tokens": "16",
}
MATCH_EVERY_WORD = r"\S+"


def alternating_correctness_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """`1.0, 0.0, 1.0, ...` over a batch: half the rollouts count as correct (tiny runs only; see the module doc)."""
    return [float(i % 2 == 0) for i in range(len(completions))]


def offline_annotator(annotator: str | None) -> str | None:
    """The annotator a tiny run uses instead of `annotator` (itself when it needs no server)."""
    return OFFLINE_ANNOTATOR.get(annotator, annotator) if annotator is not None else None


def write_tiny_dataset(path: str | Path, n: int = TINY_NUM_PROBLEMS, seed: int = 0) -> str:
    """`n` small arithmetic problems with their answer and worked solution, as JSONL; returns the path."""
    from trace_trl.scripts.demo import make_problems

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for problem in make_problems(n, seed):
            row = {"problem": problem.question, "answer": problem.answer, "solution": problem.solution}
            handle.write(json.dumps(row) + "\n")
    return str(path)


def build_tiny_model(output_dir: str | Path, dataset_path: str | Path) -> str:
    """A tiny Qwen3 and a tokenizer trained on the dataset's text, saved to `output_dir`; returns the path."""
    from trace_trl.tiny import build_tiny_qwen3, build_tiny_tokenizer, save_tiny_model

    rows = [json.loads(line) for line in Path(dataset_path).read_text(encoding="utf-8").splitlines()]
    corpus = [f"{row['problem']} {row['solution']}" for row in rows]
    corpus.append("<|im_start|>user\n<|im_start|>assistant\n<think>\n</think>\n\\boxed{} Please reason step by step")
    tokenizer = build_tiny_tokenizer(corpus, vocab_size=400)
    return save_tiny_model(build_tiny_qwen3(tokenizer, hidden_size=64, num_layers=2), tokenizer, output_dir)


def new_tiny_workdir() -> Path:
    """A fresh folder name for a tiny run's model, data and output, in the temp folder; not created yet.

    `trace-trl train --tiny` names it first, checks every argument, and only then builds into it: an error leaves
    nothing behind.
    """
    return Path(tempfile.gettempdir()) / f"trace-trl-tiny-{secrets.token_hex(6)}"


def tiny_settings(recipe: dict[str, Any], workdir: str | Path) -> list[str]:
    """Command-line overrides that turn `recipe` (its parsed YAML) into a tiny CPU run, with paths under `workdir`.

    Builds nothing ([`build_tiny_assets`] does). Returns `--field value` pairs to put after the recipe and before the
    user's own flags (which then win).
    """
    workdir = Path(workdir)
    settings = {
        **TINY_SETTINGS,
        "model_name_or_path": str(workdir / "model"),
        "dataset_name": str(workdir / "data" / "problems.jsonl"),
        "output_dir": str(workdir / "output"),
    }
    annotator = offline_annotator(recipe.get("annotator"))
    if annotator is not None and annotator != recipe.get("annotator"):
        settings["annotator"] = annotator
    reward_funcs = list(recipe.get("reward_funcs") or ["accuracy_reward", "format_reward"])
    reward_weights = list(recipe.get("reward_weights") or [1.0] * len(reward_funcs))
    settings["correctness_reward_func"] = alternating_correctness_reward.__name__
    argv = [item for key, value in settings.items() for item in (f"--{key}", value)]
    argv += ["--reward_funcs", *reward_funcs, f"{__name__}.{alternating_correctness_reward.__name__}"]
    argv += ["--reward_weights", *map(str, reward_weights), "0.0"]
    # Every word, so a random model's rollouts have spans of both kinds and the KL channel runs.
    argv += ["--regex_key_patterns", MATCH_EVERY_WORD, "--regex_error_patterns", MATCH_EVERY_WORD]
    return argv


def build_tiny_assets(workdir: str | Path) -> None:
    """Write the tiny dataset and build the tiny model at the paths [`tiny_settings`] names under `workdir`."""
    workdir = Path(workdir)
    dataset_path = write_tiny_dataset(workdir / "data" / "problems.jsonl")
    build_tiny_model(workdir / "model", dataset_path)


def tiny_overrides(recipe: dict[str, Any], workdir: str | Path | None = None) -> list[str]:
    """[`tiny_settings`] for `recipe`, with the model and data built (in a new temp folder unless `workdir` is given)."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="trace-trl-tiny-"))
    argv = tiny_settings(recipe, workdir)
    build_tiny_assets(workdir)
    return argv
