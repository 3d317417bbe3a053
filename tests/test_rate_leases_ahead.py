"""Rate leases taken ahead of need (workers/ratelimits.py) on a real nats-server: what they spare a request,
when they stop, that their tokens expire, and that none outlives the limiter's close()."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace

import msgspec
import pytest
from nats.aio.client import Client as NATS

from router.config import UNLIMITED, Limits, LimitsConfig, RateLimit
from router.ratelimit import RateState, available, lease_validity_us
from schemas import Request
from workers.ratelimits import BUCKET, REFILL_DELAY_S, RateLimiter, now_us

LIMIT = RateLimit(per_second=10, burst=40)  # leases of up to 10 tokens, valid V = 1 s
V = lease_validity_us(LIMIT)


@pytest.fixture
async def limiter(nc: NATS) -> AsyncIterator[RateLimiter]:
    rates = await RateLimiter.open(nc.jetstream())
    yield rates
    await rates.close()


async def _writes(nc: NATS) -> int:
    """Writes to the rate state so far (the KV stream's last sequence): one per compare-and-set that won."""
    return int((await nc.jetstream().stream_info(f"KV_{BUCKET}")).state.last_seq)


def _refills() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if getattr(t.get_coro(), "__name__", "") == "_refill" and not t.done()]


async def test_a_rare_accounts_next_request_within_v_makes_no_compare_and_set(nc: NATS, limiter: RateLimiter) -> None:
    t = now_us() + 60_000_000  # a clock of our own, ahead of the real one: the schedule decides, not the machine
    first = await limiter.decide("rare", LIMIT, t)
    await limiter.quiet()
    assert first.admitted and limiter.ahead == 1  # its own decision, then one token taken ahead
    before = await _writes(nc)
    second = await limiter.decide("rare", LIMIT, t + V // 2)  # half a validity later
    assert second.admitted and limiter.local == 1 and limiter.from_ahead == 1
    await limiter.quiet()
    # The one write since is the next refill, which the request that used the last token started in the
    # background: the request itself wrote nothing.
    assert limiter.ahead == 2 and await _writes(nc) - before == 1


async def test_a_refills_tokens_expire_unused_after_v(nc: NATS, limiter: RateLimiter) -> None:
    t = now_us() + 60_000_000
    assert (await limiter.decide("late", LIMIT, t)).admitted
    await limiter.quiet()
    assert limiter.ahead == 1
    before = await _writes(nc)
    late = await limiter.decide("late", LIMIT, t + V + 1)  # one microsecond past the refill's validity
    assert late.admitted and limiter.local == 0 and limiter.from_ahead == 0
    await limiter.quiet()
    # Decided on the shared state (the refill's token was lost), and nothing taken ahead after it: the
    # account sends rarer than V, so a token taken for its next request would be lost as well.
    assert await _writes(nc) - before == 1 and limiter.ahead == 1


async def test_refills_stop_below_half_the_burst_and_no_token_is_lost(nc: NATS, limiter: RateLimiter) -> None:
    t = now_us() + 60_000_000
    kv = await nc.jetstream().key_value(BUCKET)
    admitted, below_half_from = 0, None
    for i in range(LIMIT.burst + 5):  # all at one instant: nothing refills the bucket meanwhile
        ahead = limiter.ahead
        if (await limiter.decide("busy", LIMIT, t)).admitted:
            admitted += 1
        await limiter.quiet()
        if below_half_from is not None:
            assert limiter.ahead == ahead, i  # below half the burst: no refill, every request decided exactly
        state = msgspec.json.decode((await kv.get("a.busy")).value or b"", type=RateState)
        if below_half_from is None and 2 * available(state, LIMIT, t) < LIMIT.burst:
            below_half_from = i
    assert below_half_from is not None and limiter.ahead > 1 and limiter.from_ahead > 0
    # Every token leased ahead went to one of this replica's next requests: exactly the burst was admitted.
    assert admitted == LIMIT.burst


async def test_no_refill_outlives_close(nc: NATS) -> None:
    limiter = await RateLimiter.open(nc.jetstream())
    t = now_us() + 60_000_000
    assert (await limiter.decide("closing", LIMIT, t)).admitted
    assert _refills() == []  # due REFILL_DELAY_S after the request, which is handed over first
    for _ in range(1000):  # until it starts: then cancelled in flight
        if _refills():
            break
        await asyncio.sleep(REFILL_DELAY_S / 10)
    assert len(_refills()) == 1
    await limiter.close()
    assert _refills() == [] and limiter.ahead == 0  # cancelled in flight (its write may still land: tokens lost)
    other = await RateLimiter.open(nc.jetstream())
    assert (await other.decide("due", LIMIT, t)).admitted
    await other.close()  # before its refill was due: it never starts
    await asyncio.sleep(5 * REFILL_DELAY_S)
    assert _refills() == [] and other.ahead == 0
    # A closed limiter still decides, and takes nothing ahead: the state holds the request's one token only.
    assert (await limiter.decide("closed", LIMIT, t)).admitted
    assert _refills() == []
    await asyncio.sleep(0.2)
    kv = await nc.jetstream().key_value(BUCKET)
    state = msgspec.json.decode((await kv.get("a.closed")).value or b"", type=RateState)
    assert state.requests_us == t + 1_000_000 // 10 and limiter.ahead == 0


def _request(account: str, **fields: object) -> Request:
    return msgspec.convert({"id": f"r-{account}", "account": account, "use_case": "draft", "reply_to": "_INBOX.x",
                            "messages": [{"role": "user", "content": "hi"}], **fields}, Request)


async def test_admitted_now_spends_a_leased_token_and_otherwise_leaves_the_request_to_admit(
    nc: NATS, limiter: RateLimiter
) -> None:
    limits = LimitsConfig(default=Limits(rate=LIMIT))
    req = _request("now")
    start = await _writes(nc)
    assert not limiter.admitted_now(req, limits)  # no lease yet: nothing spent, admit decides it
    assert limiter.local == 0 and await _writes(nc) == start
    first_delivery = SimpleNamespace(metadata=SimpleNamespace(num_delivered=1, sequence=SimpleNamespace(stream=1)))
    assert await limiter.admit(req, first_delivery, 0, limits) is None  # type: ignore[arg-type]
    await limiter.quiet()  # its refill took the next token ahead
    before = await _writes(nc)
    assert limiter.admitted_now(req, limits)
    assert limiter.local == 1 and limiter.from_ahead == 1
    await limiter.quiet()
    assert await _writes(nc) - before == 1  # only the next refill: the request itself wrote nothing
    # A request that may wait is always decided on the shared state; an account with no limit needs nothing.
    assert not limiter.admitted_now(_request("now", queue_ms=1000), limits)
    unlimited = LimitsConfig(default=Limits(rate=RateLimit(per_second=UNLIMITED)))
    before = await _writes(nc)
    assert limiter.admitted_now(_request("free"), unlimited) and await _writes(nc) == before



async def test_after_a_burst_a_paced_account_is_served_from_leases_renewed_before_they_expire(
    nc: NATS, limiter: RateLimiter
) -> None:
    from .test_ratelimit import burst_then_pace_arrivals

    limit = RateLimit(per_second=100, burst=400)  # leases of up to 100 tokens, valid 1 s
    arrivals = burst_then_pace_arrivals(now_us() + 60_000_000, 800_000, 10)
    for t, _ in arrivals[:200]:
        assert (await limiter.decide("paced", limit, t)).admitted
        await limiter.quiet()
    local, ahead, before = limiter.local, limiter.ahead, await _writes(nc)
    for t, _ in arrivals[200:]:
        assert (await limiter.decide("paced", limit, t)).admitted
        await limiter.quiet()
    # The first paced request found the burst's last lease expired and decided on the shared state; each
    # one after it was admitted from a lease taken ahead of it, some while the lease before still had
    # tokens (it would have expired before the request came), with no compare-and-set of its own.
    assert limiter.local - local == 9 and limiter.from_ahead >= 9
    assert await _writes(nc) - before == 1 + (limiter.ahead - ahead)


async def _steady_misses(limiter: RateLimiter, account: str, limit: RateLimit) -> tuple[int, int]:
    """An account at a steady ~400/s on one replica, through the dispatcher's fast path: how many of its first
    300 and of its next 300 requests found no leased token (and were decided by `decide` instead)."""
    req = _request(account)
    misses = [0, 0]
    for i in range(600):
        if not limiter.admitted_now_under(req, limit):
            misses[i // 300] += 1
            assert (await limiter.decide(account, limit, now_us())).admitted
        await asyncio.sleep(0.002)
    return misses[0], misses[1]


async def test_a_lease_running_low_is_followed_by_the_next_before_its_last_token(
    nc: NATS, limiter: RateLimiter, monkeypatch: pytest.MonkeyPatch
) -> None:
    from router import ratelimit
    from workers import ratelimits

    monkeypatch.setattr(ratelimits, "REFILL_DELAY_S", 0.02)  # refills that take their time: 20 ms and a round trip
    limit = RateLimit(per_second=1000, burst=2000)  # leases of up to 500 tokens, valid 0.5 s
    # Once its leases have grown to its pace, the account's requests always find a token: the next lease is
    # taken while a quarter of the current one is left (tens of ms of this account's requests), and it
    # follows that lease instead of replacing it, so no token is lost.
    _, steady = await _steady_misses(limiter, "low-water", limit)
    await limiter.quiet()
    assert steady == 0
    held = limiter._leases["a.low-water"]
    assert held.left + (held.next.left if held.next is not None else 0) <= ratelimit.lease_cap(limit)
    # What it spares: the next lease taken only once the last token is used, requests that come before it
    # lands find none.
    monkeypatch.setattr(ratelimit, "LOW_WATER_SHARE", 10**9)
    _, steady = await _steady_misses(limiter, "at-the-last-token", limit)
    assert steady > 0
