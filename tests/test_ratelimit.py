"""router/ratelimit.py with a fake clock: what is admitted, when, and what the retry hint promises."""

from __future__ import annotations

from router import config as config_mod
from router.config import LimitsConfig, RateLimit
from router.ratelimit import DEFAULT_ANSWER_TOKENS, RateState, decide, estimated_tokens, limits_for
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
