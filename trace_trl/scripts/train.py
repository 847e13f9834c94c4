"""`trace-trl train`: train TRACE (or one of its baselines) from a YAML recipe, with command-line overrides.

```bash
trace-trl train qwen3-8b-trace-fkl                                  # a recipe shipped with the package, by name
trace-trl train my_recipe.yaml --learning_rate 5e-7 --max_steps 100  # a file, with overrides
trace-trl train --list                                              # the shipped recipes
accelerate launch --config_file examples/accelerate/fsdp2.yaml -m trace_trl.scripts.train qwen3-8b-trace-fkl
```

The arguments are TRL's: a [`TraceScriptArguments`] (dataset, rewards, annotator), a [`~trace_trl.TRACEConfig`]
(every `GRPOConfig` field plus TRACE's) and a [`~trl.ModelConfig`] (model, dtype, LoRA), parsed by
[`~trl.TrlParser`] from the YAML recipe and then the command line, which wins. The script reads top to bottom like
open-r1's `grpo.py`: logging, dataset, tokenizer, model, rewards, annotator, trainer, train, save, push.

Secrets never go in a recipe: the annotator's API key is read from the environment (`annotator_api_key_env`,
`OPENAI_API_KEY` by default), and a recipe holding an API key or token is refused.
"""

from __future__ import annotations

import importlib
import importlib.resources
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trl import ScriptArguments


if TYPE_CHECKING:
    from trace_trl.trainer import TRACETrainer

from trace_trl.annotator_factory import (  # noqa: F401 (ANNOTATORS, SPAN_FORMATS, build_annotator: re-exported)
    ANNOTATORS,
    SPAN_FORMATS,
    AnnotatorSettings,
    build_annotator,
)
from trace_trl.cli_errors import CommandLineError, check_model_path, dataset_column_error, did_you_mean, print_error
from trace_trl.trackers import check_report_to


logger = logging.getLogger(__name__)

# Recipe keys (at any depth, `env:` included) that hold credentials. They belong in the environment.
_SECRET_KEY = re.compile(r"(^|_)(api_?keys?|token|secrets?|password|passwd|credentials?)$", re.IGNORECASE)


