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


def scrub(text: str) -> str:
    """Mask anything that looks like a provider key, a bearer token or a password in a URL."""
    return _SECRET_VALUES.sub(MASK, text)


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
