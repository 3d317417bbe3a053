"""Budgets across dispatcher replicas: spend never passes the limit, reservations come back, alerts fire once."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import uuid
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
from nats.aio.client import Client as NATS

from router import budget as policy
from router import config as config_mod
from router.config import Config
from router.providers.fakes import FakeOpenAI, Scenario
from router.routing import Selection, Source
from schemas import Done, Error, Reply, Request, Target, WorkItem, decode_reply
from workers.budget import BudgetRefused, Budgets, counter, subject
from workers.publish import now_ms
from workers.runtime import ensure_topology

from .conftest import fleet_config, running_fleet
from .helpers import ask_raw, request
from .process_fleet import replicas

ANSWER = " ".join(["word"] * 50)  # 249 characters: 62 output tokens from the fake
PROMPT = "Tell me about budgets, briefly please."  # 38 characters: 9 input tokens from the fake, 10 estimated
# $1,000 per million tokens: a request costs about $0.07 and reserves about $0.11 (10 in + 100 out).
PRICE = {"input_usd_per_mtok": 1000.0, "output_usd_per_mtok": 1000.0}
MAX_TOKENS = 100
RESERVED = 110_000
"""What one request reserves, micro-dollars (10 tokens in and 100 out at $1,000 per million)."""


@pytest.fixture
async def metered_fake() -> Any:
    fake = FakeOpenAI(default=Scenario(text=ANSWER))
    await fake.start()
    yield fake
    await fake.stop()


def _config(fake: FakeOpenAI, daily_usd: float = 1.0, **extra: Any) -> Config:
    base = fleet_config({"openai": fake.url + "/v1"})
    raw = msgspec.to_builtins(base)
    raw["models"] = {"metered": PRICE}
    raw["routes"] = {"draft": {"default": ["openai:metered"]}, "homebrew": {"default": ["openai:homebrew-7b"]}}
    raw["pools"]["openai"]["concurrency"] = 64
    raw["limits"] = {"default": {"rate": {"per_second": 100_000, "burst": 100_000},
                                 "budget": {"daily_usd": daily_usd, "monthly_usd": 1000.0, "alert_at": 0.8}}}
    raw.update(extra)
    return config_mod.from_mapping(raw)


def dispatchers(cfg: Config, tmp_path: Path, nats_url: str, n: int) -> AbstractContextManager[
        list[subprocess.Popen[bytes]]]:
    return replicas(cfg, tmp_path, nats_url, [["dispatcher"]] * n)


async def _totals(nc: NATS, cfg: Config, account: str = "acme") -> tuple[int, int]:
    """(used, spent) of the account's current day, micro-dollars."""
    day = policy.periods(now_ms(), cfg.limits.timezone).day
    js = nc.jetstream()
    return (await counter(js, subject("llm", account, day, "used")),
            await counter(js, subject("llm", account, day, "spent")))


