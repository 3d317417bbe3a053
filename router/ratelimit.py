"""Account rate limits: the admission arithmetic (GCRA) and which limits apply to a request.

GCRA keeps one number per dimension, the theoretical arrival time (TAT): when the account's bucket
would be empty again if nothing more came. A request of cost `n` in a dimension with one unit every
`T` µs and a burst of `B` units conforms at the earliest at `max(TAT, now) + (n - B)·T`; admitting it
moves TAT to `max(TAT, at) + n·T`. Two dimensions exist: requests (`n` = 1, `T` = 1 s / per_second,
`B` = burst) and, when `tokens_per_minute` is set, tokens (`n` = the request's estimated tokens,
`T` = 1 min / tokens_per_minute, `B` = tokens_per_minute: one minute's worth at once).

A request may also be *booked* for a later moment (`wait_us`): its place in the schedule is taken now,
so requests that wait are served in the order they asked and a fresh one cannot take their turn.

Everything here is pure: the clock is a parameter, and the shared copy of the state lives in
workers/ratelimits.py.
"""

from __future__ import annotations

import math

import msgspec

from router.config import UNLIMITED, LimitsConfig, RateLimit
from router.limits import AccountLimits, rate_limit
from router.routing import needs
from schemas import Request

DEFAULT_ANSWER_TOKENS = 1024
"""The answer's size assumed for a request without `max_tokens`, in the tokens-per-minute check."""

US = 1_000_000


class RateState(msgspec.Struct, array_like=True, frozen=True):
    """An account's TATs in µs since the epoch; 0 (or any time past) means a full bucket."""

    requests_us: int = 0
    tokens_us: int = 0

    def idle_after_us(self) -> int:
        """When this state becomes the same as no state at all (what a stored copy may expire after)."""
        return max(self.requests_us, self.tokens_us)


class Decision(msgspec.Struct, frozen=True):
    """What `decide` says. `at_us` is when the request conforms (`now` or later); `admitted` when that
    is within its wait, then `state` is the new state to store. When not admitted, `retry_after_ms`
    is how long until it would be admitted if nothing else changed (None: never, see `impossible`)."""

    admitted: bool
    at_us: int
    state: RateState
    retry_after_ms: int | None = None
    impossible: str = ""
    """Set when no wait will do: the request alone is larger than the tokens per minute."""


def limits_for(
    limits: LimitsConfig, account: str, tier: str, own: AccountLimits | None = None
) -> RateLimit | None:
    """The rate limit of an account (router/limits.py: its row in the account table, then the config's
    `accounts.<name>`, else `tiers.<tier>`, else `default`); None when it has none at all."""
    return rate_limit(limits, account, tier, own)


def per_second(limit: RateLimit) -> float:
    """The limit's requests per second as a number (`math.inf` for `"unlimited"`)."""
    return math.inf if limit.per_second == UNLIMITED else float(limit.per_second)


def estimated_tokens(req: Request) -> int:
    """Input + output tokens a request may use, estimated before any call: the prompt estimate of
    router/routing.py (characters / 4, a fixed sum per image) plus `max_tokens`, or
    DEFAULT_ANSWER_TOKENS without it. An estimate: the real count is known only after the call, and
    the limit is not settled to it afterwards."""
    return needs(req).prompt_tokens + (req.max_tokens or DEFAULT_ANSWER_TOKENS)


def decide(state: RateState, limit: RateLimit, now_us: int, *, tokens: int = 0, wait_us: int = 0) -> Decision:
    """Whether one request (of `tokens` estimated tokens, counted only when the limit has
    `tokens_per_minute`) is admitted now, or booked for a moment within `wait_us` from now."""
    req_t = US / per_second(limit)
    at = _conforms_at(state.requests_us, now_us, 1, req_t, limit.burst)
    tpm = limit.tokens_per_minute
    tok_t = 60 * US / tpm if tpm else 0.0
    if tpm:
        if tokens > tpm:
            return Decision(False, now_us, state, None,
                            f"the request's estimated {tokens:,} tokens are more than its limit of {tpm:,} per minute")
        at = max(at, _conforms_at(state.tokens_us, now_us, tokens, tok_t, tpm))
    at = max(at, now_us)
    if at - now_us > max(wait_us, 0):
        return Decision(False, at, state, retry_after_ms=-(-(at - now_us) // 1000))
    new = RateState(
        requests_us=math.ceil(max(state.requests_us, at) + req_t),
        tokens_us=math.ceil(max(state.tokens_us, at) + tokens * tok_t) if tpm else 0,
    )
    return Decision(True, at, new)


def _conforms_at(tat: int, now: int, cost: int, interval: float, burst: int) -> int:
    return math.ceil(max(tat, now) + (cost - burst) * interval)


def describe(limit: RateLimit) -> str:
    """The limit in words, for a refusal's message."""
    parts = [] if math.isinf(per_second(limit)) else [f"{per_second(limit):g} requests/s (burst {limit.burst})"]
    if limit.tokens_per_minute:
        parts.append(f"{limit.tokens_per_minute:,} tokens/min")
    return " and ".join(parts) or "no rate limit"
