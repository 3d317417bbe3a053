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


async def test_a_request_handed_over_already_keeps_one_reservation(nc: NATS, dispatchers: list[Budgets]) -> None:
    cfg = _config(FakeOpenAI(), daily_usd=100.0)
    a, b = dispatchers[0], dispatchers[1]
    published = now_ms()
    req = _req("twice", "lease-c", 100)
    # A reserved and handed the request over, then died or could not ack it; B gets it again, reserves afresh,
    # and finds its hand-over a duplicate: B's reservation goes back, A's is the one the worker settles.
    assert await a.reserve(cfg, req, SELECTION, published) == pytest.approx(0.11)
    assert await b.reserve(cfg, req, SELECTION, published) == pytest.approx(0.11)
    b.handed_over_already(cfg, req, published)
    # A itself gets it again (its ack was lost): the reservation it finds is that hand-over's own, and stays.
    assert await a.reserve(cfg, req, SELECTION, published) == pytest.approx(0.11)
    a.handed_over_already(cfg, req, published)
    await a.stop()
    await b.stop()
    assert await _used(nc, cfg, "lease-c") == 110_000


async def test_a_lowered_limit_is_checked_against_the_counter_before_a_slice_is_used_again(
    nc: NATS, dispatchers: list[Budgets]
) -> None:
    budgets = dispatchers[0]
    published = now_ms()
    reqs = [_req(f"low{i}", "lease-e", 100) for i in range(4)]
    await budgets.reserve(_config(FakeOpenAI(), daily_usd=100.0), reqs[0], SELECTION, published)
    assert await _used(nc, _config(FakeOpenAI()), "lease-e") == 2_000_000  # a $2 slice, $1.89 of it left
    # The limit lowered under what is counted: the slice held is not reserved from, and the request is refused.
    with pytest.raises(BudgetRefused, match=r"daily budget of \$1\.50"):
        await budgets.reserve(_config(FakeOpenAI(), daily_usd=1.5), reqs[1], SELECTION, published)
    assert await _used(nc, _config(FakeOpenAI()), "lease-e") == 2_000_000 - 110_000  # what it used went back
    # Lowered, but above what is counted: checked against the counter once, then reserved from again.
    five = _config(FakeOpenAI(), daily_usd=5.0)
    assert await budgets.reserve(five, reqs[2], SELECTION, published) == pytest.approx(0.11)
    increments = await _increments(nc, five, "lease-e")
    assert await budgets.reserve(five, reqs[3], SELECTION, published) == pytest.approx(0.11)
    assert await _increments(nc, five, "lease-e") == increments
    await budgets.stop()
    assert await _used(nc, five, "lease-e") == 3 * 110_000  # the three requests reserved, nothing else


async def test_reserve_here_takes_from_both_slices_or_from_neither(nc: NATS, dispatchers: list[Budgets]) -> None:
    cfg = _config(FakeOpenAI(), daily_usd=1000.0)  # slices of many reservations
    budgets = dispatchers[0]
    published = now_ms()
    assert budgets.reserve_here(cfg, _req("h1", "here", 100), SELECTION, published) is None  # no slice yet
    assert budgets.slices.holding() == 0  # nothing reserved: `reserve` decides it
    first = await budgets.reserve(cfg, _req("h1", "here", 100), SELECTION, published)  # takes both slices
    held, increments = budgets.slices.holding(), await _increments(nc, cfg, "here")
    second = _req("h2", "here", 100)
    assert budgets.reserve_here(cfg, second, SELECTION, published) == pytest.approx(first)
    assert budgets.slices.holding() == held - 2 * policy.to_micros(first)  # from the day's and the month's
    assert budgets.reserve_here(cfg, second, SELECTION, published) == pytest.approx(first)  # delivered again
    assert budgets.slices.holding() == held - 2 * policy.to_micros(first)
    # One period's slice short of the request: neither is taken from, and nothing went to NATS.
    per = policy.periods(published, cfg.limits.timezone)
    budgets.slices.get(subject("llm", "here", per.month, "used")).remaining = 0
    day = budgets.slices.get(subject("llm", "here", per.day, "used")).remaining
    assert budgets.reserve_here(cfg, _req("h3", "here", 100), SELECTION, published) is None
    assert budgets.slices.get(subject("llm", "here", per.day, "used")).remaining == day
    assert await _increments(nc, cfg, "here") == increments
    # A target without a price is refused here as in `reserve`.
    unpriced = Selection(chain=[Target(pool="openai", model="homebrew-7b")], skipped=[], source=Source.DEFAULT_ROUTE,
                         prompt_tokens=10)
    with pytest.raises(BudgetRefused):
        budgets.reserve_here(cfg, _req("h4", "here", 100), unpriced, published)


@pytest.mark.timeout(300)
async def test_ten_thousand_accounts_at_once_stay_exact_and_bounded(
    nc: NATS, dispatchers: list[Budgets], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Bounds smaller than the accounts, so that keeping within them is shown (as shipped they are 16,384).
    monkeypatch.setattr(budget_mod, "COUNTERS_KEPT", 1000)
    monkeypatch.setattr(budget_mod, "HELD_MAX", 2000)
    # $0.05 a day, $0.02 a request: two fit, a third would pass the limit.
    cfg = _config(FakeOpenAI(), daily_usd=0.05)
    published = now_ms()
    gate = asyncio.Semaphore(64)
    reserved: dict[str, int] = {}

    async def account(n: int) -> None:
        name = f"many{n}"
        async with gate:  # one request of the account through each dispatcher, at once
            got = await asyncio.gather(*(b.reserve(cfg, _req(f"{name}-{i}", name, 10), SELECTION, published)
                                         for i, b in enumerate(dispatchers)), return_exceptions=True)
        assert all(isinstance(g, float | BudgetRefused) for g in got), got
        reserved[name] = sum(isinstance(g, float) for g in got)

    await asyncio.gather(*(account(n) for n in range(10_000)))
    assert len(reserved) == 10_000 and set(reserved.values()) == {2}
    for b in dispatchers:
        assert len(b._counters) <= 1000 and len(b._held) <= 2000
    # Idle slices are given back: nothing stays held, and each account's counters are exactly its reservations.
    async with asyncio.timeout(30):
        while any(b.slices.held for b in dispatchers):
            await asyncio.sleep(0.2)
    month = policy.periods(published, cfg.limits.timezone).month
    for n in range(0, 10_000, 97):
        assert await _used(nc, cfg, f"many{n}") == 2 * 20_000
        assert await counter(nc.jetstream(), subject("llm", f"many{n}", month, "used")) == 2 * 20_000
