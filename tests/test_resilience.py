"""Resilience through a running fleet (real NATS, fake providers): the pool breaker shared by worker
processes, credit exhaustion moving traffic to the fallback and back, and retries and hangs that
never eat the time the rest of the chain needs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from router import config as config_mod
from router.config import BreakerPolicy, Config, RetryPolicy
from router.providers.fakes import FakeAnthropic, FakeGemini, FakeOpenAI, FakeServer, Scenario
from router.providers.fakes.anthropic import ANTHROPIC_SCENARIOS
from schemas import Done, Error, Message, Request, Target, WorkItem, encode
from workers.health import breaker_status, now_ms

from .conftest import Fleet, fleet_config, running_fleet
from .helpers import ask_raw, request

KEY = "sk-test-not-a-real-key"
BASE_PATH = {"openai": "/v1", "backup": "/v1", "anthropic": "", "gemini": ""}


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    end = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > end:
            raise AssertionError("not within the time allowed")
        await asyncio.sleep(0.02)


@pytest.fixture
async def fakes() -> AsyncIterator[dict[str, FakeServer]]:
    servers: dict[str, FakeServer] = {
        "openai": FakeOpenAI(), "backup": FakeOpenAI(), "anthropic": FakeAnthropic(), "gemini": FakeGemini(),
    }
    for s in servers.values():
        await s.start()
    yield servers
    for s in servers.values():
        await s.stop()


def chain(fakes: dict[str, FakeServer], primary: str, fallback: str = "backup") -> Config:
    """draft → [primary, fallback]; `only_<name>` routes to one pool alone."""
    cfg = fleet_config({name: fakes[name].url + BASE_PATH[name] for name in (primary, fallback)})
    models = {"anthropic": "claude-haiku-4-5", "gemini": "gemini-2.5-flash"}
    cfg.routes["draft"]["default"] = [f"{primary}:{models.get(primary, 'gpt-4o-mini')}",
                                      f"{fallback}:{models.get(fallback, 'gpt-4o-mini')}"]
    return cfg


def served_by(replies: list[Any]) -> list[tuple[str, str | None]]:
    done = replies[-1]
    assert isinstance(done, Done), done
    return [(a.pool, a.error) for a in done.attempts]


async def work_item(nc: NATS, cfg: Config, pool: str, fallback: str) -> list[Any]:
    """A work item published straight to a pool, as a worker passing a request on would: it reaches
    the pool's workers whatever the dispatcher knows."""
    inbox = f"_INBOX.{uuid.uuid4().hex}"
    req = Request(id=uuid.uuid4().hex, account="acme", use_case="draft",
                  messages=[Message(role="user", content="hi")], reply_to=inbox)
    route = [Target(pool=pool, model="gpt-4o-mini"), Target(pool=fallback, model="gpt-4o-mini")]
    data = encode(WorkItem(request=req, route=route, accepted_ms=now_ms()))
    return await ask_raw(nc, data, subject=f"llm.work.{pool}", inbox=inbox)


def live_replicas(fleet: Fleet, pool: str) -> int:
    assert fleet.health is not None
    now = now_ms()
    return sum(1 for r, _ in fleet.health.pools.values.values() if r.pool == pool and r.until_ms > now)


# --- one breaker per pool, shared by its worker processes ---------------------------------------


def _spawn_worker(config_file: Path, log_file: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log_file.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "worker", "--pool", "openai", "--config", str(config_file)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )


