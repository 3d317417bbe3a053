"""A pool's concurrency is its consumer's `max_ack_pending`, shared by every replica of the pool: two
worker replicas, each willing to run more, never have more calls in flight at the provider than the pool's
`concurrency` together."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import nats
import pytest
from aiohttp import web
from nats.aio.client import Client as NATS

from router.providers.fakes import FakeOpenAI, Scenario
from schemas import Done
from workers.processes import http_client
from workers.progress import Progress, ensure_bucket
from workers.provider import PoolWorker
from workers.publish import Publisher

from .conftest import fleet_config, running_fleet
from .helpers import ask_raw, request


class CountingFake(FakeOpenAI):
    """Counts the chat calls in flight at once."""

    def __init__(self) -> None:
        super().__init__(default=Scenario(ttft_ms=300))
        self.now = 0
        self.peak = 0

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            return await super().chat(request)
        finally:
            self.now -= 1


@pytest.fixture
async def fake() -> AsyncIterator[CountingFake]:
    server = CountingFake()
    await server.start()
    yield server
    await server.stop()


async def test_two_replicas_share_the_pools_concurrency(nats_url: str, nc: NATS, db: asyncpg.Pool,
                                                       fake: CountingFake) -> None:
    cfg = fleet_config({"openai": fake.url + "/v1"})
    cfg.pools["openai"].concurrency = 3  # the consumer's max_ack_pending; each process would take up to 3 too
    async with running_fleet(nats_url, cfg, db) as fleet:
        # A second replica of the pool on its own connection, as a second worker process would be.
        second = await nats.connect(nats_url)
        js = second.jetstream()
        stop = asyncio.Event()
        async with http_client() as http:
            worker = PoolWorker(js, Publisher(second, js, "llm"), http, cfg, "openai",
                                {"openai": "sk-test-not-a-real-key"}, Progress(second, await ensure_bucket(js)))
            task = asyncio.create_task(worker.serve(stop))
            try:
                replies = await asyncio.gather(*(ask_raw(nc, request(), timeout=30) for _ in range(12)))
            finally:
                stop.set()
                await asyncio.wait_for(task, 10)
        await second.close()
        assert fleet.task is not None and not fleet.task.done()
    assert all(isinstance(r[-1], Done) for r in replies)
    assert fake.peak <= 3, f"{fake.peak} calls at once for a pool of concurrency 3"
    assert fake.peak >= 2  # the calls did overlap: the cap held them, not a lack of work
