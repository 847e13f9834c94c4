"""A new user's first hour with the command line (issue 9): errors at startup that name the fix, one annotator
builder for `trace-trl train` and `trace-trl annotate`, short parser errors, and a KL channel that routes nothing says
so."""

from __future__ import annotations

import json
import logging
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

from trace_trl import TRACEConfig
from trace_trl.annotator_factory import ANNOTATORS, canonical_annotator_name
from trace_trl.annotators import AllTokensAnnotator, AnnotationRequest, RandomSpanAnnotator, RegexAnnotator
from trace_trl.cli import main as cli_main
from trace_trl.inspection import read_jsonl
from trace_trl.scripts.train import TraceScriptArguments, build_annotator, get_reward_funcs, parse_args


ROOT = Path(__file__).resolve().parents[1]
CPU = ["--use_cpu", "true", "--bf16", "false"]


# --- 1. math-verify is checked at startup --------------------------------------------------------------------------


@pytest.fixture
def no_math_verify(monkeypatch):
    """`import math_verify` fails, as on an install without the `math` extra."""
    monkeypatch.setitem(sys.modules, "math_verify", None)


def test_reward_funcs_that_need_math_verify_name_the_extra(no_math_verify):
    with pytest.raises(ImportError, match=re.escape("pip install 'trace-trl[math]'")):
        get_reward_funcs(["format_reward", "accuracy_reward"])
    # The dependency-free rewards still resolve.
    assert [f.__name__ for f in get_reward_funcs(["boxed_match_reward", "format_reward"])] == [
        "boxed_match_reward",
        "format_reward",
    ]


def test_train_without_math_verify_fails_before_data_tokenizer_or_model(no_math_verify, monkeypatch, tmp_path):
    from trace_trl.scripts import train

    def too_late(*args, **kwargs):
        raise AssertionError("the dataset was loaded before the reward functions were checked")

    monkeypatch.setattr(train, "load_datasets", too_late)
    argv = ["train", "qwen3-1.7b-trace-rkl", *CPU, "--output_dir", str(tmp_path), "--report_to", "none"]
    with pytest.raises(ImportError, match=re.escape("pip install 'trace-trl[math]'")):
        cli_main(argv)


# --- 2. local dataset paths that do not exist ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["/no/such/dir/data.jsonl", "./missing", "../missing/data", "~/missing-trace-data", "missing.jsonl",
     "missing.parquet", "data/missing/train.csv", "a/b/c", ".", "MISSING.JSON"],
)  # fmt: skip
def test_local_looking_paths_are_local(name):
    from trace_trl.data import looks_like_local_path

    assert looks_like_local_path(name)


@pytest.mark.parametrize(
    "name", ["gsm8k", "open-thoughts/OpenThoughts-114k", "DigitalLearningGmbH/MATH-lighteval", "owner/name.v2"]
)
def test_hub_ids_are_not_local_paths(name):
    from trace_trl.data import looks_like_local_path

    assert not looks_like_local_path(name)


@pytest.mark.parametrize("name", ["./missing.jsonl", "~/no-such-trace-trl-dir/x.jsonl", "runs/a/b", "gone.parquet"])
def test_missing_local_dataset_fails_at_once_without_asking_the_hub(name, monkeypatch):
    import datasets

    from trace_trl import data

    def hub(*args, **kwargs):
        raise AssertionError("a missing local path reached datasets.load_dataset (a Hub lookup)")

    monkeypatch.setattr(datasets, "load_dataset", hub)
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        data.load_math_dataset(name, source="custom")
    assert repr(name) in str(info.value)


def test_existing_local_files_still_load(tmp_path, monkeypatch):
    from trace_trl import data

    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"problem": "1+1?", "answer": "2", "solution": "1+1=2. \\boxed{2}"}) + "\n")
    monkeypatch.chdir(tmp_path)
    assert len(data.load_math_dataset("./rows.jsonl", source="custom")) == 1


def test_annotate_a_missing_file_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli_main(["annotate", str(tmp_path / "rollouts.jsonl"), "-o", str(tmp_path / "out.jsonl"), "--quiet"])


# --- 3. one annotator builder -----------------------------------------------------------------------------------------


