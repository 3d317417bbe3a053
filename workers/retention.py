"""Audit retention: the auditor deletes `llm_audit` rows older than `audit.retention_days`.

A sweep runs when the auditor starts and then every hour. It deletes the oldest rows past the
retention (by the time their request finished) a small batch per statement, each its own
transaction, with a pause between batches: no long lock, no long transaction, and the auditor's
inserts go on meanwhile. Replicas sweep side by side: each batch skips the rows another replica
is deleting. A sweep that fails (PostgreSQL unreachable) is logged and tried again at the next
one; it never ends the auditor.
"""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import structlog

from router.redact import scrub

log = structlog.get_logger("retention")

SWEEP_EVERY_S = 3600.0
BATCH = 1000
_PAUSE_S = 0.05
_STATEMENT_TIMEOUT_S = 60.0

# The (finished_at) index of migration 005 finds the oldest rows.
_DELETE = """
DELETE FROM llm_audit WHERE (account, request_id) IN (
    SELECT account, request_id FROM llm_audit
    WHERE finished_at < now() - make_interval(days => $1)
    ORDER BY finished_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
"""


class Retention:
    """Deletes ledger rows older than `days` (None: keeps every row)."""

    def __init__(self, pool: asyncpg.Pool, days: int | None, *, batch: int | None = None,
                 every_s: float | None = None) -> None:
        self.pool = pool
        self.days = days
        self.batch = BATCH if batch is None else batch
        self.every_s = SWEEP_EVERY_S if every_s is None else every_s

    async def sweep(self, stop: asyncio.Event | None = None) -> tuple[int, int]:
        """Delete every row past the retention, a batch at a time, until none is left or `stop` is set.
        Returns (rows deleted, statements that deleted some). Raises what asyncpg raises."""
        if self.days is None:
            return 0, 0
        rows = batches = 0
        while stop is None or not stop.is_set():
            status = await self.pool.execute(_DELETE, self.days, self.batch, timeout=_STATEMENT_TIMEOUT_S)
            deleted = int(status.split()[-1])  # "DELETE <n>"
            if deleted:
                rows += deleted
                batches += 1
            if deleted < self.batch:
                break
            await asyncio.sleep(_PAUSE_S)
        return rows, batches

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep now and every `every_s` until `stop` is set. Never raises but CancelledError."""
        if self.days is None:
            log.info("audit_retention_off", effect="ledger rows are kept for good (set audit.retention_days)")
            return
        log.info("audit_retention", days=self.days, every_s=self.every_s)
        while not stop.is_set():
            try:
                rows, batches = await self.sweep(stop)
            except Exception as exc:
                log.warning("audit_retention_failed", error=scrub(f"{type(exc).__name__}: {exc}")[:300],
                            retry_in_s=self.every_s)
            else:
                if rows:
                    log.info("audit_rows_expired", rows=rows, batches=batches, days=self.days)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.every_s)
