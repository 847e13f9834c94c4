"""Keep credentials out of every error text the package stores or prints.

Servers echo what they were sent: OpenAI's HTTP 401 says `Incorrect API key provided: sk-proj-****...abcd`, a proxy's
HTML error page may print the request headers, a misbehaving model may repeat them. Any such text can end up in
`Annotation.error`, a log line, the JSONL of `trace-trl annotate` or its HTML page, so each of those passes through
`redact` first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable


REDACTED = "[redacted]"

# Fragments shorter than this are not matched: they would hit ordinary words.
_MIN_FRAGMENT = 4
# A window of this many characters shared with the secret marks a token as an echo of it, wherever it was cut.
_WINDOW = 8
# Vendor prefixes carry no secret, so a key's leading fragment is only counted from after them.
_VENDOR_PREFIX = re.compile(r"^(?:sk|pk|rk)-(?:(?:proj|svcacct|admin|ant|live|test|or-v1)-)?|^(?:hf|gsk|xai)_|^AIza")
# What a key (or a masked rendering of it) is made of.
_TOKEN = re.compile(r"[\w\-*.\u2026]+")
_PATTERNS = (
    # `Authorization: Bearer x`, `'authorization': 'x'`, `api_key=x`, `x-api-key: x`: keep the name, drop the value.
    re.compile(
        r"""(?ix)
        (\b(?:authorization|proxy-authorization|x-api-key|api[_-]?key|access[_-]?token|secret|password)\b
         ["']?\s*[:=]\s*["']?)
        (?:(?:bearer|basic|token)\s+)?
        (?!\[redacted\])[^\s"',;}\]]+
        """
    ),
    re.compile(r"(?i)(\b(?:bearer|basic)\s+)[A-Za-z0-9\-._~+/*]{6,}=*"),
    # Key-looking tokens, also partly masked (`sk-abc1************wxyz`).
    re.compile(r"\b(?:sk|pk|rk)-[A-Za-z0-9_\-*.\u2026]{12,}"),
    re.compile(r"\b(?:hf|gsk|xai)_[A-Za-z0-9]{16,}"),
)
# A token masked with a run of asterisks: its visible ends are a fragment of some key.
_MASK = "****"


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` without any credential: the given `secrets`, fragments of them, and credential-shaped values.

    Removed (each replaced by `[redacted]`):

    - every token (a run of letters, digits, `_ - * .`) that contains a secret, its last 4 or more characters, its
      first 4 or more characters after a vendor prefix such as `sk-proj-`, or any 8 consecutive characters of it:
      this catches a full echo, a truncated one (`sk-abc1...`) and OpenAI's masked form (`sk-****abcd`);
    - the value after `Authorization`, `api_key`, `x-api-key`, `Bearer`, `Basic` and the like;
    - key-shaped tokens (`sk-...`, `hf_...`) and tokens masked with a run of `*`, whatever key they belong to.

    Secrets shorter than 8 characters (such as the `"EMPTY"` placeholder sent to local servers) are not secrets and
    are left alone; `None` entries are skipped.
    """
    if not text:
        return text
    keys = [secret for secret in secrets if secret and len(secret) >= _WINDOW]
    windows = [{key[i : i + _WINDOW] for i in range(len(key) - _WINDOW + 1)} for key in keys]

    def token(match: re.Match[str]) -> str:
        value = match.group(0)
        return REDACTED if _MASK in value or _echoes_a_secret(value, keys, windows) else value

    # One pass over the tokens (linear; a regex that looks around a masked run would be quadratic on long words).
    text = _TOKEN.sub(token, text)
    for pattern in _PATTERNS:
        text = pattern.sub(lambda match: (match.group(1) if match.lastindex else "") + REDACTED, text)
    return text


def _echoes_a_secret(token: str, secrets: list[str], windows: list[set[str]]) -> bool:
    if len(token) < _MIN_FRAGMENT:
        return False
    for secret, secret_windows in zip(secrets, windows):
        prefix = _VENDOR_PREFIX.match(secret)
        head = secret[: (prefix.end() if prefix else 0) + _MIN_FRAGMENT]
        if secret[-_MIN_FRAGMENT:] in token or head in token:
            return True
        if any(token[i : i + _WINDOW] in secret_windows for i in range(len(token) - _WINDOW + 1)):
            return True
    return False
