"""Publishing helpers every worker uses: replies, completion events, dead letters."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Mapping

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import PubAck

from router.redact import scrub
from schemas import CompletionEvent, Reply, Request, TextPart, encode


def now_ms() -> int:
    return int(time.time() * 1000)


MAX_SUBJECT = 512
"""Longest subject the fleet publishes on; the server's whole control line is 4 KiB."""
_BAD_SUBJECT = re.compile(r"[\s\x00-\x1f\x7f*>]|^\.|\.$|\.\.")
_HEADER_OVERHEAD = 16  # "NATS/1.0\r\n", the blank line, and slack
_DLQ_ERROR_CHARS = 1000


class PublishRefused(Exception):
    """A message the server would refuse, or that would cost the connection (an over-long subject, a
    body over `max_payload`): refused here, before anything is sent."""


def _header_bytes(headers: Mapping[str, str] | None) -> int:
    if not headers:
        return 0
    return _HEADER_OVERHEAD + sum(len(k) + len(v.encode()) + 4 for k, v in headers.items())


class Publisher:
    """Holds the connection and subject prefix; every outbound message goes through here."""

    def __init__(self, nc: NATS, js: JetStreamContext, prefix: str) -> None:
        self.nc = nc
        self.js = js
        self.prefix = prefix
        self._res = f"{prefix}.res."

    def check(self, subject: str, data: bytes, headers: Mapping[str, str] | None = None) -> None:
        """Raise PublishRefused for a message the server would refuse or close the connection over."""
        if not subject or len(subject) > MAX_SUBJECT or _BAD_SUBJECT.search(subject):
            raise PublishRefused(f"cannot publish on subject {subject[:80]!r}: not a plain subject of at most"
                                 f" {MAX_SUBJECT} characters")
        size = len(data) + _header_bytes(headers)
        if size > self.nc.max_payload:
            raise PublishRefused(f"a message of {size} bytes is over the server's max_payload of"
                                 f" {self.nc.max_payload} bytes")

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> PubAck:
        """A JetStream publish, checked first. Raises PublishRefused, or what nats-py raises."""
        self.check(subject, data, headers)
        return await self.js.publish(subject, data, headers=headers)

    async def reply(self, subject: str, reply: Reply, *, account: str = "") -> None:
        """Core NATS for inboxes; JetStream (deduplicated per request and seq) for durable `llm.res.` subjects."""
        data = encode(reply)
        if subject.startswith(self._res):
            await self.publish(subject, data, {"Nats-Msg-Id": f"{account}:{reply.id}:{reply.seq}"})
        else:
            self.check(subject, data)
            await self.nc.publish(subject, data)

    async def refusal_event(self, event: CompletionEvent, *, origin_seq: int) -> None:
        """The completion event of a request refused before any provider was tried. Deduplicated by the
        request message's sequence, not its id: a replay of the request after its cause was fixed is
        a new message whose own event must not be taken for a duplicate of this one."""
        await self.publish(
            f"{self.prefix}.events.completed", encode(event), {"Nats-Msg-Id": f"refused:{origin_seq}"}
        )

    async def dead_letter(
        self,
        stage: str,
        data: bytes,
        *,
        subject: str,
        code: str,
        error: str,
        origin_seq: int | None = None,
    ) -> None:
        """Copy a message given up on to `<prefix>.dlq.<stage>`. A body too large to fit beside the
        headers is cut, and `Switchyard-Truncated` gives its original size. `origin_seq`, the
        message's sequence in its own stream, makes a second copy of one message (a redelivery)
        a duplicate, while two messages that merely share a request id both keep their copy."""
        headers = {
            "Switchyard-Error-Code": code,
            "Switchyard-Error": _one_line(scrub(error))[:_DLQ_ERROR_CHARS],
            "Switchyard-Subject": _one_line(subject)[:MAX_SUBJECT],
        }
        if origin_seq is not None:
            headers["Nats-Msg-Id"] = f"dlq:{stage}:{origin_seq}"
        room = self.nc.max_payload - _header_bytes(headers) - 64  # 64: the Truncated header itself
        if len(data) > room:
            headers["Switchyard-Truncated"] = str(len(data))
            data = data[: max(0, room)]
        await self.publish(f"{self.prefix}.dlq.{stage}", data, headers)


def _one_line(text: str) -> str:
    """For a header value: one line, and encodable (a lone surrogate becomes `?`)."""
    return text.replace("\r", " ").replace("\n", " ").encode("utf-8", "replace").decode()


def prompt_fingerprint(req: Request) -> tuple[int, str]:
    """Length in characters and SHA-256 of the prompt's text: auditable without storing it."""
    h = hashlib.sha256()
    chars = 0
    for msg in req.messages:
        h.update(msg.role.encode())
        parts = [msg.content] if isinstance(msg.content, str) else msg.content or []
        for part in parts:
            text = part if isinstance(part, str) else part.text if isinstance(part, TextPart) else ""
            chars += len(text)
            h.update(b"\x00" + text.encode())
        if msg.tool_calls:
            h.update(msgspec.json.encode(msg.tool_calls))
    return chars, h.hexdigest()
