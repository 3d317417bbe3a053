"""Budget leases (workers/budget.py): a dispatcher reserves from a slice of the shared counter it took in one
increment, gives back what it did not use, and slices taken together never keep the counter past the limit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest
from nats.aio.client import Client as NATS

from router import budget as policy
from router.config import Config
from router.providers.fakes import FakeOpenAI
from router.routing import Selection, Source
from schemas import Request, Target
from workers import budget as budget_mod
from workers.budget import BudgetRefused, Budgets, counter, subject
from workers.publish import now_ms
from workers.runtime import ensure_topology

from .test_budget_fleet import PROMPT, _config

CHAIN = [Target(pool="openai", model="metered")]
SELECTION = Selection(chain=CHAIN, skipped=[], source=Source.DEFAULT_ROUTE, prompt_tokens=10)


def _req(rid: str, account: str, max_tokens: int) -> Request:
    return msgspec.convert({"id": rid, "account": account, "use_case": "draft", "reply_to": "_INBOX.x",
                            "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens}, Request)


async def _used(nc: NATS, cfg: Config, account: str) -> int:
    day = policy.periods(now_ms(), cfg.limits.timezone).day
    return await counter(nc.jetstream(), subject("llm", account, day, "used"))


async def _increments(nc: NATS, cfg: Config, account: str) -> int:
    """How many increments the account's day counter took (the stream keeps each one)."""
    subj = subject("llm", account, policy.periods(now_ms(), cfg.limits.timezone).day, "used")
    info = await nc.jetstream().stream_info("LLM_BUDGET", subjects_filter=subj)
    return (info.state.subjects or {}).get(subj, 0)


@pytest.fixture
async def dispatchers(nc: NATS) -> AsyncIterator[list[Budgets]]:
    """Three dispatchers' budgets (each its own slices), stopped after the test."""
    cfg = _config(FakeOpenAI())
    await ensure_topology(nc.jetstream(), cfg)
    made = [await Budgets.open(nc.jetstream(), "llm") for _ in range(3)]
    yield made
    for b in made:
        await b.stop()


async def test_requests_reserve_from_one_slice_and_an_idle_slice_is_given_back(
    nc: NATS, dispatchers: list[Budgets], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _config(FakeOpenAI(), daily_usd=100.0)
    budgets = dispatchers[0]
    published = now_ms()
    reqs = [_req(f"r{i}", "lease-a", 100) for i in range(10)]
    got = [await budgets.reserve(cfg, r, SELECTION, published) for r in reqs]
    assert got == [pytest.approx(0.11)] * 10
    # One increment of 2 % of $100 covered the ten reservations ($1.10 together, $0.90 of it left).
    assert await _used(nc, cfg, "lease-a") == 2_000_000 and await _increments(nc, cfg, "lease-a") == 1
    # A reservation its request gives back goes to the slice: the counter does not move.
    await budgets.release(cfg, reqs[0], published, got[0])
    await budgets.release(cfg, reqs[0], published, got[0])  # once only
    assert await _used(nc, cfg, "lease-a") == 2_000_000
    day = policy.periods(published, cfg.limits.timezone).day
    assert budgets.slices.held[subject("llm", "lease-a", day, "used")].remaining == 2_000_000 - 9 * 110_000
    # Idle for IDLE_S: the remainder goes back, and what stays counted is the nine requests' reservations.
    async with asyncio.timeout(budget_mod.IDLE_S + 10):
        while await _used(nc, cfg, "lease-a") != 9 * 110_000:
            await asyncio.sleep(0.1)
    assert budgets.slices.held == {}


async def test_dispatchers_leasing_together_near_the_limit_never_keep_more_than_it(
    nc: NATS, dispatchers: list[Budgets]
) -> None:
    # $5 a day; each request reserves $0.02 (10 in + 10 out at $1,000 per million); slices start at $0.10.
    cfg = _config(FakeOpenAI(), daily_usd=5.0)
    published = now_ms()

    async def one(i: int) -> float | None:
        try:
            return await dispatchers[i % 3].reserve(cfg, _req(f"n{i}", "lease-b", 10), SELECTION, published)
        except BudgetRefused as exc:
            assert "daily budget of $5.00 for account lease-b would be exceeded" in str(exc)
            return None

    got = await asyncio.gather(*(one(i) for i in range(200)))  # $4 of the $5
    assert None not in got
    # Far fewer increments than requests: each one a slice for several requests.
    assert await _increments(nc, cfg, "lease-b") < 200 / 4
    got += await asyncio.gather(*(one(i) for i in range(200, 400)))  # then past the limit
    reserved = [g for g in got if g is not None]
    assert reserved == [pytest.approx(0.02)] * len(reserved)
    held = sum(s.remaining for b in dispatchers for k, s in b.slices.held.items() if ".lease-b.d" in k)
    used = await _used(nc, cfg, "lease-b")
    # Never past the limit; the counter is exactly the reservations plus the slices' unused remainders...
    assert used <= 5_000_000
    assert used == len(reserved) * 20_000 + held
    # ...and refusing early costs at most a few requests: slices shrink to one reservation near the limit.
    assert len(reserved) >= 250 - 3 * 2
    for b in dispatchers:
        await b.stop()
    assert await _used(nc, cfg, "lease-b") == len(reserved) * 20_000
