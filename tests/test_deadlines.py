"""A request's deadline counts from its publish: a backlog that outlived its producers' patience is not
sent to a provider (and paid for) when a dispatcher comes back."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from router.providers.fakes import FakeOpenAI
from schemas import Done, Error, Reply, decode_reply
from workers.runtime import ensure_topology

from .conftest import fleet_config, running_fleet
from .helpers import audit_row, request


async def test_a_request_whose_deadline_passed_in_the_queue_ends_timeout_without_a_call(
    nats_url: str, nc: NATS, fake_openai: FakeOpenAI, db: asyncpg.Pool
) -> None:
    cfg = fleet_config({"openai": fake_openai.url + "/v1"})
    js = nc.jetstream()
    await ensure_topology(js, cfg)  # the streams, but no dispatcher yet: an outage
    inbox = f"_INBOX.t{uuid.uuid4().hex}"
    replies: dict[str, Reply] = {}

    async def collect(msg: Msg) -> None:
        reply = decode_reply(msg.data)
        replies[reply.id] = reply

    await nc.subscribe(inbox, cb=collect)
    stale = request(timeout_ms=1000, reply_to=inbox)
    patient = request(timeout_ms=30_000, reply_to=inbox)
    for body in (stale, patient):
        await js.publish("llm.req.draft.acme", msgspec.json.encode(body))
    await asyncio.sleep(1.3)
    async with running_fleet(nats_url, cfg, db):
        async with asyncio.timeout(15):
            while len(replies) < 2:
                await asyncio.sleep(0.05)
        row = await audit_row(db, stale["id"])
    late = replies[stale["id"]]
    assert isinstance(late, Error) and late.code == "TIMEOUT" and "waited" in late.message
    assert isinstance(replies[patient["id"]], Done)
    assert len(fake_openai.requests) == 1  # only the patient one reached the provider
    assert row["code"] == "TIMEOUT" and row["provider"] is None
