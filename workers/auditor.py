"""The auditor: completion events from LLM_EVENTS into PostgreSQL, a batch per commit.

A batch is inserted in one transaction and acked after the commit. When the insert fails,
what failed decides what happens:

- **PostgreSQL is unavailable** (unreachable, connection lost, shutting down, out of
  connections or disk, a pool or statement timeout, the table missing or not writable):
  every event not yet acked is nak'd and retried with backoff, however long it takes.
  Nothing is dead-lettered, because no event is at fault.
- **PostgreSQL refuses the rows** (any other error, e.g. a value a column cannot hold):
  the batch is split in halves until the event(s) at fault are alone; the others are
  committed and acked, each refused event goes to `llm.dlq.audit` and is terminated.

An event is also dead-lettered, before any insert, when it cannot become a row: it does
not decode (malformed, wrong types, nested too deep), an integer does not fit its
`integer` column, a time is out of range, or a string holds a character PostgreSQL cannot
store. A NUL (U+0000) is such a character: `text` refuses 0x00 and `jsonb` refuses
`\\u0000`. The auditor does not strip it, because a ledger row that silently differs from
the event is worse than no row: the event is dead-lettered with a message naming the
field, and an operator decides. The same goes for a lone surrogate.

If the dead-letter copy cannot be published, the event is not acked: JetStream delivers
it again later.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math

import asyncpg
import msgspec
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from router.errors import ErrorCode
from router.redact import scrub
from router.vitals import Vitals
from schemas import CompletionEvent, decode_event

from .budget import BudgetAlert
from .metrics import AuditorMetrics
from .publish import Publisher, now_ms

log = structlog.get_logger("auditor")

_INSERT = """
INSERT INTO llm_audit (
    request_id, account, use_case, tier, status, code, provider, model, attempts,
    input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, reasoning_tokens, raw_usage,
    cost_usd, latency_ms, ttft_ms, started_at, finished_at, prompt_chars, prompt_sha256, finish_reason, metadata,
    trace_id
) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10, $11, $12, $13, $14, $15::jsonb,
          $16, $17, $18, $19, $20, $21, $22, $23, $24::jsonb, $25)
ON CONFLICT (account, request_id) DO UPDATE SET
    use_case = EXCLUDED.use_case,
    tier = EXCLUDED.tier,
    status = EXCLUDED.status,
    code = EXCLUDED.code,
    provider = EXCLUDED.provider,
    model = EXCLUDED.model,
    attempts = EXCLUDED.attempts,
    input_tokens = EXCLUDED.input_tokens,
    output_tokens = EXCLUDED.output_tokens,
    cache_read_tokens = EXCLUDED.cache_read_tokens,
    cache_write_tokens = EXCLUDED.cache_write_tokens,
    reasoning_tokens = EXCLUDED.reasoning_tokens,
    raw_usage = EXCLUDED.raw_usage,
    cost_usd = EXCLUDED.cost_usd,
    latency_ms = EXCLUDED.latency_ms,
    ttft_ms = EXCLUDED.ttft_ms,
    started_at = EXCLUDED.started_at,
    finished_at = EXCLUDED.finished_at,
    prompt_chars = EXCLUDED.prompt_chars,
    prompt_sha256 = EXCLUDED.prompt_sha256,
    finish_reason = EXCLUDED.finish_reason,
    metadata = EXCLUDED.metadata,
    trace_id = EXCLUDED.trace_id,
    recorded_at = now()
