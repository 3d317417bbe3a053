"""Accounts' own limits from PostgreSQL in a running fleet: a change of the table is followed without a
restart; an account with no limit makes no round trip for it; rate and budget checked together give
back what a refusal of the other left reserved."""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import KeyNotFoundError

from router import budget as policy
from router import config as config_mod
from router.config import Config
from router.limits import AccountLimits
from router.providers.fakes import FakeOpenAI, Scenario
from schemas import Done, Error, Reply, decode_reply
from workers import accounts as store
from workers.accounts import AccountRoutes
from workers.budget import Budgets, counter, subject
from workers.dispatcher import Dispatcher
from workers.processes import http_client
from workers.progress import Progress, ensure_bucket
from workers.provider import PoolWorker
from workers.publish import Publisher, now_ms
from workers.ratelimits import BUCKET, RateLimiter
from workers.runtime import ensure_topology

from .conftest import fleet_config
from .helpers import request
from .test_budget_fleet import ANSWER, MAX_TOKENS, PRICE, PROMPT

FRESH_S = 5.0
"""How long a dispatcher may take to see a change of the table (it is about two seconds at most)."""


def unlimited_config(fake: FakeOpenAI, **limits: Any) -> Config:
    """One metered pool; by default no rate limit and no budget for anyone."""
    raw = msgspec.to_builtins(fleet_config({"openai": fake.url + "/v1"}))
    raw["models"] = {"metered": PRICE}
    raw["routes"] = {"draft": {"default": ["openai:metered"]}}
    raw["pools"]["openai"]["concurrency"] = 32
    raw["limits"] = limits or {"default": {"rate": {"per_second": "unlimited"},
                                           "budget": {"daily_usd": "unlimited", "monthly_usd": "unlimited"}}}
    return config_mod.from_mapping(raw)


@contextlib.asynccontextmanager
async def limited_fleet(nats_url: str, pg_url: str, cfg: Config) -> AsyncIterator[AccountRoutes]:
    """A dispatcher following the account tables, with rates and budgets, and a worker per pool that settles.
    Yields the dispatcher's view of the tables."""
    conns: list[NATS] = []
    stop = asyncio.Event()
    routes = AccountRoutes(pg_url)

    async def conn() -> NATS:
        c = await nats.connect(nats_url)
        conns.append(c)
        return c

    first = await conn()
    await ensure_topology(first.jetstream(), cfg)
    dnc, wnc = await conn(), await conn()
    djs, wjs = dnc.jetstream(), wnc.jetstream()
    dispatcher = Dispatcher(djs, Publisher(dnc, djs, "llm"), cfg, accounts=routes, rates=await RateLimiter.open(djs),
                            budgets=await Budgets.open(djs, "llm"))
    try:
        async with http_client() as http:
            keys: dict[str, str | None] = {name: "sk-test-fake" for name in cfg.providers}
            workers = [PoolWorker(wjs, Publisher(wnc, wjs, "llm"), http, cfg, pool, keys,
                                  Progress(wnc, await ensure_bucket(wjs)), budgets=await Budgets.open(wjs, "llm"))
                       for pool in cfg.pools]
            tasks = [asyncio.create_task(dispatcher.serve(stop))]
            tasks += [asyncio.create_task(w.serve(stop)) for w in workers]
            await asyncio.wait_for(routes.loaded.wait(), 10)
            try:
                yield routes
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*tasks), 15)
                for w in workers:  # their settlements (and the alerts they raise) out, as a worker process does
                    assert w.budgets is not None
                    await w.budgets.stop()
    finally:
        for c in conns:
            await c.close()