@dataclass
class TraceScriptArguments(AnnotatorSettings, ScriptArguments):
    r"""
    Script arguments of `trace-trl train`: the dataset, the reward functions and the annotator (the fields of
    [`~trace_trl.annotator_factory.AnnotatorSettings`], which this class extends: `annotator`, `annotator_*`,
    `regex_*`, `random_*`, ...).

    The dataset fields of [`~trl.ScriptArguments`] are used as follows: `dataset_name` is a Hub id or a local file
    (`.jsonl`, `.parquet`, ...) read by [`~trace_trl.data.load_math_dataset`], `dataset_config` its Hub config, and
    `dataset_train_split` / `dataset_test_split` the splits.

    Args:
        dataset_source (`str` or `None`, *optional*, defaults to `None`):
            Schema of the dataset: `"math"`, `"gsm8k"`, `"numina"`, `"openr1"`, `"openthoughts"` or `"custom"`;
            `None` guesses from `dataset_name`. `"openthoughts"` is the paper's setup: the math rows of
            OpenThoughts-114k (config `metadata`), shuffled with `dataset_seed`, split into a held-out validation set
            of `validation_size` problems (the `eval_dataset`, for checkpoint selection) and a training set of at
            most `max_train_samples` (30,000 unless set) problems; see [`~trace_trl.data.load_openthoughts_math`].
        prompt_column, answer_column, solution_column (`str`, *optional*):
            `"custom"` schema only: the columns with the problem, the gold answer (`None`: the last `\boxed{}` of the
            solution) and the reference solution (the teacher's privileged context).
        system_prompt (`str` or `None`, *optional*, defaults to `None`):
            System turn of every prompt.
        instruction (`str` or `None`, *optional*):
            Instruction appended to every problem (asks for a `\boxed{}` answer by default).
        strip_thinking (`bool`, *optional*, defaults to `False`):
            Remove `<think>` blocks from the reference solutions.
        drop_empty_solutions (`bool`, *optional*, defaults to `False`):
            Drop rows without a reference solution instead of failing.
        max_train_samples (`int` or `None`, *optional*, defaults to `None`):
            Keep only the first rows of the training split. `"openthoughts"`: the most training problems, after the
            seeded shuffle (`None`: the paper's 30,000).
        validation_size (`int`, *optional*, defaults to `500`):
            `"openthoughts"` only: problems held out of training as the validation split.
        dataset_seed (`int`, *optional*, defaults to `42`):
            `"openthoughts"` only: seed of the shuffle that makes the train/validation split.
        reward_funcs (`list[str]`, *optional*, defaults to `["accuracy_reward", "format_reward"]`):
            Reward functions by name (`trace_trl.rewards.REWARD_FUNCTIONS`) or dotted import path. Weights go in
            `reward_weights` (a `TRACEConfig` field).
        console_log (`str`, *optional*, defaults to `"compact"`):
            What the console prints per logging step: `"compact"`, one line with the numbers a person watches
            ([`~trace_trl.console.compact_line`]), or `"full"`, transformers' whole log dict. Trackers (`report_to`)
            and `trainer_state.json` get every metric either way.
    """

    # Dataset (beyond TRL's `dataset_name`, `dataset_config`, `dataset_train_split`, `dataset_test_split`)
    dataset_source: str | None = field(
        default=None,
        metadata={
            "help": "Dataset schema: 'math', 'gsm8k', 'numina', 'openr1', 'openthoughts' (the paper's: OpenThoughts-114k "
            "math rows with a held-out validation split) or 'custom'; None guesses from dataset_name.",
            "choices": ["math", "gsm8k", "numina", "openr1", "openthoughts", "custom"],
        },
    )
    prompt_column: str = field(default="problem", metadata={"help": "'custom' schema: column with the problem."})
    answer_column: str | None = field(
        default="answer",
        metadata={"help": "'custom' schema: column with the gold answer; None reads the solution's last \\boxed{}."},
    )
    solution_column: str = field(
        default="solution", metadata={"help": "'custom' schema: column with the reference solution."}
    )
    system_prompt: str | None = field(default=None, metadata={"help": "System turn of every prompt."})
    instruction: str | None = field(
        default="Please reason step by step, and put your final answer within \\boxed{}.",
        metadata={"help": "Instruction appended to every problem; None appends nothing."},
    )
    strip_thinking: bool = field(
        default=False, metadata={"help": "Remove <think> blocks from the reference solutions."}
    )
    drop_empty_solutions: bool = field(
        default=False, metadata={"help": "Drop rows without a reference solution instead of failing."}
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={
            "help": "Keep only the first rows of the training split. 'openthoughts': most training problems after the "
            "seeded shuffle (None: the paper's 30000)."
        },
    )
    validation_size: int = field(
        default=500,
        metadata={"help": "'openthoughts' only: problems held out as the validation split (the eval_dataset)."},
    )
    dataset_seed: int = field(
        default=42,
        metadata={"help": "'openthoughts' only: seed of the shuffle that makes the train/validation split."},
    )

    # Rewards
    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy_reward", "format_reward"],
        metadata={
            "help": "Reward functions: 'accuracy_reward', 'boxed_match_reward', 'format_reward', "
            "'multiple_choice_reward', or a dotted import path. Weights go in `reward_weights`."
        },
    )

    # Console
    console_log: str = field(
        default="compact",
        metadata={
            "help": "What the console prints per logging step: 'compact' (one line: step, loss, reward, KL weight, "
            "routed fraction, entropy, ...) or 'full' (transformers' whole log dict). Trackers get every metric "
            "either way.",
            "choices": ["compact", "full"],
        },
    )

    def __post_init__(self):
        AnnotatorSettings.__post_init__(self)
        for name in (
            "answer_column",
            "system_prompt",
            "instruction",
        ):
            if getattr(self, name) in ("None", "none", "null"):  # `--answer_column None` on the command line
                setattr(self, name, None)


# ---------------------------------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------------------------------


def recipes_dir() -> Path:
    """Folder of the recipes shipped with the package (`trace_trl/recipes/`)."""
    return Path(str(importlib.resources.files("trace_trl") / "recipes"))


def list_recipes() -> list[str]:
    """Names of the shipped recipes (file names without `.yaml`)."""
    return sorted(path.stem for path in recipes_dir().glob("*.yaml"))


