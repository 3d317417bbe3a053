"""Retries on one target and the time each target of a chain may take: pure, driven by the pool's
RetryPolicy and the request's deadline (docs/protocol.md, "Retries, fallback and time")."""

from __future__ import annotations

import random

from .config import RetryPolicy

MIN_SHARE_MS = 1000
"""The least time a target is given while that much of the request's time is left, however many
targets follow it: less is too short for any provider to answer."""


def backoff_ms(
    policy: RetryPolicy, attempt: int, *, asked_ms: int | None = None, rng: random.Random | None = None
) -> int:
    """Delay before retry number `attempt` (0 for the first retry).

    A delay the provider asked for (Retry-After) wins when it is longer than ours.
    """
    base = min(policy.max_ms, policy.initial_ms * policy.multiplier**attempt)
    spread = base * policy.jitter
    r = (rng or random).uniform(-spread, spread)
    ours = max(0, int(base + r))
    return max(ours, asked_ms or 0)


def retry_delay_ms(
    policy: RetryPolicy,
    attempt: int,
    *,
    asked_ms: int | None,
    left_ms: float,
    rng: random.Random | None = None,
) -> int | None:
    """The wait before retry number `attempt` on the same target, or None to move on to the next target
    at once: the provider asked for a wait longer than the pool's `max_ms`, or the wait would use up
    `left_ms`, the time this target has left. A provider's wait is honoured only when it fits; it never
    eats the time the rest of the chain needs."""
    if asked_ms is not None and asked_ms > policy.max_ms:
        return None
    delay = backoff_ms(policy, attempt, asked_ms=asked_ms, rng=rng)
    if delay >= left_ms:
        return None
    return delay


def share_ms(left_ms: int, targets_left: int) -> int:
    """How long the current target may take, all its tries together, before the chain moves on.

    An equal part of the request's remaining time among the targets still to try (this one
    included), at least MIN_SHARE_MS, never more than what is left. Time a target does not use
    goes to the ones after it; the last target gets all that is left. Each try within the share
    is bounded by the pool's own `timeout_ms` as well (the provider's silence between bytes).
    """
    if left_ms <= 0:
        return 0
    equal = left_ms // max(1, targets_left)
    return min(left_ms, max(equal, MIN_SHARE_MS))
