"""A pool's own rate limit towards its provider (`requests_per_minute`, `tokens_per_minute`): shared by the
pool's worker replicas, over it a work item waits in the queue for its turn instead of failing, unless its
deadline comes first."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import asyncpg
import msgspec
import pytest
from aiohttp import web
from nats.aio.client import Client as NATS

from router import config as config_mod
from router.config import Config, ConfigError
from router.providers.fakes import FakeOpenAI
from schemas import Done, Error
from workers.ratelimits import pool_limit

from .conftest import fleet_config, running_fleet
from .helpers import ask_raw, request


class TimedOpenAI(FakeOpenAI):
    """The fake OpenAI, noting when each chat call reached it."""

    def __init__(self) -> None:
        super().__init__()
        self.called_at: list[float] = []

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.called_at.append(time.monotonic())
        return await super().chat(request)


def _config(fake: FakeOpenAI, **pool: Any) -> Config:
    raw = msgspec.to_builtins(fleet_config({"openai": fake.url + "/v1"}))
    raw["pools"]["openai"].update(pool)
    return config_mod.from_mapping(raw)


async def test_four_requests_at_once_are_spaced_at_the_pools_rate_across_two_replicas(
    nats_url: str, nc: NATS, db: asyncpg.Pool
) -> None:
    fake = TimedOpenAI()
    await fake.start()
    try:
        cfg = _config(fake, requests_per_minute=60)  # one call a second, burst 1
        async with running_fleet(nats_url, cfg, db), running_fleet(nats_url, cfg, None):
            bodies = [request(timeout_ms=30_000) for _ in range(4)]
            answers = await asyncio.gather(*(ask_raw(nc, b, timeout=30) for b in bodies))
    finally:
        await fake.stop()
    assert [type(a[-1]) for a in answers] == [Done] * 4, [a[-1] for a in answers]
    assert not any(isinstance(r, Error) for a in answers for r in a)
    assert len(fake.called_at) == 4
    gaps = [b - a for a, b in zip(fake.called_at, fake.called_at[1:], strict=False)]
    # At the rate: never two calls within the second, and nobody left waiting much longer than their turn.
    assert all(0.9 <= g <= 2.5 for g in gaps), gaps


async def test_a_deadline_before_the_pools_next_turn_ends_provider_unavailable(
    nats_url: str, nc: NATS, db: asyncpg.Pool, fake_openai: FakeOpenAI
) -> None:
    cfg = _config(fake_openai, requests_per_minute=6)  # a turn every 10 s
    async with running_fleet(nats_url, cfg, db):
        first = await ask_raw(nc, request(timeout_ms=10_000))
        second = await ask_raw(nc, request(timeout_ms=2_000))
    assert isinstance(first[-1], Done)
    err = second[-1]
    assert isinstance(err, Error), err
    assert err.code == "PROVIDER_UNAVAILABLE" and err.retryable
    assert "own rate limit of 6 requests/min" in err.message
    assert err.retry_after_ms is not None and 2_000 < err.retry_after_ms <= 10_000
    assert len(fake_openai.requests) == 1  # the provider never saw the request that could not wait


async def test_tokens_per_minute_counts_the_estimate_with_max_tokens(
    nats_url: str, nc: NATS, db: asyncpg.Pool, fake_openai: FakeOpenAI
) -> None:
    # 1,200 tokens a minute and ~1,010 estimated tokens a request: the second waits ~40 s for its tokens.
    cfg = _config(fake_openai, tokens_per_minute=1200)
    async with running_fleet(nats_url, cfg, db):
        first = await ask_raw(nc, request(max_tokens=1000))
        second = await ask_raw(nc, request(max_tokens=1000, timeout_ms=3_000))
    assert isinstance(first[-1], Done)
    err = second[-1]
    assert isinstance(err, Error) and err.code == "PROVIDER_UNAVAILABLE", err
    assert "1,200 tokens/min" in err.message
    assert err.retry_after_ms is not None and err.retry_after_ms > 30_000
    assert len(fake_openai.requests) == 1


@pytest.mark.parametrize("field", ["requests_per_minute", "tokens_per_minute"])
@pytest.mark.parametrize("value", [0, -5, "many"])
def test_config_rejects_a_bad_pool_limit_naming_the_field(field: str, value: object) -> None:
    raw = msgspec.to_builtins(fleet_config({"openai": "http://127.0.0.1:1/v1"}))
    raw["pools"]["openai"][field] = value
    with pytest.raises(ConfigError, match=rf"^pools\.openai\.{field}: "):
        config_mod.from_mapping(raw)


def test_config_pool_limits_are_optional_and_become_a_gcra_limit() -> None:
    raw = msgspec.to_builtins(fleet_config({"openai": "http://127.0.0.1:1/v1"}))
    assert pool_limit(config_mod.from_mapping(raw).pools["openai"]) is None
    raw["pools"]["openai"].update(requests_per_minute=120, tokens_per_minute=90_000)
    pool = config_mod.from_mapping(raw).pools["openai"]
    assert (pool.requests_per_minute, pool.tokens_per_minute) == (120, 90_000)
    limit = pool_limit(pool)
    assert limit is not None
    assert (limit.per_second, limit.burst, limit.tokens_per_minute) == (2.0, 1, 90_000)
    del raw["pools"]["openai"]["requests_per_minute"]
    only_tokens = pool_limit(config_mod.from_mapping(raw).pools["openai"])
    assert only_tokens is not None and math.isinf(only_tokens.per_second)
