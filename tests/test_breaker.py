"""The pool breaker's state machine (router/breaker.py), driven by a fake clock: no NATS here."""

from __future__ import annotations

import pytest

from router import breaker
from router.breaker import CLOSED, BreakerState, Ticket, Verdict
from router.config import BreakerPolicy
from router.errors import ErrorCode, ProviderFailure, StreamBroken, SwitchyardError

POLICY = BreakerPolicy(failures=5, cooldown_ms=60_000, successes=2, probes=1)


class Pool:
    """One pool's breaker as the workers keep it: a stored state, calls admitted and recorded."""

    def __init__(self, policy: BreakerPolicy = POLICY) -> None:
        self.policy = policy
        self.state = CLOSED
        self.now = 1_000_000
        self._n = 0

    def admit(self, lease_ms: int = 10_000) -> Ticket | None:
        self._n += 1
        decided = breaker.admit(self.state, self.policy, self.now, token=f"t{self._n}", lease_ms=lease_ms)
        if decided.state is not None:
            self.state = decided.state
        return decided.ticket

    def call(self, outcome: Verdict) -> bool:
        """One call with this outcome; False when the breaker refused it."""
        ticket = self.admit()
        if ticket is None:
            return False
        self.record(ticket, outcome)
        return True

    def record(self, ticket: Ticket, outcome: Verdict) -> None:
        self.state = breaker.record(self.state, self.policy, self.now, ticket, outcome)


def test_consecutive_failures_open_it_and_a_success_resets_the_count() -> None:
    pool = Pool()
    for _ in range(4):
        assert pool.call(Verdict.FAILURE)
    assert pool.state.state == "closed" and pool.state.failures == 4
    assert pool.call(Verdict.SUCCESS)
    assert pool.state.failures == 0
    for _ in range(4):
        pool.call(Verdict.FAILURE)
    assert pool.state.state == "closed"
    pool.call(Verdict.FAILURE)
    assert pool.state.state == "open" and pool.state.failures == 5
    assert pool.state.until_ms == pool.now + 60_000


def test_ignored_outcomes_neither_count_nor_reset() -> None:
    pool = Pool()
    for _ in range(3):
        pool.call(Verdict.FAILURE)
    for _ in range(20):
        pool.call(Verdict.IGNORED)
    assert pool.state.failures == 3 and pool.state.state == "closed"


def test_open_refuses_until_the_cool_down_then_one_probe_goes_through() -> None:
    pool = Pool()
    for _ in range(5):
        pool.call(Verdict.FAILURE)
    pool.now += 59_999
    assert pool.admit() is None
    assert breaker.refuses(pool.state, pool.now)
    pool.now += 1
    assert not breaker.refuses(pool.state, pool.now)  # the next call is the probe
    probe = pool.admit()
    assert probe is not None and probe.token is not None
    assert pool.state.state == "half_open" and len(pool.state.probes) == 1
    assert pool.admit() is None  # `probes` = 1: the slot is taken
    assert breaker.refuses(pool.state, pool.now)


def test_successful_probes_close_it() -> None:
    pool = Pool()
    for _ in range(5):
        pool.call(Verdict.FAILURE)
    pool.now += 60_000
    assert pool.call(Verdict.SUCCESS)
    assert pool.state.state == "half_open" and pool.state.successes == 1 and not pool.state.probes
    assert pool.call(Verdict.SUCCESS)
    assert pool.state == BreakerState(since_ms=pool.now)


def test_a_failed_probe_opens_it_again_for_a_whole_cool_down() -> None:
    pool = Pool()
    for _ in range(5):
        pool.call(Verdict.FAILURE)
    pool.now += 60_000
    pool.call(Verdict.SUCCESS)
    pool.now += 5
    assert pool.call(Verdict.FAILURE)
    assert pool.state.state == "open" and pool.state.until_ms == pool.now + 60_000
    assert pool.admit() is None


def test_an_ignored_probe_gives_its_slot_back() -> None:
    pool = Pool()
    for _ in range(5):
        pool.call(Verdict.FAILURE)
    pool.now += 60_000
    pool.call(Verdict.IGNORED)  # e.g. the caller's bad request: says nothing either way
    assert pool.state.state == "half_open" and not pool.state.probes
    assert pool.admit() is not None


def test_a_probe_slot_of_a_lost_worker_frees_itself_after_its_lease() -> None:
    pool = Pool()
    for _ in range(5):
        pool.call(Verdict.FAILURE)
    pool.now += 60_000
    assert pool.admit(lease_ms=3000) is not None  # and never reported back
    pool.now += 2999
    assert pool.admit() is None
    pool.now += 1
    assert not breaker.refuses(pool.state, pool.now)
    assert pool.admit() is not None
    assert len(pool.state.probes) == 1  # the lost one was dropped


