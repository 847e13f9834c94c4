"""Build an annotator from its name and settings: the one builder behind `trace-trl train` and `trace-trl annotate`.

Both commands name annotators the same way (`regex`, `all_tokens`, `random`, `openai`, ...; the hyphenated spelling
`all-tokens` is accepted too) and read the same settings, with the same defaults: one [`AnnotatorSettings`]
(`regex_key_patterns`, `annotator_model`, `random_seed`, ...). `trace-trl train` parses it as part of its script
arguments (a recipe's `annotator_*` keys); `trace-trl annotate` maps its own flags onto it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


ANNOTATORS: tuple[str, ...] = (
    "none",
    "regex",
    "all_tokens",
    "random",
    "random_like_openai",
    "random_like_self",
    "openai",
    "self",
    "inverted_openai",
    "inverted_self",
    "inverted_regex",
)
# Annotators that need the policy being trained (`bind(trainer)`), so only `trace-trl train` can run them.
NEEDS_TRAINER: frozenset[str] = frozenset({"self", "random_like_self", "inverted_self"})
# Annotators that talk to a server.
NEEDS_SERVER: frozenset[str] = frozenset({"openai", "random_like_openai", "inverted_openai"})
SPAN_FORMATS: tuple[str, ...] = ("segments", "quotes")
# Named patterns a recipe may use instead of a raw regular expression (see `RegexAnnotator`).
REGEX_CONSTANTS: tuple[str, ...] = ("BOXED", "BOXED_CONTENT", "EQUATION", "EQUALS_LINE", "ANSWER_LINE")


def canonical_annotator_name(name: str) -> str:
    """`name` with hyphens read as underscores (`all-tokens` -> `all_tokens`), checked against `ANNOTATORS`."""
    canonical = str(name).strip().replace("-", "_")
    if canonical not in ANNOTATORS:
        raise ValueError(f"Unknown annotator {name!r}: use one of {', '.join(ANNOTATORS)}.")
    return canonical


def annotator_choices() -> list[str]:
    """The names a command line accepts: `ANNOTATORS` and their hyphenated aliases."""
    aliases = [name.replace("_", "-") for name in ANNOTATORS if "_" in name]
    return [*ANNOTATORS, *aliases]


def regex_patterns(patterns: list[str] | tuple[str, ...] | None) -> list[str]:
    """Raw regular expressions, with `RegexAnnotator` constant names (`BOXED`, ...) replaced by their pattern."""
    from .annotators import RegexAnnotator

    return [getattr(RegexAnnotator, p) if p in REGEX_CONSTANTS else p for p in patterns or ()]


def _drop_none(**kwargs: Any) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


def text_or_file(value: str | None, name: str) -> str | None:
    """`value` itself, or the content of the file it names (a prompt template or system prompt given by path)."""
    if value is None:
        return None
    text = str(value)
    if "\n" not in text and len(text) < 4096:
        path = Path(text).expanduser()
        if path.is_file():
            return path.read_text(encoding="utf-8")
        if text.endswith((".txt", ".md", ".jinja", ".j2", ".tmpl")):
            raise ValueError(f"`{name}` names the file {text!r}, which does not exist.")
    return text


@dataclass
class AnnotatorSettings:
    r"""
    Which annotator a run uses and how it is configured: the settings [`build_annotator`] takes.

    `trace-trl train` reads them from a recipe or the command line (they are fields of its
    [`~trace_trl.scripts.train.TraceScriptArguments`]); `trace-trl annotate` from its flags; in Python,
    `build_annotator(AnnotatorSettings(annotator="regex"))`.

    Args:
        annotator (`str`, *optional*, defaults to `"none"`):
            `"regex"`, `"all_tokens"` (all-token self-OPD baseline), `"random"` (random spans), `"random_like_openai"`
            / `"random_like_self"` (the random-span control: the spans of that annotator moved to random places),
            `"openai"` (any OpenAI-compatible server), `"self"` (the policy annotates its own rollouts),
            `"inverted_openai"` / `"inverted_self"` / `"inverted_regex"` (the inverted control: `random_span_fraction`
            of each rollout outside that annotator's spans), or `"none"` (only with `kl_coef: 0`, i.e. GRPO).
            Hyphens read as underscores (`all-tokens`), as in `trace-trl annotate`, which builds annotators with the
            same names and defaults ([`~trace_trl.annotator_factory.build_annotator`]).
        annotator_span_format (`str`, *optional*, defaults to `"segments"`):
            Protocol of the `"openai"` and `"self"` annotators (and the controls built on them): `"segments"`
            (numbered segments, the paper's) or `"quotes"` (verbatim quotes).
        annotator_model, annotator_base_url, annotator_api_key_env, annotator_max_concurrency, annotator_timeout,
        annotator_max_retries, annotator_cache_dir, annotator_max_key_spans, annotator_temperature,
        annotator_max_tokens, annotator_extra_body, annotator_use_json_schema, annotator_max_answer_chars,
        annotator_send_temperature, annotator_token_limit_param, annotator_reask_on_malformed,
        annotator_prompt_template, annotator_system_prompt:
            Settings of the `"openai"` annotator. The key itself is read from the environment variable
            `annotator_api_key_env`; it is never a recipe field. For OpenAI's reasoning models (o-series, gpt-5):
            `annotator_send_temperature: false`, `annotator_token_limit_param: max_completion_tokens` and a larger
            `annotator_max_tokens` (their hidden reasoning counts against it). `annotator_prompt_template` and
            `annotator_system_prompt` are the text itself or the path of a file holding it.
        self_annotator_max_new_tokens, self_annotator_temperature, self_annotator_top_p, self_annotator_batch_size:
            Sampling settings of the `"self"` annotator (`None` keeps `SelfAnnotator`'s defaults).
        regex_key_patterns, regex_error_patterns (`list[str]`, *optional*, defaults to `["BOXED", "EQUATION"]` and `["BOXED"]`):
            Patterns of the `"regex"` annotator: raw regular expressions or names of `RegexAnnotator` constants. Key
            patterns mark correct rollouts, error patterns incorrect ones; the defaults route something under both
            presets (TRACE-FKL routes key spans, TRACE-RKL error spans: the wrong `\\boxed{}` answer).
        random_seed, random_span_fraction, random_num_spans:
            Settings of the random-span annotators; `random_seed` and `random_span_fraction` (default 0.25, the
            paper's 25%) also set the inverted controls.
        all_tokens_incorrect (`bool`, *optional*, defaults to `False`):
            `"all_tokens"` only: also give incorrect rollouts an all-token error span.
    """

    annotator: str = field(
        default="none",
        metadata={
            "help": "Span annotator: 'regex', 'all_tokens', 'random', 'random_like_openai', 'random_like_self', "
            "'openai', 'self', 'inverted_openai', 'inverted_self', 'inverted_regex', or 'none' (GRPO, kl_coef 0).",
            "choices": annotator_choices(),
        },
    )
    annotator_span_format: str = field(
        default="segments",
        metadata={
            "help": "'openai'/'self' annotator protocol: 'segments' (numbered segments, the paper's) or 'quotes'.",
            "choices": list(SPAN_FORMATS),
        },
    )
    annotator_model: str | None = field(
        default=None, metadata={"help": "'openai' annotator: model name as the server knows it."}
    )
    annotator_base_url: str | None = field(
        default=None,
        metadata={"help": "'openai' annotator: server URL, e.g. http://localhost:8000/v1 (None: OpenAI)."},
    )
    annotator_api_key_env: str = field(
        default="OPENAI_API_KEY",
        metadata={"help": "'openai' annotator: environment variable holding the API key (never put the key itself)."},
    )
    annotator_max_concurrency: int = field(
        default=16, metadata={"help": "'openai' annotator: most requests in flight per process."}
    )
    annotator_timeout: float = field(default=60.0, metadata={"help": "'openai' annotator: seconds per request."})
    annotator_max_retries: int = field(
        default=3, metadata={"help": "'openai' annotator: retries on 429/5xx/timeouts before a failed annotation."}
    )
    annotator_cache_dir: str | None = field(
        default=None, metadata={"help": "'openai' annotator: folder of a persistent cache of annotations."}
    )
    annotator_max_key_spans: int | None = field(
        default=None, metadata={"help": "'openai'/'self' annotator: most key steps asked for per correct rollout."}
    )
    annotator_temperature: float | None = field(
        default=None, metadata={"help": "'openai' annotator: sampling temperature of the annotator model."}
    )
    annotator_max_tokens: int | None = field(
        default=None, metadata={"help": "'openai' annotator: most tokens in the annotator's answer."}
    )
    annotator_extra_body: dict | str | None = field(
        default=None,
        metadata={
            "help": "'openai' annotator: extra request fields as a dict or JSON string, e.g. "
            '\'{"chat_template_kwargs": {"enable_thinking": false}}\' for a vLLM server.'
        },
    )
    annotator_use_json_schema: bool = field(
        default=True,
        metadata={"help": "'openai' annotator: send response_format=json_schema (false for servers that reject it)."},
    )
    annotator_max_answer_chars: int | None = field(
        default=None,
        metadata={
            "help": "'openai' annotator: longest answer read (None: 200000); longer ones fail as answer_too_long."
        },
    )
    annotator_send_temperature: bool = field(
        default=True,
        metadata={
            "help": "'openai' annotator: send `temperature` (false for OpenAI reasoning models, which reject any value "
            "but their default)."
        },
    )
    annotator_token_limit_param: str = field(
        default="max_tokens",
        metadata={
            "help": "'openai' annotator: request field of the answer-length limit: 'max_tokens', "
            "'max_completion_tokens' (OpenAI's, required by its reasoning models) or 'none' (send no limit).",
            "choices": ["max_tokens", "max_completion_tokens", "none"],
        },
    )
    annotator_reask_on_malformed: bool = field(
        default=False,
        metadata={"help": "'openai' annotator: when an answer holds no usable JSON, ask once more before failing."},
    )
    annotator_prompt_template: str | None = field(
        default=None,
        metadata={
            "help": "'openai' annotator: user-message template (the text, or a file holding it) replacing the default; "
            "see trace_trl.annotators.prompts."
        },
    )
    annotator_system_prompt: str | None = field(
        default=None,
        metadata={
            "help": "'openai' annotator: system message (the text, or a file holding it) replacing the default."
        },
    )
    self_annotator_max_new_tokens: int | None = field(
        default=None, metadata={"help": "'self' annotator: most new tokens of the policy's annotation."}
    )
    self_annotator_temperature: float | None = field(
        default=None, metadata={"help": "'self' annotator: sampling temperature (0 = greedy)."}
    )
    self_annotator_top_p: float | None = field(default=None, metadata={"help": "'self' annotator: top-p."})
    self_annotator_batch_size: int | None = field(
        default=None, metadata={"help": "'self' annotator: rollouts annotated per generate call."}
    )
    regex_key_patterns: list[str] = field(
        default_factory=lambda: ["BOXED", "EQUATION"],
        metadata={"help": f"'regex' annotator: key-span patterns (regexes or {', '.join(REGEX_CONSTANTS)})."},
    )
    regex_error_patterns: list[str] = field(
        # The wrong final answer: without an error pattern the regex smoke test routes nothing under TRACE-RKL.
        default_factory=lambda: ["BOXED"],
        metadata={
            "help": "'regex' annotator: error-span patterns of incorrect rollouts (regexes or RegexAnnotator constant "
            "names); the default marks the wrong \\boxed{} answer."
        },
    )
    random_seed: int = field(default=0, metadata={"help": "Random-span and inverted annotators: seed."})
    random_span_fraction: float = field(
        default=0.25,
        metadata={"help": "'random' and 'inverted_*' annotators: fraction of each completion's characters to cover."},
    )
    random_num_spans: int = field(default=1, metadata={"help": "'random' annotator: spans per rollout."})
    all_tokens_incorrect: bool = field(
        default=False,
        metadata={"help": "'all_tokens' annotator: also give incorrect rollouts an all-token error span."},
    )

    def __post_init__(self):
        try:
            self.annotator = canonical_annotator_name(self.annotator)  # `all-tokens` is `all_tokens`
        except ValueError as exc:
            raise ValueError(f"`annotator`: {exc}") from None
        if self.annotator_span_format not in SPAN_FORMATS:
            raise ValueError(
                f"`annotator_span_format` must be one of {', '.join(SPAN_FORMATS)}; got {self.annotator_span_format!r}."
            )
        if isinstance(self.annotator_extra_body, str):
            try:
                self.annotator_extra_body = json.loads(self.annotator_extra_body)
            except json.JSONDecodeError as exc:
                raise ValueError(f"`annotator_extra_body` must be a JSON object: {exc}") from exc
        if self.annotator_token_limit_param not in ("max_tokens", "max_completion_tokens", "none"):
            raise ValueError(
                "`annotator_token_limit_param` must be one of max_tokens, max_completion_tokens, none; got "
                f"{self.annotator_token_limit_param!r}."
            )
        for name in (
            "annotator_base_url",
            "annotator_cache_dir",
            "annotator_prompt_template",
            "annotator_system_prompt",
        ):
            if getattr(self, name) in ("None", "none", "null"):  # `--annotator_base_url None` on the command line
                setattr(self, name, None)

    @classmethod
    def from_attributes(cls, source: Any) -> AnnotatorSettings:
        """The settings held by `source`'s attributes of the same names (an `argparse.Namespace`, script arguments);
        an attribute that is missing or `None` where the field has a non-`None` default keeps the default."""
        values = {}
        for spec in fields(cls):
            value = getattr(source, spec.name, None)
            if value is not None:
                values[spec.name] = value
        return cls(**values)


def _openai(settings: AnnotatorSettings):
    from .annotators import OpenAIAnnotator

    if not settings.annotator_model:
        raise ValueError(
            "The 'openai' annotator needs `annotator_model` (the model name the server knows): "
            "`--annotator_model NAME` for `trace-trl train`, `--model NAME` for `trace-trl annotate`."
        )
    optional = _drop_none(
        max_key_spans=settings.annotator_max_key_spans,
        temperature=settings.annotator_temperature,
        max_tokens=settings.annotator_max_tokens,
        extra_body=settings.annotator_extra_body,
        max_answer_chars=settings.annotator_max_answer_chars,
    )
    if settings.annotator_api_key_env != "OPENAI_API_KEY":
        optional["api_key_env"] = settings.annotator_api_key_env
    if not settings.annotator_use_json_schema:
        optional["use_json_schema"] = False
    if not settings.annotator_send_temperature:
        optional["temperature"] = None
    limit = settings.annotator_token_limit_param
    if limit == "none":
        optional["max_tokens"] = None
    elif limit != "max_tokens":
        optional["token_limit_param"] = limit
    if settings.annotator_reask_on_malformed:
        optional["reask_on_malformed"] = True
    for field_name, keyword in (
        ("annotator_prompt_template", "prompt_template"),
        ("annotator_system_prompt", "system_prompt"),
    ):
        text = text_or_file(getattr(settings, field_name), field_name)
        if text is not None:
            optional[keyword] = text
    # No `api_key=`: the annotator reads it from the environment itself, so it never passes through the arguments.
    return OpenAIAnnotator(
        settings.annotator_model,
        base_url=settings.annotator_base_url,
        max_concurrency=settings.annotator_max_concurrency,
        timeout=settings.annotator_timeout,
        max_retries=settings.annotator_max_retries,
        cache_dir=settings.annotator_cache_dir,
        span_format=settings.annotator_span_format,
        **optional,
    )


def _self(settings: AnnotatorSettings):
    from .annotators import SelfAnnotator

    return SelfAnnotator(
        **_drop_none(
            max_new_tokens=settings.self_annotator_max_new_tokens,
            temperature=settings.self_annotator_temperature,
            top_p=settings.self_annotator_top_p,
            batch_size=settings.self_annotator_batch_size,
            max_key_spans=settings.annotator_max_key_spans,
        ),
        span_format=settings.annotator_span_format,
    )


def _regex(settings: AnnotatorSettings):
    from .annotators import RegexAnnotator

    key, error = regex_patterns(settings.regex_key_patterns), regex_patterns(settings.regex_error_patterns)
    if not key and not error:
        raise ValueError(
            "The 'regex' annotator needs at least one pattern: set `regex_key_patterns` or `regex_error_patterns` "
            f"(regular expressions or {', '.join(REGEX_CONSTANTS)}), e.g. `--regex_key_patterns BOXED` for "
            "`trace-trl train`, `--regex-key-pattern BOXED` for `trace-trl annotate`."
        )
    return RegexAnnotator(key_patterns=key, error_patterns=error)


def build_annotator(settings: AnnotatorSettings):
    """The annotator `settings.annotator` names, configured by `settings` (`None` for `"none"`).

    `settings` is an [`AnnotatorSettings`] (`trace-trl train`'s script arguments are one). Anything else with the same
    attribute names (an `argparse.Namespace`) is read through [`AnnotatorSettings.from_attributes`].
    """
    if not isinstance(settings, AnnotatorSettings):
        settings = AnnotatorSettings.from_attributes(settings)
    from .annotators import AllTokensAnnotator, InvertedSpanAnnotator, RandomSpanAnnotator

    kind = canonical_annotator_name(settings.annotator)
    if kind == "none":
        return None
    if kind.startswith("inverted_"):
        bases = {"inverted_openai": _openai, "inverted_self": _self, "inverted_regex": _regex}
        return InvertedSpanAnnotator(
            bases[kind](settings), fraction=settings.random_span_fraction, seed=settings.random_seed
        )
    if kind == "regex":
        return _regex(settings)
    if kind == "all_tokens":
        return AllTokensAnnotator(kind_for_incorrect="error" if settings.all_tokens_incorrect else None)
    if kind == "random":
        return RandomSpanAnnotator(
            seed=settings.random_seed, span_fraction=settings.random_span_fraction, num_spans=settings.random_num_spans
        )
    if kind == "random_like_openai":
        return RandomSpanAnnotator(seed=settings.random_seed, like=_openai(settings))
    if kind == "random_like_self":
        return RandomSpanAnnotator(seed=settings.random_seed, like=_self(settings))
    if kind == "openai":
        return _openai(settings)
    return _self(settings)
