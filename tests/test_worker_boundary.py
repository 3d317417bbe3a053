"""The worker's error boundary: what fails inside a request is that request's error, decided where
the mechanism lives, and a terminal reply is never followed by a second provider call."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from router.providers.fakes import FakeGemini, FakeOpenAI
from schemas import Chunk, Done, Error, Reply, decode_reply
from workers.progress import Progress
from workers.publish import Publisher

from .conftest import Fleet, fleet_config, running_fleet
from .helpers import ask_raw, audit_row, request


async def test_a_request_an_adapter_cannot_build_fails_at_once(nats_url: str, db: asyncpg.Pool) -> None:
    gemini = FakeGemini()
    await gemini.start()
    try:
        cfg = fleet_config({"gemini": gemini.url})
        async with running_fleet(nats_url, cfg, db):
            nc = await nats.connect(nats_url)
            body = request(messages=[
                {"role": "user", "content": "weather?"},
                {"role": "tool", "tool_call_id": "call_nobody_made", "content": "14 C"},
            ])
            [reply] = await ask_raw(nc, body, timeout=5)
            await nc.close()
    finally:
        await gemini.stop()
    # Before: the build raised outside the attempt, was delivered five times and ended INTERNAL.
    assert isinstance(reply, Error) and reply.code == "INVALID_REQUEST"
    assert "answers no earlier assistant tool call" in reply.message
    assert gemini.requests == []
    row = await audit_row(db, body["id"])
    assert row["code"] == "INVALID_REQUEST"


async def test_a_nats_timeout_inside_a_request_is_not_the_requests_timeout(
    fleet: Fleet, nc: NATS, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Progress.started
    calls: list[str] = []

    async def slow_kv(self: Progress, account: str, request_id: str) -> None:
        calls.append(request_id)
        if len(calls) == 1:
            raise nats.errors.TimeoutError  # a subclass of the builtin TimeoutError
        await real(self, account, request_id)

    monkeypatch.setattr(Progress, "started", slow_kv)
    body = request(stream=True)
    replies = await ask_raw(nc, body, timeout=15)
    # Nothing had gone out, so the item is delivered again and served; no TIMEOUT reply.
    assert isinstance(replies[-1], Done), replies[-1]
    assert all(isinstance(r, Chunk) for r in replies[:-1]) and [r.seq for r in replies] == list(range(len(replies)))
    assert len(calls) == 2


async def test_a_failed_event_publish_never_calls_the_provider_twice(
    fleet: Fleet, nc: NATS, db: asyncpg.Pool, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Publisher.publish
    failed: list[str] = []

    async def flaky(self: Publisher, subject: str, data: bytes, headers: dict[str, str] | None = None) -> Any:
        if subject.endswith(".events.completed") and not failed:
            failed.append(subject)
            raise nats.errors.TimeoutError
        return await real(self, subject, data, headers)

    monkeypatch.setattr(Publisher, "publish", flaky)
    body = request(reply_to="_INBOX.once")
    replies: list[Reply] = []

    async def collect(msg: Msg) -> None:
        replies.append(decode_reply(msg.data))

    sub = await nc.subscribe("_INBOX.once", cb=collect)
    await nc.jetstream().publish("llm.req.draft.acme", msgspec.json.encode(body))
    row = await audit_row(db, body["id"], timeout=15)  # published by the redelivery, from the kept event
    await asyncio.sleep(1.5)  # room for a second answer, were there one
    await sub.unsubscribe()
    assert failed and row["status"] == "ok"
    assert len(replies) == 1 and isinstance(replies[0], Done)
    assert len(fake_openai.requests) == 1
