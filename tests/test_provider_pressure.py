"""A provider that answers 429 with a wait is waited for: the pool stops pulling for the wait and its
requests stay queued, so none gets a 429 of ours while its deadline allows the wait."""

from __future__ import annotations

import asyncio

import asyncpg
from nats.aio.client import Client as NATS

from router.providers.fakes import FakeOpenAI, Scenario
from schemas import Done

from .conftest import fleet_config, running_fleet
from .helpers import ask_raw, audit_row, request


async def test_requests_wait_out_a_providers_429_and_all_succeed(
    nats_url: str, nc: NATS, db: asyncpg.Pool, fake_openai: FakeOpenAI
) -> None:
    cfg = fleet_config({"openai": fake_openai.url + "/v1"})  # one target: nothing to fall back to
    fake_openai.default = Scenario(status=429, headers={"retry-after": "3"})

    async def recover() -> None:
        await asyncio.sleep(3)
        fake_openai.default = Scenario()

    async with running_fleet(nats_url, cfg, db):
        recovering = asyncio.create_task(recover())
        bodies = [request(timeout_ms=30_000) for _ in range(6)]
        answers = await asyncio.gather(*(ask_raw(nc, b, timeout=30) for b in bodies))
        await recovering
        rows = [await audit_row(db, b["id"]) for b in bodies]
    assert all(isinstance(a[-1], Done) for a in answers), [a[-1] for a in answers]
    assert all(r["status"] == "ok" for r in rows)
    # While the pool was paused nobody called the provider: far fewer calls than one per second per request.
    assert len(fake_openai.requests) < 6 * 4