async def seen(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(FRESH_S):
        while not check():
            await asyncio.sleep(0.02)


async def burst(nc: NATS, account: str, n: int, **fields: Any) -> list[Reply]:
    """`n` requests of `account` at once; the terminal reply of each."""
    inbox = f"_INBOX.limits.{uuid.uuid4().hex}"
    ends: dict[str, Reply] = {}
    complete = asyncio.Event()

    async def on_msg(msg: Any) -> None:
        reply = decode_reply(msg.data)
        if isinstance(reply, Done | Error):
            ends[reply.id] = reply
            if len(ends) == n:
                complete.set()

    sub = await nc.subscribe(f"{inbox}.*", cb=on_msg)
    js = nc.jetstream()
    for _ in range(n):
        body = request(PROMPT, account=account, max_tokens=MAX_TOKENS, **fields)
        await js.publish(f"llm.req.draft.{account}", msgspec.json.encode({**body, "reply_to": f"{inbox}.{body['id']}"}),
                         headers={"Nats-Msg-Id": body["id"]})
    try:
        await asyncio.wait_for(complete.wait(), 30)
    finally:
        await sub.unsubscribe()
    return list(ends.values())


def codes(replies: list[Reply]) -> list[str]:
    return sorted("done" if isinstance(r, Done) else r.code for r in replies if isinstance(r, Done | Error))


async def day_totals(nc: NATS, account: str) -> tuple[int, int]:
    """(used, spent) of the account's current day, micro-dollars."""
    day = policy.periods(now_ms(), "UTC").day
    js = nc.jetstream()
    return await counter(js, subject("llm", account, day, "used")), await counter(js, subject("llm", account, day,
                                                                                               "spent"))


async def settled(nc: NATS, account: str) -> tuple[int, int]:
    async with asyncio.timeout(10):
        while True:
            used, spent = await day_totals(nc, account)
            if used == spent:
                return used, spent
            await asyncio.sleep(0.05)


async def has_rate_state(nc: NATS, account: str) -> bool:
    kv = await nc.jetstream().key_value(BUCKET)
    try:
        await kv.get(f"a.{account}")
    except KeyNotFoundError:
        return False
    return True


@pytest.fixture
async def metered() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI(default=Scenario(text=ANSWER))
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def account(db: asyncpg.Pool) -> AsyncIterator[str]:
    """An account of its own (the database is shared by the session); its limits are removed after."""
    name = f"lim-{uuid.uuid4().hex[:10]}"
    yield name
    await db.execute("DELETE FROM llm_account_limits WHERE account = $1", name)


@pytest.mark.timeout(90)
async def test_the_account_table_sets_and_lifts_limits_in_a_running_fleet(
    nats_url: str, pg_url: str, db: asyncpg.Pool, nc: NATS, metered: FakeOpenAI, account: str
) -> None:
    cfg = unlimited_config(metered)
    async with limited_fleet(nats_url, pg_url, cfg) as routes:
        # No limit in the config: served, and neither the rate state nor a budget counter was touched.
        assert codes(await burst(nc, account, 5)) == ["done"] * 5
        assert not await has_rate_state(nc, account)
        assert await day_totals(nc, account) == (0, 0)

        # A rate from the table, without a restart: one burst of 2, the rest refused with a hint.
        async with db.acquire() as conn:
            await store.put_limits(conn, account, AccountLimits(per_second=0.5, burst=2))
        await seen(lambda: routes.limits(account) is not None)
        replies = await burst(nc, account, 5)
        assert codes(replies) == ["RATE_LIMITED"] * 3 + ["done"] * 2
        limited = [r for r in replies if isinstance(r, Error)]
        assert all(r.retry_after_ms and "0.5 requests/s (burst 2)" in r.message for r in limited)
        assert await day_totals(nc, account) == (0, 0)  # still no budget

        # A budget from the table (the rate lifted again): refused when the reservation does not fit.
        async with db.acquire() as conn:
            await store.put_limits(conn, account, AccountLimits(per_second=math.inf, daily_usd=0.05))
        await seen(lambda: (own := routes.limits(account)) is not None and own.daily_usd == 0.05)
        [refused] = await burst(nc, account, 1)
        assert isinstance(refused, Error) and refused.code == "BUDGET_EXCEEDED"
        assert f"daily budget of $0.05 for account {account} would be exceeded" in refused.message
        assert await day_totals(nc, account) == (0, 0)  # the refusal left nothing reserved

        # Deleting the row gives the config's limits back: none.
        async with db.acquire() as conn:
            assert await store.delete_limits(conn, account)
        await seen(lambda: routes.limits(account) is None)
        assert codes(await burst(nc, account, 5)) == ["done"] * 5
        assert await day_totals(nc, account) == (0, 0)


@pytest.mark.timeout(90)
async def test_rate_and_budget_together_give_back_what_a_rate_refusal_reserved_and_alert_on_the_tables_limit(
    nats_url: str, pg_url: str, db: asyncpg.Pool, nc: NATS, metered: FakeOpenAI, account: str
) -> None:
    cfg = unlimited_config(metered)
    async with db.acquire() as conn:  # a request reserves $0.11 and costs about $0.071; 5 % of $1.20 is $0.06
        await store.put_limits(conn, account, AccountLimits(per_second=0.5, burst=10, daily_usd=1.2, alert_at=0.05))
    alerts = await nc.subscribe("llm.alerts.budget")
    async with limited_fleet(nats_url, pg_url, cfg) as routes:
        await seen(lambda: routes.limits(account) is not None)
        replies = await burst(nc, account, 30)
        used, spent = await settled(nc, account)
    done = [r for r in replies if isinstance(r, Done)]
    errors = [r for r in replies if isinstance(r, Error)]
    # Both checks ran on every request: 10 admitted by the rate, of which the budget let through what fit
    # in $1.20 at $0.11 reserved each (the reservations of requests the rate refused count until they are
    # given back, so a few may have been refused for them); the rest refused by one or the other.
    assert len(replies) == 30 and {e.code for e in errors} <= {"RATE_LIMITED", "BUDGET_EXCEEDED"}
    assert sum(e.code == "RATE_LIMITED" for e in errors) == 20
    assert 1 <= len(done) <= 10
    # Every reservation of a refused request came back: what is counted is exactly what was spent.
    assert used == spent == sum(policy.to_micros(d.cost_usd or 0) for d in done)
    assert spent <= 1_200_000
    # The worker alerted against the table's $1.20 and 5 %, not the config (which has no budget): once.
    msg = await alerts.next_msg(timeout=5)
    event = msgspec.json.decode(msg.data)
    assert (event["account"], event["threshold_pct"], event["limit_usd"]) == (account, 5, 1.2)
    with pytest.raises(nats.errors.TimeoutError):
        await alerts.next_msg(timeout=0.5)
    await alerts.unsubscribe()


@pytest.mark.timeout(90)
async def test_a_budget_refusal_spends_the_rate_token(
    nats_url: str, pg_url: str, db: asyncpg.Pool, nc: NATS, metered: FakeOpenAI, account: str
) -> None:
    cfg = unlimited_config(metered)
    async with db.acquire() as conn:  # one request at once, then one every 20 s; less budget than one reservation
        await store.put_limits(conn, account, AccountLimits(per_second=0.05, burst=1, daily_usd=0.05))
    async with limited_fleet(nats_url, pg_url, cfg) as routes:
        await seen(lambda: routes.limits(account) is not None)
        [refused] = await burst(nc, account, 1)
        assert isinstance(refused, Error) and refused.code == "BUDGET_EXCEEDED"
        # The budget refused it, but the rate had admitted it at the same time: its token is gone.
        [limited] = await burst(nc, account, 1)
        assert isinstance(limited, Error) and limited.code == "RATE_LIMITED" and limited.retry_after_ms
    assert await day_totals(nc, account) == (0, 0)


@pytest.mark.timeout(90)
async def test_requests_that_may_wait_under_a_budget_are_held_then_served_and_leave_nothing_reserved(
    nats_url: str, pg_url: str, db: asyncpg.Pool, nc: NATS, metered: FakeOpenAI, account: str
) -> None:
    cfg = unlimited_config(metered)
    async with db.acquire() as conn:
        await store.put_limits(conn, account, AccountLimits(per_second=5, burst=1, daily_usd=5.0))
    async with limited_fleet(nats_url, pg_url, cfg) as routes:
        await seen(lambda: routes.limits(account) is not None)
        replies = await burst(nc, account, 4, queue_ms=20_000, timeout_ms=30_000)
        assert codes(replies) == ["done"] * 4
        used, spent = await settled(nc, account)
    assert used == spent == sum(policy.to_micros(r.cost_usd or 0) for r in replies if isinstance(r, Done))


@pytest.mark.timeout(90)
async def test_a_fallback_target_settles_and_alerts_against_the_budget_the_reservation_was_checked_against(
    nats_url: str, pg_url: str, db: asyncpg.Pool, nc: NATS, metered: FakeOpenAI, account: str
) -> None:
    failing = FakeOpenAI(default=Scenario(status=500))
    await failing.start()
    try:
        # Two pools of their own (a failing pool's breaker is shared state): the first fails, the second serves.
        raw = msgspec.to_builtins(unlimited_config(metered))
        raw["providers"] = {"failing": {**raw["providers"]["openai"], "base_url": failing.url + "/v1"},
                            "spare": raw["providers"]["openai"]}
        raw["pools"] = {"failing": {**raw["pools"]["openai"], "provider": "failing"},
                        "spare": {**raw["pools"]["openai"], "provider": "spare"}}
        raw["routes"] = {"draft": {"default": ["failing:metered", "spare:metered"]}}
        cfg = config_mod.from_mapping(raw)
        # The budget is the table's alone (the config has none): a request reserves $0.11 and costs about
        # $0.071, past 5 % of $1.20. Were the budget lost on the hand-over, the worker would find no limit to
        # alert against; were the reservation lost, nothing would be settled.
        async with db.acquire() as conn:
            await store.put_limits(conn, account, AccountLimits(daily_usd=1.2, alert_at=0.05))
        alerts = await nc.subscribe("llm.alerts.budget")
        async with limited_fleet(nats_url, pg_url, cfg) as routes:
            await seen(lambda: routes.limits(account) is not None)
            [done] = await burst(nc, account, 1)
            used, spent = await settled(nc, account)
        assert isinstance(done, Done), done
        assert [(a.pool, a.error) for a in done.attempts] == [("failing", "PROVIDER_ERROR"), ("spare", None)]
        assert failing.requests and metered.requests
        assert used == spent == policy.to_micros(done.cost_usd or 0) > 0
        event = msgspec.json.decode((await alerts.next_msg(timeout=5)).data)
        assert (event["account"], event["threshold_pct"], event["limit_usd"], event["request_id"]) == (
            account, 5, 1.2, done.id)
        await alerts.unsubscribe()
    finally:
        await failing.stop()
