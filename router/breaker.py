"""One circuit breaker per pool: a pure state machine over a small Struct that lives in a KV value.

CLOSED counts consecutive provider-side failures; `failures` of them open the breaker. OPEN
refuses every call until `cooldown_ms` has passed; the next call then turns it HALF_OPEN and
becomes a probe. HALF_OPEN lets at most `probes` calls through at once; `successes` successful
probes close it, one failed probe opens it again for another cool-down.

Every function here is pure and takes the time (`now_ms`, wall clock: the state is shared by
processes on several machines), so a fake clock drives the tests. Who stores the state, and how
replicas agree on it, is `workers/health.py`'s business.
"""

from __future__ import annotations

import enum
from typing import Literal, NamedTuple

import msgspec

from .config import BreakerPolicy
from .errors import ErrorCode, ProviderFailure, SwitchyardError

StateName = Literal["closed", "open", "half_open"]


class Probe(msgspec.Struct, frozen=True, array_like=True):
    """A claimed probe slot. `until_ms` ends the claim of a holder that never reports back."""

    token: str
    until_ms: int


class BreakerState(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    state: StateName = "closed"
    failures: int = 0
    """Consecutive provider-side failures while closed; when open, the count that opened it."""
    successes: int = 0
    """Successful probes in this half-open spell."""
    since_ms: int = 0
    """When the breaker entered `state`; also names a half-open spell, so a late probe of an
    earlier spell is not counted in this one."""
    until_ms: int = 0
    """Open: when the cool-down ends."""
    probe_limit: int = 1
    """Half-open: probes allowed at once, so a reader needs no config to tell whether one is free."""
    probes: tuple[Probe, ...] = ()

    def live_probes(self, now_ms: int) -> tuple[Probe, ...]:
        return tuple(p for p in self.probes if p.until_ms > now_ms)


CLOSED = BreakerState()


class Verdict(enum.Enum):
    """What one call's outcome means for its pool's breaker."""

    SUCCESS = "success"
    FAILURE = "failure"
    """Provider-side: the pool could not serve a request it should have served."""
    IGNORED = "ignored"
    """Says nothing about the pool's health (a bad request, our own fault, a provider-wide matter)."""


# Which failures count against a pool. Decided by code; PROVIDER_ERROR is refined by HTTP status below.
#
# Counted (PROVIDER_ERROR): HTTP 5xx, 529, 408/409, timeouts (the provider's and the attempt's own share
# of the request's time), refused or broken connections, broken streams; and the provider's own 429
# without a wait. Such a 429 counts because it is said about the pool's key, not about one request: every
# replica of the pool shares that key, each request would spend its retries and its time on it, and the
# fallbacks are the better place for the traffic until it cools down. A lone 429 does nothing: only
# `failures` in a row without a success in between open the breaker. A 429 that says how long to wait
# (Retry-After) does not count: the provider is pacing us, not failing, and the worker pauses the whole
# pool for that wait (workers/provider.py), which an open breaker would only turn into refusals.
#
# Not counted:
# - INVALID_REQUEST, CONTEXT_TOO_LONG: the caller's request (ours at the door, or a 400 the provider
#   blames on the request); another request to the same pool would succeed.
# - UNAUTHORIZED: a key problem, which no cool-down heals and which may be one account's own key; the
#   pool's key presence is reported apart (`llm_pools`) and the dispatcher skips a pool without one.
# - PROVIDER_UNAVAILABLE: the provider's credit is exhausted; that concerns every pool of the provider
#   and is recorded provider-wide (`llm_credit`), not in one pool's breaker.
# - PROVIDER_ERROR with HTTP 404: the provider does not know this model; a config fault of one model
#   that says nothing about the pool's other models.
# - TIMEOUT: the request's own deadline, which may have been nearly spent before this pool was called.
# - BUDGET_EXCEEDED, RATE_LIMITED, NO_ROUTE, INTERNAL: our own decisions and our own bugs.
_COUNTED: dict[ErrorCode, bool] = {
    ErrorCode.INVALID_REQUEST: False,
    ErrorCode.CONTEXT_TOO_LONG: False,
    ErrorCode.UNAUTHORIZED: False,
    ErrorCode.BUDGET_EXCEEDED: False,
    ErrorCode.RATE_LIMITED: False,
    ErrorCode.NO_ROUTE: False,
    ErrorCode.PROVIDER_ERROR: True,
    ErrorCode.PROVIDER_UNAVAILABLE: False,
    ErrorCode.TIMEOUT: False,
    ErrorCode.INTERNAL: False,
}
_NOT_COUNTED_STATUSES = frozenset({404})


def verdict(failure: SwitchyardError) -> Verdict:
    """Whether a failed call counts against its pool (FAILURE) or not (IGNORED)."""
    if not _COUNTED[failure.code]:
        return Verdict.IGNORED
    if isinstance(failure, ProviderFailure) and (
        failure.credit_exhausted
        or failure.http_status in _NOT_COUNTED_STATUSES
        or (failure.http_status == 429 and bool(failure.retry_after_ms))
    ):
        return Verdict.IGNORED
    return Verdict.FAILURE


class Ticket(NamedTuple):
    """A call the breaker let through. `token` is set for a half-open probe, whose slot is to be given
    back; `spell` is the `since_ms` of the state it was admitted in."""

    token: str | None
    spell: int


class Admission(NamedTuple):
    ticket: Ticket | None
    """None: refused."""
    state: BreakerState | None
    """The state to store for the decision to hold (a probe slot claimed); None: nothing to store."""


def admit(s: BreakerState, policy: BreakerPolicy, now_ms: int, *, token: str, lease_ms: int) -> Admission:
    """May a call go to the pool now? A half-open admission claims a probe slot for `lease_ms`
    under `token`; its new state must be stored (compare-and-set) before the call is made."""
    if s.state == "closed":
        return Admission(Ticket(None, s.since_ms), None)
    if s.state == "open":
        if now_ms < s.until_ms:
            return Admission(None, None)
        s = BreakerState(state="half_open", since_ms=now_ms, probe_limit=policy.probes)
    live = s.live_probes(now_ms)
    if len(live) >= s.probe_limit:
        return Admission(None, None)
    claimed = msgspec.structs.replace(s, probes=(*live, Probe(token, now_ms + max(1, lease_ms))))
    return Admission(Ticket(token, s.since_ms), claimed)


def record(s: BreakerState, policy: BreakerPolicy, now_ms: int, ticket: Ticket, outcome: Verdict) -> BreakerState:
    """The state after a call admitted with `ticket` ended with `outcome`. Returns `s` itself when
    nothing changes, so the caller can skip the write."""
    match s.state:
        case "closed":
            if outcome is Verdict.SUCCESS:
                return s if s.failures == 0 else msgspec.structs.replace(s, failures=0)
            if outcome is Verdict.FAILURE:
                if s.failures + 1 >= policy.failures:
                    return _opened(now_ms, policy, s.failures + 1)
                return msgspec.structs.replace(s, failures=s.failures + 1)
            return s
        case "half_open":
            if ticket.token is None or ticket.spell != s.since_ms:
                return s  # a call let through before the breaker opened: it probes nothing
            probes = tuple(p for p in s.probes if p.token != ticket.token)
            if outcome is Verdict.FAILURE:
                return _opened(now_ms, policy, 1)
            if outcome is Verdict.SUCCESS:
                if s.successes + 1 >= policy.successes:
                    return BreakerState(since_ms=now_ms)
                return msgspec.structs.replace(s, successes=s.successes + 1, probes=probes)
            return msgspec.structs.replace(s, probes=probes) if probes != s.probes else s
        case _:
            # Open: calls that were in flight when it opened neither extend nor shorten the cool-down.
            return s


def _opened(now_ms: int, policy: BreakerPolicy, failures: int) -> BreakerState:
    return BreakerState(state="open", failures=failures, since_ms=now_ms, until_ms=now_ms + policy.cooldown_ms)


def refuses(s: BreakerState, now_ms: int) -> bool:
    """Whether a call now would be refused: open and cooling down, or half-open with every probe slot
    taken. An open breaker whose cool-down is over does not refuse: the next call is its probe."""
    if s.state == "open":
        return now_ms < s.until_ms
    if s.state == "half_open":
        return len(s.live_probes(now_ms)) >= s.probe_limit
    return False


_decoder = msgspec.json.Decoder(BreakerState)


def encode(s: BreakerState) -> bytes:
    return msgspec.json.encode(s)


def decode(data: bytes) -> BreakerState:
    """Raises msgspec.DecodeError / ValidationError on a value that is not a breaker state."""
    return _decoder.decode(data)