async def test_five_failures_open_the_breaker_for_every_replica_then_one_probe_closes_it(
    nats_url: str, nc: NATS, fakes: dict[str, FakeServer], tmp_path: Path
) -> None:
    primary = fakes["openai"]
    cfg = chain(fakes, "openai")
    cfg.pools["openai"].retry = RetryPolicy(attempts=1)  # one call per request: five requests, five failures
    cfg.pools["openai"].breaker = BreakerPolicy(failures=5, cooldown_ms=4000, successes=1, probes=1)
    primary.default = Scenario(status=500)  # the pool's provider is down
    config_file = tmp_path / "config.json"
    config_file.write_bytes(config_mod.encode(cfg))
    log_file = tmp_path / "worker.log"
    env = {**os.environ, "NATS_URL": nats_url, "SY_TEST_OPENAI_KEY": KEY}

    # The dispatcher and the fallback pool here; pool `openai`'s first replica in a process of its own.
    async with running_fleet(nats_url, cfg, None, pools=["backup"]) as fleet:
        replica_a = _spawn_worker(config_file, log_file, env)
        try:
            await eventually(lambda: live_replicas(fleet, "openai") == 1, timeout=30)

            # Five failing requests at once: each fails on the primary and is served by the fallback.
            replies = await asyncio.gather(*(ask_raw(nc, request(f"hi {i}")) for i in range(5)))
            assert all(served_by(r) == [("openai", "PROVIDER_ERROR"), ("backup", None)] for r in replies)
            assert len(primary.requests) == 5
            state = (await breaker_status(nc.jetstream()))["openai"]
            assert state.state == "open" and state.failures == 5

            # A second replica, in this process, which has seen none of those failures.
            async with running_fleet(nats_url, cfg, None, pools=["openai"]):
                await eventually(lambda: live_replicas(fleet, "openai") == 2)
                replica_a.terminate()
                assert replica_a.wait(15) == 0
                await eventually(lambda: live_replicas(fleet, "openai") == 1)

                # The dispatcher skips the pool...
                for _ in range(3):
                    assert served_by(await ask_raw(nc, request("hi"))) == [
                        ("openai", "SKIPPED_BREAKER_OPEN"), ("backup", None)]
                # ...and the replica refuses what reaches it anyway, without calling the provider.
                for _ in range(3):
                    assert served_by(await work_item(nc, cfg, "openai", "backup")) == [
                        ("openai", "PROVIDER_UNAVAILABLE"), ("backup", None)]
                assert len(primary.requests) == 5

                # The provider is back; after the cool-down the next request is the probe, and closes it.
                primary.default = Scenario()
                await asyncio.sleep(max(0, state.until_ms - now_ms()) / 1000 + 0.05)
                assert served_by(await ask_raw(nc, request("hi"))) == [("openai", None)]
                assert len(primary.requests) == 6
                assert (await breaker_status(nc.jetstream()))["openai"].state == "closed"
                assert served_by(await ask_raw(nc, request("hi again"))) == [("openai", None)]
        finally:
            if replica_a.poll() is None:
                replica_a.kill()
                replica_a.wait(5)
    assert b"breaker_open" in log_file.read_bytes()  # replica A counted the fifth failure


# --- credit exhaustion --------------------------------------------------------------------------


async def test_credit_exhaustion_moves_traffic_to_the_fallback_at_once_and_back_after_the_cool_down(
    nats_url: str, nc: NATS, fakes: dict[str, FakeServer]
) -> None:
    anthropic = fakes["anthropic"]
    cfg = chain(fakes, "anthropic")
    cfg.providers["anthropic"].credit_cooldown_ms = 2500
    anthropic.default = ANTHROPIC_SCENARIOS["credit_exhausted"]
    async with running_fleet(nats_url, cfg, None):
        first = await ask_raw(nc, request("hi"))
        marked = now_ms()
        # Found out within this one request: no retry, straight to the fallback.
        assert served_by(first) == [("anthropic", "PROVIDER_UNAVAILABLE"), ("backup", None)]
        assert len(anthropic.requests) == 1

        # Meanwhile every request goes to the fallback, streamed or not, without calling anthropic.
        replies = await asyncio.gather(*(ask_raw(nc, request(f"hi {i}", stream=i % 2 == 0)) for i in range(8)))
        assert all(served_by(r) == [("anthropic", "SKIPPED_CREDIT_EXHAUSTED"), ("backup", None)] for r in replies)
        # A work item that reaches a worker of the provider anyway is passed on without a call.
        assert served_by(await work_item(nc, cfg, "anthropic", "backup")) == [
            ("anthropic", "PROVIDER_UNAVAILABLE"), ("backup", None)]
        assert len(anthropic.requests) == 1

        anthropic.default = Scenario()  # credit bought
        await asyncio.sleep(max(0, marked + 2500 - now_ms()) / 1000 + 0.1)
        assert served_by(await ask_raw(nc, request("hi"))) == [("anthropic", None)]
        assert len(anthropic.requests) == 2


# --- waits and hangs that do not fit ---------------------------------------------------------------


