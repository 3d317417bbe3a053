"""router/ratelimit.py with a fake clock: what is admitted, when, and what the retry hint promises."""

from __future__ import annotations

import random
from collections.abc import Collection

from router import config as config_mod
from router.config import LimitsConfig, RateLimit
from router.ratelimit import (
    DEFAULT_ANSWER_TOKENS,
    Lease,
    RateState,
    available,
    decide,
    decide_leasing,
    estimated_tokens,
    lease_cap,
    lease_size,
    lease_validity_us,
    limits_for,
    refill_size,
)
from schemas import Message, Request

S = 1_000_000
T0 = 1_700_000_000 * S


def _run(limit: RateLimit, times_us: list[int], tokens: int = 0) -> tuple[list[bool], RateState]:
    state = RateState()
    out = []
    for t in times_us:
        d = decide(state, limit, t, tokens=tokens)
        out.append(d.admitted)
        state = d.state
    return out, state


def test_an_idle_account_gets_its_burst_at_once_and_no_more() -> None:
    admitted, _ = _run(RateLimit(per_second=20, burst=20), [T0] * 200)
    assert admitted.count(True) == 20
    assert admitted[:20] == [True] * 20


def test_over_time_the_rate_holds_within_one_burst() -> None:
    limit = RateLimit(per_second=20, burst=20)
    times = [T0 + i * 1000 for i in range(5000)]  # one attempt every ms for 5 s
    admitted, _ = _run(limit, times)
    assert admitted.count(True) == 20 + 5 * 20 - 1  # the burst, then one per 50 ms (the last lands at 5 s)


def test_the_retry_hint_is_truthful_and_not_early() -> None:
    limit = RateLimit(per_second=3, burst=2)
    state = RateState()
    now = T0
    for _ in range(2):
        state = decide(state, limit, now).state
    refused = decide(state, limit, now)
    assert not refused.admitted and refused.retry_after_ms is not None
    later = now + refused.retry_after_ms * 1000
    assert decide(state, limit, later).admitted
    assert not decide(state, limit, later - 2000).admitted  # a hint 2 ms shorter would not have done


def test_a_refusal_changes_nothing() -> None:
    limit = RateLimit(per_second=1, burst=1)
    state = decide(RateState(), limit, T0).state
    refused = decide(state, limit, T0)
    assert refused.state == state


def test_booking_takes_the_next_slots_in_order() -> None:
    limit = RateLimit(per_second=10, burst=1)
    state = decide(RateState(), limit, T0).state
    slots = []
    for _ in range(3):
        d = decide(state, limit, T0, wait_us=S)
        assert d.admitted
        slots.append(d.at_us - T0)
        state = d.state
    assert slots == [100_000, 200_000, 300_000]
    # A fresh request cannot take a booked slot: it is told to come after the queue.
    fresh = decide(state, limit, T0 + 100_000)
    assert not fresh.admitted and fresh.retry_after_ms == 300


