"""`OpenAIAnnotator`: the paper's "strong API" annotator, for any OpenAI-compatible chat-completions server.

It works with OpenAI itself and with the OpenAI-compatible servers of vLLM, SGLang and Ollama. Requests go out
concurrently through the `openai` client's async API, bounded by `max_concurrency`; retries (HTTP 429/5xx, timeouts,
dropped connections) are ours, with exponential backoff and jitter, so they can be counted; answers are cached on
disk so that a rerun or a resumed run never pays twice. Install with `pip install trace-trl[openai]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import os
import random
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import Annotation, AnnotationRequest, AnnotatorPreflightError
from .cache import AnnotationCache, request_cache_key
from .parsing import MAX_ANSWER_CHARS, AnnotationParseError, AnnotatorStats, AnswerTooLongError, strip_think_blocks
from .prompts import (
    RESPONSE_SCHEMA,
    prompt_fingerprint,
    segment_prompt_fingerprint,
    segment_response_schema,
    validate_template,
)
from .protocol import SEGMENT_REASK_MESSAGE, check_span_format, parse_protocol_answer, protocol_request
from .redaction import redact
from .responses import BadResponseError, ChatAnswer, read_chat_completion  # noqa: F401 (ChatAnswer: re-exported)
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
TOKEN_LIMIT_PARAMS: tuple[str, ...] = ("max_tokens", "max_completion_tokens")
# The rollout `OpenAIAnnotator.preflight` asks about: small (a few hundred prompt tokens), correct, with a key step.
PREFLIGHT_REQUEST = AnnotationRequest(
    prompt="What is 17 + 25?",
    completion="We add the units: 7 + 5 = 12, write 2 and carry 1.\nThen the tens: 1 + 2 + 1 = 4.\nSo the answer is "
    "\\boxed{42}.",
    is_correct=True,
    reward=1.0,
    privileged_context="17 + 25 = 42.",
)


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
        temperature (`float` or `None`, *optional*, defaults to `0.0`):
            Sampling temperature of the annotator; `None` sends no `temperature` (the server's default). OpenAI's
            reasoning models (o-series, gpt-5) reject any value but their default: use `None` for them.
        max_tokens (`int` or `None`, *optional*, defaults to `1024`):
            Most tokens in the annotator's answer, sent under the name `token_limit_param`; `None` sends no limit.
            A reasoning model's hidden reasoning counts against it: give such models several thousand.
        token_limit_param (`str`, *optional*, defaults to `"max_tokens"`):
            Request field that carries `max_tokens`: `"max_tokens"` (every OpenAI-compatible server) or
            `"max_completion_tokens"` (what OpenAI documents, and the only one its reasoning models accept).
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
        max_answer_chars (`int`, *optional*, defaults to `parsing.MAX_ANSWER_CHARS` (200,000)):
            Longest answer read; a longer one fails that rollout (`answer_too_long`, counted in
            `annotator/answers_too_long`) without being parsed, which bounds the time one runaway answer can take.
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
        temperature: float | None = 0.0,
        max_tokens: int | None = 1024,
        token_limit_param: str = "max_tokens",
        use_json_schema: bool = True,
        reask_on_malformed: bool = False,
        extra_body: dict[str, Any] | None = None,
        span_format: str = "segments",
        max_segment_chars: int = DEFAULT_MAX_SEGMENT_CHARS,
        max_answer_chars: int = MAX_ANSWER_CHARS,
    ) -> None:
        try:
            import openai  # noqa: F401
        except ImportError as exc:
            raise ImportError("OpenAIAnnotator needs the `openai` package: pip install 'trace-trl[openai]'.") from exc
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}.")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}.")
        if max_answer_chars < 1:
            raise ValueError(f"max_answer_chars must be >= 1, got {max_answer_chars}.")
        if token_limit_param not in TOKEN_LIMIT_PARAMS:
            raise ValueError(
                f"token_limit_param must be one of {', '.join(TOKEN_LIMIT_PARAMS)}, got {token_limit_param!r}."
            )
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
        ):
            raise ValueError(f"max_tokens must be a positive integer or None (no limit sent), got {max_tokens!r}.")
        if temperature is not None and not 0.0 <= float(temperature) <= 2.0:
            raise ValueError(f"temperature must be in [0, 2] or None (not sent), got {temperature!r}.")
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
        self.token_limit_param = token_limit_param
        self.use_json_schema = use_json_schema
        self.reask_on_malformed = reask_on_malformed
        self.extra_body = dict(extra_body or {})
        self.span_format = check_span_format(span_format)
        check_max_segment_chars(max_segment_chars)
        self.max_segment_chars = max_segment_chars
        self.max_answer_chars = max_answer_chars
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._cache = AnnotationCache(self.cache_dir) if self.cache_dir is not None else None
        # Flipped off for good the first time the server rejects structured outputs.
        self._json_schema_supported = True
        # Set (and warned about, once) the first time an answer to a request with response_format is not JSON.
        self._structured_output_ignored = False
        self._stats = AnnotatorStats()
        # The annotator's own event loop and the client that lives in it (made on the first call).
        self._runner: _LoopThread | None = None
        self._client: openai.AsyncOpenAI | None = None

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
        # A thread, its loop and open connections cannot be copied: a copy makes its own on first use.
        state["_runner"], state["_client"] = None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._api_key = os.environ.get(self.api_key_env)
        self.__dict__.setdefault("max_answer_chars", MAX_ANSWER_CHARS)
        self.__dict__.setdefault("_structured_output_ignored", False)
        self.__dict__.setdefault("token_limit_param", "max_tokens")
        self.__dict__.setdefault("_runner", None)
        self.__dict__.setdefault("_client", None)

    def redact(self, text: str) -> str:
        """`text` without the API key (or a fragment of it) or any other credential; see `redaction.redact`."""
        return redact(text, [self._api_key])

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
                    **self._limit_fingerprint(),
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
                **self._limit_fingerprint(),
            },
            sort_keys=True,
            default=str,
        )

    def _limit_fingerprint(self) -> dict[str, str]:
        # Only a non-default name enters the fingerprint, so caches written before the option existed stay valid.
        limit = getattr(self, "token_limit_param", "max_tokens")
        return {} if limit == "max_tokens" else {"token_limit_param": limit}

    # --- metrics ---------------------------------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """Running totals since creation (or `reset_metrics`), keys prefixed with `annotator/`.

        `requests`, `cache_hits`, `api_calls`, `retries`, `failures` (of which `invalid_responses`, `format_failures`
        and `answers_too_long`), `spans`, `dropped_spans`, `prompt_tokens`, `completion_tokens`,
        `json_schema_fallbacks`, `latency_s_mean` (per annotation not served from the cache, retries included), and
        `structured_output_ignored`: 1 once the server answered a request that carried `response_format` with
        something that is not JSON (it does not honour structured output), else 0.
        """
        metrics = self._stats.as_dict()
        metrics["annotator/structured_output_ignored"] = float(self._structured_output_ignored)
        return metrics

    def reset_metrics(self) -> None:
        self._stats.reset()

    # --- preflight ---------------------------------------------------------------------------------------------------

    def preflight(self) -> Annotation:
        """Send one annotation request (a tiny correct rollout, never cached or counted in `metrics()`) with this
        annotator's exact settings, and raise when the server cannot serve a run.

        Raises:
            `AnnotatorPreflightError`: the server is unreachable or times out (after the retries), answers something
            that is not a chat completion, or rejects the request (HTTP 4xx, e.g. a reasoning model refusing
            `temperature` or `max_tokens`); the message holds the (redacted) cause and what to do.

        An answer that arrives but is not a usable annotation only warns: the server works, the model's answers may
        still parse on real rollouts (see `annotator/format_failures` during training).
        """
        stats, self._stats = self._stats, AnnotatorStats()  # the check is not part of the run's totals
        try:
            annotation = self._run_in_own_loop(self._preflight_once())
        finally:
            self._stats = stats
        if not annotation.failed:
            return annotation
        usage = annotation.usage
        if usage.get("format_failures") or usage.get("answers_too_long"):
            logger.warning(
                "Annotator preflight: the server at %s answered, but not with a usable annotation (%s). Training "
                "starts; watch annotator/format_failures, and consider reask_on_malformed=True or another prompt.",
                self.base_url or "the OpenAI API",
                annotation.error,
            )
            return annotation
        raise AnnotatorPreflightError(
            f"The annotator server failed its one-request check before training (model {self.model!r} at "
            f"{self.base_url or 'the OpenAI API'}): {annotation.error}. Nothing was trained. Fix the server, "
            "`base_url`, model or request settings (reasoning models: `temperature=None`, "
            "`token_limit_param='max_completion_tokens'`); try it with `trace-trl annotate --limit 5`; or skip this "
            "check with `annotation_preflight=False`."
        )

    async def _preflight_once(self) -> Annotation:
        return await self._annotate_guarded(self._shared_client(), asyncio.Semaphore(1), PREFLIGHT_REQUEST)

    def _run_in_own_loop(self, coroutine: Any) -> Any:
        """Run `coroutine` in the annotator's own event loop (a daemon thread), whatever loop the caller runs (Jupyter)."""
        if self._runner is None or not self._runner.usable():
            self._runner, self._client = _LoopThread(), None  # after a fork the parent's loop thread is gone
        return self._runner.run(coroutine)

    # --- annotation --------------------------------------------------------------------------------------------------

    def __call__(self, requests: Sequence[AnnotationRequest]) -> list[Annotation]:
        requests = list(requests)
        if not requests:
            return []
        return self._run_in_own_loop(self._acall_with_shared_client(requests))

    async def _acall_with_shared_client(self, requests: list[AnnotationRequest]) -> list[Annotation]:
        return await self._acall(requests, self._shared_client())

    def _shared_client(self) -> openai.AsyncOpenAI:
        """The client of the annotator's own loop, made on first use. Building one costs a CA-bundle load (about 0.1
        s of CPU) and each call with a fresh one opened new connections (a TLS handshake each, to a remote API); it
        and its keep-alive connections now last across calls."""
        if self._client is None:
            self._client = self._make_client()
        return self._client

    def close(self) -> None:
        """Close the shared client and stop the annotator's event loop (both are made again if it is called again)."""
        runner, client = self._runner, self._client
        self._runner, self._client = None, None
        if runner is not None:
            runner.stop(client)

    async def acall(self, requests: Sequence[AnnotationRequest]) -> list[Annotation]:
        """Annotate `requests` concurrently; one annotation per request, in order. Never raises for a bad answer.

        Runs in the caller's event loop with a client of its own (closed at the end); the synchronous call instead
        reuses one client and its connections across calls, in the annotator's own loop.
        """
        return await self._acall(requests, None)

    async def _acall(
        self, requests: Sequence[AnnotationRequest], client: openai.AsyncOpenAI | None
    ) -> list[Annotation]:
        requests = list(requests)
        fingerprint = self.config_fingerprint
        keys = [request_cache_key(fingerprint, request) for request in requests]
        results: dict[str, Annotation] = await asyncio.to_thread(self._cache_get, keys)
        # Identical rollouts (common for short answers) are asked about once.
        todo = {key: request for key, request in zip(keys, requests) if key not in results}
        if todo:
            own = client is None
            client = self._make_client() if own else client
            try:
                semaphore = asyncio.Semaphore(self.max_concurrency)
                fresh = await asyncio.gather(*(self._annotate_guarded(client, semaphore, r) for r in todo.values()))
            finally:
                if own:
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
        kwargs: dict[str, Any] = {"model": self.model, "messages": messages, "timeout": self.timeout}
        # Omitted when `None`: reasoning models reject a non-default temperature and the `max_tokens` name.
        if self.temperature is not None:
            kwargs["temperature"] = self.temperature
        if self.max_tokens is not None:
            kwargs[self.token_limit_param] = self.max_tokens
        if with_schema:
            kwargs["response_format"] = {"type": "json_schema", "json_schema": schema or RESPONSE_SCHEMA}
        if self.extra_body:
            kwargs["extra_body"] = self.extra_body
        return kwargs

    async def _annotate_guarded(
        self, client: openai.AsyncOpenAI, semaphore: asyncio.Semaphore, request: AnnotationRequest
    ) -> Annotation:
        """`_annotate_one`, but no exception of one request escapes to fail the others of the batch.

        Only `Exception`s are caught: `KeyboardInterrupt` and `asyncio.CancelledError` still stop the call.
        """
        started = time.perf_counter()
        try:
            return await self._annotate_one(client, semaphore, request)
        except Exception as exc:
            error = self.redact(f"internal error while annotating ({type(exc).__name__}: {_short(exc)})")
            logger.warning("%s; this rollout trains as GRPO. Please report this as a trace-trl bug.", error)
            return Annotation.failure(error, usage=self._usage({"prompt_tokens": 0, "completion_tokens": 0}, started))

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
                    # The raw response: the client's own parsing raises, or returns a string, on a body that is not a
                    # chat completion; `read_chat_completion` turns every such body into this request's failure.
                    raw = await asyncio.wait_for(
                        client.chat.completions.with_raw_response.create(
                            **self._request_kwargs(messages, with_schema, schema)
                        ),
                        timeout=self.timeout,
                    )
                    body, content_type = raw.http_response.content, raw.headers.get("content-type")
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
                        f"{_describe(exc)} (after {usage['attempts']} attempt(s)): {_short(exc)}{self._fix_for(exc)}",
                        usage,
                        started,
                    )
                delay = self._backoff(retries, exc)
                retries += 1
                self._stats.add(retries=1)
                logger.debug("Annotator request failed with %s; retry %d in %.2fs.", _describe(exc), retries, delay)
                await asyncio.sleep(delay)
                continue

            try:
                answer = read_chat_completion(body, content_type)
            except BadResponseError as exc:
                return self._failure(
                    f"server answered HTTP 200 with a body that is not a chat completion: {exc}; check that base_url "
                    "points at an OpenAI-compatible chat-completions endpoint (a proxy or login page answers like this)",
                    usage,
                    started,
                    kind="invalid_responses",
                )
            usage["prompt_tokens"] += answer.prompt_tokens
            usage["completion_tokens"] += answer.completion_tokens
            text = answer.text
            try:
                return parse_protocol_answer(
                    text, request, built, usage=self._usage(usage, started), max_chars=self.max_answer_chars
                )
            except AnswerTooLongError as exc:
                return self._failure(str(exc), usage, started, kind="answers_too_long")
            except AnnotationParseError as exc:
                hint = ""
                if answer.finish_reason == "length":
                    hint = (
                        f" (the answer was cut at {self.token_limit_param}={self.max_tokens}: raise max_tokens; a "
                        "reasoning model's hidden reasoning counts against it)"
                    )
                elif with_schema and not strip_think_blocks(text).lstrip().startswith("{"):
                    self._note_structured_output_ignored()
                    hint = (
                        " (the server does not honour response_format: use a server that supports structured "
                        "output, a stricter prompt_template, or reask_on_malformed=True)"
                    )
                if self.reask_on_malformed and not reasked:
                    reasked = True
                    messages = [
                        *messages,
                        {"role": "assistant", "content": text},
                        {"role": "user", "content": REASK_MESSAGE if schema is None else SEGMENT_REASK_MESSAGE},
                    ]
                    continue
                return self._failure(f"malformed annotation: {exc}{hint}", usage, started, kind="format_failures")

    def _fix_for(self, exc: BaseException) -> str:
        """What to do about an HTTP error that retrying does not cure, as a suffix of the error text."""
        status = getattr(exc, "status_code", None)
        if status in (401, 403):
            return (
                f" (the server refused the credentials: put the right API key in ${self.api_key_env} or pass "
                "api_key=...)"
            )
        if status == 404:
            return f" (check base_url={self.base_url!r} and that the server serves model {self.model!r})"
        return ""

    def _note_structured_output_ignored(self) -> None:
        if self._structured_output_ignored:
            return
        self._structured_output_ignored = True
        logger.warning(
            "The annotator server (model %r) does not honour response_format=json_schema: it answered a structured-"
            "output request with text that is not JSON (as `transformers serve` does). Such answers fail their "
            "rollout (counted in annotator/format_failures; annotator/structured_output_ignored is 1). Use a server "
            "that supports structured output (vLLM, SGLang, OpenAI), a stricter prompt_template, or "
            "reask_on_malformed=True.",
            self.model,
        )

    def _backoff(self, retry: int, exc: BaseException) -> float:
        retry_after = _retry_after_seconds(exc)
        if retry_after is not None:
            return min(self.backoff_max, retry_after)
        return min(self.backoff_max, self.backoff_base * 2**retry) * random.uniform(0.5, 1.0)

    @staticmethod
    def _usage(usage: dict[str, int], started: float) -> dict[str, float]:
        return {**usage, "latency_s": time.perf_counter() - started}

    def _failure(self, error: str, usage: dict[str, int], started: float, kind: str | None = None) -> Annotation:
        # Servers echo what they were sent (a 401 quotes the key): no error text is stored or logged unredacted.
        error = self.redact(error)
        logger.debug("Annotation failed: %s", error)
        flags = {kind: 1} if kind is not None else {}
        return Annotation.failure(error, usage={**self._usage(usage, started), **flags})


