"""`SelfAnnotator`: online self-annotation, the policy being trained annotates its own rollouts.

It uses the same prompt and parser as `OpenAIAnnotator`, and generates through the trainer's own backend: vLLM in
colocate mode when the trainer uses it, else Hugging Face `generate` on the unwrapped policy. It is called on every
rank with that rank's rollouts and adds no collective of its own.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .base import Annotation, AnnotationRequest
from .parsing import AnnotationParseError, AnnotatorStats
from .prompts import RESPONSE_SCHEMA, segment_response_schema, validate_template
from .protocol import ProtocolRequest, check_span_format, parse_protocol_answer, protocol_request
from .segments import DEFAULT_MAX_SEGMENT_CHARS, check_max_segment_chars


if TYPE_CHECKING:
    from ..trainer import TRACETrainer

logger = logging.getLogger(__name__)

AnnotatorPrompt = str | list[dict[str, str]]


class SelfAnnotator:
    """Let the policy annotate its own rollouts (the paper's online self-annotation setting).

    Pass it as `TRACETrainer(annotator=SelfAnnotator())`; the trainer calls `bind(trainer)` so the annotator can
    reach the policy, its tokenizer and its generation backend. Output that cannot be parsed gives a failed
    annotation (the rollout trains as pure GRPO), never an exception; so does an exception during generation, so
    that no rank stops while the others go on.

    Args:
        max_new_tokens (`int`, *optional*, defaults to `512`):
            Most tokens generated per annotation.
        temperature (`float`, *optional*, defaults to `0.0`):
            Sampling temperature; `0` is greedy decoding.
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus sampling threshold (when sampling).
        batch_size (`int`, *optional*, defaults to `8`):
            Prompts per Hugging Face `generate` call (vLLM takes them all at once).
        prompt_template (`str`, *optional*):
            User-message template; see `OpenAIAnnotator`.
        system_prompt (`str`, *optional*):
            System message replacing `prompts.SYSTEM_PROMPT`.
        max_key_spans (`int`, *optional*, defaults to `3`):
            Most key steps asked for in a correct rollout.
        chat_template_kwargs (`dict`, *optional*):
            Applied on top of the trainer's `chat_template_kwargs` for annotation prompts only, e.g.
            `{"enable_thinking": False}` to keep a Qwen3 policy's annotations short.
        span_format (`str`, *optional*, defaults to `"segments"`):
            `"segments"` (numbered segments, the paper's protocol) or `"quotes"`; see `OpenAIAnnotator`.
        max_segment_chars (`int`, *optional*, defaults to `300`):
            `"segments"` only: lines longer than this are split at sentence ends (`segments.split_segments`).
        structured_output (`bool`, *optional*, defaults to `True`):
            With vLLM (colocate), constrain each answer (vLLM structured outputs) to the protocol's JSON, the schema
            `OpenAIAnnotator` sends as `response_format`, written compactly and narrowed to the rollout's own segment
            numbers and its kind's labels: every answer parses and is short, even from a policy never taught the
            format. Hugging Face `generate` has no such constraint and ignores it.
    """

    def __init__(
        self,
        *,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        batch_size: int = 8,
        prompt_template: str | None = None,
        system_prompt: str | None = None,
        max_key_spans: int = 3,
        chat_template_kwargs: dict[str, Any] | None = None,
        span_format: str = "segments",
        max_segment_chars: int = DEFAULT_MAX_SEGMENT_CHARS,
        structured_output: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.batch_size = batch_size
        self.prompt_template = validate_template(prompt_template) if prompt_template is not None else None
        self.system_prompt = system_prompt
        self.max_key_spans = max_key_spans
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.span_format = check_span_format(span_format)
        check_max_segment_chars(max_segment_chars)
        self.max_segment_chars = max_segment_chars
        self.structured_output = structured_output
        self._trainer: TRACETrainer | None = None
        self._stats = AnnotatorStats()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(max_new_tokens={self.max_new_tokens}, temperature={self.temperature}, "
            f"batch_size={self.batch_size}, bound={self._trainer is not None})"
        )

    def __getstate__(self) -> dict[str, Any]:
        # Never drag the trainer (and the model) into a pickle or deep copy of the annotator; re-bind after loading.
        state = self.__dict__.copy()
        state["_trainer"] = None
        return state

    def bind(self, trainer: TRACETrainer) -> None:
        """Keep a handle on the trainer, whose policy and generation backend do the annotating."""
        self._trainer = trainer

    def metrics(self) -> dict[str, float]:
        """Running totals since creation, keys prefixed with `annotator/` (same keys as `OpenAIAnnotator`)."""
        return self._stats.as_dict()

    def reset_metrics(self) -> None:
        self._stats.reset()

    # --- annotation --------------------------------------------------------------------------------------------------

    def __call__(self, requests: Sequence[AnnotationRequest]) -> list[Annotation]:
        if self._trainer is None:
            raise RuntimeError(
                "SelfAnnotator is not bound to a trainer. Pass it as `TRACETrainer(..., annotator=SelfAnnotator())` "
                "(the trainer calls `annotator.bind(trainer)`), or call `bind(trainer)` yourself."
            )
        requests = list(requests)
        if not requests:
            return []
        built = [
            protocol_request(
                request,
                self.span_format,
                template=self.prompt_template,
                system_prompt=self.system_prompt,
                max_key_spans=self.max_key_spans,
                max_segment_chars=self.max_segment_chars,
            )
            for request in requests
        ]
        prompts = [item.messages for item in built]
        started = time.perf_counter()
        outputs: list[str] | None = None
        error = ""
        try:
            constraints = [_answer_constraint(r, item, self.max_key_spans) for r, item in zip(requests, built)]
            outputs = self._generate(prompts, constraints)
            if len(outputs) != len(requests):
                raise RuntimeError(f"generation returned {len(outputs)} texts for {len(requests)} prompts")
        except Exception as exc:  # noqa: BLE001 - one rank raising while the others go on would hang the run
            logger.warning(
                "Self-annotation generation failed (%s: %s); these rollouts train as GRPO.", type(exc).__name__, exc
            )
            outputs = None
            error = f"self-annotation generation failed: {type(exc).__name__}: {exc}"
        usage = {"latency_s": (time.perf_counter() - started) / len(requests)}
        if outputs is None:
            annotations = [Annotation.failure(error, usage=usage) for _ in requests]
        else:
            annotations = [
                self._parse(text, request, item, usage) for text, request, item in zip(outputs, requests, built)
            ]
        self._stats.add(requests=len(requests))
        for annotation in annotations:
            self._stats.record(annotation)
        return annotations

    @staticmethod
    def _parse(text: str, request: AnnotationRequest, built: ProtocolRequest, usage: dict[str, float]) -> Annotation:
        try:
            return parse_protocol_answer(text, request, built, usage=usage)
        except AnnotationParseError as exc:
            return Annotation.failure(f"unparseable self-annotation: {exc}", usage=usage)

    def _generate(self, prompts: list[AnnotatorPrompt], constraints: list[dict[str, Any]] | None = None) -> list[str]:
        """One answer text per prompt (chat messages or plain text), from vLLM colocate or HF `generate`;
        `constraints` (one `_answer_constraint` per prompt) bind vLLM's answers when `structured_output` is on."""
        trainer = self._trainer
        texts = [self._render(prompt) for prompt in prompts]
        generation = getattr(trainer, "vllm_generation", None)
        if getattr(trainer, "use_vllm", False) and getattr(generation, "llm", None) is not None:
            return self._generate_vllm(texts, constraints if self.structured_output else None)
        return self._generate_hf(texts)

    @property
    def _tokenizer(self) -> Any:
        processing_class = self._trainer.processing_class
        # A multimodal processor wraps the tokenizer.
        return getattr(processing_class, "tokenizer", processing_class)

    def _render(self, prompt: AnnotatorPrompt) -> str:
        """The annotation prompt as text, through the policy's chat template and the trainer's template kwargs."""
        if isinstance(prompt, str):
            return prompt
        tokenizer = self._tokenizer
        if getattr(tokenizer, "chat_template", None) is None:  # a base model: plain text
            return "\n\n".join(message["content"] for message in prompt) + "\n\n"
        kwargs = {**(getattr(self._trainer, "chat_template_kwargs", None) or {}), **self.chat_template_kwargs}
        try:
            return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **kwargs)
        except Exception:  # noqa: BLE001 - some templates (e.g. Gemma's) reject a system role: merge it into the user turn
            merged = [{"role": "user", "content": "\n\n".join(message["content"] for message in prompt)}]
            return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True, **kwargs)

    def _vllm_sampling_params(self, constraint: dict[str, Any] | None = None) -> Any:
        from vllm import SamplingParams

        structured = None
        if constraint is not None:
            from vllm.sampling_params import StructuredOutputsParams

            structured = StructuredOutputsParams(**constraint)
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.max_new_tokens,
            n=1,
            structured_outputs=structured,
        )

    def _generate_vllm(self, texts: list[str], constraints: list[dict[str, Any]] | None = None) -> list[str]:
        generation = self._trainer.vllm_generation
        llm = generation.llm
        tokenizer = self._tokenizer
        prompts = [{"prompt_token_ids": tokenizer(text, add_special_tokens=False)["input_ids"]} for text in texts]
        sleep_mode = bool(getattr(generation, "enable_sleep_mode", False))
        if sleep_mode:
            # TRL puts the engine to sleep (level 2: weights discarded) after each generation; bring it back.
            if getattr(generation, "_llm_weights_sleeping", False):
                generation.sync_weights()
            llm.wake_up(tags=["kv_cache"])
        if constraints is None:
            prompts, own = _gather_tensor_parallel(generation, prompts)
            sampling_params = self._vllm_sampling_params()
        else:  # one set of sampling parameters per prompt, gathered with it under tensor parallelism
            pairs, own = _gather_tensor_parallel(generation, list(zip(prompts, constraints)))
            prompts = [prompt for prompt, _ in pairs]
            sampling_params = [self._vllm_sampling_params(constraint) for _, constraint in pairs]
        try:
            outputs = llm.generate(prompts, sampling_params, use_tqdm=False)
        finally:
            if sleep_mode:
                llm.sleep(level=2)
                generation._llm_weights_sleeping = True
        return [output.outputs[0].text if output.outputs else "" for output in outputs[own]]

    def _generate_hf(self, texts: list[str]) -> list[str]:
        import torch
        from transformers import GenerationConfig

        trainer = self._trainer
        tokenizer = self._tokenizer
        model = trainer.accelerator.unwrap_model(trainer.model)
        sampling = self.temperature > 0
        eos_token_id = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
        config = GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=sampling,
            temperature=self.temperature if sampling else None,
            top_p=self.top_p if sampling else None,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            eos_token_id=eos_token_id,
        )
        padding_side, was_training = tokenizer.padding_side, model.training
        tokenizer.padding_side = "left"  # generation continues from the right edge of every row
        model.eval()
        outputs: list[str] = []
        try:
            with torch.no_grad():
                for i in range(0, len(texts), self.batch_size):
                    batch = tokenizer(
                        texts[i : i + self.batch_size], return_tensors="pt", padding=True, add_special_tokens=False
                    ).to(trainer.accelerator.device)
                    generated = model.generate(**batch, generation_config=config)
                    new_tokens = generated[:, batch["input_ids"].shape[1] :]
                    outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        finally:
            tokenizer.padding_side = padding_side
            model.train(was_training)
        return outputs