def test_booking_beyond_the_wait_is_refused_with_the_time_it_would_take() -> None:
    limit = RateLimit(per_second=1, burst=1)
    state = decide(RateState(), limit, T0).state
    d = decide(state, limit, T0, wait_us=S // 2)
    assert not d.admitted and d.retry_after_ms == 1000


def test_tokens_per_minute_limit_the_estimated_tokens() -> None:
    limit = RateLimit(per_second=1000, burst=1000, tokens_per_minute=6000)
    admitted, state = _run(limit, [T0] * 10, tokens=1000)
    assert admitted.count(True) == 6
    d = decide(state, limit, T0, tokens=1000)
    assert d.retry_after_ms == 10_000  # 1000 tokens come back in 10 s at 6000/min
    assert decide(state, limit, T0 + 10 * S, tokens=1000).admitted


def test_a_request_larger_than_a_minute_of_tokens_is_never_admitted() -> None:
    d = decide(RateState(), RateLimit(tokens_per_minute=100), T0, tokens=101)
    assert not d.admitted and d.retry_after_ms is None and "100 per minute" in d.impossible


def test_tokens_are_ignored_without_a_tokens_limit() -> None:
    admitted, _ = _run(RateLimit(per_second=1, burst=3), [T0] * 5, tokens=10**9)
    assert admitted.count(True) == 3


def test_an_idle_state_expires_into_a_full_bucket() -> None:
    limit = RateLimit(per_second=10, burst=5)
    _, state = _run(limit, [T0] * 5)
    assert state.idle_after_us() == T0 + S // 2
    admitted, _ = _run(limit, [state.idle_after_us()] * 6)
    assert admitted.count(True) == 5


def test_limits_lookup_prefers_account_then_tier_then_default() -> None:
    cfg = config_mod.from_mapping({
        "providers": {}, "pools": {}, "routes": {},
        "limits": {"default": {"rate": {"per_second": 1, "burst": 1}},
                   "tiers": {"pro": {"rate": {"per_second": 2, "burst": 2}}},
                   "accounts": {"acme": {"rate": {"per_second": 3, "burst": 3}}}},
    })
    limits: LimitsConfig = cfg.limits
    assert limits_for(limits, "acme", "pro").per_second == 3
    assert limits_for(limits, "other", "pro").per_second == 2
    assert limits_for(limits, "other", "free").per_second == 1
    assert limits_for(LimitsConfig(), "x", "y") == RateLimit(per_second=10, burst=50)


def test_estimated_tokens_are_the_prompt_plus_the_answer() -> None:
    req = Request(id="r", account="a", use_case="u", messages=[Message(role="user", content="x" * 400)],
                  reply_to="_INBOX.x")
    assert estimated_tokens(req) == 100 + DEFAULT_ANSWER_TOKENS
    req.max_tokens = 50
    assert estimated_tokens(req) == 150


# Leases: one decision takes k request tokens; the replica admits k - 1 more locally until they expire.


class Trace:
    """What `simulate` saw besides the admissions: the refills ahead of need (time, replica, size), what the
    replica then held (time, replica, its usable tokens of both leases, when the first of them expire), and
    the unused leased tokens the replicas held, still valid, when each arrival's moment began."""

    def __init__(self) -> None:
        self.refills: list[tuple[int, int, int]] = []
        self.holding: list[tuple[int, int, int, int]] = []
        self.held: dict[int, int] = {}


def simulate(
    limit: RateLimit, arrivals: list[tuple[int, int]], ahead: Collection[int] = (), trace: Trace | None = None
) -> list[tuple[int, int, int]]:
    """Replicas sharing one account's state as workers/ratelimits.py does (one shared state, a lease per
    replica), on a fake clock: (time, replica, tokens its decision took; 0 for a local admission) for
    each admitted arrival (time, replica), in order. The replicas in `ahead` take their next lease ahead
    of need, once an admission left them with no more tokens than the lease's low-water mark (or with a
    lease that expires before the account's next request is due, `Lease.renew_due`), before the next
    arrival: it follows the lease while that one has usable tokens (`Lease.next`, sized so that both stay
    within `lease_cap`), else it replaces it."""
    state = RateState()
    leases: dict[int, Lease] = {}
    out = []
    trace = trace if trace is not None else Trace()
    for t, replica in arrivals:
        trace.held.setdefault(t, sum(_unused(held, limit, t) for held in leases.values()))
        last = leases.get(replica)
        spent = last is not None and last.use(limit, t)
        if last is not None and not spent and (nxt := last.then()) is not None:
            last = leases[replica] = nxt
            spent = nxt.use(limit, t)
        if spent:
            assert last is not None
            out.append((t, replica, 0))
        else:
            d, take = decide_leasing(state, limit, t, last)
            if not d.admitted:
                continue
            state = d.state
            last = leases[replica] = Lease.taken(limit, take, t, last.latest_us() if last is not None else 0)
            out.append((t, replica, take))
        if replica in ahead and last.next is None and (last.left <= last.low or last.renew_due(t)):
            wanted = last.wanted_ahead(limit, t)
            keep = last if last.usable(limit, t) else None
            size = min(refill_size(state, limit, t, wanted), lease_cap(limit) - keep.left if keep else wanted)
            if size > 0:
                refill = decide(state, limit, t, take=size)
                assert refill.admitted  # half the burst is there, and a lease is at most a quarter of it
                state = refill.state
                taken = Lease.taken_ahead(limit, size, t, last)
                if keep is not None:
                    keep.next = taken
                else:
                    leases[replica] = taken
                trace.refills.append((t, replica, size))
                first = keep if keep is not None else taken
                trace.holding.append((t, replica, _unused(first, limit, t), first.until_us))
    return out


def _unused(held: Lease, limit: RateLimit, t: int) -> int:
    """The tokens of a replica's lease, and of the lease that follows it, still usable at `t`."""
    nxt = held.next
    return (held.left if held.usable(limit, t) else 0) + (_unused(nxt, limit, t) if nxt is not None else 0)


def worst_excess(limit: RateLimit, times_us: list[int], held: dict[int, int] | None = None) -> float:
    """The most admissions in any window [t, t + W] beyond the exact limiter's burst + per_second x W
    (and beyond the leased tokens held unused when the window began, `held` by moment, when given)."""
    times = sorted(times_us)
    worst = float("-inf")
    for i, t in enumerate(times):
        extra = held[t] if held is not None else 0
        for j in range(i, len(times)):
            worst = max(worst, (j - i + 1) - (limit.burst + float(limit.per_second) * (times[j] - t) / S) - extra)
    return worst


def test_a_lease_takes_k_tokens_in_one_decision() -> None:
    limit = RateLimit(per_second=10, burst=40)
    d = decide(RateState(), limit, T0, take=10)
    assert d.admitted and d.state.requests_us == T0 + 10 * S // 10  # TAT moved by 10 emission intervals
    assert available(d.state, limit, T0) == 30
    assert not decide(d.state, limit, T0, take=31).admitted and decide(d.state, limit, T0, take=30).admitted


def test_no_lease_below_half_the_burst_and_never_more_than_a_quarter() -> None:
    limit = RateLimit(per_second=10, burst=40)
    assert lease_cap(limit) == 10 and lease_validity_us(limit) == S  # 10 tokens refill in 1 s
    assert lease_size(RateState(), limit, T0, wanted=1000) == 10
    assert lease_size(RateState(), limit, T0, wanted=3) == 3
    assert lease_size(RateState(), limit, T0, wanted=1) == 1
    half = decide(RateState(), limit, T0, take=20).state
    assert lease_size(half, limit, T0, wanted=8) == 8  # 20 of 40 left: still half the burst
    under = decide(half, limit, T0).state
    assert lease_size(under, limit, T0, wanted=8) == 1  # 19 left: decided one at a time, exactly
    assert lease_size(under, limit, T0 + S // 10, wanted=8) == 8  # a token later, half the burst again


def test_no_lease_with_tokens_per_minute_a_small_burst_or_no_request_rate() -> None:
    assert lease_cap(RateLimit(per_second=10, burst=40, tokens_per_minute=10_000)) == 1
    assert lease_cap(RateLimit(per_second=1, burst=7)) == 1
    assert lease_cap(RateLimit(per_second="unlimited", tokens_per_minute=10)) == 1
    assert lease_validity_us(RateLimit(per_second=1, burst=2)) == 0
    limit = RateLimit(per_second=1, burst=2)
    assert decide_leasing(RateState(), limit, T0, Lease.taken(limit, 1, T0))[1] == 1


def test_leased_tokens_expire_and_belong_to_their_limit() -> None:
    limit = RateLimit(per_second=10, burst=40)
    lease = Lease.taken(limit, 3, T0)
    assert lease.left == 2 and lease.until_us == T0 + S
    assert not lease.use(RateLimit(per_second=5, burst=40), T0)  # the account's limit changed
    assert lease.use(limit, T0 + S)  # the last moment it is valid
    assert not lease.use(limit, T0 + S + 1) and lease.left == 1  # expired: the unused token is lost
    assert lease.use(limit, T0 + 1) and lease.left == 0
    assert not lease.use(limit, T0 + 2)


def test_the_next_lease_follows_the_accounts_recent_rate() -> None:
    limit = RateLimit(per_second=10, burst=40)
    used_up = Lease.taken(limit, 4, T0)
    used_up.left = 0
    assert used_up.wanted_next(limit, T0 + S // 2) == 8  # all used within its validity: twice as many
    assert used_up.wanted_next(limit, T0 + 2 * S) == 2  # 4 used over 2 s: 2 per validity of 1 s
    rare = Lease.taken(limit, 1, T0)
    assert rare.wanted_next(limit, T0 + 5 * S) == 1  # an account rarer than once per validity: no lease
    assert used_up.wanted_next(RateLimit(per_second=5, burst=40), T0) == 1


def test_a_lease_that_does_not_fit_falls_back_to_one_token() -> None:
    limit = RateLimit(per_second=10, burst=40)
    greedy = Lease.taken(limit, 10, T0)
    greedy.left = 0
    state = decide(RateState(), limit, T0, take=20).state  # exactly half left: a lease of 10 would fit
    d, take = decide_leasing(state, limit, T0, greedy)
    assert d.admitted and take == 10
    # Never refuses what one token admits: drain to 1 token, whatever the last lease asked.
    state = decide(RateState(), limit, T0, take=39).state
    d, take = decide_leasing(state, limit, T0, greedy)
    assert d.admitted and take == 1
    refused, take = decide_leasing(d.state, limit, T0, greedy)
    assert not refused.admitted and refused.retry_after_ms == 100  # the hint is for one token


def late_use_arrivals(limit: RateLimit, base_us: int) -> list[tuple[int, int]]:
    """The worst case for leases: replica 0 at a steady 10/s grows its lease to the cap; that lease's
    tokens are then used at its last valid moment, when replica 1 takes all the bucket has refilled."""
    warm = [(base_us + i * 100_000, 0) for i in range(40)]
    ta = next(t for t, _, k in simulate(limit, warm) if k == lease_cap(limit))
    until = ta + lease_validity_us(limit)
    return [a for a in warm if a[0] <= ta] + [(until, 0)] * 9 + [(until, 1)] * 50


def random_arrivals(rng: random.Random, base_us: int, n: int) -> list[tuple[int, int]]:
    """`n` arrivals over 3 replicas: bursts at one instant, steady runs, and pauses past a lease's validity."""
    t, arrivals = base_us, []
    for _ in range(n):
        t += rng.choice([0, 0, 1_000, 20_000, 100_000, 300_000, 999_999, 1_000_000, 3_000_000])
        arrivals.append((t, rng.randrange(3)))
    return arrivals


def test_a_late_leased_token_adds_at_most_a_quarter_burst_to_any_window() -> None:
    # Over a window of W the exact limiter admits at most burst + rate x W; with leases up to lease_cap
    # more. The worst case reaches cap - 1 (= 9 here) at one instant.
    limit = RateLimit(per_second=10, burst=40)
    arrivals = late_use_arrivals(limit, T0)
    trace = Trace()
    out = simulate(limit, arrivals, {1}, trace)  # replica 1 refilling ahead changes nothing here
    until = arrivals[-1][0]
    assert sum(1 for t, r, k in out if t == until and r == 0 and k == 0) == 9
    assert worst_excess(limit, [t for t, _, _ in out]) == lease_cap(limit) - 1
    # Exactly the leased tokens replica 0 held unused when that window began: the second bound is tight.
    assert worst_excess(limit, [t for t, _, _ in out], trace.held) == 0
    # One microsecond later the lease has expired: replica 0's requests go to the shared state instead.
    out = simulate(limit, [(t + 1, r) if t == until else (t, r) for t, r in arrivals])
    assert worst_excess(limit, [t for t, _, _ in out]) <= 0


def test_three_replicas_leasing_stay_within_the_stated_bound() -> None:
    limit = RateLimit(per_second=10, burst=40)
    rng = random.Random(9)
    local = refills = 0
    for n in range(60):
        # Replicas 0 and 1 take their next lease ahead of need (as workers/ratelimits.py does); in a third of
        # the schedules replica 2 does too, else it leases only when a request asks.
        trace = Trace()
        ahead = {0, 1, 2} if n % 3 == 0 else {0, 1}
        out = simulate(limit, random_arrivals(rng, T0, rng.randint(50, 250)), ahead, trace)
        times = [t for t, _, _ in out]
        assert worst_excess(limit, times) <= lease_cap(limit)
        # ... and within the exact bound plus the leased tokens the replicas held unused when a window began.
        assert worst_excess(limit, times, trace.held) <= 0
        local += sum(1 for _, _, k in out if k == 0)
        refills += len(trace.refills)
    # The replicas did lease, and ahead: the bound was checked on late uses, not exact decisions only.
    assert local > 500 and refills > 300


def test_a_refill_takes_what_the_accounts_use_asks_for_while_half_the_burst_is_there() -> None:
    limit = RateLimit(per_second=10, burst=40)  # leases of up to 10, valid 1 s
    state = RateState()
    assert refill_size(state, limit, T0, 1) == 1 and refill_size(state, limit, T0, 0) == 0
    assert refill_size(state, limit, T0, 1000) == lease_cap(limit)
    half = decide(state, limit, T0, take=20).state
    assert refill_size(half, limit, T0, 4) == 4  # 20 of 40 left: still half the burst
    under = decide(half, limit, T0).state
    assert refill_size(under, limit, T0, 4) == 0  # 19 left: no refill, every request decided exactly
    assert refill_size(under, limit, T0 + S // 10, 4) == 4  # a token later, half the burst again
    assert refill_size(RateState(), RateLimit(per_second=10, burst=40, tokens_per_minute=10**6), T0, 4) == 0
    assert refill_size(RateState(), RateLimit(per_second=1, burst=7), T0, 4) == 0  # no lease at all
    # One token after a request's own one-token decision, unless the account's previous lease here was
    # taken more than V before (it sends rarer than that); then the account's use on this replica decides.
    own = Lease.taken(limit, 1, T0)
    assert own.left == 0 and own.wanted_ahead(limit, T0) == 1
    assert Lease.taken(limit, 1, T0, prior_us=T0 - S).wanted_ahead(limit, T0) == 1
    assert Lease.taken(limit, 1, T0, prior_us=T0 - S - 1).wanted_ahead(limit, T0) == 0
    ahead = Lease.taken_ahead(limit, 4, T0)
    assert ahead.left == 4
    ahead.left = 0
    assert ahead.wanted_ahead(limit, T0 + S // 4) == 8  # 4 used in a quarter of V: at most twice as many
    assert ahead.wanted_ahead(limit, T0 + S // 2) == 8  # 4 in half of V: 8 per V
    assert ahead.wanted_ahead(limit, T0 + S) == 4  # 4 in V: as many again
    assert ahead.wanted_ahead(limit, T0 + 3 * S // 4) == 5  # rounded down: never below what it used
    assert ahead.wanted_ahead(RateLimit(per_second=5, burst=40), T0 + S) == 1  # a new limit starts from 1
    bigger = Lease.taken(limit, 4, T0)
    bigger.left = 0
    assert bigger.wanted_ahead(limit, T0 + S // 2) == 6  # a request's lease: its 3 uses after the debit in V / 2
    assert bigger.wanted_ahead(limit, T0 + S // 10) == 8  # at most twice its size


def test_a_refills_tokens_expire_unused_after_its_validity() -> None:
    limit = RateLimit(per_second=10, burst=40)
    # A rare account (one request every 2 s, rarer than V = 1 s): the refill of one token after its first
    # request expires unused, and then the replica, seeing it rarer than V, takes none ahead.
    trace = Trace()
    arrivals = [(T0 + i * 2 * S, 0) for i in range(5)]
    out = simulate(limit, arrivals, {0}, trace)
    assert [k for _, _, k in out] == [1] * 5 and trace.refills == [(T0, 0, 1)]
    refill = Lease.taken_ahead(limit, 1, T0)
    assert not refill.use(limit, T0 + S + 1) and refill.left == 1
    # Within V its next request is admitted from the refill, with no decision of its own.
    out = simulate(limit, [(T0 + i * S, 0) for i in range(5)], {0})
    assert [k for _, _, k in out] == [1, 0, 0, 0, 0]


def burst_then_pace_arrivals(base_us: int, pace_us: int, paced: int) -> list[tuple[int, int]]:
    """One replica's arrivals for an account of `RateLimit(100, 400)` (leases of up to 100, V = 1 s): 200
    requests 12 ms apart (a burst its leases grow to serve), then `paced` requests `pace_us` apart."""
    burst = [(base_us + i * 12_000, 0) for i in range(200)]
    end = burst[-1][0]
    return burst + [(end + (k + 1) * pace_us, 0) for k in range(paced)]


def test_a_lease_that_would_expire_before_the_accounts_next_request_is_renewed_ahead() -> None:
    limit = RateLimit(per_second=100, burst=400)
    # The account's latest spacing here (800 ms) is longer than what is left of the lease (300 ms) and
    # within a validity (1 s): the next request would find the lease expired, so a new one is taken now.
    lease = Lease.taken(limit, 40, T0, prior_us=T0 - 800_000)
    assert lease.gap_us == 800_000 and lease.latest_us() == T0
    assert not lease.renew_due(T0)  # a whole validity left
    assert lease.use(limit, T0 + 700_000) and lease.gap_us == 700_000 and lease.latest_us() == T0 + 700_000
    assert lease.renew_due(T0 + 700_000)  # 300 ms left, 700 ms apart
    assert not Lease.taken(limit, 40, T0, prior_us=T0 - S - 1).renew_due(T0 + 900_000)  # rarer than V: none
    assert not Lease.taken(limit, 40, T0).renew_due(T0 + 900_000)  # spacing not known
    used_up = Lease.taken(limit, 1, T0, prior_us=T0 - 800_000)
    assert used_up.left == 0 and not used_up.renew_due(T0 + 900_000)  # no tokens left: the usual refill's case
    ahead = Lease.taken_ahead(limit, 3, T0, used_up)
    assert ahead.latest_us() == T0 and ahead.gap_us == 800_000  # the account's record goes on
    assert Lease.taken_ahead(limit, 3, T0).latest_us() == T0

    # After a burst, an account slowing to one request every 800 ms (within V) awaits one compare-and-set (its
    # first request after the burst's lease expired), then is served from leases taken ahead; without renewals
    # it awaited three, as the large lease that request took expired unused between two of its requests.
    trace = Trace()
    arrivals = burst_then_pace_arrivals(T0, 800_000, 10)
    out = simulate(limit, arrivals, {0}, trace)
    assert len(out) == len(arrivals)
    paced = [k for t, _, k in out if t > arrivals[199][0]]
    assert paced[0] > 1 and paced[1:] == [0] * 9
    assert worst_excess(limit, [t for t, _, _ in out]) <= lease_cap(limit)
    assert worst_excess(limit, [t for t, _, _ in out], trace.held) <= 0


def late_refill_arrivals(limit: RateLimit, base_us: int) -> list[tuple[int, int]]:
    """`late_use_arrivals` for replicas that refill ahead: replica 0 at a steady 10/s refills until it holds
    the cap (the rest of its lease and the next one); those tokens are then all used at the last moment
    they are all valid, when replica 1 takes all the bucket has refilled."""
    warm = [(base_us + i * 100_000, 0) for i in range(40)]
    trace = Trace()
    simulate(limit, warm, {0}, trace)
    ta, until = next((t, end) for t, _, held, end in trace.holding if held == lease_cap(limit))
    return [a for a in warm if a[0] <= ta] + [(until, 0)] * lease_cap(limit) + [(until, 1)] * 50


def test_a_late_used_refill_stays_within_the_bound() -> None:
    limit = RateLimit(per_second=10, burst=40)
    arrivals = late_refill_arrivals(limit, T0)
    until = arrivals[-1][0]
    trace = Trace()
    out = simulate(limit, arrivals, {0, 1}, trace)
    assert sum(1 for t, r, k in out if t == until and r == 0 and k == 0) == lease_cap(limit)
    assert worst_excess(limit, [t for t, _, _ in out]) <= lease_cap(limit)
    assert worst_excess(limit, [t for t, _, _ in out], trace.held) <= 0
    trace = Trace()
    out = simulate(limit, [(t + 1, r) if t == until else (t, r) for t, r in arrivals], {0, 1}, trace)
    assert trace.held[until + 1] < lease_cap(limit)  # a moment later the older lease's tokens have expired
    assert worst_excess(limit, [t for t, _, _ in out], trace.held) <= 0