def resolve_recipe(name_or_path: str) -> str:
    """A recipe file: `name_or_path` itself if it is a file, else the shipped recipe of that name."""
    if os.path.isfile(name_or_path):
        return name_or_path
    name = name_or_path[: -len(".yaml")] if name_or_path.endswith(".yaml") else name_or_path
    shipped = recipes_dir() / f"{name}.yaml"
    if shipped.is_file():
        return str(shipped)
    suggestion = did_you_mean(name, list_recipes(), quote="'")
    raise FileNotFoundError(
        f"No recipe file {name_or_path!r} and no shipped recipe named {name!r}.{suggestion} Shipped recipes: "
        f"{', '.join(list_recipes())}."
    )


def check_recipe_has_no_secrets(config: Any, path: str = "") -> None:
    """Refuse a recipe that holds credentials (API keys, tokens, passwords), in any key, `env:` included."""
    if isinstance(config, dict):
        for key, value in config.items():
            where = f"{path}.{key}" if path else str(key)
            if _SECRET_KEY.search(str(key)) and value not in (None, "", False):
                raise ValueError(
                    f"The recipe sets `{where}`, which looks like a credential. Secrets never go in a recipe (it is "
                    "copied into logs, checkpoints and Hub repos): export it in the environment instead, e.g. "
                    "`export OPENAI_API_KEY=...` (see `annotator_api_key_env`) or `hf auth login`."
                )
            check_recipe_has_no_secrets(value, where)
    elif isinstance(config, list):
        for i, value in enumerate(config):
            check_recipe_has_no_secrets(value, f"{path}[{i}]")