def asks_40s(fmt: str) -> Scenario:
    """A primary that asks for a 40 s wait, the way each format says it."""
    if fmt == "gemini":  # in the error body's RetryInfo
        return Scenario(status=429, error_body={"error": {
            "code": 429, "status": "RESOURCE_EXHAUSTED", "message": "Resource has been exhausted.",
            "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "40s"}],
        }})
    if fmt == "anthropic":  # as an HTTP date
        when = format_datetime(datetime.now(UTC) + timedelta(seconds=40), usegmt=True)
        return Scenario(status=429, headers={"retry-after": when})
    return Scenario(status=429, headers={"retry-after": "40"})


@pytest.mark.parametrize("fmt", ["openai", "gemini", "anthropic"])
async def test_a_primary_asking_for_a_40s_wait_falls_back_at_once(
    nats_url: str, nc: NATS, fakes: dict[str, FakeServer], fmt: str
) -> None:
    primary = fakes[fmt]
    primary.default = asks_40s(fmt)
    cfg = chain(fakes, fmt)
    async with running_fleet(nats_url, cfg, None):
        started = time.monotonic()
        replies = await ask_raw(nc, request("hi", timeout_ms=10_000))
        took = time.monotonic() - started
        assert served_by(replies) == [(fmt, "PROVIDER_ERROR"), ("backup", None)]
        assert took < 2.0
        assert len(primary.requests) == 1  # not tried again: the wait does not fit

        # With no fallback the request ends at once, saying how long the provider asked to wait.
        started = time.monotonic()
        [err] = await ask_raw(nc, request("hi", timeout_ms=10_000), subject=f"llm.req.only_{fmt}.acme")
        assert isinstance(err, Error) and err.code == "PROVIDER_ERROR" and time.monotonic() - started < 2.0
        assert err.retry_after_ms is not None and 38_000 <= err.retry_after_ms <= 40_000


@pytest.mark.parametrize("stream", [False, True])
async def test_a_hung_primary_falls_back_within_the_requests_deadline(
    nats_url: str, nc: NATS, fakes: dict[str, FakeServer], stream: bool
) -> None:
    primary = fakes["openai"]
    primary.default = Scenario(ttft_ms=4000)  # answers nothing before the request's deadline
    cfg = chain(fakes, "openai")
    assert cfg.pools["openai"].timeout_ms == 5000  # the pool's own timeout would come too late
    async with running_fleet(nats_url, cfg, None):
        started = time.monotonic()
        replies = await ask_raw(nc, request("hi", timeout_ms=3000, stream=stream))
        took = time.monotonic() - started
    assert served_by(replies) == [("openai", "PROVIDER_ERROR"), ("backup", None)]
    # The primary had half of the 3 s (two targets), the fallback the rest.
    assert 1.4 < took < 3.0
    assert replies[-1].attempts[0].latency_ms >= 1400


async def test_a_hung_last_target_is_the_requests_timeout(
    nats_url: str, nc: NATS, fakes: dict[str, FakeServer]
) -> None:
    fakes["openai"].default = Scenario(ttft_ms=3000)
    cfg = chain(fakes, "openai")
    async with running_fleet(nats_url, cfg, None):
        started = time.monotonic()
        [err] = await ask_raw(nc, request("hi", timeout_ms=1500), subject="llm.req.only_openai.acme")
    assert isinstance(err, Error) and err.code == "TIMEOUT"
    assert 1.4 < time.monotonic() - started < 2.5


async def test_a_hang_counts_against_the_pool(
    nats_url: str, nc: NATS, fakes: dict[str, FakeServer]
) -> None:
    fakes["openai"].default = Scenario(ttft_ms=2500)
    cfg = chain(fakes, "openai")
    cfg.pools["openai"].breaker = BreakerPolicy(failures=2, cooldown_ms=60_000)
    async with running_fleet(nats_url, cfg, None):
        for _ in range(2):
            assert served_by(await ask_raw(nc, request("hi", timeout_ms=2000)))[0] == ("openai", "PROVIDER_ERROR")
        assert (await breaker_status(nc.jetstream()))["openai"].state == "open"
        assert served_by(await ask_raw(nc, request("hi", timeout_ms=2000)))[0] == ("openai", "SKIPPED_BREAKER_OPEN")
    assert len(fakes["openai"].requests) == 2

