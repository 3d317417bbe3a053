"""A worker's settlements go out in batches: one increment per counter per flush, retried with the same
message ids, alerts named after the request that crossed, settled once however often an item is delivered."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, cast

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck

from router import budget as policy
from router.config import Config
from router.providers.fakes import FakeOpenAI
from schemas import BudgetLimits, Done, Request, Target, WorkItem, decode_reply
from workers import budget as budget_mod
from workers import processes
from workers.budget import Budgets, counter, subject
from workers.progress import Progress
from workers.publish import Publisher, now_ms
from workers.runtime import ensure_topology

from .conftest import running_fleet
from .helpers import request
from .test_budget_cli import metered_fake
from .test_budget_fleet import MAX_TOKENS, PROMPT, RESERVED, _config
from .test_limits_fleet import account, limited_fleet

__all__ = ["account", "metered_fake"]  # the fixtures, shared with test_limits_fleet and test_budget_cli

CHAIN = [Target(pool="openai", model="metered")]
COST = 71_000
"""What each request here costs, micro-dollars (it reserved RESERVED)."""
LIMITS = BudgetLimits(daily_usd=1.0, monthly_usd=1000.0, alert_at=0.8)


@pytest.fixture
async def cfg(nc: NATS) -> Config:
    config = _config(FakeOpenAI())
    await ensure_topology(nc.jetstream(), config)
    return config


def _work(request_id: str, published: int, account: str = "acme") -> WorkItem:
    req = msgspec.convert({"id": request_id, "account": account, "use_case": "draft", "reply_to": "_INBOX.x",
                           "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS}, Request)
    return WorkItem(request=req, route=CHAIN, accepted_ms=published, reserved_usd=policy.usd(RESERVED),
                    budget=LIMITS)


def _subjects(published: int, account: str = "acme") -> dict[str, str]:
    per = policy.periods(published, "UTC")
    return {f"{kind} {period}": subject("llm", account, per.of(period), kind)
            for kind in ("used", "spent") for period in ("day", "month")}


async def _reserved(js: JetStreamContext, published: int, amount: int, account: str = "acme") -> None:
    """What the dispatchers' slices took for the requests settled here: one increment of each `used`."""
    for name, subj in _subjects(published, account).items():
        if name.startswith("used"):
            await js.publish(subj, b"", headers={"Nats-Incr": str(amount)})


async def _totals(js: JetStreamContext, published: int, account: str = "acme") -> dict[str, int]:
    return {name: await counter(js, subj) for name, subj in _subjects(published, account).items()}


async def _until_totals(js: JetStreamContext, published: int, want: dict[str, int],
                        account: str = "acme") -> dict[str, int]:
    """The counters once they are `want` (after a flush), or as they are after 5 s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while (got := await _totals(js, published, account)) != want and loop.time() < deadline:
        await asyncio.sleep(0.02)
    return got


async def _increments(js: JetStreamContext, published: int, account: str = "acme") -> dict[str, int]:
    """How many increments each counter of the account received (one message each in LLM_BUDGET)."""
    info = await js.stream_info("LLM_BUDGET", subjects_filter=f"llm.budget.{account}.>")
    by_subject = info.state.subjects or {}
    return {name: by_subject.get(subj, 0) for name, subj in _subjects(published, account).items()}


def _each(used: int, spent: int) -> dict[str, int]:
    return {"used day": used, "used month": used, "spent day": spent, "spent month": spent}


async def test_many_settlements_of_an_account_go_out_as_one_increment_per_counter(nc: NATS, cfg: Config) -> None:
    js = nc.jetstream()
    budgets = await Budgets.open(js, "llm")
    published = now_ms()
    await _reserved(js, published, 55 * RESERVED)
    try:
        for i in range(50):
            budgets.settle(cfg, _work(f"r{i}", published), policy.usd(COST), failed=False)
        for i in range(5):  # failed: their reservations come back, nothing spent
            budgets.settle(cfg, _work(f"f{i}", published), None, failed=True)
        assert await _until_totals(js, published, _each(50 * COST, 50 * COST)) == _each(50 * COST, 50 * COST)
        # `used`: the dispatchers' increment and one settlement; `spent`: one settlement.
        assert await _increments(js, published) == _each(2, 1)
    finally:
        await budgets.stop()


class _AckLost:
    """A JetStream context whose first increment of each `spent` counter lands, but its acknowledgement is lost
    (a timeout, as when the connection drops after the publish). Records every try: (subject, message id)."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self._nc = js._nc
        self.tries: list[tuple[str, str]] = []

    async def publish(self, subject: str, payload: bytes = b"", timeout: float | None = None,
                      headers: dict[str, str] | None = None) -> PubAck:
        self.tries.append((subject, (headers or {}).get("Nats-Msg-Id", "")))
        ack = await self.js.publish(subject, payload, timeout=timeout, headers=headers)
        if subject.endswith(".spent") and [s for s, _ in self.tries].count(subject) == 1:
            raise nats.errors.TimeoutError
        return ack

    def __getattr__(self, name: str) -> Any:
        return getattr(self.js, name)


