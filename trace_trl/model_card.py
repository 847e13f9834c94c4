"""The "TRACE settings" section of the model card that `TRACETrainer.create_model_card` writes.

TRL's own card (from `_name`, `_paper` and `_tag_names`) already names TRACE and cites the paper and TRL; this module
adds what a reader needs to reproduce the run: the `TRACEConfig` fields that `GRPOConfig` does not have, a few GRPO
fields for context, and the annotator.

Nothing secret may reach the card. Annotator settings go through an allow-list: an annotator's own `card_settings()`
if it has one, else a fixed list of public attribute names per known class, else the class name only; values must be
plain scalars (or lists of strings), and names that look like credentials are dropped. As a last line of defence,
every credential-looking environment value (and the annotator's own key) is redacted from the whole card.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

from . import __version__


PAPER_URL = "https://huggingface.co/papers/2605.10194"
TRL_URL = "https://github.com/huggingface/trl"
# trace-trl is installed from a checkout of its repository (not on PyPI yet), so the card links the repository.
REPOSITORY_URL = "https://github.com/trace-trl/trace-trl"
SECTION_TITLE = "## TRACE settings"

# GRPO fields shown for context next to TRACE's own.
GRPO_CONTEXT_FIELDS: tuple[str, ...] = (
    "learning_rate",
    "num_generations",
    "max_completion_length",
    "loss_type",
    "beta",
    "temperature",
    "scale_rewards",
    "reward_weights",
)
# Shown only as "default" or "custom": a template is long, and the run's `training_args.bin` holds it.
_SUMMARIZED_FIELDS = {"teacher_context_template"}

# Public, non-secret attributes of the annotators this package ships, used when a class has no `card_settings()`.
# `base_url` is deliberately absent: a URL may carry credentials or name a private host.
ANNOTATOR_CARD_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "AllTokensAnnotator": ("kind_for_correct", "kind_for_incorrect"),
    "RegexAnnotator": ("key_patterns", "error_patterns", "flags"),
    "RandomSpanAnnotator": ("seed", "span_fraction", "num_spans", "like"),
    "InvertedSpanAnnotator": ("seed", "fraction"),
    "OpenAIAnnotator": (
        "model",
        "max_concurrency",
        "timeout",
        "max_retries",
        "max_key_spans",
        "temperature",
        "max_tokens",
        "use_json_schema",
        "span_format",
    ),
    "SelfAnnotator": ("max_new_tokens", "temperature", "top_p", "batch_size", "max_key_spans", "span_format"),
}

_SECRET_NAME = re.compile(r"(api_?key|token|secret|password|passwd|credential|auth)", re.IGNORECASE)
_SECRET_ENV = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH)", re.IGNORECASE)
_MIN_SECRET_LENGTH = 8  # shorter values ("1", "true") would redact ordinary text
REDACTED = "<redacted>"


def trace_fields(args: Any) -> dict[str, Any]:
    """The fields `args` (a `TRACEConfig`) has beyond `GRPOConfig`, in declaration order."""
    from trl import GRPOConfig

    grpo = {f.name for f in dataclasses.fields(GRPOConfig)}
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.name not in grpo}


def _is_plain(value: Any) -> bool:
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    return isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float, bool)) for v in value)


def _plain(value: Any) -> Any:
    if isinstance(value, re.Pattern):
        return value.pattern
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def annotator_card_settings(annotator: Any) -> dict[str, Any]:
    """Non-secret settings of `annotator` for the card: `{"class": name, ...allow-listed settings}`."""
    if annotator is None:
        return {"class": None}
    name = type(annotator).__name__
    own = getattr(annotator, "card_settings", None)
    if callable(own):
        raw = dict(own())
    else:
        raw = {
            attr: getattr(annotator, attr)
            for attr in ANNOTATOR_CARD_ATTRIBUTES.get(name, ())
            if hasattr(annotator, attr)
        }
    settings: dict[str, Any] = {"class": name}
    for key, value in raw.items():
        if _SECRET_NAME.search(str(key)):
            continue
        if key == "like":  # the matched annotator of the random-span control, through the same allow-list
            if isinstance(value, Mapping):
                settings["like"] = {k: v for k, v in value.items() if not _SECRET_NAME.search(str(k)) and _is_plain(v)}
            elif value is not None:
                settings["like"] = annotator_card_settings(value)
            continue
        value = _plain(value)
        if _is_plain(value):
            settings[str(key)] = value
    return settings


def _format(value: Any) -> str:
    if isinstance(value, Mapping):  # annotator settings: `Class` (name=`value`, ...)
        details = ", ".join(f"{k}={_format(v)}" for k, v in value.items() if k != "class")
        return f"`{value.get('class')}`" + (f" ({details})" if details else "")
    return f"`{value}`"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def trace_settings_section(args: Any, annotator: Any = None) -> str:
    """The markdown "TRACE settings" section for a run configured by `args` with `annotator`."""
    from trl import __version__ as trl_version

    from .config import DEFAULT_TEACHER_CONTEXT_TEMPLATE

    lines = [
        SECTION_TITLE,
        "",
        f"This model was trained with [TRACE]({PAPER_URL}) (token-routed self on-policy distillation over GRPO): an "
        "annotator marks key spans of correct rollouts and error spans of incorrect ones; those tokens are distilled "
        "from the policy itself conditioned on privileged context (a reference solution), every other token gets the "
        "GRPO loss, and the distillation weight is annealed to zero after a warm-up. "
        f"Implementation: [trace-trl]({REPOSITORY_URL}) {__version__} on [TRL]({TRL_URL}) "
        f"{trl_version}.",
        "",
        "| Setting | Value |",
        "| --- | --- |",
    ]
    for name, value in trace_fields(args).items():
        if name in _SUMMARIZED_FIELDS:
            value = "default" if value == DEFAULT_TEACHER_CONTEXT_TEMPLATE else "custom"
        if _is_plain(value) and not _SECRET_NAME.search(name):
            lines.append(f"| `{name}` | {_md_cell(_format(value))} |")
    annotator_settings = annotator_card_settings(annotator)
    lines.append(f"| annotator | {_md_cell(_format(annotator_settings))} |")
    lines += ["", "GRPO settings of the same run:", "", "| Setting | Value |", "| --- | --- |"]
    for name in GRPO_CONTEXT_FIELDS:
        if hasattr(args, name) and _is_plain(getattr(args, name)):
            lines.append(f"| `{name}` | {_md_cell(_format(getattr(args, name)))} |")
    lines += [
        "",
        "When the KL weight is zero (`kl_coef: 0`, or after `kl_warmup_steps + kl_decay_steps`) the update is "
        "exactly GRPO's.",
        "",
    ]
    return "\n".join(lines)


def secret_values(annotator: Any = None, environ: Mapping[str, str] | None = None) -> set[str]:
    """Values that must never appear in a card: credential-looking environment values and the annotator's key."""
    environ = os.environ if environ is None else environ
    values = {v for k, v in environ.items() if _SECRET_ENV.search(k) and len(v) >= _MIN_SECRET_LENGTH}
    for owner in (annotator, getattr(annotator, "like", None)):
        for attr in ("_api_key", "api_key"):
            value = getattr(owner, attr, None) if owner is not None else None
            if isinstance(value, str) and len(value) >= _MIN_SECRET_LENGTH:
                values.add(value)
    return values


