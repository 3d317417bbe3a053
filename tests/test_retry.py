"""Retries and time on one target (router/retry.py) and the waits providers ask for (Retry-After)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from router.config import RetryPolicy
from router.providers import anthropic, gemini, openai
from router.providers.base import retry_after_ms
from router.retry import MIN_SHARE_MS, backoff_ms, retry_delay_ms, share_ms

POLICY = RetryPolicy(attempts=3, initial_ms=100, multiplier=2.0, max_ms=5000, jitter=0.0)
NOW = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)


def headers(**h: str) -> httpx.Headers:
    return httpx.Headers({k.replace("_", "-"): v for k, v in h.items()})


@pytest.mark.parametrize(
    ("given", "ms"),
    [
        ({"retry_after": "3"}, 3000),
        ({"retry_after": "1.5"}, 1500),
        ({"retry_after": "0"}, 0),
        ({"retry_after": "-4"}, 0),
        ({"retry_after_ms": "250"}, 250),
        ({"retry_after_ms": "250", "retry_after": "9"}, 250),
        ({"retry_after_ms": "soon", "retry_after": "9"}, 9000),
        ({"retry_after": format_datetime(NOW + timedelta(seconds=40), usegmt=True)}, 40_000),
        ({"retry_after": "Fri, 14 Mar 2025 09:27:33 GMT"}, 40_000),
        ({"retry_after": "Fri, 14 Mar 2025 09:27:33 -0000"}, 40_000),
        ({"retry_after": "Friday, 14-Mar-25 09:27:33 GMT"}, 40_000),  # the obsolete forms RFC 9110 accepts
        ({"retry_after": "Fri Mar 14 09:27:33 2025"}, 40_000),
        ({"retry_after": "Fri, 14 Mar 2025 09:20:00 GMT"}, 0),  # already past: no wait
        ({"retry_after": "tomorrow"}, None),
        ({"retry_after": "inf"}, None),
        ({"retry_after": "nan"}, None),
        ({}, None),
    ],
)
def test_retry_after_in_seconds_milliseconds_or_an_http_date(given: dict[str, str], ms: int | None) -> None:
    assert retry_after_ms(headers(**given), now=NOW) == ms


@pytest.mark.parametrize("module", [openai, anthropic, gemini])
def test_every_adapter_reads_an_http_date_retry_after(module: object) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    failure = module.translate_error(503, headers(retry_after=when), b"{}")  # type: ignore[attr-defined]
    assert failure.retry and failure.retry_after_ms is not None
    assert 28_000 <= failure.retry_after_ms <= 30_000


def test_backoff_grows_to_max_and_a_longer_asked_wait_wins() -> None:
    assert [backoff_ms(POLICY, n) for n in range(8)] == [100, 200, 400, 800, 1600, 3200, 5000, 5000]
    assert backoff_ms(POLICY, 0, asked_ms=2000) == 2000
    assert backoff_ms(POLICY, 3, asked_ms=10) == 800


def test_backoff_jitter_stays_within_its_spread() -> None:
    policy = RetryPolicy(initial_ms=1000, jitter=0.25)
    rng = random.Random(7)
    delays = {backoff_ms(policy, 0, rng=rng) for _ in range(200)}
    assert min(delays) >= 750 and max(delays) <= 1250 and len(delays) > 50


def test_a_wait_that_fits_is_taken() -> None:
    assert retry_delay_ms(POLICY, 0, asked_ms=None, left_ms=10_000) == 100
    assert retry_delay_ms(POLICY, 0, asked_ms=1000, left_ms=10_000) == 1000
    assert retry_delay_ms(POLICY, 0, asked_ms=5000, left_ms=10_000) == 5000  # max_ms itself is allowed


def test_a_provider_wait_longer_than_max_ms_moves_on() -> None:
    # Gemini's RetryInfo of 37 s, twice, used to spend a 60 s request on one target.
    assert retry_delay_ms(POLICY, 0, asked_ms=37_000, left_ms=60_000) is None
    assert retry_delay_ms(POLICY, 0, asked_ms=5001, left_ms=60_000) is None


def test_a_wait_longer_than_the_time_left_moves_on() -> None:
    assert retry_delay_ms(POLICY, 0, asked_ms=3000, left_ms=2999) is None
    assert retry_delay_ms(POLICY, 0, asked_ms=3000, left_ms=3000) is None  # no time left for the call
    assert retry_delay_ms(POLICY, 2, asked_ms=None, left_ms=300) is None  # our own backoff (400) too


def test_each_target_gets_an_equal_share_of_what_is_left() -> None:
    assert share_ms(60_000, 3) == 20_000
    assert share_ms(60_000, 2) == 30_000
    assert share_ms(59_000, 1) == 59_000  # the last target: all that is left


def test_time_a_target_did_not_use_goes_to_the_next() -> None:
    first = share_ms(60_000, 3)
    left = 60_000 - 1_000  # the first target failed after 1 s
    assert first == 20_000 and share_ms(left, 2) == 29_500


def test_the_share_never_passes_what_is_left() -> None:
    assert share_ms(800, 4) == 800  # the floor never gives more than is left
    assert share_ms(0, 2) == 0
    assert share_ms(-5, 2) == 0


def test_the_share_has_a_floor_however_long_the_chain() -> None:
    assert share_ms(4_000, 10) == MIN_SHARE_MS
