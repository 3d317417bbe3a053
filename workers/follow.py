"""Follow PostgreSQL tables that notify their changes: the loop shared by workers/keys.py (stored
provider keys) and workers/accounts.py (account routes and limits).

A `TableFollower` keeps one connection of its own (named by its application_name, as pg_stat_activity
shows it) and, on it:

- LISTENs on the given channels, which the tables' triggers notify at the commit of every change, and
  calls the owner's `reload(conn)` at once after a notification;
- runs a `SELECT 1` every `ping_s` while idle, so a connection that died without a word is noticed,
  replaced and the tables read again;
- calls `reload(conn)` every `reload_s` whatever happens, as a safety net.

When PostgreSQL cannot be reached it tries again with a doubling backoff and the owner keeps what it
read last. It logs `<prefix>_unreachable` once per outage, `<prefix>_lost` when a followed connection
fails, and `<prefix>_reachable` when it is back. The database is migrated on the first connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

import asyncpg
import structlog

from .db import migrate

PING_S = 1.0
RELOAD_S = 30.0
QUERY_S = 5.0
RETRY_S = (1.0, 10.0)
"""The backoff between attempts to reach PostgreSQL: from the first to the last, doubling."""

Reload = Callable[[asyncpg.Connection], Awaitable[None]]


class TableFollower:
    """Calls `reload(conn)` whenever the followed tables may have changed (see the module's docstring)."""

    def __init__(
        self,
        database_url: str,
        *,
        channels: Sequence[str],
        application: str,
        reload: Reload,
        log: structlog.typing.FilteringBoundLogger,
        event_prefix: str,
        unreachable_effect: str,
        error_detail: Callable[[BaseException], str],
        ping_s: float = PING_S,
        reload_s: float = RELOAD_S,
    ) -> None:
        self.url = database_url
        self.channels = tuple(channels)
        self.application = application
        self.ping_s = ping_s
        self.reload_s = reload_s
        self._reload_with = reload
        self._log = log
        self._prefix = event_prefix
        self._unreachable_effect = unreachable_effect
        self._detail = error_detail
        """What of a connection's error goes into a log line (only its type where a message might say too much)."""
        self._changed = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the tables until `stop`; never raises but CancelledError."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._wake_on(stop))
            delay, migrated, down = RETRY_S[0], False, False
            while not stop.is_set():
                try:
                    conn = await asyncpg.connect(self.url, timeout=QUERY_S,
                                                 server_settings={"application_name": self.application})
                except Exception as exc:
                    if not down:
                        self._log.warning(f"{self._prefix}_unreachable", error=self._detail(exc),
                                          effect=self._unreachable_effect)
                    down = True
                    await _sleep(stop, delay)
                    delay = min(delay * 2, RETRY_S[1])
                    continue
                try:
                    if not migrated:
                        await migrate(conn)
                        migrated = True
                    if down:
                        self._log.info(f"{self._prefix}_reachable")
                    down, delay = False, RETRY_S[0]
                    await self._follow(conn, stop)
                except Exception as exc:
                    self._log.warning(f"{self._prefix}_lost", error=self._detail(exc))
                    down = True
                finally:
                    conn.terminate()

    async def _follow(self, conn: asyncpg.Connection, stop: asyncio.Event) -> None:
        def notified(*_args: object) -> None:
            self._changed.set()

        for channel in self.channels:
            await conn.add_listener(channel, notified)
        await self._reload(conn, stop)
        last = time.monotonic()
        while not stop.is_set():
            try:
                async with asyncio.timeout(self.ping_s):
                    await self._changed.wait()
            except TimeoutError:
                pass
            if stop.is_set():
                return
            if self._changed.is_set() or time.monotonic() - last >= self.reload_s:
                await self._reload(conn, stop)
                last = time.monotonic()
            else:
                async with asyncio.timeout(self.ping_s):
                    await conn.fetchval("SELECT 1")

    async def _reload(self, conn: asyncpg.Connection, stop: asyncio.Event) -> None:
        if not stop.is_set():
            self._changed.clear()  # a change committed from now on notifies again
        await self._reload_with(conn)

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._changed.set()


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    try:
        async with asyncio.timeout(seconds):
            await stop.wait()
    except TimeoutError:
        pass