# Most entries a constrained answer about an incorrect rollout may list (the prompt asks for the localized error,
# "usually one segment"); a correct rollout's answer may list `max_key_spans`, as its prompt asks.
MAX_CONSTRAINED_ERROR_SEGMENTS = 8


def _answer_constraint(request: AnnotationRequest, built: ProtocolRequest, max_key_spans: int) -> dict[str, Any]:
    """What vLLM's structured outputs must hold an answer about `request` to (`StructuredOutputsParams` fields).

    Segment protocol: a regular expression for the compact JSON of the protocol's schema, narrowed to this rollout's
    segment numbers, its kind and its kind's labels, with at most as many entries as there are segments and as the
    prompt asks for (`max_key_spans`, `MAX_CONSTRAINED_ERROR_SEGMENTS`), so that a constrained model can neither name a
    segment that does not exist nor write an endless list, number or run of whitespace (a JSON schema would leave
    whitespace free: vLLM sets that per engine, not per request). Quote protocol: its JSON schema (quotes are free
    text).
    """
    if built.segments is None:
        return {"json": RESPONSE_SCHEMA["schema"]}
    schema = segment_response_schema(request.is_correct)["schema"]
    kind = schema["properties"]["segments"]["items"]["properties"]["kind"]["enum"][0]
    labels = "|".join(re.escape(json.dumps(label)) for label in schema["properties"]["type"]["enum"])
    numbers = [segment.index for segment in built.segments]
    entries = ""
    if numbers:
        entry = r'\{"id":(' + "|".join(str(n) for n in numbers) + r'),"kind":' + re.escape(json.dumps(kind)) + r"\}"
        most = min(len(numbers), max_key_spans if request.is_correct else MAX_CONSTRAINED_ERROR_SEGMENTS)
        entries = f"({entry}(,{entry}){{0,{most - 1}}})?" if most > 0 else ""
    return {"regex": r'\{"segments":\[' + entries + r'\],"type":(' + labels + r")\}"}


def _gather_tensor_parallel(generation: Any, prompts: list[Any]) -> tuple[list[Any], slice]:
    """All the prompts of this process's vLLM tensor-parallel group, and the slice of the outputs that are this rank's.

    With `vllm_tensor_parallel_size > 1` the ranks of a group share one colocated engine, which must be called with the
    same prompts on every rank (TRL's own generation gathers them the same way); each rank then keeps its own answers.
    Ranks may hold different numbers of requests.
    """
    size = int(getattr(generation, "tensor_parallel_size", 1) or 1)
    if size <= 1:
        return prompts, slice(0, len(prompts))
    import torch.distributed as dist

    group = generation.tp_group
    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, prompts, group=group)
    rank = dist.get_rank(group=group)
    start = sum(len(part) for part in gathered[:rank])
    return [p for part in gathered for p in part], slice(start, start + len(prompts))
