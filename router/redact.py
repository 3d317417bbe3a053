"""A structlog processor that keeps secrets out of log lines."""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from typing import Any

_SECRET_KEYS = re.compile(r"(api[_-]?key|authorization|password|secret|token$|x-goog-api-key)", re.I)
_SECRET_VALUES = re.compile(
    r"(sk-(?:proj-|ant-)?[A-Za-z0-9_-]{8,}|AIza[0-9A-Za-z_-]{20,}|Bearer\s+[A-Za-z0-9._~+/=-]{8,}"
    r"|(?<=://)[^/@\s:]+:[^/@\s]+(?=@))"
)
MASK = "[redacted]"
# A value given by name: `x-api-key: …`, `'x-goog-api-key': '…'`, `api_key=…`, `access_token=…`, and a URL's
# `?key=…` / `&token=…`. The name stays, so a message still says what was there.
_NAMED_VALUES = re.compile(
    r"""((?:x-api-key|x-goog-api-key|api[_-]?key|access[_-]?token|authorization)["']?\s*[:=]\s*["']?"""
    r"""|[?&;](?:key|token|sig|signature)=)(?!\[redacted\])(?:Bearer\s+)?[^\s"',;&}#]+""",
    re.I,
)
_DISTINCTIVE = 8
"""A part of a known secret this long (between `.`, `:`, `_`, `-` or `/`) is masked on its own too."""

# The secrets this process holds (its provider keys): the one piece of global state here, so that
# every scrub() of the process, in replies and in log lines alike, masks them whatever their shape.
_known: set[str] = set()
_known_re: re.Pattern[str] | None = None


def remember_secret(value: str | None) -> None:
    """Mask `value`, and every distinctive part of it, wherever scrub() runs in this process from now on:
    a key that does not look like a key (an OpenAI-compatible endpoint's own format) is still never
    echoed back from a provider's error message."""
    global _known_re
    if not value:
        return
    parts = {value} | {p for p in re.split(r"[.:_\-/]", value) if len(p) >= _DISTINCTIVE}
    if parts <= _known:
        return
    _known.update(parts)
    _known_re = re.compile("|".join(re.escape(p) for p in sorted(_known, key=len, reverse=True)))


def scrub(text: str) -> str:
    """Mask anything that looks like a provider key, a bearer token, a password in a URL, a value named as a
    key or token (a header, a parameter, a URL's `key=`), and every secret this process was told of
    (`remember_secret`)."""
    text = _NAMED_VALUES.sub(lambda m: m.group(1) + MASK, _SECRET_VALUES.sub(MASK, text))
    return _known_re.sub(MASK, text) if _known_re is not None else text


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: MASK if _SECRET_KEYS.search(str(k)) else _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def redact_secrets(_logger: object, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: mask secret-named keys and secret-looking values, at any depth."""
    for key in list(event):
        if _SECRET_KEYS.search(key) and key not in ("event",):
            event[key] = MASK
        else:
            event[key] = _clean(event[key])
    return event
