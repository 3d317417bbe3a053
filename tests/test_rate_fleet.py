"""Rate limits across dispatcher replicas on a real nats-server: exact bursts and rates (also when a
dispatcher dies), truthful retry hints, held requests (`queue_ms`), and 10,000 accounts at once."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import uuid
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NATS

from router import config as config_mod
from router.config import Config, RateLimit
from router.providers.fakes import FakeOpenAI
from schemas import Done, Error, InvalidMessage, Reply, decode_reply, decode_request
from workers.ratelimits import CACHE_SIZE, RateLimiter, now_us
from workers.runtime import ensure_topology

from .conftest import fleet_config, running_fleet
from .helpers import ask_raw, request
from .process_fleet import replicas


def _config(fake: FakeOpenAI, per_second: float, burst: int) -> Config:
    raw = msgspec.to_builtins(fleet_config({"openai": fake.url + "/v1"}))
    raw["pools"]["openai"]["concurrency"] = 32
    raw["limits"] = {"default": {"rate": {"per_second": per_second, "burst": burst}}}
    return config_mod.from_mapping(raw)


def processes(cfg: Config, tmp_path: Path, nats_url: str, dispatchers: int) -> AbstractContextManager[
        list[subprocess.Popen[bytes]]]:
    """`dispatchers` dispatcher processes and one worker process of pool `openai`."""
    roles = [["dispatcher"]] * dispatchers + [["worker", "--pool", "openai"]]
    return replicas(cfg, tmp_path, nats_url, roles, SY_TEST_OPENAI_KEY="sk-test")


class Replies:
    """Every terminal reply on one inbox, with when it arrived."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.inbox = f"_INBOX.rate.{uuid.uuid4().hex}"
        self.ends: dict[str, tuple[Reply, float]] = {}
        self.extra = 0

    async def __aenter__(self) -> Replies:
        async def on_msg(msg: Any) -> None:
            reply = decode_reply(msg.data)
            if isinstance(reply, Done | Error):
                if reply.id in self.ends:
                    self.extra += 1
                self.ends[reply.id] = (reply, time.monotonic())

        self.sub = await self.nc.subscribe(f"{self.inbox}.*", cb=on_msg)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.sub.unsubscribe()

    async def send(self, **fields: Any) -> str:
        body = request(**fields)
        await self.nc.jetstream().publish(
            "llm.req.draft.acme", msgspec.json.encode({**body, "reply_to": f"{self.inbox}.{body['id']}"}),
            headers={"Nats-Msg-Id": f"acme:{body['id']}"})
        return str(body["id"])

    async def wait(self, ids: list[str], timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not all(i in self.ends for i in ids):
                await asyncio.sleep(0.05)

    def done(self, ids: list[str]) -> list[str]:
        return [i for i in ids if isinstance(self.ends[i][0], Done)]

    def errors(self, ids: list[str]) -> list[Error]:
        return [r for i in ids if isinstance(r := self.ends[i][0], Error)]


async def _wait_dispatchers(nc: NATS, n: int) -> None:
    """Until `n` dispatcher replicas have a pull request open on the consumer."""
    async with asyncio.timeout(30):
        while True:
            try:
                info = await nc.jetstream().consumer_info("LLM_REQ", "dispatch")
                if info.num_waiting >= n:
                    return
            except Exception:
                pass
            await asyncio.sleep(0.1)


async def test_three_dispatchers_admit_exactly_one_burst_at_once(
    tmp_path: Path, nats_url: str, fake_openai: FakeOpenAI, nc: NATS
) -> None:
    # A rate so slow that nothing refills while the 200 go by: the burst alone is what may pass.
    cfg = _config(fake_openai, per_second=0.01, burst=20)
    await ensure_topology(nc.jetstream(), cfg)
    with processes(cfg, tmp_path, nats_url, 3):
        await _wait_dispatchers(nc, 3)
        async with Replies(nc) as replies:
            sent = [await replies.send() for _ in range(200)]
            await replies.wait(sent, 60)
            assert len(replies.done(sent)) == 20
            assert {e.code for e in replies.errors(sent)} == {"RATE_LIMITED"}
            assert replies.extra == 0


@pytest.mark.timeout(180)
async def test_three_dispatchers_admit_one_burst_then_the_rate_even_when_one_dies(
    tmp_path: Path, nats_url: str, fake_openai: FakeOpenAI, nc: NATS
) -> None:
    cfg = _config(fake_openai, per_second=20, burst=20)
    await ensure_topology(nc.jetstream(), cfg)
    with processes(cfg, tmp_path, nats_url, 3) as procs:
        await _wait_dispatchers(nc, 3)
        async with Replies(nc) as replies:
            published = time.monotonic()
            first = [await replies.send() for _ in range(200)]
            await replies.wait(first, 60)
            # The burst, plus what the rate refilled while 200 publishes and decisions went by (on a
            # shared 2-core machine they take ~0.1-0.3 s): never a burst per replica.
            span = max(t for _, t in replies.ends.values()) - published
            assert 20 <= len(replies.done(first)) <= 20 + 20 * span, (len(replies.done(first)), span)
            refused = replies.errors(first)
            assert len(refused) == 200 - len(replies.done(first)) and {e.code for e in refused} == {"RATE_LIMITED"}
            assert all(e.retry_after_ms is not None and 0 < e.retry_after_ms <= 1000 for e in refused)
            assert all("account 'acme' is limited to 20 requests/s (burst 20)" in e.message for e in refused)

            # Five seconds of 60 requests/s, one dispatcher SIGKILLed after two.
            start = time.monotonic()
            second: list[str] = []
            while (elapsed := time.monotonic() - start) < 5.0:
                if elapsed >= 2.0 and procs[0].poll() is None:
                    procs[0].send_signal(signal.SIGKILL)
                second.append(await replies.send())
                await asyncio.sleep(1 / 60)
            end = time.monotonic()
            # What the killed dispatcher held comes back after the consumer's ack_wait (30 s).
            await replies.wait(second, 60)
            in_window = [i for i in replies.done(second) if replies.ends[i][1] <= end + 0.5]
            assert 100 - 20 <= len(in_window) <= 100 + 20, len(in_window)
            assert {e.code for e in replies.errors(second)} == {"RATE_LIMITED"}
            assert replies.extra == 0


async def test_retrying_after_the_hint_succeeds(nats_url: str, fake_openai: FakeOpenAI, nc: NATS) -> None:
    cfg = _config(fake_openai, per_second=2, burst=1)
    async with running_fleet(nats_url, cfg, None):
        first = await ask_raw(nc, request())
        assert isinstance(first[-1], Done)
        refused = await ask_raw(nc, request())
        assert isinstance(refused[-1], Error) and refused[-1].code == "RATE_LIMITED"
        hint = refused[-1].retry_after_ms
        assert hint is not None and 0 < hint <= 500
        await asyncio.sleep(hint / 1000)
        again = await ask_raw(nc, request())
        assert isinstance(again[-1], Done), again[-1]


async def test_the_dispatcher_starts_a_refill_once_its_request_is_handed_over(
    nats_url: str, fake_openai: FakeOpenAI, nc: NATS, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers import ratelimits

    # A timer that would start the refill only after the test gave up: the hand-over alone must start it.
    monkeypatch.setattr(ratelimits, "REFILL_DELAY_S", 600.0)
    cfg = _config(fake_openai, per_second=100, burst=400)  # leases of up to 100 tokens
    account = f"handover-{uuid.uuid4().hex[:8]}"
    js = nc.jetstream()
    async with running_fleet(nats_url, cfg, None):
        before = (await js.stream_info("KV_llm_rates")).state.last_seq
        replies = await ask_raw(nc, request(account=account), subject=f"llm.req.draft.{account}")
        assert isinstance(replies[-1], Done)
        # The request's own decision, then the one token taken ahead for the account's next request.
        async with asyncio.timeout(5):
            while (await js.stream_info("KV_llm_rates")).state.last_seq - before < 2:
                await asyncio.sleep(0.02)
        assert (await js.stream_info("KV_llm_rates")).state.last_seq - before == 2
        # The account's next request is admitted from it, with no write of its own (its own refill starts
        # at its hand-over in turn: the third write).
        assert isinstance((await ask_raw(nc, request(account=account), subject=f"llm.req.draft.{account}"))[-1], Done)
        async with asyncio.timeout(5):
            while (await js.stream_info("KV_llm_rates")).state.last_seq - before < 3:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        assert (await js.stream_info("KV_llm_rates")).state.last_seq - before == 3


async def test_queue_ms_holds_requests_for_their_turn_then_serves_them(
    nats_url: str, fake_openai: FakeOpenAI, nc: NATS
) -> None:
    cfg = _config(fake_openai, per_second=5, burst=1)
    async with running_fleet(nats_url, cfg, None), Replies(nc) as replies:
        held = [await replies.send(queue_ms=10_000, timeout_ms=20_000) for _ in range(6)]
        await asyncio.sleep(0.3)  # all six are booked: the first now, then one every 200 ms
        fresh = await replies.send()
        await replies.wait([*held, fresh], 30)
        assert len(replies.done(held)) == 6
        served = sorted(replies.ends[i][1] for i in held)
        assert served[-1] - served[0] >= 5 * 0.2 - 0.1  # held for the rate, not refused
        # A request that does not wait is not let in ahead of those that do: its hint is after the queue.
        [late] = replies.errors([fresh])
        assert late.code == "RATE_LIMITED" and late.retry_after_ms is not None and late.retry_after_ms >= 500
        info = await nc.jetstream().consumer_info("LLM_REQ", "dispatch")
        assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_a_wait_longer_than_queue_ms_is_refused_at_once(nats_url: str, fake_openai: FakeOpenAI, nc: NATS) -> None:
    cfg = _config(fake_openai, per_second=0.5, burst=1)
    async with running_fleet(nats_url, cfg, None):
        assert isinstance((await ask_raw(nc, request()))[-1], Done)
        t = time.monotonic()
        replies = await ask_raw(nc, request(queue_ms=500))
        assert isinstance(replies[-1], Error) and replies[-1].code == "RATE_LIMITED"
        assert "within its queue_ms" in replies[-1].message and time.monotonic() - t < 1.5
        assert replies[-1].retry_after_ms is not None and replies[-1].retry_after_ms > 500


async def test_held_requests_past_their_deadline_end_timeout(
    nats_url: str, fake_openai: FakeOpenAI, nc: NATS
) -> None:
    cfg = _config(fake_openai, per_second=0.5, burst=1)
    async with Replies(nc) as replies:
        async with running_fleet(nats_url, cfg, None):
            first = await replies.send()
            await replies.wait([first], 10)
            held = await replies.send(queue_ms=3_000, timeout_ms=3_000)  # booked for ~2 s from now
            await asyncio.sleep(0.5)
            assert held not in replies.ends
        await asyncio.sleep(3.0)  # no dispatcher while its turn and its deadline pass
        async with running_fleet(nats_url, cfg, None):
            await replies.wait([held], 30)
    [end] = replies.errors([held])
    assert end.code == "TIMEOUT" and "past its timeout_ms of 3000" in end.message


def test_queue_ms_is_at_most_timeout_ms() -> None:
    body = msgspec.json.encode({**request(queue_ms=5000, timeout_ms=1000), "reply_to": "_INBOX.x"})
    with pytest.raises(InvalidMessage) as err:
        decode_request(body, use_case="draft", account="acme")
    assert err.value.field == "$.queue_ms"
    ok = msgspec.json.encode({**request(queue_ms=1000, timeout_ms=1000), "reply_to": "_INBOX.x"})
    assert decode_request(ok, use_case="draft", account="acme").queue_ms == 1000


@pytest.mark.timeout(240)
async def test_ten_thousand_accounts_at_once_stay_exact_and_leave_nothing_behind(nats_url: str) -> None:
    import nats

    conns = [await nats.connect(nats_url) for _ in range(3)]
    try:
        replicas = [await RateLimiter.open(c.jetstream()) for c in conns]
        limit = RateLimit(per_second=1, burst=2)
        gate = asyncio.Semaphore(64)
        admitted: dict[str, int] = {}

        async def account(n: int) -> None:
            name = f"acct{n}"
            async with gate:
                # Three attempts at the same instant, one through each replica: the burst of 2 admits
                # exactly two. One instant for all three, since on a loaded machine the three can be
                # more than a second apart, and a second refills a token at 1/s.
                now = now_us()
                decisions = await asyncio.gather(*(r.decide(name, limit, now) for r in replicas))
            admitted[name] = sum(d.admitted for d in decisions)

        await asyncio.gather(*(account(n) for n in range(10_000)))
        assert len(admitted) == 10_000
        assert {v for v in admitted.values()} == {2}
        # Memory: each replica keeps at most CACHE_SIZE states; the server one per account, which expire.
        assert all(r.cached_accounts <= CACHE_SIZE for r in replicas)
        kv = conns[0].jetstream()
        info = await kv.stream_info("KV_llm_rates")
        assert info.state.messages <= 10_000
        async with asyncio.timeout(30):
            while (await kv.stream_info("KV_llm_rates")).state.messages > 0:
                await asyncio.sleep(0.5)
    finally:
        for c in conns:
            await c.close()


async def _replicas(nats_url: str, n: int) -> tuple[list[NATS], list[RateLimiter]]:
    import nats

    conns = [await nats.connect(nats_url) for _ in range(n)]
    return conns, [await RateLimiter.open(c.jetstream()) for c in conns]


async def _kv_writes(nc: NATS) -> int:
    return int((await nc.jetstream().stream_info("KV_llm_rates")).state.last_seq)


async def test_a_steady_account_under_its_limit_is_mostly_admitted_from_leases(nats_url: str) -> None:
    conns, replicas = await _replicas(nats_url, 3)
    try:
        limit = RateLimit(per_second=100, burst=100)  # leases of up to 25 tokens, valid 250 ms
        # A clock of our own, ahead of the real one, so the schedule (60 requests/s round-robin over the three
        # replicas, 20/s each), not the machine's speed, decides the leases.
        start = now_us() + 60 * 1_000_000
        before = await _kv_writes(conns[0])
        decisions = []
        for i in range(300):  # a little apart in real time too: a refill starts once its request is handed over
            decisions.append(await replicas[i % 3].decide("steady", limit, start + i * 1_000_000 // 60))
            replicas[i % 3].handed_over("steady")
            await asyncio.sleep(0.002)
        for r in replicas:
            await r.quiet()
        writes = await _kv_writes(conns[0]) - before
        assert all(d.admitted for d in decisions)
        local = sum(r.local for r in replicas)
        ahead = sum(r.ahead for r in replicas)
        assert writes == 300 - local + ahead  # one write per decision not made from a lease, and per refill
        assert writes <= 300 // 3, writes  # most decisions made no round trip
        # Each replica's next lease was taken ahead of need: only its first request awaited a compare-and-set
        # (a few more when a refill lost its compare-and-sets to the other replicas' and was dropped).
        assert 300 - local <= 3 * 3, 300 - local
        assert all(r.from_ahead > 0 and r.leased > 0 for r in replicas)
        # Queued requests (queue_ms) and an account under tokens_per_minute never lease: one write each.
        before = await _kv_writes(conns[0])
        for i in range(10):
            assert (await replicas[0].decide("queued", limit, start + i, lease=False)).admitted
        tpm = RateLimit(per_second=100, burst=100, tokens_per_minute=10**6)
        for i in range(10):
            assert (await replicas[0].decide("tpm", tpm, start + i, tokens=10)).admitted
        assert await _kv_writes(conns[0]) - before == 20
    finally:
        for c in conns:
            await c.close()


async def test_three_replicas_leasing_stay_within_the_stated_bound(nats_url: str) -> None:
    import random

    from router.ratelimit import lease_cap

    from .test_ratelimit import Trace, late_refill_arrivals, random_arrivals, simulate, worst_excess

    conns, replicas = await _replicas(nats_url, 3)
    try:
        limit = RateLimit(per_second=10, burst=40)
        start = now_us() + 600 * 1_000_000  # our own clock, ahead of the real one (see above)
        schedules = [late_refill_arrivals(limit, start), random_arrivals(random.Random(5), start + 60_000_000, 300)]
        refills = 0
        for n, arrivals in enumerate(schedules):
            account = f"bound{n}"
            admitted: list[tuple[int, int, int]] = []
            for t, r in arrivals:
                local = replicas[r].local
                d = await replicas[r].decide(account, limit, t)
                if d.admitted:
                    assert d.at_us == t
                    admitted.append((t, r, replicas[r].local - local))
                for replica in replicas:  # its refill ahead, if any, before the next arrival (as simulated)
                    await replica.quiet()
            # The replicas on the shared state, each refilling ahead, admit exactly what router/ratelimit.py's
            # arithmetic does ...
            trace = Trace()
            expected = simulate(limit, arrivals, {0, 1, 2}, trace)
            assert [(t, r, k == 0) for t, r, k in expected] == [(t, r, bool(k)) for t, r, k in admitted]
            refills += len(trace.refills)
            assert sum(r.ahead for r in replicas) == refills  # the same refills, too
            # ... which stays within burst + rate x W + lease_cap in any window of W, and within the exact
            # bound plus the leased tokens held unused when the window began.
            times = [t for t, _, _ in admitted]
            assert worst_excess(limit, times) <= lease_cap(limit)
            assert worst_excess(limit, times, trace.held) <= 0
        assert all(r.from_ahead > 0 for r in replicas)
    finally:
        for c in conns:
            await c.close()
