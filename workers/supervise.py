"""When to restart a child process of `switchyard up` that exited, and when to call it a crash loop.

Pure: the caller passes the monotonic clock's reading, so tests drive the policy with a fake
clock and no process. A child that exits is restarted after a delay that doubles from
INITIAL_DELAY_S up to MAX_DELAY_S, and starts over from INITIAL_DELAY_S once the child has
stayed up STABLE_AFTER_S. A child with CRASH_LOOP_EXITS exits within CRASH_LOOP_WINDOW_S is
in a crash loop: that is reported once (until it has been stable again), and it is still
restarted, never given up on, because what makes it crash (a NATS server or a database
that is down, a port that is taken) usually passes without anyone touching the fleet, and the
rest of the fleet serves meanwhile.
"""

from __future__ import annotations

import signal
from collections import deque
from dataclasses import dataclass

INITIAL_DELAY_S = 0.5
MAX_DELAY_S = 30.0
STABLE_AFTER_S = 30.0
"""A child that stayed up this long had recovered: its next exit is a first one again."""
CRASH_LOOP_EXITS = 5
CRASH_LOOP_WINDOW_S = 60.0


@dataclass(frozen=True)
class Restart:
    """What to do about one exit."""

    delay_s: float
    """Restart the child after this long."""
    recent_exits: int
    """Exits within the crash-loop window, this one included."""
    crash_loop: bool
    """This exit made it a crash loop: say so (once per loop)."""


class RestartPolicy:
    """The restart schedule of one child."""

    def __init__(
        self,
        *,
        initial_s: float = INITIAL_DELAY_S,
        max_s: float = MAX_DELAY_S,
        stable_after_s: float = STABLE_AFTER_S,
        loop_exits: int = CRASH_LOOP_EXITS,
        loop_window_s: float = CRASH_LOOP_WINDOW_S,
    ) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.stable_after_s = stable_after_s
        self.loop_exits = loop_exits
        self.loop_window_s = loop_window_s
        self._next_delay_s = initial_s
        self._started_at = 0.0
        self._exits: deque[float] = deque()
        self._reported = False

    def started(self, now: float) -> None:
        self._started_at = now

    def exited(self, now: float) -> Restart:
        if now - self._started_at >= self.stable_after_s:
            self._next_delay_s = self.initial_s
            self._exits.clear()
            self._reported = False
        delay = self._next_delay_s
        self._next_delay_s = min(delay * 2, self.max_s)
        self._exits.append(now)
        while self._exits and now - self._exits[0] > self.loop_window_s:
            self._exits.popleft()
        crash_loop = len(self._exits) >= self.loop_exits and not self._reported
        self._reported = self._reported or crash_loop
        return Restart(delay_s=delay, recent_exits=len(self._exits), crash_loop=crash_loop)


def describe_exit(returncode: int) -> str:
    """`exit code 1`, or `killed by SIGKILL` for a child a signal ended (Popen's negative code)."""
    if returncode >= 0:
        return f"exit code {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"
