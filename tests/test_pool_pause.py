"""A pool's pause (its consumer paused while a wait runs out) is never cut short: a short wait for the
pool's own rate limit that comes after a provider's longer 429 wait leaves the longer pause in place."""

from __future__ import annotations

import time

import msgspec
import structlog
from nats.aio.client import Client as NATS

from router import config as config_mod
from router.providers.fakes import FakeOpenAI
from workers.processes import http_client
from workers.progress import Progress, ensure_bucket
from workers.provider import PoolWorker
from workers.publish import Publisher
from workers.ratelimits import paused_until_ms
from workers.runtime import ensure_topology

from .conftest import fleet_config


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
