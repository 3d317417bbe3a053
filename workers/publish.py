"""Publishing helpers every worker uses: replies, completion events, dead letters."""

from __future__ import annotations

import hashlib
import time

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from router.redact import scrub
from schemas import CompletionEvent, Reply, Request, TextPart, encode


def now_ms() -> int:
    return int(time.time() * 1000)


class Publisher:
    """Holds the connection and subject prefix; every outbound message goes through here."""

    def __init__(self, nc: NATS, js: JetStreamContext, prefix: str) -> None:
        self.nc = nc
        self.js = js
        self.prefix = prefix
        self._res = f"{prefix}.res."

    async def reply(self, subject: str, reply: Reply) -> None:
        """Core NATS for inboxes; JetStream (deduplicated per seq) for durable `llm.res.` subjects."""
        data = encode(reply)
        if subject.startswith(self._res):
            await self.js.publish(subject, data, headers={"Nats-Msg-Id": f"{reply.id}:{reply.seq}"})
        else:
            await self.nc.publish(subject, data)

    async def event(self, event: CompletionEvent) -> None:
        await self.js.publish(
            f"{self.prefix}.events.completed", encode(event), headers={"Nats-Msg-Id": f"done:{event.id}"}
        )

    async def dead_letter(
        self, stage: str, data: bytes, *, subject: str, code: str, error: str, request_id: str | None = None
    ) -> None:
        headers = {
            "Switchyard-Error-Code": code,
            "Switchyard-Error": scrub(error)[:1000].replace("\r", " ").replace("\n", " "),
            "Switchyard-Subject": subject,
        }
        if request_id:
            headers["Nats-Msg-Id"] = f"dlq:{stage}:{request_id}"
        await self.js.publish(f"{self.prefix}.dlq.{stage}", data, headers=headers)


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