def test_several_probes_at_once_when_the_policy_allows() -> None:
    pool = Pool(BreakerPolicy(failures=1, cooldown_ms=10, successes=3, probes=2))
    pool.call(Verdict.FAILURE)
    pool.now += 10
    first, second = pool.admit(), pool.admit()
    assert first is not None and second is not None
    assert pool.admit() is None
    pool.record(first, Verdict.SUCCESS)
    assert pool.admit() is not None


def test_calls_in_flight_when_it_opened_change_nothing() -> None:
    pool = Pool(BreakerPolicy(failures=2, cooldown_ms=1000, successes=1, probes=1))
    early = [t for t in (pool.admit() for _ in range(3)) if t is not None]
    assert len(early) == 3 and all(t.token is None for t in early)
    pool.record(early[0], Verdict.FAILURE)
    pool.record(early[1], Verdict.FAILURE)
    opened = pool.state
    assert opened.state == "open"
    pool.now += 500
    pool.record(early[2], Verdict.SUCCESS)
    assert pool.state is opened  # neither shortened nor extended, and nothing to store
    pool.now += 500
    probe = pool.admit()
    assert probe is not None
    late = breaker.record(pool.state, pool.policy, pool.now, early[2], Verdict.FAILURE)
    assert late == pool.state  # not a probe: half-open counts only its probes


def test_a_probe_of_an_earlier_half_open_spell_does_not_count_in_this_one() -> None:
    pool = Pool(BreakerPolicy(failures=1, cooldown_ms=100, successes=1, probes=1))
    pool.call(Verdict.FAILURE)
    pool.now += 100
    stale = pool.admit(lease_ms=10)
    assert stale is not None
    pool.now += 10  # its lease ends; another probe fails and the breaker opens again
    pool.call(Verdict.FAILURE)
    pool.now += 100
    assert pool.admit() is not None  # a new spell
    spell = pool.state
    pool.record(stale, Verdict.SUCCESS)
    assert pool.state == spell


def test_nothing_to_store_returns_the_same_state() -> None:
    """The worker skips the write (a round trip) whenever record() hands back its argument."""
    assert breaker.record(CLOSED, POLICY, 1, Ticket(None, 0), Verdict.SUCCESS) is CLOSED
    assert breaker.record(CLOSED, POLICY, 1, Ticket(None, 0), Verdict.IGNORED) is CLOSED
    assert breaker.admit(CLOSED, POLICY, 1, token="t", lease_ms=1).state is None


def test_the_state_round_trips_through_a_kv_value() -> None:
    state = BreakerState(state="half_open", successes=1, since_ms=5, probe_limit=2,
                         probes=(breaker.Probe("abc", 99),))
    data = breaker.encode(state)
    assert len(data) < 120
    assert breaker.decode(data) == state
    assert breaker.decode(breaker.encode(CLOSED)) == CLOSED


@pytest.mark.parametrize(
    ("failure", "counted"),
    [
        (ProviderFailure(ErrorCode.PROVIDER_ERROR, "HTTP 500", retry=True, http_status=500), True),
        (ProviderFailure(ErrorCode.PROVIDER_ERROR, "HTTP 529", retry=True, http_status=529), True),
        (ProviderFailure(ErrorCode.PROVIDER_ERROR, "rate limiting", retry=True, http_status=429), True),
        (ProviderFailure(ErrorCode.PROVIDER_ERROR, "timed out", retry=True), True),
        (ProviderFailure(ErrorCode.PROVIDER_ERROR, "could not reach the provider", retry=True), True),
        (StreamBroken("the provider stopped sending mid-stream"), True),
        (ProviderFailure(ErrorCode.PROVIDER_ERROR, "unknown model", retry=False, http_status=404), False),
        (ProviderFailure(ErrorCode.INVALID_REQUEST, "HTTP 400", retry=False, http_status=400), False),
        (ProviderFailure(ErrorCode.CONTEXT_TOO_LONG, "too long", retry=False, http_status=400), False),
        (ProviderFailure(ErrorCode.UNAUTHORIZED, "bad key", retry=False, http_status=401), False),
        (ProviderFailure(ErrorCode.PROVIDER_UNAVAILABLE, "no credit", retry=False, http_status=429,
                         credit_exhausted=True), False),
        (ProviderFailure(ErrorCode.INTERNAL, "could not translate", retry=False), False),
        (SwitchyardError(ErrorCode.TIMEOUT, "the request's timeout passed"), False),
        (SwitchyardError(ErrorCode.INVALID_REQUEST, "our own validation"), False),
    ],
)
def test_which_failures_count_against_the_pool(failure: SwitchyardError, counted: bool) -> None:
    assert breaker.verdict(failure) is (Verdict.FAILURE if counted else Verdict.IGNORED)


def test_every_error_code_has_a_row() -> None:
    for code in ErrorCode:
        breaker.verdict(SwitchyardError(code, "x"))  # a code without a row would raise KeyError