def redact(text: str, secrets: set[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


# TRL's card template links `base_model` to the Hub; for a local folder or an in-memory model it gets `None` and writes
# "fine-tuned version of [None](https://huggingface.co/None)".
_UNKNOWN_BASE_MODEL = re.compile(r"This model is a fine-tuned version of \[None\]\(https://huggingface\.co/None\)")


def describe_base_model(card: str, base_model: str | None) -> str:
    """
    Replace TRL's "fine-tuned version of [None](https://huggingface.co/None)" in `card`: a local base model (a folder,
    `base_model`) is named plainly, without a Hub link; an unknown one (`None` or empty) is not named at all. A card
    that links a Hub model is returned unchanged.
    """
    if base_model:
        replacement = f"This model is a fine-tuned version of the local model `{base_model}`"
    else:
        replacement = "This model was fine-tuned"
    return _UNKNOWN_BASE_MODEL.sub(lambda _: replacement, card)


def add_trace_settings(readme_path: str, args: Any, annotator: Any = None, base_model: str | None = None) -> None:
    """Insert the "TRACE settings" section into the card at `readme_path` (before "## Citations"), name a base model
    that TRL could not link (`base_model`: the model's local path, or `None` when unknown), then redact."""
    with open(readme_path, encoding="utf-8") as f:
        card = describe_base_model(f.read(), base_model)
    section = trace_settings_section(args, annotator)
    if SECTION_TITLE in card:  # a card written earlier in the same folder: replace the old section
        start = card.index(SECTION_TITLE)
        end = card.find("\n## ", start + len(SECTION_TITLE))
        card = card[:start] + card[end + 1 if end != -1 else len(card) :]
    anchor = card.find("## Citations")
    card = card[:anchor] + section + "\n" + card[anchor:] if anchor != -1 else card.rstrip("\n") + "\n\n" + section
    with open(readme_path, "w", encoding="utf-8") as f:
        f.write(redact(card, secret_values(annotator)))