async def _outcome(coroutine: Any) -> tuple[bool, Any]:
    try:
        return False, await coroutine
    except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, which raises it
        return True, exc


class _LoopThread:
    """An event loop running in a daemon thread, owned by one annotator: the synchronous API submits coroutines to it,
    so one HTTP client (and its keep-alive connections) serves every call, and a caller's own loop (Jupyter) is never
    nested."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._serve, name="trace-annotator", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        # asyncio re-raises a task's KeyboardInterrupt / SystemExit out of `run_forever` (after recording it on the
        # task, so the awaiting coroutine still sees it): keep the loop running for the caller waiting on it.
        while True:
            try:
                self.loop.run_forever()
                return  # stopped by `stop()`
            except BaseException:  # noqa: BLE001
                continue

    def usable(self) -> bool:
        return self.pid == os.getpid() and self.thread.is_alive() and not self.loop.is_closed()

    def run(self, coroutine: Any) -> Any:
        """`coroutine`'s result, or its exception raised here. Every exception, `KeyboardInterrupt` included, is caught
        in the loop and re-raised in the caller: one escaping `run_forever` would end the loop thread and leave the
        caller waiting forever. An interrupted caller cancels the coroutine."""
        future = asyncio.run_coroutine_threadsafe(_outcome(coroutine), self.loop)
        try:
            failed, value = future.result()
        except BaseException:
            future.cancel()
            raise
        if failed:
            raise value
        return value

    def stop(self, client: Any = None) -> None:
        if not self.usable():
            return
        if client is not None:
            with contextlib.suppress(Exception):
                self.run(client.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.loop.close()


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