def _rollouts(path: Path) -> Path:
    rows = [
        {"prompt": "What is 6 * 7?", "completion": "6 * 7 = 42, so \\boxed{42}", "is_correct": True},
        {"prompt": "What is 6 * 7?", "completion": "6 * 7 = 48, so \\boxed{48}", "is_correct": False},
        {"prompt": "What is 2 + 2?", "completion": "2 + 2 = 4. The answer is \\boxed{4}.", "is_correct": True},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _doc_annotate_commands() -> list[list[str]]:
    """The `trace-trl annotate ... --annotator regex` commands of docs/annotators.md, exactly as written."""
    text = (ROOT / "docs" / "annotators.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split("#", 1)[0].strip()
            if command.startswith("trace-trl annotate") and "--annotator regex" in command:
                commands.append(shlex.split(command))
    return commands


def test_the_docs_regex_annotate_examples_run_as_written(tmp_path, monkeypatch, capsys):
    commands = _doc_annotate_commands()
    expected = ["trace-trl", "annotate", "rollouts.jsonl", "-o", "regex.jsonl", "--annotator", "regex", "--all-kinds"]
    assert commands and expected in commands
    monkeypatch.chdir(tmp_path)
    _rollouts(tmp_path / "rollouts.jsonl")
    for command in commands:
        assert cli_main([*command[1:], "--quiet"]) == 0, command
        rows = read_jsonl(tmp_path / command[command.index("-o") + 1])
        assert len(rows) == 3 and all(row["error"] is None for row in rows)
        texts = [[span[3] for span in row["spans"]] for row in rows]
        # Key spans (the answer and the equation) in correct rollouts, the wrong answer in the incorrect one.
        assert "\\boxed{42}" in texts[0] and "6 * 7 = 42" in texts[0]
        assert texts[1] == ["\\boxed{48}"] and [span[2] for span in rows[1]["spans"]] == ["error"]


def test_annotate_regex_patterns_accept_constants_and_regexes(tmp_path, capsys):
    source, output = _rollouts(tmp_path / "rollouts.jsonl"), tmp_path / "out.jsonl"
    argv = ["annotate", str(source), "-o", str(output), "--annotator", "regex", "--quiet", "--all-kinds"]
    argv += [
        "--regex-key-pattern",
        "BOXED_CONTENT",
        "--regex-key-pattern",
        r"answer is",
        "--regex-error-pattern",
        "48",
    ]
    assert cli_main(argv) == 0
    rows = read_jsonl(output)
    assert [span[3] for span in rows[0]["spans"]] == ["42"]
    assert [span[3] for span in rows[1]["spans"]] == ["48", "48"]
    assert sorted(span[3] for span in rows[2]["spans"]) == ["4", "answer is"]


def _annotate_args(*flags: str):
    from trace_trl.scripts.annotate import _annotate_parser, _build_from_flags

    return _build_from_flags(_annotate_parser().parse_args(["in.jsonl", "-o", "out.jsonl", *flags]))


@pytest.mark.parametrize("name", ["regex", "all_tokens", "all-tokens", "random", "inverted_regex", "inverted-regex"])
def test_train_and_annotate_build_the_same_annotator_with_the_same_defaults(name):
    from_train = build_annotator(TraceScriptArguments(annotator=name))
    from_annotate = _annotate_args("--annotator", name)
    assert type(from_train) is type(from_annotate)
    assert vars(from_train).keys() == vars(from_annotate).keys()
    for key, value in vars(from_train).items():
        if key == "base" or key.startswith("_"):
            continue
        other = getattr(from_annotate, key)
        if isinstance(value, tuple) and value and isinstance(value[0], re.Pattern):
            value, other = [p.pattern for p in value], [p.pattern for p in other]
        assert value == other, key
    if name.startswith("inverted"):
        assert repr(from_train.base) == repr(from_annotate.base)


def test_shared_defaults_and_settings():
    regex = _annotate_args("--annotator", "regex")
    assert [p.pattern for p in regex.key_patterns] == [RegexAnnotator.BOXED, RegexAnnotator.EQUATION]
    assert [p.pattern for p in regex.error_patterns] == [RegexAnnotator.BOXED]
    assert isinstance(_annotate_args("--annotator", "all-tokens"), AllTokensAnnotator)
    assert _annotate_args("--annotator", "all_tokens").kind_for_incorrect is None  # train's default, not "error"
    assert _annotate_args("--annotator", "all-tokens", "--all-tokens-incorrect").kind_for_incorrect == "error"
    random = _annotate_args("--annotator", "random", "--seed", "7", "--random-span-fraction", "0.5")
    assert isinstance(random, RandomSpanAnnotator) and random.seed == 7 and random.span_fraction == 0.5


def test_hyphenated_names_are_aliases_for_train_too(tmp_path):
    assert canonical_annotator_name("all-tokens") == "all_tokens"
    assert TraceScriptArguments(annotator="random-like-openai").annotator == "random_like_openai"
    script_args, _, _ = parse_args(["qwen3-8b-trace-fkl", *CPU, "--annotator", "all-tokens", "--output_dir", "x"])
    assert script_args.annotator == "all_tokens"
    assert isinstance(build_annotator(script_args), AllTokensAnnotator)
    with pytest.raises(ValueError, match="Unknown annotator 'al-tokens'"):
        TraceScriptArguments(annotator="al-tokens")
    assert set(ANNOTATORS) >= {"regex", "all_tokens", "random", "openai", "self", "inverted_openai"}


def test_annotate_refuses_trainer_only_annotators_with_the_reason(capsys):
    with pytest.raises(SystemExit, match="only inside `trace-trl train`"):
        _annotate_args("--annotator", "self")
    with pytest.raises(SystemExit, match="annotator_model|--model"):
        _annotate_args("--annotator", "openai")


def test_regex_without_any_pattern_names_the_fields():
    with pytest.raises(ValueError, match="regex_key_patterns"):
        build_annotator(TraceScriptArguments(annotator="regex", regex_key_patterns=[], regex_error_patterns=[]))


# --- 5. usage and short parser errors -------------------------------------------------------------------------------


def test_train_without_arguments_prints_usage_and_exits_2(capsys):
    assert cli_main(["train"]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert "usage: trace-trl train RECIPE" in captured.err
    assert "qwen3-8b-trace-fkl" in captured.err and "qwen3-1.7b-trace-rkl" in captured.err
    assert "trace-trl train qwen3-8b-trace-fkl --tiny" in captured.err


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--no_such_field", "1"], "--no_such_field"),
        (["--annotator", "bogus"], "invalid choice: 'bogus'"),
        (["--learning_rate", "fast"], "--learning_rate"),
    ],
)
def test_parser_errors_are_one_line_and_a_hint(flags, needle, capsys):
    assert cli_main(["train", "qwen3-8b-trace-fkl", *CPU, *flags]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("trace-trl train") or line.startswith("Run ")]
    assert lines[0].startswith("trace-trl train: error:") and needle in lines[0]
    assert "--help" in lines[1]
    assert "usage:" not in err and len(err.splitlines()) < 10


@pytest.mark.skipif(torch.cuda.is_available(), reason="bf16 is supported on this machine")
def test_bf16_on_a_cpu_machine_says_how_to_run_there(capsys):
    assert cli_main(["train", "qwen3-8b-trace-fkl"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--use_cpu true --bf16 false" in err and "--tiny" in err


# --- 4. a KL channel that routes nothing says so ---------------------------------------------------------------------


def test_explain_unrouted_names_the_likely_cause():
    from trace_trl.routing import explain_unrouted

    base = {"rollouts": 24.0, "correct": 12.0, "failures": 0.0, "dropped_spans": 0.0, "key": 0.0, "error": 0.0}
    key_only = explain_unrouted({**base, "key": 30.0}, "grpo", "rkl", 3)
    assert "first 3 generation batches" in key_only and "key spans" in key_only and "TRACE-RKL" in key_only
    assert "regex_error_patterns" in key_only
    error_only = explain_unrouted({**base, "error": 5.0}, "fkl", "grpo", 3)
    assert "`error_span_action` is 'grpo'" in error_only and "regex_key_patterns" in error_only
    assert "every annotation failed" in explain_unrouted({**base, "failures": 24.0}, "fkl", "grpo", 3)
    assert "no rollout was correct" in explain_unrouted({**base, "correct": 0.0}, "fkl", "grpo", 3)
    assert "every rollout was correct" in explain_unrouted({**base, "correct": 24.0}, "grpo", "rkl", 3)
    assert "drops" in explain_unrouted({**base, "dropped_spans": 4.0}, "fkl", "grpo", 3)
    assert "marked no key span in the correct rollouts it was sent" in explain_unrouted(base, "fkl", "grpo", 3)
    assert "marked no span" in explain_unrouted(base, "fkl", "rkl", 3)


def _builder(tokenizer, tmp_path, annotator, **config):
    from trace_trl.context import TeacherContextBuilder
    from trace_trl.routing import RoutedBatchBuilder

    args = TRACEConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", **config)
    context = TeacherContextBuilder(
        args.teacher_context_template,
        tokenize=lambda prompts, rows: [tokenizer.encode(str(p)) for p in prompts],
        encode_text=tokenizer.encode,
        decode_text=tokenizer.decode,
        max_length=None,
    )
    return RoutedBatchBuilder(args, tokenizer, annotator, context, reduce_sum=lambda t: t, device=torch.device("cpu"))


def _batch(builder, tokenizer, texts, rewards):
    ids = [tokenizer.encode(text) for text in texts]
    width = max(map(len, ids))
    completion_ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in ids])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    rows = [{"prompt": "q", "solution": "ref"} for _ in texts]
    output = {"completion_ids": completion_ids, "completion_mask": mask}
    return builder.build(["q"] * len(texts), rows, ids, torch.tensor(rewards), output)


def test_builder_warns_once_when_the_first_batches_route_nothing(tiny_tokenizer, tmp_path, caplog):
    from trace_trl.routing import UNROUTED_BATCHES_BEFORE_WARNING

    # The old regex smoke test under TRACE-RKL: key patterns only, and only error spans are routed.
    annotator = RegexAnnotator(key_patterns=[RegexAnnotator.BOXED])
    builder = _builder(tiny_tokenizer, tmp_path, annotator, key_span_action="grpo", error_span_action="rkl")
    texts = ["so \\boxed{42}", "so \\boxed{41}"]
    with caplog.at_level(logging.WARNING, logger="trace_trl.routing"):
        for _ in range(UNROUTED_BATCHES_BEFORE_WARNING - 1):
            _batch(builder, tiny_tokenizer, texts, [1.0, 0.0])
        assert not [r for r in caplog.records if "routed no token" in r.getMessage()]
        for _ in range(3):
            _batch(builder, tiny_tokenizer, texts, [1.0, 0.0])
    warnings = [r.getMessage() for r in caplog.records if "routed no token" in r.getMessage()]
    assert len(warnings) == 1 and "`key_span_action` is 'grpo'" in warnings[0]


def test_builder_stays_quiet_once_something_was_routed(tiny_tokenizer, tmp_path, caplog):
    annotator = RegexAnnotator(key_patterns=[RegexAnnotator.BOXED], error_patterns=[RegexAnnotator.BOXED])
    builder = _builder(tiny_tokenizer, tmp_path, annotator, key_span_action="grpo", error_span_action="rkl")
    with caplog.at_level(logging.WARNING, logger="trace_trl.routing"):
        routed = _batch(builder, tiny_tokenizer, ["so \\boxed{42}", "so \\boxed{41}"], [1.0, 0.0])
        assert int((routed.tensors["trace_route"] != 0).sum()) > 0
        for _ in range(5):  # later empty batches (all correct) are normal
            _batch(builder, tiny_tokenizer, ["so \\boxed{42}", "so \\boxed{42}"], [1.0, 1.0])
    assert not [r for r in caplog.records if "routed no token" in r.getMessage()]


def test_the_default_regex_annotator_routes_under_both_presets():
    regex = build_annotator(TraceScriptArguments(annotator="regex"))
    requests = [
        AnnotationRequest(prompt="?", completion="6 * 7 = 42 so \\boxed{42}", is_correct=True, reward=1.0),
        AnnotationRequest(prompt="?", completion="6 * 7 = 48 so \\boxed{48}", is_correct=False, reward=0.0),
    ]
    correct, incorrect = regex(requests)
    assert {span.kind for span in correct.spans} == {"key"}  # TRACE-FKL routes these
    assert [span.kind for span in incorrect.spans] == ["error"]  # TRACE-RKL routes this
