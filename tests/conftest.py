"""Shared fixtures: offline environment, tiny models and tokenizers built on the spot (no network, no GPU)."""

from __future__ import annotations

import os


# Before any Hugging Face import: nothing in the suite may touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


TINY_CORPUS = [
    "What is 12 + 7? Let me think step by step. 12 + 7 = 19. The answer is \\boxed{19}.",
    "Solve for x: 2x + 4 = 10. Subtract 4, divide by 2, so x = 3. The answer is \\boxed{3}.",
    "Compute 6 * 7. We have 6 * 7 = 42, so the answer is \\boxed{42}.",
    "<think> reasoning about the problem </think> final answer: \\boxed{5}",
    "The quick brown fox jumps over the lazy dog. Reference solution: factor the quadratic.",
] * 40


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen3 vocabulary (151,669 ids) with its added tokens at their real ids."""
    from trace_trl.tiny import build_qwen_tokenizer

    return build_qwen_tokenizer()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from trace_trl.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer(TINY_CORPUS, vocab_size=400)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny Qwen3 (2 layers, hidden 64) and its tokenizer; TRL reloads references and teachers from it."""
    from trace_trl.tiny import build_tiny_qwen3, save_tiny_model

    path = tmp_path_factory.mktemp("tiny-qwen3")
    return str(save_tiny_model(build_tiny_qwen3(tiny_tokenizer), tiny_tokenizer, path))


@pytest.fixture(scope="session")
def untied_tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny Qwen3 with its own LM head (untied from the input embeddings, as in Qwen3-8B)."""
    from trace_trl.tiny import build_tiny_qwen3, save_tiny_model

    path = tmp_path_factory.mktemp("tiny-qwen3-untied")
    return str(save_tiny_model(build_tiny_qwen3(tiny_tokenizer, tie_word_embeddings=False), tiny_tokenizer, path))


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(False)
    yield


# ---------------------------------------------------------------------------------------------------------------------
# Test tiers. `python -m pytest` runs the fast default tier; the tiers below are deselected unless asked for, with
# `--all-tiers` (every tier; the vLLM tests still skip where vLLM is not installed) or an explicit `-m` expression
# (`-m sharded`, `-m "slow or multiprocess or sharded"`). CI (`.ci/run`) runs the default tier, then the others.
# ---------------------------------------------------------------------------------------------------------------------
TIERS: tuple[str, ...] = ("slow", "multiprocess", "sharded", "vllm")


def pytest_addoption(parser):
    parser.addoption(
        "--all-tiers",
        action="store_true",
        help="run every test tier (slow, multiprocess, sharded, vllm), not only the fast default tier",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--all-tiers") or config.getoption("markexpr"):
        return
    kept, deselected = [], []
    for item in items:
        (deselected if any(item.get_closest_marker(tier) for tier in TIERS) else kept).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept
        config._trace_deselected_tiers = len(deselected)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    count = getattr(config, "_trace_deselected_tiers", 0)
    if count:
        terminalreporter.write_line(
            f"fast tier: {count} tests of the {', '.join(TIERS)} tiers were not run; "
            '`python -m pytest --all-tiers` runs every tier, `-m "slow or multiprocess or sharded"` only those.'
        )