def _config_argv(argv: list[str]) -> list[str]:
    """`[recipe, *overrides]` or `[--config, recipe, *overrides]` -> TrlParser's `[--config, file, *overrides]`."""
    argv = list(argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--config", argv[0], *argv[1:]]
    if "--config" in argv:
        index = argv.index("--config") + 1
        if index >= len(argv):
            raise ValueError("`--config` needs a recipe file or name.")
        argv[index] = resolve_recipe(argv[index])
    return argv


def _read_recipe(argv: list[str]) -> dict[str, Any] | None:
    """The parsed YAML of the recipe `argv` names after `--config` (`None` without one), refused if it holds a secret."""
    import yaml

    if "--config" not in argv:
        return None
    with open(argv[argv.index("--config") + 1]) as f:
        recipe = yaml.safe_load(f)
    check_recipe_has_no_secrets(recipe)
    return recipe


def make_parser():
    """TRL's parser over `(TraceScriptArguments, TRACEConfig, ModelConfig)`."""
    from trl import ModelConfig, TrlParser

    from trace_trl.config import TRACEConfig

    return TrlParser((TraceScriptArguments, TRACEConfig, ModelConfig), prog="trace-trl train")


def parse_args(argv: list[str]):
    """Parse a recipe plus overrides into `(script_args, training_args, model_args)`, as `trace-trl train` does."""
    return make_parser().parse_args_and_config(_config_argv(argv))


# ---------------------------------------------------------------------------------------------------------------------
# Rewards and annotators
# ---------------------------------------------------------------------------------------------------------------------


def get_reward_funcs(names: list[str]) -> list[Any]:
    """Reward functions by name (`trace_trl.rewards.REWARD_FUNCTIONS`) or dotted import path.

    Raises `ImportError` naming the fix (`pip install 'trace-trl[math]'`) when one needs a package that is missing.
    """
    from trace_trl.rewards import REWARD_FUNCTIONS, check_reward_dependencies

    funcs = []
    for name in names:
        if name in REWARD_FUNCTIONS:
            funcs.append(REWARD_FUNCTIONS[name])
        elif "." in name:
            module_name, attribute = name.rsplit(".", 1)
            sys.path.insert(0, os.getcwd())
            try:
                funcs.append(getattr(importlib.import_module(module_name), attribute))
            except (ModuleNotFoundError, AttributeError) as exc:
                if isinstance(exc, ModuleNotFoundError) and not module_name.startswith(exc.name or "\0"):
                    raise  # the module exists but imports a missing package: its own error says which
                raise CommandLineError(
                    f"`--reward_funcs {name}`: cannot import {attribute!r} from {module_name!r} ({exc}).",
                    "A dotted path is `module.function`, importable from the current folder.",
                ) from exc
        else:
            raise CommandLineError(
                f"`--reward_funcs {name}`: unknown reward function.{did_you_mean(name, REWARD_FUNCTIONS)}",
                f"Reward functions: {', '.join(sorted(REWARD_FUNCTIONS))}, or a dotted import path (module.function).",
            )
    check_reward_dependencies(funcs)
    return funcs


# ---------------------------------------------------------------------------------------------------------------------
# The script
# ---------------------------------------------------------------------------------------------------------------------


def load_datasets(script_args: TraceScriptArguments, training_args) -> tuple[Any, Any]:
    """
    The training set and the evaluation set (`None` when `eval_strategy` is `"no"`) a recipe asks for.

    `dataset_source: openthoughts` makes both from one Hub split ([`~trace_trl.data.load_openthoughts_math`]): the
    evaluation set is the held-out validation split, disjoint from training. Other sources read `dataset_train_split`
    and `dataset_test_split`.
    """
    from trace_trl import data

    if not script_args.dataset_name:
        raise ValueError("Set `dataset_name` (a Hub dataset id or a local .jsonl/.parquet file) in the recipe.")
    evaluating = training_args.eval_strategy != "no"
    source = script_args.dataset_source or data.guess_source(script_args.dataset_name)
    if source == "openthoughts":
        if evaluating and script_args.validation_size == 0:
            raise ValueError(
                "`eval_strategy` is on but `validation_size` is 0: set `validation_size` (e.g. 500) to hold out "
                "OpenThoughts problems for evaluation, or `eval_strategy: no`."
            )
        max_train = script_args.max_train_samples
        splits = data.load_openthoughts_math(
            script_args.dataset_name,
            config_name=script_args.dataset_config,
            max_train_samples=data.PAPER_MAX_TRAIN_SAMPLES if max_train is None else max_train,
            validation_size=script_args.validation_size,
            seed=script_args.dataset_seed,
            system_prompt=script_args.system_prompt,
            instruction=script_args.instruction,
            drop_empty_solutions=script_args.drop_empty_solutions,
        )
        return splits["train"], splits["validation"] if evaluating else None

    dataset_kwargs = dict(
        source=source,
        config_name=script_args.dataset_config,
        prompt_column=script_args.prompt_column,
        answer_column=script_args.answer_column,
        solution_column=script_args.solution_column,
        system_prompt=script_args.system_prompt,
        instruction=script_args.instruction,
        strip_thinking=script_args.strip_thinking,
        drop_empty_solutions=script_args.drop_empty_solutions,
    )
    try:
        train_dataset = data.load_math_dataset(
            script_args.dataset_name,
            split=script_args.dataset_train_split,
            limit=script_args.max_train_samples,
            **dataset_kwargs,
        )
        eval_dataset = None
        if evaluating:
            eval_dataset = data.load_math_dataset(
                script_args.dataset_name, split=script_args.dataset_test_split, **dataset_kwargs
            )
    except data.MissingColumnError as exc:  # in the command line's words: the flag that maps the column
        raise dataset_column_error(exc, script_args.dataset_name, source) from exc
    return train_dataset, eval_dataset


def run(script_args: TraceScriptArguments, training_args, model_args) -> Any:
    """Train from parsed arguments; returns the trainer."""
    import datasets
    import transformers
    from transformers import AutoTokenizer, set_seed
    from transformers.trainer_utils import get_last_checkpoint
    from trl import get_peft_config, get_quantization_config

    from trace_trl.console import install_console_log
    from trace_trl.trainer import TRACETrainer

    # Before anything loads: a tracker that is not installed would fail only once the Trainer is built.
    check_report_to(training_args.report_to)
    set_seed(training_args.seed)

    ###############
    # Setup logging
    ###############
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    logging.getLogger("trace_trl").setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    # The full configuration is hundreds of fields; `--console_log full` prints it, the compact console does not.
    log_config = logger.info if script_args.console_log == "full" else logger.debug
    log_config(f"Model parameters {model_args}")
    log_config(f"Script parameters {script_args}")
    log_config(f"Training parameters {training_args}")

    # Check for last checkpoint
    last_checkpoint = None
    if os.path.isdir(training_args.output_dir):
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
    if last_checkpoint is not None and training_args.resume_from_checkpoint is None:
        logger.info(f"Checkpoint detected, resuming training at {last_checkpoint}.")

    #############################
    # Reward functions, annotator (first: a missing package or setting fails before any download)
    #############################
    reward_funcs = get_reward_funcs(script_args.reward_funcs)
    annotator = build_annotator(script_args)
    if annotator is None and training_args.kl_coef > 0:
        raise ValueError(
            "This recipe has `kl_coef > 0` but `annotator: none`. Choose an annotator (regex, all_tokens, random, "
            "random_like_openai, random_like_self, openai, self) or set `kl_coef: 0` for plain GRPO."
        )
    logger.info(f"Annotator: {type(annotator).__name__ if annotator is not None else None}")

    check_model_path(model_args.model_name_or_path)  # a mistyped local folder fails now, not after a Hub lookup

    ################
    # Load datasets
    ################
    train_dataset, eval_dataset = load_datasets(script_args, training_args)

    ################
    # Load tokenizer
    ################
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    ##############
    # Model kwargs
    ##############
    # The trainer loads the model from its id (and the teacher/reference from the same id) with these kwargs.
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs
    peft_config = get_peft_config(model_args)

    #############################
    # Initialize the TRACE trainer
    #############################
    trainer = TRACETrainer(
        model=model_args.model_name_or_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        quantization_config=get_quantization_config(model_args),
        annotator=annotator,
    )
    install_console_log(trainer, script_args.console_log)

    ###############
    # Training loop
    ###############
    logger.info("*** Train ***")
    checkpoint = training_args.resume_from_checkpoint or last_checkpoint
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = train_result.metrics
    metrics["train_samples"] = len(train_dataset)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    ##################################
    # Save model and create model card
    ##################################
    logger.info("*** Save model ***")
    trainer.model.generation_config.eos_token_id = tokenizer.eos_token_id
    save_final_model(trainer, training_args.output_dir)
    logger.info(f"Model saved to {training_args.output_dir}")

    kwargs = {"dataset_name": script_args.dataset_name if not os.path.exists(script_args.dataset_name) else None}
    if trainer.accelerator.is_main_process:
        trainer.create_model_card(model_name=Path(training_args.output_dir).name, **kwargs)
        # Restore k,v cache for fast inference
        trainer.model.config.use_cache = True
        trainer.model.config.save_pretrained(training_args.output_dir)

    #############
    # push to hub
    #############
    if training_args.push_to_hub:
        logger.info("Pushing to hub...")
        trainer.push_to_hub(**kwargs)

    if callable(getattr(trainer, "end", None)):  # transformers >= 5.18: finish trackers, destroy process group
        trainer.end()
    return trainer


def usage() -> str:
    """What `trace-trl train` with no arguments prints: how to call it, the shipped recipes, examples."""
    lines = [
        "usage: trace-trl train RECIPE [--field value ...] [--tiny]",
        "",
        "Train TRACE (or a baseline) from a YAML recipe: a shipped recipe's name or a .yaml file. Flags override the",
        "recipe's fields (every TRACEConfig / GRPOConfig / ModelConfig field and the script arguments).",
        "",
        "shipped recipes:",
        *(f"  {name}" for name in list_recipes()),
        "",
        "examples:",
        "  trace-trl train qwen3-8b-trace-fkl --tiny          # any recipe as a CPU smoke run, offline, in seconds",
        "  trace-trl train qwen3-8b-trace-fkl --learning_rate 5e-7 --max_steps 100",
        "",
        "`trace-trl train --help` lists every field; `trace-trl train --list` prints the recipe names.",
    ]
    return "\n".join(lines)


def _short_error(message: str) -> None:
    """Print a parser error as one line plus a hint (not the whole usage), and exit with status 2."""
    print(f"trace-trl train: error: {message}", file=sys.stderr)
    print("Run `trace-trl train --help` for every field, or `trace-trl train` for the recipes.", file=sys.stderr)
    raise SystemExit(2)


def _parse(argv: list[str], parser=None):
    """`parser.parse_args_and_config(argv)` (`make_parser()` by default), with argparse and config errors as short
    messages."""
    parser = parser or make_parser()
    parser.error = _short_error  # argparse prints ~250 lines of usage before the one line that matters
    try:
        return parser.parse_args_and_config(argv)
    except ValueError as exc:  # a field's validation (TRACEConfig, GRPOConfig, TrainingArguments __post_init__)
        from trace_trl.config import CPUPrecisionError, cpu_precision_hint

        # The Python API's hint names `use_cpu=True, bf16=False`; the command line names its flags.
        message = f"{exc.reason} {cpu_precision_hint(cli=True)}" if isinstance(exc, CPUPrecisionError) else str(exc)
        _short_error(message)


def save_final_model(trainer: TRACETrainer, output_dir: str) -> None:
    """Save the trained model as full weights that `from_pretrained` (and `trace-trl eval`) load.

    Under FSDP with `SHARDED_STATE_DICT` (examples/accelerate/fsdp2.yaml: fast, resumable checkpoints),
    `Trainer.save_model` writes no weights into the final folder; the final save switches to `FULL_STATE_DICT`.
    """
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(output_dir)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] == "--list":
        for name in list_recipes():
            print(name)
        return 0
    tiny = "--tiny" in argv
    argv = [arg for arg in argv if arg != "--tiny"]
    # Everything is checked before anything is built (the `--tiny` model and data included): a typo costs a second.
    parser = make_parser()
    try:
        argv = _config_argv(argv)
        recipe = _read_recipe(argv)
        _check_field_names(argv, recipe, parser)
    except (FileNotFoundError, ValueError) as exc:
        print_error(exc)
        return 2
    workdir = None
    if tiny:
        argv, workdir = _with_tiny_overrides(argv, recipe)
    try:
        script_args, training_args, model_args = _parse(argv, parser)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        get_reward_funcs(script_args.reward_funcs)
        check_report_to(training_args.report_to)
        if workdir is None or model_args.model_name_or_path != str(workdir / "model"):  # the tiny one is built below
            check_model_path(model_args.model_name_or_path)
    except CommandLineError as exc:
        print_error(exc)
        return 2
    try:
        if workdir is not None:
            from trace_trl.scripts.tiny_recipe import build_tiny_assets

            print(f"trace-trl train --tiny: a tiny Qwen3 on CPU, {training_args.output_dir}", file=sys.stderr)
            build_tiny_assets(workdir)
        run(script_args, training_args, model_args)
    except CommandLineError as exc:
        _remove_tiny_workdir(workdir)
        print_error(exc)
        return 2
    except BaseException:
        _remove_tiny_workdir(workdir)
        raise
    return 0


