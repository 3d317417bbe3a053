"""What one fleet process knows about itself, kept in memory: in-flight work, a bounded window of recent
outcomes with their success rate and p50/p95 latency, and (for a provider worker) its provider's health.

Pure: the clock is passed in (`now_ms`), nothing here does I/O. workers/discovery.py serves a snapshot of
it on each process's micro service, and `switchyard status` reads those snapshots.
"""

from __future__ import annotations

import contextvars
import math
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Literal, NamedTuple, TypeVar

import msgspec

WINDOW_SIZE = 1000
"""Outcomes kept at most: the window is the last WINDOW_SIZE outcomes within WINDOW_MS."""
WINDOW_MS = 300_000
"""Outcomes older than this (5 minutes) leave the window."""


class Outcome(NamedTuple):
    at_ms: int
    ok: bool
    latency_ms: float


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The nearest-rank q-th percentile (0 < q <= 100) of values sorted ascending; None when empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class Summary(msgspec.Struct, kw_only=True, frozen=True):
    """The window's outcomes: how many, the share that succeeded, and the latency percentiles of all of them."""

    count: int = 0
    ok: int = 0
    success_rate: float | None = None
    """ok / count; None when the window is empty (nothing to say, which is not 0 %)."""
    p50_ms: float | None = None
    p95_ms: float | None = None
    window_s: float = WINDOW_MS / 1000
    """The window's span: outcomes older than this are not counted."""


class Window:
    """The last `size` outcomes within `span_ms`, in memory (a bounded deque: O(1) per record)."""

    def __init__(self, size: int = WINDOW_SIZE, span_ms: int = WINDOW_MS) -> None:
        if size < 1 or span_ms < 1:
            raise ValueError("a window needs a size and a span of at least 1")
        self.span_ms = span_ms
        self._items: deque[Outcome] = deque(maxlen=size)

    def record(self, ok: bool, latency_ms: float, now_ms: int) -> None:
        self._items.append(Outcome(now_ms, ok, max(0.0, latency_ms)))

    def _expire(self, now_ms: int) -> None:
        horizon = now_ms - self.span_ms
        while self._items and self._items[0].at_ms <= horizon:
            self._items.popleft()

    def summary(self, now_ms: int) -> Summary:
        self._expire(now_ms)
        items = list(self._items)
        if not items:
            return Summary(window_s=self.span_ms / 1000)
        ok = sum(1 for o in items if o.ok)
        latencies = sorted(o.latency_ms for o in items)
        return Summary(
            count=len(items), ok=ok, success_rate=round(ok / len(items), 4),
            p50_ms=percentile(latencies, 50), p95_ms=percentile(latencies, 95), window_s=self.span_ms / 1000,
        )


class ProviderHealth(msgspec.Struct, kw_only=True, frozen=True):
    """The last periodic check of a pool's provider (the format's cheapest call, a models list)."""

    healthy: bool
    checked_ms: int
    """When the check ended (Unix time, ms)."""
    latency_ms: int | None = None
    """How long the call took; None when none was made (no key)."""
    status: int | None = None
    """The provider's HTTP status; None when it never answered."""
    code: str | None = None
    """Not healthy: the error code the failure has in a reply."""
    error: str | None = None
    """Not healthy: one sentence, anything like a key masked."""
    last_ok_ms: int | None = None
    """When a check last succeeded, if one did since the process started."""
    last_error: str | None = None
    """The last failed check's error, kept after the provider recovers (None: none failed yet)."""
    last_error_ms: int | None = None
    """When that check ended."""


T = TypeVar("T")

_failed: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar("vitals_failed", default=None)


class Vitals:
    """One process's counters: in-flight work, the recent outcomes' window, the provider's last check, and
    the last failure the process met (for its health). Not shared between processes: each replica serves
    its own, and `switchyard status` adds them up per pool."""

    def __init__(self, *, clock: Callable[[], int], window: Window | None = None) -> None:
        self.clock = clock
        self.window = window or Window()
        self.started_ms = clock()
        self.in_flight = 0
        self.provider: ProviderHealth | None = None
        self.failing_since_ms: int | None = None
        """Set while the process's own work fails (the auditor's batches cannot be written): when it began."""
        self.last_error: str | None = None

    def record(self, ok: bool, latency_ms: float) -> None:
        self.window.record(ok, latency_ms, self.clock())

    @contextmanager
    def working(self, count: int = 1) -> Iterator[None]:
        """Count `count` items in flight for the block, and one outcome when it ends: a failure when the block
        raises or `fail()` was called inside it (in the same task), else a success, with the block's time.
        A block of no items (an empty batch) is no outcome."""
        flag = [False]
        token = _failed.set(flag)
        started = self.clock()
        self.in_flight += count
        ok = False
        try:
            yield
            ok = not flag[0]
        finally:
            self.in_flight -= count
            _failed.reset(token)
            if count > 0:
                self.record(ok, self.clock() - started)

    def tracked(self, handle: Callable[[T], Awaitable[None]]) -> Callable[[T], Awaitable[None]]:
        """`handle` with each call counted in `working()`."""

        async def counted(item: T) -> None:
            with self.working():
                await handle(item)

        return counted

    @staticmethod
    def fail() -> None:
        """Mark the work of the enclosing `working()` block (of this task) as failed; nothing outside one."""
        flag = _failed.get()
        if flag is not None:
            flag[0] = True

    def failing(self, error: str) -> None:
        """The process's own work cannot be done now (e.g. its database is unreachable)."""
        if self.failing_since_ms is None:
            self.failing_since_ms = self.clock()
        self.last_error = error

    def recovered(self) -> None:
        self.failing_since_ms = None

    def summary(self) -> Summary:
        return self.window.summary(self.clock())

    def check_provider(self, health: ProviderHealth) -> None:
        """Keep the provider's latest check, with when one last succeeded and the last failure's error."""
        before = self.provider
        if health.healthy:
            self.provider = msgspec.structs.replace(
                health, last_ok_ms=health.checked_ms, last_error=before.last_error if before else None,
                last_error_ms=before.last_error_ms if before else None,
            )
        else:
            self.provider = msgspec.structs.replace(
                health, last_ok_ms=before.last_ok_ms if before else None,
                last_error=health.error or health.code, last_error_ms=health.checked_ms,
            )


Role = Literal["dispatcher", "worker", "auditor"]
ROLES: tuple[Role, ...] = ("dispatcher", "worker", "auditor")


class ProcessStats(msgspec.Struct, kw_only=True):
    """What a process's health endpoint answers (and its `$SRV.STATS` carries as the endpoint's `data`)."""

    role: Role
    id: str = ""
    """The process's micro service instance id (as `$SRV.PING` lists it)."""
    host: str = ""
    """The host name of the process's machine (a Kubernetes pod's name)."""
    pool: str | None = None
    """A worker's pool."""
    provider: str | None = None
    """A worker's provider."""
    version: str = ""
    """Switchyard's version (the package's)."""
    started_ms: int = 0
    uptime_s: float = 0.0
    healthy: bool = True
    problem: str | None = None
    """Not healthy: why, in one sentence."""
    in_flight: int = 0
    """Requests (dispatcher, worker) or events (auditor) being handled now."""
    recent: Summary = msgspec.field(default_factory=Summary)
    provider_health: ProviderHealth | None = None
    """A worker's last check of its provider; None before the first (or when it does not check)."""
