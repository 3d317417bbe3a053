"""The limits a request must keep, checked at the door so no later hop can trip over one.

Each limit protects a hop behind the dispatcher: a `reply_to` longer than the server's
control line would end a worker's connection; a body near `max_payload` would make a work
item or a dead-letter copy too large to publish; a NUL character is refused by PostgreSQL;
deep nesting exhausts a decoder's recursion. docs/protocol.md ("Limits") lists them all.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MAX_ID = 128
"""Characters of a request `id`."""
MAX_REPLY_TO = 256
"""Characters of `reply_to`, far below the server's 4 KiB control line."""
MAX_MODEL = 256
MAX_MESSAGES = 1024
MAX_PARTS = 256
"""Content parts of one message."""
MAX_IMAGES = 64
"""Image parts in the whole request."""
MAX_IMAGE_URL = 8192
MAX_MEDIA_TYPE = 128
MAX_TOOLS = 128
MAX_TOOL_DESCRIPTION = 16_384
MAX_TOOL_CALLS = 128
"""Tool calls on one assistant message."""
MAX_TOOL_CALL_ID = 256
MAX_METADATA = 64
"""Entries in `metadata`."""
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 1024
MAX_DEPTH = 32
"""Nesting of a tool's `parameters` or a tool call's `arguments` (objects and arrays)."""
ENVELOPE_BYTES = 16 * 1024
"""What the fleet may add around a request (the work item's route and attempts, headers)."""
DEFAULT_MAX_PAYLOAD = 1024 * 1024
"""nats-server's default `max_payload`; the fleet reads the real one from the server."""


def max_body(max_payload: int) -> int:
    """The largest request body the fleet accepts on a server with this `max_payload`."""
    return max(0, max_payload - ENVELOPE_BYTES)


# A subject token here: printable ASCII without `.` (the separator) and the wildcards `*` and `>`.
_TOKEN = r"[!-)+-\-/-=?-~]+"
_REPLY_TO = re.compile(rf"(?:_INBOX|llm\.res)(?:\.{_TOKEN})+")
_ID_BAD = re.compile(r"[.*>\s\x00-\x1f\x7f]")


def reply_to_problem(reply_to: str, account: str | None = None) -> str | None:
    """Why `reply_to` is refused, or None when it is fine. With `account`, a durable reply subject must
    be that account's own (`llm.res.<account>.…`): NATS permissions give each producer its own results
    only, so replies to another account's subjects would be written where its owner reads them."""
    if len(reply_to) > MAX_REPLY_TO:
        return f"`reply_to` is {len(reply_to)} characters; the limit is {MAX_REPLY_TO}"
    if not reply_to.startswith(("_INBOX.", "llm.res.")):
        return "`reply_to` must start with `_INBOX.` or `llm.res.`"
    if not _REPLY_TO.fullmatch(reply_to):
        return (
            "`reply_to` must be a plain subject (no spaces or wildcards): tokens of printable ASCII"
            " separated by single dots, without control characters, `*` or `>`"
        )
    if account is not None and reply_to.startswith("llm.res.") and not reply_to.startswith(f"llm.res.{account}."):
        return (
            f"`reply_to` under `llm.res.` must be the request's own account's, `llm.res.{account}.<anything>`"
            f" (it names account {reply_to.split('.')[2]!r})"
        )
    return None


def id_problem(rid: str) -> str | None:
    """Why a request `id` is refused, or None when it is fine."""
    if not rid:
        return "`id` is empty"
    if len(rid) > MAX_ID:
        return f"`id` is {len(rid)} characters; the limit is {MAX_ID}"
    bad = _ID_BAD.search(rid)
    if bad:
        return f"`id` may not contain {bad.group()!r} (no `.`, `*`, `>`, whitespace or control characters)"
    return None


def too_deep(value: object, limit: int = MAX_DEPTH) -> bool:
    """Whether objects and arrays nest more than `limit` levels in a decoded JSON value (a scalar is
    level 0). The walk stops at `limit`, so its recursion stays shallow whatever the value."""
    children: Iterable[object]
    if type(value) is dict:
        children = value.values()
    elif type(value) is list:
        children = value
    else:
        return False
    if limit == 0:
        return True
    for child in children:
        if (type(child) is dict or type(child) is list) and too_deep(child, limit - 1):
            return True
    return False


def has_nul(value: object) -> bool:
    """Whether any string (keys included) in a decoded JSON value holds a NUL character."""
    stack: list[object] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False