async def _until_totals(nc: NATS, cfg: Config, want: tuple[int, int], timeout: float = 5.0) -> tuple[int, int]:
    """(used, spent) once they are `want` (the worker's flush), or as they are at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (got := await _totals(nc, cfg)) != want and loop.time() < deadline:
        await asyncio.sleep(0.02)
    return got


async def _wait_settled(
    nc: NATS, cfg: Config, timeout: float = 10.0, left: int = 0, account: str = "acme"
) -> tuple[int, int]:
    """(used, spent) once at most `left` is counted beyond what was spent."""
    async with asyncio.timeout(timeout):
        while True:
            used, spent = await _totals(nc, cfg, account)
            if spent <= used <= spent + left:
                return used, spent
            await asyncio.sleep(0.05)


async def _burst(nc: NATS, n: int, on_published: Any = None, account: str = "acme") -> list[Reply]:
    """`n` requests of `account` at once; every terminal reply (done or error), in arrival order."""
    inbox = f"_INBOX.budget.{uuid.uuid4().hex}"
    ends: dict[str, Reply] = {}
    extra: list[Reply] = []
    complete = asyncio.Event()

    async def on_msg(msg: Any) -> None:
        reply = decode_reply(msg.data)
        if isinstance(reply, Done | Error):
            if reply.id in ends:
                extra.append(reply)
            ends[reply.id] = reply
            if len(ends) == n:
                complete.set()

    sub = await nc.subscribe(f"{inbox}.*", cb=on_msg)
    js = nc.jetstream()
    for _ in range(n):
        body = request(PROMPT, max_tokens=MAX_TOKENS, account=account)
        await js.publish(f"llm.req.draft.{account}", msgspec.json.encode({**body, "reply_to": f"{inbox}.{body['id']}"}),
                         headers={"Nats-Msg-Id": body["id"]})
    if on_published is not None:
        await on_published(ends)
    await asyncio.wait_for(complete.wait(), 90)
    await asyncio.sleep(0.5)  # a second terminal reply would arrive by now
    await sub.unsubscribe()
    # A dispatcher killed between answering a refusal and acking it refuses again on redelivery: the same answer.
    assert all(isinstance(e, Error) and e == ends[e.id] for e in extra), extra
    return list(ends.values())


def _check_outcome(replies: list[Reply], used: int, spent: int, left: int = 0) -> None:
    done = [r for r in replies if isinstance(r, Done)]
    errors = [r for r in replies if isinstance(r, Error)]
    assert done and errors  # some fit in the budget, most did not
    assert {e.code for e in errors} == {"BUDGET_EXCEEDED"}, {e.code for e in errors}
    assert all("daily budget of $1.00 for account acme would be exceeded" in e.message for e in errors)
    costs = sum(d.cost_usd or 0 for d in done)
    assert costs > 0.8 and sum(d.cost_usd is None for d in done) == 0
    # The real cost of the 500 sums far past the budget, yet what was spent stays within it...
    assert len(replies) * min(d.cost_usd or 0 for d in done) > 10
    assert spent <= 1_000_000 and costs <= 1.0
    # ...the counters agree with the replies, and nothing is left reserved (but `left`: whole reservations).
    assert abs(spent - policy.to_micros(costs)) <= len(done)
    assert spent <= used <= spent + left and (used - spent) % RESERVED == 0


async def _alerts_in_ledger(db: asyncpg.Pool, day: str, timeout: float = 10.0) -> list[asyncpg.Record]:
    async with asyncio.timeout(timeout):
        while True:
            rows = await db.fetch("SELECT * FROM llm_budget_alerts WHERE account = 'acme' AND period_key = $1", day)
            if rows:
                await asyncio.sleep(0.5)  # a duplicate would be in by now
                final: list[asyncpg.Record] = await db.fetch(
                    "SELECT * FROM llm_budget_alerts WHERE account = 'acme' AND period_key = $1", day)
                return final
            await asyncio.sleep(0.1)


@pytest.mark.timeout(180)
async def test_three_dispatchers_never_spend_past_a_budget_and_the_alert_fires_once(
    tmp_path: Path, nats_url: str, metered_fake: FakeOpenAI, nc: NATS, db: asyncpg.Pool
) -> None:
    # Account `roomy` has $20 a day: each dispatcher leases slices of up to $0.40 (2 %) of it for $0.11
    # reservations, shrinking to one reservation near the limit; its 500 requests would cost ~$35. (At $1, a
    # reservation is more than 2 % of the limit: every slice is one reservation.)
    roomy = {"rate": {"per_second": 100_000, "burst": 100_000},
             "budget": {"daily_usd": 20.0, "monthly_usd": 1000.0, "alert_at": 0.8}}
    cfg = _config(metered_fake)
    cfg = config_mod.from_mapping({**msgspec.to_builtins(cfg),
                                   "limits": {**msgspec.to_builtins(cfg.limits), "accounts": {"roomy": roomy}}})
    async with running_fleet(nats_url, cfg, db, budgets=True):  # one dispatcher, the worker and the auditor here
        with dispatchers(cfg, tmp_path, nats_url, 2):
            await asyncio.sleep(2)  # the subprocesses connect
            replies = await _burst(nc, 500)
            used, spent = await _wait_settled(nc, cfg)
            _check_outcome(replies, used, spent)
            day = policy.periods(now_ms(), cfg.limits.timezone).day
            rows = await _alerts_in_ledger(db, day)
            assert [(r["period"], r["threshold_pct"]) for r in rows] == [("day", 80)]
            assert 0.8 <= float(rows[0]["spent_usd"]) <= 1.0 and float(rows[0]["limit_usd"]) == 1.0
            info = await nc.jetstream().stream_info("LLM_EVENTS", subjects_filter="llm.alerts.budget")
            assert info.state.subjects == {"llm.alerts.budget": 1}

            # Slices larger than a reservation: once the dispatchers' slices are idle they give them back, and
            # what stays counted is what was spent.
            replies = await _burst(nc, 500, account="roomy")
            used, spent = await _wait_settled(nc, cfg, timeout=20, account="roomy")
    done = [r for r in replies if isinstance(r, Done)]
    errors = [r for r in replies if isinstance(r, Error)]
    assert done and errors
    assert {e.code for e in errors} == {"BUDGET_EXCEEDED"}, {e.code for e in errors}
    assert all("daily budget of $20.00 for account roomy would be exceeded" in e.message for e in errors)
    costs = sum(d.cost_usd or 0 for d in done)
    assert spent <= 20_000_000 and costs <= 20.0
    assert used == spent and abs(spent - policy.to_micros(costs)) <= len(done)
    assert costs > 16.0  # most of the budget was spent (the rest was reserved when the last ones asked)


@pytest.mark.timeout(180)
async def test_a_dispatcher_killed_mid_run_overspends_nothing_and_leaves_at_most_its_own_reservations(
    tmp_path: Path, nats_url: str, metered_fake: FakeOpenAI, nc: NATS, db: asyncpg.Pool
) -> None:
    metered_fake.default = Scenario(text=ANSWER, ttft_ms=20)
    cfg = _config(metered_fake)
    async with running_fleet(nats_url, cfg, db, budgets=True):
        with dispatchers(cfg, tmp_path, nats_url, 2) as procs:
            await asyncio.sleep(2)

            async def kill_one(ends: dict[str, Reply]) -> None:
                async with asyncio.timeout(30):
                    while len(ends) < 20:
                        await asyncio.sleep(0.005)
                procs[0].send_signal(signal.SIGKILL)
                procs[0].wait()

            replies = await _burst(nc, 500, kill_one)
            # With leases, a reservation the killed dispatcher made and had not handed over stays counted (the
            # request's redelivery reserves again elsewhere and is settled once): a whole reservation, rarely two.
            used, spent = await _wait_settled(nc, cfg, left=3 * RESERVED)
    _check_outcome(replies, used, spent, left=3 * RESERVED)


async def test_a_redelivered_request_is_never_counted_twice(nats_url: str, nc: NATS) -> None:
    cfg = _config(FakeOpenAI(), daily_usd=10.0)
    js = nc.jetstream()
    await ensure_topology(js, cfg)
    budgets = await Budgets.open(js, "llm")
    try:
        req = msgspec.convert({"id": "once", "account": "acme", "use_case": "draft", "reply_to": "_INBOX.x",
                               "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS}, Request)
        chain = [Target(pool="openai", model="metered")]
        selection = Selection(chain=chain, skipped=[], source=Source.DEFAULT_ROUTE, prompt_tokens=10)
        published = now_ms()
        first = await budgets.reserve(cfg, req, selection, published)
        again = await budgets.reserve(cfg, req, selection, published)  # the same request delivered again
        assert first == again == pytest.approx(0.11)
        # The dispatcher leased a slice of 2 % of the $10 (one increment) and reserved $0.11 of it, once.
        assert await _totals(nc, cfg) == (200_000, 0)
        day = policy.periods(published, cfg.limits.timezone).day
        assert budgets.slices.held[subject("llm", "acme", day, "used")].remaining == 90_000
        work = WorkItem(request=req, route=chain, accepted_ms=published, reserved_usd=first)
        # Settled once, by the worker that ended it (a redelivery that finds the done marker settles nothing:
        # test_budget_settle.py); the reservation becomes the cost with the next flush.
        budgets.settle(cfg, work, 0.071, failed=False)
        assert await _until_totals(nc, cfg, (200_000 - 39_000, 71_000)) == (200_000 - 39_000, 71_000)
        # A request over the limit reserves nothing, however often it is delivered (and the refusal gave the
        # slice's unused $0.09 back with it).
        big = msgspec.structs.replace(req, id="big", max_tokens=20_000)
        for _ in range(2):
            with pytest.raises(BudgetRefused, match=r"daily budget of \$10\.00"):
                await budgets.reserve(cfg, big, selection, published)
        assert await _totals(nc, cfg) == (71_000, 71_000)
    finally:
        await budgets.stop()
    assert await _totals(nc, cfg) == (71_000, 71_000)


async def test_an_unpriced_target_under_a_budget_is_refused_with_a_clear_message(
    nats_url: str, metered_fake: FakeOpenAI, nc: NATS
) -> None:
    cfg = _config(metered_fake)
    async with running_fleet(nats_url, cfg, None, budgets=True):
        [reply] = await ask_raw(nc, request(PROMPT), subject="llm.req.homebrew.acme")
    assert isinstance(reply, Error) and reply.code == "BUDGET_EXCEEDED"
    assert "no price is known for openai:homebrew-7b" in reply.message
    assert metered_fake.requests == []  # nothing was sent to the provider
