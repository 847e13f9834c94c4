"""`OpenAIAnnotator`: the paper's "strong API" annotator, for any OpenAI-compatible chat-completions server.

It works with OpenAI itself and with the OpenAI-compatible servers of vLLM, SGLang and Ollama. Requests go out
concurrently through the `openai` client's async API, bounded by `max_concurrency`; retries (HTTP 429/5xx, timeouts,
dropped connections) are ours, with exponential backoff and jitter, so they can be counted; answers are cached on
disk so that a rerun or a resumed run never pays twice. Install with `pip install trace-trl[openai]`.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import Annotation, AnnotationRequest
from .cache import AnnotationCache, request_cache_key
from .parsing import AnnotationParseError, AnnotatorStats
from .prompts import (
    RESPONSE_SCHEMA,
    prompt_fingerprint,
    segment_prompt_fingerprint,
    segment_response_schema,
    validate_template,
)
from .protocol import SEGMENT_REASK_MESSAGE, check_span_format, parse_protocol_answer, protocol_request
from .segments import DEFAULT_MAX_SEGMENT_CHARS, check_max_segment_chars


if TYPE_CHECKING:
    import openai

logger = logging.getLogger(__name__)

# Sent when no key is configured: local servers (vLLM, SGLang, Ollama) need none, but the client insists on one.
PLACEHOLDER_API_KEY = "EMPTY"
REASK_MESSAGE = (
    "Your answer was not a valid JSON object of the requested form. Answer again with only the JSON object: "
    '{"spans": [{"quote": "...", "kind": "key" or "error"}], "diagnosis": "<label>" or null}'
)
_RETRYABLE_STATUS = frozenset({408, 409, 425, 429})


class OpenAIAnnotator:
    """Annotate rollouts with a model behind an OpenAI-compatible chat-completions endpoint.

    Calling the annotator is synchronous (the trainer calls it once per generation batch on every rank); inside a
    running event loop (e.g. Jupyter) the requests run in a worker thread. `acall` is the async equivalent.

    Args:
        model (`str`):
            Model name as the server knows it (e.g. `"gpt-4.1-mini"`, or the path a vLLM server was started with).
        base_url (`str`, *optional*):
            Server URL, e.g. `"http://localhost:8000/v1"`. Defaults to OpenAI (or `OPENAI_BASE_URL`).
        api_key (`str`, *optional*):
            The API key. Defaults to the environment variable `api_key_env`; when neither is set, a placeholder
            (`"EMPTY"`) is sent, which local servers accept. The key is never logged, shown by `repr`, written to
            the cache or pickled.
        api_key_env (`str`, *optional*, defaults to `"OPENAI_API_KEY"`):
            Environment variable that holds the key.
        max_concurrency (`int`, *optional*, defaults to `16`):
            Most requests in flight at once (per process).
        timeout (`float`, *optional*, defaults to `60.0`):
            Seconds allowed for one request (one attempt).
        max_retries (`int`, *optional*, defaults to `3`):
            Retries after the first attempt, on HTTP 408/409/425/429/5xx, timeouts and connection errors. After the
            last one the rollout gets a failed annotation (it trains as pure GRPO).
        backoff_base (`float`, *optional*, defaults to `1.0`):
            Backoff before retry `k` (from 0) is `backoff_base * 2**k` seconds, times a random jitter in [0.5, 1],
            capped at `backoff_max`. A `Retry-After` header replaces it, also capped at `backoff_max`.
        backoff_max (`float`, *optional*, defaults to `30.0`):
            Longest wait between two attempts.
        cache_dir (`str` or `Path`, *optional*):
            Folder of a persistent SQLite cache of successful annotations, safe to share between processes.
        prompt_template (`str`, *optional*):
            User-message template replacing `prompts.DEFAULT_TEMPLATE`; needs `{problem}`, `{rollout}`, `{verdict}`
            and `{task}`, may use `{reference}`.
        system_prompt (`str`, *optional*):
            System message replacing `prompts.SYSTEM_PROMPT`.
        max_key_spans (`int`, *optional*, defaults to `3`):
            Most key steps asked for in a correct rollout.
        temperature (`float`, *optional*, defaults to `0.0`):
            Sampling temperature of the annotator.
        max_tokens (`int`, *optional*, defaults to `1024`):
            Most tokens in the annotator's answer.
        use_json_schema (`bool`, *optional*, defaults to `True`):
            Send `response_format={"type": "json_schema", ...}`. A server that rejects it (HTTP 400 mentioning
            `response_format` or `json_schema`) is asked again without it, and never again with it.
        reask_on_malformed (`bool`, *optional*, defaults to `False`):
            When an answer holds no usable JSON, ask once more (showing the model its answer) before failing.
        extra_body (`dict`, *optional*):
            Extra request fields, e.g. `{"chat_template_kwargs": {"enable_thinking": False}}` for a vLLM server.
        span_format (`str`, *optional*, defaults to `"segments"`):
            `"segments"` (the paper's protocol): the rollout is shown as numbered segments and the model answers
            segment numbers, their kind and a type label from the taxonomy (`annotators.taxonomy`); `"quotes"`: the
            model quotes the rollout verbatim (prompt `trace-annotator-v1`, unchanged). See `annotators.protocol`.
        max_segment_chars (`int`, *optional*, defaults to `300`):
            `"segments"` only: lines longer than this are split at sentence ends (`segments.split_segments`).
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        max_concurrency: int = 16,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff_base: float = 1.0,
        backoff_max: float = 30.0,
        cache_dir: str | os.PathLike[str] | None = None,
        prompt_template: str | None = None,
        system_prompt: str | None = None,
        max_key_spans: int = 3,
        temperature: float = 0.0,
        max_tokens: int = 1024,
        use_json_schema: bool = True,
        reask_on_malformed: bool = False,
        extra_body: dict[str, Any] | None = None,
        span_format: str = "segments",
        max_segment_chars: int = DEFAULT_MAX_SEGMENT_CHARS,
    ) -> None:
        try:
            import openai  # noqa: F401
        except ImportError as exc:
            raise ImportError("OpenAIAnnotator needs the `openai` package: pip install 'trace-trl[openai]'.") from exc
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}.")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}.")
        self.model = model
        self.base_url = base_url
        self.api_key_env = api_key_env
        self._api_key = api_key if api_key is not None else os.environ.get(api_key_env)
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.prompt_template = validate_template(prompt_template) if prompt_template is not None else None
        self.system_prompt = system_prompt
        self.max_key_spans = max_key_spans
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.use_json_schema = use_json_schema
        self.reask_on_malformed = reask_on_malformed
        self.extra_body = dict(extra_body or {})
        self.span_format = check_span_format(span_format)
        check_max_segment_chars(max_segment_chars)
        self.max_segment_chars = max_segment_chars
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._cache = AnnotationCache(self.cache_dir) if self.cache_dir is not None else None
        # Flipped off for good the first time the server rejects structured outputs.
        self._json_schema_supported = True
        self._stats = AnnotatorStats()

    # --- what may and may not leave the process ------------------------------------------------------------------

    def __repr__(self) -> str:
        key = "<set>" if self._api_key else "<unset>"
        return (
            f"{type(self).__name__}(model={self.model!r}, base_url={self.base_url!r}, api_key={key}, "
            f"max_concurrency={self.max_concurrency}, timeout={self.timeout}, max_retries={self.max_retries}, "
            f"cache_dir={str(self.cache_dir) if self.cache_dir else None!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        # Pickles and deep copies (of the trainer, of a config) must not carry the key: it is re-read from the
        # environment on unpickling.
        state = self.__dict__.copy()
        state.pop("_api_key", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._api_key = os.environ.get(self.api_key_env)

    @property
    def config_fingerprint(self) -> str:
        """Everything the answer depends on besides the request; hashed into every cache key. Holds no secret.

        The quote protocol's fingerprint is exactly what it was before `span_format` existed, so its cache stays valid.
        """
        if self.span_format == "segments":
            return json.dumps(
                {
                    "model": self.model,
                    "span_format": self.span_format,
                    "prompt": segment_prompt_fingerprint(
                        self.prompt_template, self.system_prompt, self.max_key_spans, self.max_segment_chars
                    ),
                    "temperature": self.temperature,
                    "max_tokens": self.max_tokens,
                    "schema": [segment_response_schema(True), segment_response_schema(False)]
                    if self.use_json_schema
                    else None,
                    "extra_body": self.extra_body,
                },
                sort_keys=True,
                default=str,
            )
        return json.dumps(
            {
                "model": self.model,
                "prompt": prompt_fingerprint(self.prompt_template, self.system_prompt, self.max_key_spans),
                "temperature": self.temperature,
                "max_tokens": self.max_tokens,
                "schema": RESPONSE_SCHEMA if self.use_json_schema else None,
                "extra_body": self.extra_body,
            },
            sort_keys=True,
            default=str,
        )

    # --- metrics ---------------------------------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """Running totals since creation (or `reset_metrics`), keys prefixed with `annotator/`.

        `requests`, `cache_hits`, `api_calls`, `retries`, `failures`, `spans`, `dropped_spans`, `prompt_tokens`,
        `completion_tokens`, `json_schema_fallbacks` and `latency_s_mean` (per annotation not served from the cache,
        retries included).
        """
        return self._stats.as_dict()

    def reset_metrics(self) -> None:
        self._stats.reset()

    # --- annotation --------------------------------------------------------------------------------------------------

    def __call__(self, requests: Sequence[AnnotationRequest]) -> list[Annotation]:
        requests = list(requests)
        if not requests:
            return []
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.acall(requests))
        # Called from inside an event loop (Jupyter): run ours in a worker thread rather than nest loops.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="trace-annotator") as pool:
            return pool.submit(asyncio.run, self.acall(requests)).result()

    async def acall(self, requests: Sequence[AnnotationRequest]) -> list[Annotation]:
        """Annotate `requests` concurrently; one annotation per request, in order. Never raises for a bad answer."""
        requests = list(requests)
        fingerprint = self.config_fingerprint
        keys = [request_cache_key(fingerprint, request) for request in requests]
        results: dict[str, Annotation] = await asyncio.to_thread(self._cache_get, keys)
        # Identical rollouts (common for short answers) are asked about once.
        todo = {key: request for key, request in zip(keys, requests) if key not in results}
        if todo:
            client = self._make_client()
            try:
                semaphore = asyncio.Semaphore(self.max_concurrency)
                fresh = await asyncio.gather(*(self._annotate_one(client, semaphore, r) for r in todo.values()))
            finally:
                await client.close()
            results.update(zip(todo, fresh))
            await asyncio.to_thread(self._cache_put, [(key, results[key]) for key in todo])
        annotations = [results[key] for key in keys]
        self._stats.add(requests=len(annotations))
        counted: set[str] = set()
        for key, annotation in zip(keys, annotations):
            # A duplicate within the batch was paid for once: count its tokens and latency once.
            self._stats.record(annotation, count_usage=key not in counted)
            counted.add(key)
        return annotations

    def _make_client(self) -> openai.AsyncOpenAI:
        import openai

        # The client's own retries are off: ours are counted, jittered and honour Retry-After with a cap.
        return openai.AsyncOpenAI(
            api_key=self._api_key or PLACEHOLDER_API_KEY,
            base_url=self.base_url,
            timeout=self.timeout,
            max_retries=0,
        )

    def _cache_get(self, keys: list[str]) -> dict[str, Annotation]:
        if self._cache is None:
            return {}
        try:
            return self._cache.get_many(keys)
        except Exception as exc:  # a broken cache must not stop training: annotate afresh
            logger.warning("Annotation cache read failed (%s); annotating without it.", type(exc).__name__)
            return {}

    def _cache_put(self, items: list[tuple[str, Annotation]]) -> None:
        if self._cache is None:
            return
        try:
            self._cache.put_many(items)
        except Exception as exc:
            logger.warning("Annotation cache write failed (%s); these annotations are not cached.", type(exc).__name__)

    def _request_kwargs(
        self, messages: list[dict[str, str]], with_schema: bool, schema: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "timeout": self.timeout,
        }
        if with_schema:
            kwargs["response_format"] = {"type": "json_schema", "json_schema": schema or RESPONSE_SCHEMA}
        if self.extra_body:
            kwargs["extra_body"] = self.extra_body
        return kwargs

    async def _annotate_one(
        self, client: openai.AsyncOpenAI, semaphore: asyncio.Semaphore, request: AnnotationRequest
    ) -> Annotation:
        import openai

        built = protocol_request(
            request,
            self.span_format,
            template=self.prompt_template,
            system_prompt=self.system_prompt,
            max_key_spans=self.max_key_spans,
            max_segment_chars=self.max_segment_chars,
        )
        messages = built.messages
        schema = segment_response_schema(request.is_correct) if built.segments is not None else None
        started = time.perf_counter()
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "attempts": 0}
        retries = 0
        reasked = False
        while True:
            with_schema = self.use_json_schema and self._json_schema_supported
            usage["attempts"] += 1
            self._stats.add(api_calls=1)
            try:
                async with semaphore:
                    # `wait_for` bounds the whole attempt; the client's timeout alone resets on every byte received.
                    response = await asyncio.wait_for(
                        client.chat.completions.create(**self._request_kwargs(messages, with_schema, schema)),
                        timeout=self.timeout,
                    )
            except openai.BadRequestError as exc:
                if with_schema and _mentions_structured_output(exc):
                    self._json_schema_supported = False
                    self._stats.add(json_schema_fallbacks=1)
                    logger.warning("The annotator server rejected response_format=json_schema; using plain text.")
                    continue
                return self._failure(f"HTTP 400 from the annotator server: {_short(exc)}", usage, started)
            except (openai.APIStatusError, openai.APIConnectionError, asyncio.TimeoutError) as exc:
                if not _is_retryable(exc) or retries >= self.max_retries:
                    return self._failure(
                        f"{_describe(exc)} (after {usage['attempts']} attempt(s)): {_short(exc)}", usage, started
                    )
                delay = self._backoff(retries, exc)
                retries += 1
                self._stats.add(retries=1)
                logger.debug("Annotator request failed with %s; retry %d in %.2fs.", _describe(exc), retries, delay)
                await asyncio.sleep(delay)
                continue

            if response.usage is not None:
                usage["prompt_tokens"] += response.usage.prompt_tokens or 0
                usage["completion_tokens"] += response.usage.completion_tokens or 0
            text = (response.choices[0].message.content or "") if response.choices else ""
            try:
                return parse_protocol_answer(text, request, built, usage=self._usage(usage, started))
            except AnnotationParseError as exc:
                if self.reask_on_malformed and not reasked:
                    reasked = True
                    messages = [
                        *messages,
                        {"role": "assistant", "content": text},
                        {"role": "user", "content": REASK_MESSAGE if schema is None else SEGMENT_REASK_MESSAGE},
                    ]
                    continue
                return self._failure(f"malformed annotation: {exc}", usage, started)

    def _backoff(self, retry: int, exc: BaseException) -> float:
        retry_after = _retry_after_seconds(exc)
        if retry_after is not None:
            return min(self.backoff_max, retry_after)
        return min(self.backoff_max, self.backoff_base * 2**retry) * random.uniform(0.5, 1.0)

    @staticmethod
    def _usage(usage: dict[str, int], started: float) -> dict[str, float]:
        return {**usage, "latency_s": time.perf_counter() - started}

    def _failure(self, error: str, usage: dict[str, int], started: float) -> Annotation:
        logger.debug("Annotation failed: %s", error)
        return Annotation.failure(error, usage=self._usage(usage, started))


def _is_retryable(exc: BaseException) -> bool:
    import openai

    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in _RETRYABLE_STATUS or exc.status_code >= 500
    # Timeouts (ours and the client's) and connection errors (refused, reset, closed without an answer).
    return isinstance(exc, (openai.APIConnectionError, asyncio.TimeoutError))


def _describe(exc: BaseException) -> str:
    import openai

    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code} from the annotator server"
    if isinstance(exc, (openai.APITimeoutError, asyncio.TimeoutError)):
        return "annotator request timed out"
    return "connection to the annotator server failed"


def _mentions_structured_output(exc: BaseException) -> bool:
    text = f"{exc} {getattr(exc, 'body', '')}".lower()
    return "response_format" in text or "json_schema" in text or "response format" in text


def _retry_after_seconds(exc: BaseException) -> float | None:
    """Seconds asked for by `Retry-After` / `retry-after-ms` on an HTTP error, or `None`."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    milliseconds = headers.get("retry-after-ms")
    if milliseconds:
        try:
            return max(0.0, float(milliseconds) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        date = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, date.timestamp() - time.time())


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."
