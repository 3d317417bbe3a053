"""A pool's waits: its pause (its consumer paused while a provider's wait runs out) is never cut short by
a shorter one, and items over the pool's own rate limit get their turns in the order they came."""

from __future__ import annotations

import asyncio
import time

import msgspec
import structlog
from nats.aio.client import Client as NATS

from router import config as config_mod
from router.providers.fakes import FakeOpenAI
from schemas import Done
from workers.processes import http_client
from workers.progress import Progress, ensure_bucket
from workers.provider import PoolWorker
from workers.publish import Publisher
from workers.ratelimits import paused_until_ms
from workers.runtime import ensure_topology

from .conftest import fleet_config, running_fleet
from .helpers import ask_raw, request


async def test_a_shorter_wait_does_not_cut_a_longer_pause_short(nc: NATS, fake_openai: FakeOpenAI) -> None:
    raw = msgspec.to_builtins(fleet_config({"openai": fake_openai.url + "/v1"}))
    raw["pools"]["openai"]["requests_per_minute"] = 60
    cfg = config_mod.from_mapping(raw)
    js = nc.jetstream()
    await ensure_topology(js, cfg)
    assert await paused_until_ms(js, "pool-openai") == 0
    for _ in range(2):
        await js.publish("llm.work.openai", b"{}")
    sub = await js.pull_subscribe("llm.work.openai", durable="pool-openai", stream="LLM_WORK")
    first, second = await sub.fetch(2, timeout=5)
    log = structlog.get_logger("test")
    async with http_client() as http:
        worker = PoolWorker(js, Publisher(nc, js, "llm"), http, cfg, "openai", {"openai": "sk-test-fake"},
                            Progress(nc, await ensure_bucket(js)))
        start = time.time() * 1000
        await worker._put_back(first, 30_000, log)  # a provider's 429 asked for 30 s
        long_until = await paused_until_ms(js, "pool-openai")
        assert start + 29_000 <= long_until <= time.time() * 1000 + 31_000
        await worker._put_back(second, 1_000, log)  # then the pool's own limit asks for 1 s
        assert await paused_until_ms(js, "pool-openai") == long_until
    await js.resume_consumer("LLM_WORK", "pool-openai")
    assert await paused_until_ms(js, "pool-openai") == 0


async def test_items_over_the_pools_limit_are_called_in_the_order_they_came(
    nats_url: str, nc: NATS, fake_openai: FakeOpenAI
) -> None:
    raw = msgspec.to_builtins(fleet_config({"openai": fake_openai.url + "/v1"}))
    raw["pools"]["openai"]["requests_per_minute"] = 240  # a turn every 250 ms, no burst
    cfg = config_mod.from_mapping(raw)
    async with running_fleet(nats_url, cfg, None):
        asks = []
        for i in range(6):  # each one asks for its turn before the next arrives
            asks.append(asyncio.create_task(ask_raw(nc, request(f"question {i}", timeout_ms=30_000), timeout=30)))
            await asyncio.sleep(0.05)
        answers = await asyncio.gather(*asks)
    assert all(isinstance(a[-1], Done) for a in answers), [a[-1] for a in answers]
    asked = [body["messages"][-1]["content"] for body in fake_openai.requests]
    assert asked == [f"question {i}" for i in range(6)]