-- Only a refusal (an error before any provider was tried) gives way, to the outcome of the same request
-- sent again (a dead-letter replay); a row with a provider call, and so possibly a cost, is never replaced.
WHERE llm_audit.status = 'error' AND llm_audit.provider IS NULL
"""

_INSERT_ALERT = """
INSERT INTO llm_budget_alerts (account, period, period_key, threshold_pct, limit_usd, spent_usd, request_id, raised_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING
"""
_alert_decoder = msgspec.json.Decoder(BudgetAlert)

_ACQUIRE_TIMEOUT_S = 10.0
_INSERT_TIMEOUT_S = 60.0
_FIRST_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 15.0
_DEAD_LETTER_RETRY_S = 5.0

_INT4 = range(-(2**31), 2**31)
_COST_LIMIT = 1e8  # numeric(18, 10) holds absolute values below 10^8

# SQLSTATE classes that say PostgreSQL cannot take any row now, whatever the rows hold:
# connection (08), read-only or broken transaction state (25, e.g. a standby after a
# failover), rollback (40: serialization, deadlock), schema or privilege (42: the table is
# missing or not writable), resources (53), locks (55), shutdown, cancel or statement
# timeout (57), system I/O (58), configuration (F0), internal (XX). Retrying after the
# operator or the server fixes it loses nothing; dead-lettering would empty the stream.
_OUTAGE_CLASSES = frozenset({"08", "25", "40", "42", "53", "55", "57", "58", "F0", "XX"})
# Classes that blame a value: data exception (22), constraint (23), size limit (54).
_DATA_CLASSES = frozenset({"22", "23", "54"})


class BadEvent(ValueError):
    """An event that cannot become a ledger row; the message says which field and why."""


class LedgerUnavailable(Exception):
    """PostgreSQL cannot take any row right now; the batch is retried later."""


def is_outage(exc: BaseException) -> bool:
    """True when a failed insert is PostgreSQL's or the network's fault, not the rows'."""
    if isinstance(exc, asyncpg.PostgresError):
        return str(exc.sqlstate or "")[:2] in _OUTAGE_CLASSES
    if isinstance(exc, ValueError):
        # asyncpg's client-side DataError is an InterfaceError too: a value its column cannot take.
        return False
    return isinstance(exc, OSError | TimeoutError | asyncpg.InterfaceError)


def _printable(text: str) -> str:
    """`text` on one line, NUL, control characters and lone surrogates escaped: safe in a log line and a header."""
    return "".join(c if c.isprintable() else " " if c in "\r\n\t" else ascii(c)[1:-1] for c in text)


def _unstorable(text: str) -> str | None:
    """What in `text` PostgreSQL cannot store, or None."""
    if "\x00" in text:
        return "a NUL character (U+0000), which PostgreSQL text and jsonb cannot store"
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        return f"a lone surrogate ({_printable(text[exc.start : exc.end])}), which is not valid UTF-8"
    return None


_Trail = tuple["_Trail", str] | None
"""Where a value sits in the event, as (parent, step): a path spelled out only when it is reported."""


def _path(trail: _Trail) -> str:
    steps: list[str] = []
    while trail is not None:
        trail, step = trail
        steps.append(step)
    return "".join(reversed(steps)).lstrip(".") or "the event"


def _check_strings(ev: CompletionEvent) -> None:
    """Raise BadEvent naming the first string (value or key, at any depth) PostgreSQL cannot store."""
    # Iterative, so that raw_usage's depth (bounded only by the decoder) cannot exhaust the stack.
    stack: list[tuple[object, _Trail]] = [(msgspec.to_builtins(ev), None)]
    while stack:
        value, trail = stack.pop()
        if isinstance(value, str):
            if reason := _unstorable(value):
                raise BadEvent(f"{_path(trail)} contains {reason}")
        elif isinstance(value, dict):
            for key, item in value.items():
                if reason := _unstorable(key):
                    raise BadEvent(f"the key '{_printable(key)}' of {_path(trail)} contains {reason}")
                stack.append((item, (trail, "." + _printable(key))))
        elif isinstance(value, list):
            stack.extend((item, (trail, f"[{i}]")) for i, item in enumerate(value))


def _check_numbers(ev: CompletionEvent) -> None:
    u = ev.usage
    integers = {
        "usage.input_tokens": u.input_tokens, "usage.output_tokens": u.output_tokens,
        "usage.cache_read_tokens": u.cache_read_tokens, "usage.cache_write_tokens": u.cache_write_tokens,
        "usage.reasoning_tokens": u.reasoning_tokens, "latency_ms": ev.latency_ms, "ttft_ms": ev.ttft_ms,
        "prompt_chars": ev.prompt_chars,
    }
    for name, value in integers.items():
        if value is not None and value not in _INT4:
            raise BadEvent(f"{name}={value} does not fit PostgreSQL's integer column (-2^31 to 2^31-1)")
    cost = ev.cost_usd
    if cost is not None and not (math.isfinite(cost) and abs(cost) < _COST_LIMIT):
        raise BadEvent(f"cost_usd={cost} does not fit the numeric(18, 10) column")


def _ts(name: str, ms: int) -> dt.datetime:
    try:
        return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
    except (OverflowError, ValueError, OSError) as exc:
        raise BadEvent(f"{name}={ms} is not a time between the years 1 and 9999") from exc


def _json(value: object) -> str:
    return msgspec.json.encode(value).decode()


def row(ev: CompletionEvent) -> tuple[object, ...]:
    """The `llm_audit` row of an event, in `_INSERT`'s order.

    Raises BadEvent when a value cannot be stored as it is (see the module's docstring).
    """
    _check_strings(ev)
    _check_numbers(ev)
    u = ev.usage
    return (
        ev.id, ev.account, ev.use_case, ev.tier, ev.status, ev.code, ev.provider, ev.model, _json(ev.attempts),
        u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens, u.reasoning_tokens,
        _json(ev.raw_usage) if ev.raw_usage is not None else None,
        ev.cost_usd, ev.latency_ms, ev.ttft_ms, _ts("started_ms", ev.started_ms), _ts("finished_ms", ev.finished_ms),
        ev.prompt_chars, ev.prompt_sha256, ev.finish_reason, _json(ev.metadata), ev.trace_id,
    )


def _why_unreadable(exc: Exception) -> str:
    if isinstance(exc, BadEvent):
        return str(exc)
    if isinstance(exc, RecursionError):
        return f"the event is nested deeper than the decoder allows ({exc})"
    if isinstance(exc, msgspec.MsgspecError):
        return f"not a completion event: {exc}"
    return f"the event cannot become a row: {type(exc).__name__}: {exc}"


def _why_refused(exc: Exception) -> tuple[ErrorCode, str]:
    """The DLQ code and message for an event PostgreSQL refused on its own."""
    if isinstance(exc, asyncpg.PostgresError):
        code = ErrorCode.INVALID_REQUEST if str(exc.sqlstate or "")[:2] in _DATA_CLASSES else ErrorCode.INTERNAL
        return code, f"PostgreSQL refused the event ({exc.sqlstate} {type(exc).__name__}): {exc}"
    return ErrorCode.INTERNAL, f"the event could not be written: {type(exc).__name__}: {exc}"


class Auditor:
    def __init__(
        self, js: JetStreamContext, pub: Publisher, pool: asyncpg.Pool, *, batch: int = 500,
        metrics: AuditorMetrics | None = None,
    ) -> None:
        self.metrics = metrics if metrics is not None else AuditorMetrics()
        """What it counts (default: a registry nobody serves)."""
        self.js = js
        self.pub = pub
        self.pool = pool
        self.batch = batch
        self.vitals = Vitals(clock=now_ms)
        """Events in flight, recent batches, and whether writing fails now: served by its health endpoint."""

    async def serve(self, stop: asyncio.Event) -> None:
        sub = await self.js.pull_subscribe_bind("audit", "LLM_EVENTS")
        log.info("auditor_started")
        delay = _FIRST_BACKOFF_S
        while not stop.is_set():
            try:
                msgs = await sub.fetch(self.batch, timeout=1)
            except TimeoutError:
                self.metrics.idle()
                continue
            except Exception as exc:
                if self.pub.nc.is_closed:
                    raise  # closed for good: the process ends (exit 1) and is started again
                # NATS reconnecting or the consumer briefly gone: ask again rather than end the process.
                log.warning("audit_fetch_failed", error=repr(exc))
                await asyncio.sleep(_FIRST_BACKOFF_S)
                continue
            self.metrics.fetched(msgs)
            # The loop's one error boundary: whatever a batch raises, its unsettled events come back.
            try:
                with self.vitals.working(len(msgs)):
                    await self.write(msgs)
            except Exception as exc:
                self.vitals.failing(scrub(f"{type(exc).__name__}: {exc}")[:300])
                self.metrics.failed(outage=isinstance(exc, LedgerUnavailable))
                await self._retry_later(msgs, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF_S)
            else:
                self.vitals.recovered()
                self.metrics.settled()
                delay = _FIRST_BACKOFF_S
        await sub.unsubscribe()

    async def write(self, msgs: list[Msg]) -> None:
        """Store a batch: unreadable events to the DLQ, the rest inserted, then acked.

        Raises LedgerUnavailable when PostgreSQL cannot take rows now; events already
        committed are acked, the others are left for the caller to nak.
        """
        alerts = [m for m in msgs if m.subject.endswith(".alerts.budget")]
        if alerts:
            await self._record_alerts(alerts)
            msgs = [m for m in msgs if not m.subject.endswith(".alerts.budget")]
        pending: list[tuple[Msg, tuple[object, ...]]] = []
        for m in msgs:
            try:
                pending.append((m, row(decode_event(m.data))))
            except Exception as exc:
                await self._dead_letter(m, ErrorCode.INVALID_REQUEST, _why_unreadable(exc))
        if pending:
            await self._store(pending)
            log.debug("audited", events=len(msgs))

    async def _store(self, pending: list[tuple[Msg, tuple[object, ...]]]) -> None:
        """Insert and ack; when PostgreSQL refuses, bisect so only the refused events are dead-lettered."""
        try:
            await self._insert([r for _, r in pending])
        except LedgerUnavailable:
            raise
        except Exception as exc:
            if len(pending) == 1:
                code, error = _why_refused(exc)
                await self._dead_letter(pending[0][0], code, error)
                return
            # A refused event takes its whole transaction down: halve until it is alone.
            # k refused events among n cost about 2k·log2(n) extra inserts.
            half = len(pending) // 2
            await self._store(pending[:half])
            await self._store(pending[half:])
            return
        for m, _ in pending:
            await m.ack()
        self.metrics.rows.inc(len(pending))

    async def _record_alerts(self, msgs: list[Msg]) -> None:
        """Budget alerts into `llm_budget_alerts` (a redelivered one changes nothing), then acked. Raises
        LedgerUnavailable on an outage; an alert PostgreSQL refuses, or that does not decode, is dead-lettered."""
        rows: list[tuple[Msg, tuple[object, ...]]] = []
        for m in msgs:
            try:
                a = _alert_decoder.decode(m.data)
                rows.append((m, (a.account, a.period, a.period_key, a.threshold_pct, a.limit_usd, a.spent_usd,
                                 a.request_id, _ts("at_ms", a.at_ms))))
            except Exception as exc:
                await self._dead_letter(m, ErrorCode.INVALID_REQUEST, f"not a budget alert: {_why_unreadable(exc)}")
        try:
            async with self.pool.acquire(timeout=_ACQUIRE_TIMEOUT_S) as conn, conn.transaction():
                await conn.executemany(_INSERT_ALERT, [r for _, r in rows], timeout=_INSERT_TIMEOUT_S)
        except Exception as exc:
            if is_outage(exc):
                raise LedgerUnavailable(f"{type(exc).__name__}: {exc}") from exc
            for m, _ in rows:
                await self._dead_letter(m, _why_refused(exc)[0], _why_refused(exc)[1])
            return
        for m, r in rows:
            await m.ack()
            self.metrics.alerted(str(r[1]))

    async def _insert(self, rows: list[tuple[object, ...]]) -> None:
        """Raises LedgerUnavailable on an outage; any other exception means PostgreSQL refused these rows."""
        try:
            async with self.pool.acquire(timeout=_ACQUIRE_TIMEOUT_S) as conn, conn.transaction():
                await conn.executemany(_INSERT, rows, timeout=_INSERT_TIMEOUT_S)
        except Exception as exc:
            if is_outage(exc):
                raise LedgerUnavailable(f"{type(exc).__name__}: {exc}") from exc
            raise

    async def _dead_letter(self, m: Msg, code: ErrorCode, error: str) -> None:
        """Copy the event to `llm.dlq.audit` and terminate it; if the copy fails, leave it to come back."""
        error = _printable(error)
        log.error("audit_event_rejected", code=code.value, error=error, subject=m.subject)
        try:
            await self.pub.dead_letter("audit", m.data, subject=m.subject, code=code.value, error=error,
                                       origin_seq=m.metadata.sequence.stream)
        except Exception:
            # Not acked, so not lost: it comes back and the copy is tried again.
            log.exception("audit_dead_letter_failed", subject=m.subject)
            await self._nak(m, _DEAD_LETTER_RETRY_S)
            return
        await m.term()
        self.metrics.dead_letters.inc()

    async def _retry_later(self, msgs: list[Msg], exc: Exception, delay: float) -> None:
        """Nak what is not settled yet; JetStream redelivers it after `delay` and the insert is idempotent."""
        if isinstance(exc, LedgerUnavailable):
            log.warning("audit_ledger_unavailable", error=str(exc), batch=len(msgs), retry_in_s=delay)
        else:
            log.error("audit_batch_failed", batch=len(msgs), retry_in_s=delay, exc_info=exc)
        for m in msgs:
            if not m.is_acked and not await self._nak(m, delay):
                return

    @staticmethod
    async def _nak(m: Msg, delay: float) -> bool:
        try:
            await m.nak(delay=delay)
        except Exception as exc:
            # NATS itself is unreachable: an unacked event comes back after ack_wait anyway.
            log.warning("audit_nak_failed", error=repr(exc))
            return False
        return True
