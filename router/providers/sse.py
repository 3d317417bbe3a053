"""A minimal Server-Sent Events decoder over an async stream of text lines."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import NamedTuple


class SSEvent(NamedTuple):
    event: str
    data: str


async def iter_events(lines: AsyncIterable[str]) -> AsyncIterator[SSEvent]:
    """Yield one SSEvent per blank-line-terminated block; comments and `id:`/`retry:` are skipped."""
    event = ""
    data: list[str] = []
    async for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data or event:
                yield SSEvent(event or "message", "\n".join(data))
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
    if data or event:
        yield SSEvent(event or "message", "\n".join(data))