async def test_a_batch_whose_acknowledgement_is_lost_is_retried_with_the_same_ids_and_counted_once(
    nc: NATS, cfg: Config
) -> None:
    js = nc.jetstream()
    flaky = _AckLost(js)
    budgets = await Budgets.open(cast(JetStreamContext, flaky), "llm")
    alerts = await nc.subscribe("llm.alerts.budget")
    published = now_ms()
    await _reserved(js, published, 12 * RESERVED)
    try:
        for i in range(12):  # $0.852 of the $1 day: past 80 % with the 12th
            budgets.settle(cfg, _work(f"r{i}", published), policy.usd(COST), failed=False)
        assert await _until_totals(js, published, _each(12 * COST, 12 * COST)) == _each(12 * COST, 12 * COST)
        await asyncio.sleep(3 * budget_mod.FLUSH_S)  # room for a third try, were there one
        assert await _increments(js, published) == _each(2, 1)  # the retry was a duplicate, not counted
        spent = [subj for name, subj in _subjects(published).items() if name.startswith("spent")]
        for subj in spent:
            [first, again] = [m for s, m in flaky.tries if s == subj]
            assert first == again and first.startswith("settle:")
        # The duplicate's acknowledgement does not say where the counter stood: the stored first try does.
        event = msgspec.json.decode((await alerts.next_msg(timeout=5)).data)
        assert (event["period"], event["threshold_pct"], event["request_id"]) == ("day", 80, "r11")
        with pytest.raises(nats.errors.TimeoutError):
            await alerts.next_msg(timeout=0.5)
    finally:
        await alerts.unsubscribe()
        await budgets.stop()


async def test_a_threshold_crossed_inside_a_batch_alerts_once_naming_the_request_that_crossed_it(
    nc: NATS, cfg: Config
) -> None:
    js = nc.jetstream()
    budgets = await Budgets.open(js, "llm")
    alerts = await nc.subscribe("llm.alerts.budget")
    published = now_ms()
    await _reserved(js, published, 20 * RESERVED)
    try:
        for i in range(15):  # $0.071 each: 80 % of $1 with the 12th ($0.852), 100 % with the 15th ($1.065)
            budgets.settle(cfg, _work(f"r{i}", published), policy.usd(COST), failed=False)
        got = [msgspec.json.decode((await alerts.next_msg(timeout=5)).data) for _ in range(2)]
        assert [(e["period"], e["threshold_pct"], e["request_id"], e["spent_usd"], e["limit_usd"]) for e in got] == [
            ("day", 80, "r11", 0.852, 1.0), ("day", 100, "r14", 1.065, 1.0)]
        for i in range(15, 20):  # a later batch past both thresholds: no alert again
            budgets.settle(cfg, _work(f"r{i}", published), policy.usd(COST), failed=False)
        assert (await _until_totals(js, published, _each(20 * COST, 20 * COST)))["spent day"] == 20 * COST
        with pytest.raises(nats.errors.TimeoutError):
            await alerts.next_msg(timeout=0.5)
    finally:
        await alerts.unsubscribe()
        await budgets.stop()


