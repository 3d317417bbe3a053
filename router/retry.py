"""Backoff between attempts on one target: pure, driven by the pool's RetryPolicy."""

from __future__ import annotations

import random

from .config import RetryPolicy


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
