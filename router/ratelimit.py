"""Account rate limits: the admission arithmetic (GCRA) and which limits apply to a request.

GCRA keeps one number per dimension, the theoretical arrival time (TAT): when the account's bucket
would be empty again if nothing more came. A request of cost `n` in a dimension with one unit every
`T` µs and a burst of `B` units conforms at the earliest at `max(TAT, now) + (n - B)·T`; admitting it
moves TAT to `max(TAT, at) + n·T`. Two dimensions exist: requests (`n` = 1, `T` = 1 s / per_second,
`B` = burst) and, when `tokens_per_minute` is set, tokens (`n` = the request's estimated tokens,
`T` = 1 min / tokens_per_minute, `B` = tokens_per_minute: one minute's worth at once).

A request may also be *booked* for a later moment (`wait_us`): its place in the schedule is taken now,
so requests that wait are served in the order they asked and a fresh one cannot take their turn.

A replica may also *lease* `k` request tokens in one decision (`take=k`: TAT moves by `k·T`), admit the
request that asked with the first and the account's next `k − 1` requests locally with the others, each
only until `V` after the debit (`lease_validity_us`). The size is adaptive and keeps the limit exact
where it matters: `k = 1` (no lease) unless at least half the burst is available, and `k` ≤ burst / 4
(`lease_cap`), so `per_second × V` ≤ burst / 4. A replica may also take its next lease *ahead of
need*, once a request left it with no more tokens than its low-water mark (`low_water`: a quarter of
them; for a one-token lease, none) (`refill_size`, `Lease.ahead`): a decision no request waits for, whose
`k` tokens are all left for the account's next requests, under the same rules (half the burst available,
at most `lease_cap`, valid for `V`). It may also take it when the lease will expire before the account's
next request is due (`Lease.renew_due`: the account's latest spacing on the replica, at most `V`, is longer
than what is left of the validity). While the lease has usable tokens the new one follows it
(`Lease.next`, used once the lease's tokens are used up or expired) and takes at most `lease_cap` minus
the lease's tokens left, so that a replica holds at most `lease_cap` unused tokens of an account. A
leased token is spent when it is debited, so the debits keep the bucket's exact shape; only its use may
come up to `V` later. Over
any window of `W` seconds the admissions are therefore at most what the exact limiter allows over
`W + V`: `burst + per_second × W + ⌊burst / 4⌋`, and at most `burst + per_second × W + Σ left` over
the unused tokens of the replicas' live leases when the window begins (a lease and the one that follows
it per account per replica, at most `lease_cap` tokens together). Unused leased tokens are lost (erring on refusing).

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


def decide(
    state: RateState, limit: RateLimit, now_us: int, *, tokens: int = 0, wait_us: int = 0, take: int = 1
) -> Decision:
    """Whether one request (of `tokens` estimated tokens, counted only when the limit has
    `tokens_per_minute`) is admitted now, or booked for a moment within `wait_us` from now. `take` > 1
    debits that many request tokens at once (a lease, see `lease_size`); its refusal's hint is for all
    of them, so a caller refused a lease asks again for one token."""
    req_t = US / per_second(limit)
    at = _conforms_at(state.requests_us, now_us, take, req_t, limit.burst)
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
        requests_us=math.ceil(max(state.requests_us, at) + take * req_t),
        tokens_us=math.ceil(max(state.tokens_us, at) + tokens * tok_t) if tpm else 0,
    )
    return Decision(True, at, new)


LEASE_SHARE = 4
"""A lease takes at most burst // LEASE_SHARE tokens, and only while at least half the burst is there."""