def _check_field_names(argv: list[str], recipe: dict[str, Any] | None, parser) -> None:
    """Refuse unknown flags and recipe keys with a "did you mean" (`--kl_coeff` -> `--kl_coef`), before parsing.

    TrlParser's own errors ("not used by the HfArgumentParser", "set `fail_with_unknown_args=False`") name Python
    arguments a command-line user cannot pass.
    """
    from trace_trl.cli_errors import check_flags, check_recipe_keys

    overrides = list(argv)
    if "--config" in overrides:
        index = overrides.index("--config")
        recipe_path = overrides[index + 1]
        del overrides[index : index + 2]
        if isinstance(recipe, dict):
            check_recipe_keys(recipe, parser, recipe_path)
    check_flags(overrides, parser)


def _remove_tiny_workdir(workdir: Path | None) -> None:
    """Remove a `--tiny` run's temp folder after an error (it holds only the tiny model, data and partial output)."""
    import shutil

    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)


def _with_tiny_overrides(argv: list[str], recipe: dict[str, Any] | None) -> tuple[list[str], Path]:
    """`argv` with the `--tiny` overrides after the recipe and before the user's flags (which still win), and the
    folder they name for the tiny model, data and output; nothing is built yet (see `tiny_recipe.build_tiny_assets`)."""
    from trace_trl.scripts.tiny_recipe import new_tiny_workdir, tiny_settings

    if "--config" not in argv:
        raise SystemExit("trace-trl train: --tiny needs a recipe, e.g. `trace-trl train qwen3-8b-trace-fkl --tiny`.")
    index = argv.index("--config") + 2
    workdir = new_tiny_workdir()
    overrides = tiny_settings(recipe or {}, workdir)
    return [*argv[:index], *overrides, *argv[index:]], workdir


if __name__ == "__main__":
    sys.exit(main())
