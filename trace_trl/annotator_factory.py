"""Build an annotator from its name and settings: the one builder behind `trace-trl train` and `trace-trl annotate`.

Both commands name annotators the same way (`regex`, `all_tokens`, `random`, `openai`, ...; the hyphenated spelling
`all-tokens` is accepted too) and read the same settings, with the same defaults: the annotator fields of
[`~trace_trl.train.TraceScriptArguments`] (`regex_key_patterns`, `annotator_model`, `random_seed`, ...).
`trace-trl annotate` maps its flags onto those fields.
"""

from __future__ import annotations

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


def _openai(settings: Any):
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
        max_answer_chars=getattr(settings, "annotator_max_answer_chars", None),
    )
    if settings.annotator_api_key_env != "OPENAI_API_KEY":
        optional["api_key_env"] = settings.annotator_api_key_env
    if not getattr(settings, "annotator_use_json_schema", True):
        optional["use_json_schema"] = False
    if not getattr(settings, "annotator_send_temperature", True):
        optional["temperature"] = None
    limit = getattr(settings, "annotator_token_limit_param", "max_tokens")
    if limit == "none":
        optional["max_tokens"] = None
    elif limit != "max_tokens":
        optional["token_limit_param"] = limit
    if getattr(settings, "annotator_reask_on_malformed", False):
        optional["reask_on_malformed"] = True
    for field_name, keyword in (
        ("annotator_prompt_template", "prompt_template"),
        ("annotator_system_prompt", "system_prompt"),
    ):
        text = text_or_file(getattr(settings, field_name, None), field_name)
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


def _self(settings: Any):
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


def _regex(settings: Any):
    from .annotators import RegexAnnotator

    key, error = regex_patterns(settings.regex_key_patterns), regex_patterns(settings.regex_error_patterns)
    if not key and not error:
        raise ValueError(
            "The 'regex' annotator needs at least one pattern: set `regex_key_patterns` or `regex_error_patterns` "
            f"(regular expressions or {', '.join(REGEX_CONSTANTS)}), e.g. `--regex_key_patterns BOXED` for "
            "`trace-trl train`, `--regex-key-pattern BOXED` for `trace-trl annotate`."
        )
    return RegexAnnotator(key_patterns=key, error_patterns=error)


def build_annotator(settings: Any):
    """The annotator `settings.annotator` names, configured by `settings`' annotator fields (`None` for `"none"`).

    `settings` is a [`~trace_trl.train.TraceScriptArguments`] or anything with the same attributes (the parsed flags of
    `trace-trl annotate`).
    """
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