def lease_cap(limit: RateLimit) -> int:
    """The most request tokens one lease may take: burst // LEASE_SHARE; 1 (no lease: every decision
    exact) with `tokens_per_minute` (each request's tokens differ) or without a request rate."""
    if limit.tokens_per_minute or math.isinf(per_second(limit)):
        return 1
    return max(1, limit.burst // LEASE_SHARE)


def lease_validity_us(limit: RateLimit) -> int:
    """`V`: how long after its debit a leased token may be used: the time the bucket takes to refill
    `lease_cap` tokens, so that `per_second × V` ≤ `lease_cap` (what a late use may add to a window)."""
    if lease_cap(limit) <= 1:
        return 0
    return int(lease_cap(limit) * US / per_second(limit))


def available(state: RateState, limit: RateLimit, now_us: int) -> int:
    """Request tokens the bucket holds at `now_us`: how many requests it would admit at once."""
    req_t = US / per_second(limit)
    if req_t == 0:
        return limit.burst
    return max(0, math.floor((limit.burst * req_t - max(state.requests_us - now_us, 0)) / req_t))


def lease_size(state: RateState, limit: RateLimit, now_us: int, wanted: int) -> int:
    """How many request tokens to take in one decision: 1 unless the limit allows leases, `wanted` > 1
    and at least half the burst is available (then at most `lease_cap`), so a contended or near-limit
    account is decided one request at a time, exactly."""
    cap = lease_cap(limit)
    if cap <= 1 or wanted <= 1 or 2 * available(state, limit, now_us) < limit.burst:
        return 1
    return min(wanted, cap)


class Lease(msgspec.Struct, kw_only=True):
    """Request tokens one replica debited at `taken_us` for an account under `limit`, `left` of them
    still usable until `until_us` (`taken_us` + `lease_validity_us`)."""

    limit: RateLimit
    size: int
    left: int
    taken_us: int
    until_us: int
    ahead: bool = False
    """Taken ahead of need, by no request: all `size` tokens were left for the account's next requests."""
    prior_us: int = 0
    """When the replica last admitted a request of the account before this lease (0: none it remembers)."""
    last_us: int = 0
    """When the replica last admitted a request of the account: with this lease's latest token, or, while
    none of its tokens is used, before it (0: none it remembers)."""
    gap_us: int = 0
    """The time between the last two requests of the account this replica admitted (0: not known)."""
    low: int = 0
    """Its low-water mark (`low_water`): once no more tokens than this are left, the next lease is taken ahead."""
    next: Lease | None = None
    """The account's next lease, taken ahead while this one still had tokens: used once this one has none
    left or has expired (`then`). Its size keeps this one's `left` and its own within `lease_cap`."""

    @classmethod
    def taken(cls, limit: RateLimit, size: int, now_us: int, prior_us: int = 0) -> Lease:
        """The lease of `size` tokens debited at `now_us`, the first of them used by the request that took
        it; `prior_us` is when the replica admitted the account's request before it (`Lease.latest_us` of
        its previous lease of the account)."""
        gap = now_us - prior_us if 0 < prior_us < now_us else 0
        return cls(limit=limit, size=size, left=size - 1, taken_us=now_us,
                   until_us=now_us + lease_validity_us(limit), prior_us=prior_us, last_us=now_us, gap_us=gap,
                   low=low_water(size))

    @classmethod
    def taken_ahead(cls, limit: RateLimit, size: int, now_us: int, after: Lease | None = None) -> Lease:
        """The lease of `size` tokens debited at `now_us` ahead of need: every one of them left. `after` is
        the lease it follows, whose record of the account's requests it keeps."""
        return cls(limit=limit, size=size, left=size, taken_us=now_us, until_us=now_us + lease_validity_us(limit),
                   ahead=True, last_us=after.last_us if after is not None else 0,
                   gap_us=after.gap_us if after is not None else 0, low=low_water(size))

    def then(self) -> Lease | None:
        """The lease that follows this one once it serves no more (`next`, with this one's record of the
        account's requests, which kept growing while `next` waited), or None."""
        nxt = self.next
        if nxt is not None:
            nxt.last_us = max(nxt.last_us, self.last_us)
            nxt.gap_us = self.gap_us or nxt.gap_us
        return nxt

    def latest_us(self) -> int:
        """When the replica last admitted a request of the account, as far as this lease knows (its debit
        when it knows none: a lease is taken by a request, or ahead of one, a moment after it)."""
        return self.last_us or self.taken_us

    def usable(self, limit: RateLimit, now_us: int) -> bool:
        """Whether a token is left to use at `now_us` under the account's `limit` (see `use`)."""
        return self.left > 0 and now_us <= self.until_us and (self.limit is limit or self.limit == limit)

    def use(self, limit: RateLimit, now_us: int) -> bool:
        """Spend one leased token at `now_us`; False (nothing spent) when none is left, the lease has
        expired, or the account's limit is no longer the one it was taken under."""
        if not self.usable(limit, now_us):
            return False
        self.left -= 1
        if 0 < self.last_us < now_us:
            self.gap_us = now_us - self.last_us
        self.last_us = max(self.last_us, now_us)
        return True

    def renew_due(self, now_us: int) -> bool:
        """Whether to take the account's next lease ahead of need although this one has tokens left: it
        expires before the account's next request is due, going by the account's latest spacing here
        (`gap_us`), and that spacing is within a validity (a lease taken now will still be valid then;
        for an account rarer than that a token taken ahead would only be lost)."""
        if self.left <= 0 or self.gap_us <= 0:
            return False
        return self.until_us - now_us < self.gap_us <= self.until_us - self.taken_us

    def wanted_next(self, limit: RateLimit, now_us: int) -> int:
        """The size to ask for when this lease no longer serves: twice its size when all of it was used
        within its validity, else what it used scaled to one validity (the account's recent rate on
        this replica), at least 1. A new limit starts again from 1."""
        if self.limit != limit:
            return 1
        if now_us <= self.until_us:
            return 2 * self.size
        used = self.size - self.left
        validity = self.until_us - self.taken_us
        return max(1, used * validity // max(1, now_us - self.taken_us))

    def wanted_ahead(self, limit: RateLimit, now_us: int) -> int:
        """The size to take ahead of need once this lease has no token left (or `renew_due`): the account's
        rate on this replica over the lease (its uses after the debit, per time since), scaled to one
        validity: at most twice its size, and never less than the uses when they all came within `V`, so a
        steady account's leases settle at what it uses within `V` instead of doubling past it; at least 1.
        After a request's own one-token decision (no use after the debit to go by): 1, which makes the
        account's next request within `V` free, unless the replica admitted the account's request before it
        more than `V` earlier: an account that sends rarer than that would leave the token unused, so 0
        (none). A new limit starts again from 1."""
        if self.limit != limit:
            return 1
        validity = self.until_us - self.taken_us
        if not self.ahead and self.size == 1:
            return 1 if self.prior_us == 0 or self.taken_us - self.prior_us <= validity else 0
        after = self.size - self.left - (0 if self.ahead else 1)
        return max(1, min(2 * self.size, after * validity // max(1, now_us - self.taken_us)))


LOW_WATER_SHARE = 4
"""A lease's next one is taken ahead once no more than size // LOW_WATER_SHARE of its tokens are left (at least
at its last one): the account's requests that come during the refill's round trip still find a token."""


def low_water(size: int) -> int:
    """How few tokens left of a lease of `size` start its next one ahead of need (0: once none is left)."""
    return size // LOW_WATER_SHARE if size > 1 else 0


def refill_size(state: RateState, limit: RateLimit, now_us: int, wanted: int) -> int:
    """How many request tokens to take ahead of need: `wanted` up to `lease_cap`, or 0 (none) when nothing
    is wanted, the limit allows no lease or less than half the burst is available, so that an account
    near its limit is decided one request at a time, exactly, with no token leased that it may not use."""
    cap = lease_cap(limit)
    if wanted < 1 or cap <= 1 or 2 * available(state, limit, now_us) < limit.burst:
        return 0
    return min(wanted, cap)


def decide_leasing(
    state: RateState, limit: RateLimit, now_us: int, last: Lease | None, *, tokens: int = 0
) -> tuple[Decision, int]:
    """`decide` (no wait) for a replica that may lease, with `last` its previous lease of the account:
    the decision and how many tokens it took (`lease_size` of what `Lease.wanted_next` asks for; one
    when a lease would not fit, so that a lease never refuses what one token would admit)."""
    wanted = last.wanted_next(limit, now_us) if last is not None else 1
    take = lease_size(state, limit, now_us, wanted)
    decision = decide(state, limit, now_us, tokens=tokens, take=take)
    if not decision.admitted and take > 1:
        return decide(state, limit, now_us, tokens=tokens), 1
    return decision, take


def _conforms_at(tat: int, now: int, cost: int, interval: float, burst: int) -> int:
    return math.ceil(max(tat, now) + (cost - burst) * interval)


def describe(limit: RateLimit) -> str:
    """The limit in words, for a refusal's message."""
    parts = [] if math.isinf(per_second(limit)) else [f"{per_second(limit):g} requests/s (burst {limit.burst})"]
    if limit.tokens_per_minute:
        parts.append(f"{limit.tokens_per_minute:,} tokens/min")
    return " and ".join(parts) or "no rate limit"
