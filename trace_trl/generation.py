"""Generation backends of the evaluation: any callable `generate(prompts, num_samples) -> list[list[str]]` ([`Generate`]).

[`HFGenerator`] (batched, left-padded `model.generate`) and [`VLLMGenerator`] (`LLM.generate` with
`SamplingParams(n=k)`) are provided; [`make_generator`] picks one; tests pass a scripted double. `PAPER_SAMPLING` is
the paper's evaluation sampling (Qwen3 thinking mode, temperature 0.6, top-p 0.95, top-k 20, avg@8).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .eval_data import Messages


logger = logging.getLogger(__name__)

Generate = Callable[[list[Messages], int], list[list[str]]]
BACKENDS: tuple[str, ...] = ("auto", "hf", "vllm")

# The paper's evaluation (Qwen3's recommended thinking-mode sampling): thinking on, temperature 0.6, top-p 0.95,
# top-k 20, avg@8. `trace-trl eval --paper` applies it.
PAPER_SAMPLING: dict[str, Any] = {
    "temperature": 0.6,
    "top_p": 0.95,
    "top_k": 20,
    "num_samples": 8,
    "enable_thinking": True,
}
# Defaults without `--paper` (top-k `None`: no top-k filtering).
DEFAULT_SAMPLING: dict[str, Any] = {"temperature": 0.6, "top_p": 0.95, "top_k": None, "num_samples": 1}


@dataclass
class SamplingSettings:
    """Decoding settings shared by the backends and recorded in the results."""

    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 32768
    seed: int = 0
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    # `None`: no top-k filtering (the HF backend passes 0, vLLM -1, so a model's generation config cannot add one).
    top_k: int | None = None


def render_prompts(tokenizer: Any, prompts: list[Messages], chat_template_kwargs: dict[str, Any]) -> list[str]:
    """Apply the chat template with a generation prompt and `chat_template_kwargs` (e.g. `enable_thinking`)."""
    return [
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **chat_template_kwargs)
        for messages in prompts
    ]


class HFGenerator:
    """
    Batched `model.generate` with left padding: the backend that needs nothing but `transformers`.

    Args:
        model (`str` or `PreTrainedModel`):
            Model id or path, or a loaded model.
        settings ([`SamplingSettings`]):
            Decoding settings. `temperature=0` decodes greedily once and repeats the completion `k` times.
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            Defaults to the model's.
        batch_size (`int`, *optional*, defaults to `8`):
            Prompts per `generate` call (each expanded to `k` sequences).
        dtype (`str`, *optional*, defaults to `"auto"`):
            Passed to `from_pretrained`.
    """

    def __init__(
        self,
        model: Any,
        settings: SamplingSettings,
        *,
        tokenizer: Any = None,
        batch_size: int = 8,
        dtype: str = "auto",
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if isinstance(model, str):
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
            device = "cuda" if torch.cuda.is_available() else "cpu"
            model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device)
        self.model = model.eval()
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(model.name_or_path)
        self.tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.settings = settings
        self.batch_size = batch_size

    def __call__(self, prompts: list[Messages], num_samples: int) -> list[list[str]]:
        import torch
        from tqdm.auto import tqdm
        from transformers import set_seed

        set_seed(self.settings.seed)
        greedy = self.settings.temperature <= 0
        sequences = 1 if greedy else num_samples
        texts = render_prompts(self.tokenizer, prompts, self.settings.chat_template_kwargs)
        outputs: list[list[str]] = []
        for start in tqdm(range(0, len(texts), self.batch_size), desc="Generating", unit="batch"):
            batch = self.tokenizer(
                texts[start : start + self.batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(self.model.device)
            sampling = (
                {}
                if greedy
                else {
                    "temperature": self.settings.temperature,
                    "top_p": self.settings.top_p,
                    "top_k": self.settings.top_k or 0,
                }
            )
            with torch.no_grad():
                generated = self.model.generate(
                    **batch,
                    do_sample=not greedy,
                    max_new_tokens=self.settings.max_new_tokens,
                    num_return_sequences=sequences,
                    pad_token_id=self.tokenizer.pad_token_id,
                    **sampling,
                )
            decoded = self.tokenizer.batch_decode(
                generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
            )
            for i in range(0, len(decoded), sequences):
                samples = decoded[i : i + sequences]
                outputs.append(samples * num_samples if greedy else samples)
        return outputs


class VLLMGenerator:
    """
    vLLM backend: one `LLM.generate` call for all prompts, `SamplingParams(n=k)`.

    Args:
        model (`str`):
            Model id or path.
        settings ([`SamplingSettings`]):
            Decoding settings.
        **llm_kwargs:
            Passed to `vllm.LLM` (e.g. `tensor_parallel_size`, `gpu_memory_utilization`, `max_model_len`).
    """

    def __init__(self, model: str, settings: SamplingSettings, **llm_kwargs: Any):
        try:
            from vllm import LLM
        except ImportError as exc:
            raise ImportError("The vLLM backend needs vLLM: pip install 'trace-trl[vllm]'.") from exc
        self.llm = LLM(model=model, seed=settings.seed, **llm_kwargs)
        self.settings = settings

    def __call__(self, prompts: list[Messages], num_samples: int) -> list[list[str]]:
        from vllm import SamplingParams

        params = SamplingParams(
            n=num_samples,
            temperature=self.settings.temperature,
            top_p=self.settings.top_p if self.settings.temperature > 0 else 1.0,
            top_k=self.settings.top_k if self.settings.top_k and self.settings.temperature > 0 else -1,
            max_tokens=self.settings.max_new_tokens,
            seed=self.settings.seed,
        )
        texts = render_prompts(self.llm.get_tokenizer(), prompts, self.settings.chat_template_kwargs)
        results = self.llm.generate(texts, params, use_tqdm=True)
        return [[output.text for output in result.outputs] for result in results]


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def make_generator(model: str, settings: SamplingSettings, *, backend: str = "auto", **kwargs: Any) -> Generate:
    """`backend="auto"` picks vLLM when it is importable and a CUDA device is present, else HF `generate`."""
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}; got {backend!r}.")
    if backend == "auto":
        import torch

        backend = "vllm" if vllm_available() and torch.cuda.is_available() else "hf"
    if backend == "vllm":
        return VLLMGenerator(model, settings, **kwargs.get("llm_kwargs", {}))
    return HFGenerator(model, settings, batch_size=kwargs.get("batch_size", 8), dtype=kwargs.get("dtype", "auto"))
