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