async def test_stop_sends_what_is_pending(nc: NATS, cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(budget_mod, "FLUSH_S", 60.0)  # no flush before the stop
    js = nc.jetstream()
    budgets = await Budgets.open(js, "llm")
    published = now_ms()
    await _reserved(js, published, 3 * RESERVED)
    for i in range(3):
        budgets.settle(cfg, _work(f"r{i}", published), policy.usd(COST), failed=False)
    await asyncio.sleep(0.1)
    assert await _totals(js, published) == _each(3 * RESERVED, 0)  # still pending
    await budgets.stop()
    assert await _totals(js, published) == _each(3 * COST, 3 * COST)


def _settled_once(totals: dict[str, int], increments: dict[str, int], cost: int) -> bool:
    """One reservation settled once to `cost`: the day's `used` (whose slice was exactly the reservation)
    and both `spent` counters are the cost, each settled by one increment. (The month's `used` also holds
    the rest of the dispatcher's slice, until it is given back.)"""
    return (totals["used day"], totals["spent day"], totals["spent month"]) == (cost, cost, cost) and (
        increments["used day"], increments["spent day"], increments["spent month"]) == (2, 1, 1)


@pytest.mark.timeout(60)
async def test_a_worker_process_sends_its_pending_settlements_when_it_stops(
    nats_url: str, nc: NATS, metered_fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(budget_mod, "FLUSH_S", 60.0)  # nothing flushed before the stop
    monkeypatch.setenv("SY_TEST_OPENAI_KEY", "sk-test-fake")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    cfg = _config(metered_fake)
    js = nc.jetstream()
    replies: list[Done] = []
    async with running_fleet(nats_url, cfg, None, pools=[], budgets=True):  # the worker is the process's own
        stop = asyncio.Event()
        worker = asyncio.create_task(processes.run_worker(stop, cfg, nats_url, "openai"))
        try:
            ended = asyncio.Event()
            await _ask(nc, "acme", replies, ended)
            await asyncio.wait_for(ended.wait(), 20)
            published = now_ms()
            assert (await _totals(js, published))["spent day"] == 0  # still pending in the worker
        finally:
            stop.set()
            await asyncio.wait_for(worker, 20)
        [done] = replies
        cost = policy.to_micros(done.cost_usd or 0)
        totals = await _totals(js, published)
        assert cost > 0 and (totals["used day"], totals["spent day"], totals["spent month"]) == (cost, cost, cost)


async def _ask(nc: NATS, account: str, replies: list[Done], ended: asyncio.Event) -> None:
    """One metered request of `account`; its Done replies collected (a redelivery may answer twice)."""
    inbox = f"_INBOX.settle.{uuid.uuid4().hex}"

    async def collect(msg: Msg) -> None:
        reply = decode_reply(msg.data)
        if isinstance(reply, Done):
            replies.append(reply)
            ended.set()

    await nc.subscribe(inbox, cb=collect)
    body = request(PROMPT, max_tokens=MAX_TOKENS, account=account, reply_to=inbox)
    await nc.jetstream().publish(f"llm.req.draft.{account}", msgspec.json.encode(body),
                                 headers={"Nats-Msg-Id": body["id"]})


@pytest.mark.timeout(60)
async def test_a_redelivered_item_whose_done_marker_landed_settles_nothing_again(
    nats_url: str, pg_url: str, nc: NATS, metered_fake: FakeOpenAI, account: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Publisher.publish
    failed: list[str] = []

    async def flaky(self: Publisher, subj: str, data: bytes, headers: dict[str, str] | None = None) -> Any:
        if subj.endswith(".events.completed") and not failed:
            failed.append(subj)  # after the reply and the done marker: the item is delivered again
            raise nats.errors.TimeoutError
        return await real(self, subj, data, headers)

    monkeypatch.setattr(Publisher, "publish", flaky)
    events = await nc.subscribe("llm.events.completed")
    replies: list[Done] = []
    cfg = _config(metered_fake)
    async with limited_fleet(nats_url, pg_url, cfg):
        await _ask(nc, account, replies, asyncio.Event())
        await events.next_msg(timeout=15)  # published by the redelivery, which found the done marker
    # The fleet stopped: every settlement queued was sent.
    js = nc.jetstream()
    published = now_ms()
    [done] = replies
    cost = policy.to_micros(done.cost_usd or 0)
    assert failed and len(metered_fake.requests) == 1 and cost > 0
    assert _settled_once(await _totals(js, published, account), await _increments(js, published, account), cost)


@pytest.mark.timeout(60)
async def test_an_end_whose_done_marker_did_not_go_out_queues_no_settlement(
    nats_url: str, pg_url: str, nc: NATS, metered_fake: FakeOpenAI, account: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Progress.finished
    failed: list[str] = []

    async def lost(self: Progress, acct: str, request_id: str) -> None:
        if not failed:
            failed.append(request_id)  # the first end's marker never goes out: the item is served again
            raise nats.errors.TimeoutError
        await real(self, acct, request_id)

    monkeypatch.setattr(Progress, "finished", lost)
    replies: list[Done] = []
    cfg = _config(metered_fake)
    async with limited_fleet(nats_url, pg_url, cfg):
        ended = asyncio.Event()
        await _ask(nc, account, replies, ended)
        async with asyncio.timeout(15):
            while len(replies) < 2:
                await asyncio.sleep(0.02)
    js = nc.jetstream()
    published = now_ms()
    first, second = replies
    cost = policy.to_micros(second.cost_usd or 0)
    assert failed and len(metered_fake.requests) == 2 and cost == policy.to_micros(first.cost_usd or 0) > 0
    # One reservation, settled once, by the end whose marker went out: nothing left reserved, nothing below
    # zero. (The first call's cost is not counted: its settlement was never queued.)
    assert _settled_once(await _totals(js, published, account), await _increments(js, published, account), cost)
