"""The auditor: completion events from LLM_EVENTS into PostgreSQL, a batch per commit."""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import asyncpg
import msgspec
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from router.errors import ErrorCode
from schemas import CompletionEvent, decode_event

from .publish import Publisher

log = structlog.get_logger("auditor")

_INSERT = """
INSERT INTO llm_audit (
    request_id, account, use_case, tier, status, code, provider, model, attempts,
    input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, reasoning_tokens, raw_usage,
    cost_usd, latency_ms, ttft_ms, started_at, finished_at, prompt_chars, prompt_sha256, finish_reason, metadata
) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10, $11, $12, $13, $14, $15::jsonb,
          $16, $17, $18, $19, $20, $21, $22, $23, $24::jsonb)
ON CONFLICT (request_id) DO NOTHING
"""


def _ts(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)


def row(ev: CompletionEvent) -> tuple[object, ...]:
    u = ev.usage
    return (
        ev.id, ev.account, ev.use_case, ev.tier, ev.status, ev.code, ev.provider, ev.model,
        msgspec.json.encode(ev.attempts).decode(),
        u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens, u.reasoning_tokens,
        json.dumps(ev.raw_usage) if ev.raw_usage is not None else None,
        ev.cost_usd, ev.latency_ms, ev.ttft_ms, _ts(ev.started_ms), _ts(ev.finished_ms),
        ev.prompt_chars, ev.prompt_sha256, ev.finish_reason, json.dumps(ev.metadata),
    )


class Auditor:
    def __init__(self, js: JetStreamContext, pub: Publisher, pool: asyncpg.Pool, *, batch: int = 500) -> None:
        self.js = js
        self.pub = pub
        self.pool = pool
        self.batch = batch

    async def serve(self, stop: asyncio.Event) -> None:
        sub = await self.js.pull_subscribe_bind("audit", "LLM_EVENTS")
        log.info("auditor_started")
        delay = 0.5
        while not stop.is_set():
            try:
                msgs = await sub.fetch(self.batch, timeout=1)
            except TimeoutError:
                continue
            try:
                await self.write(msgs)
                delay = 0.5
            except Exception as exc:
                # PostgreSQL down or refusing: nothing is acked, JetStream redelivers after the delay and
                # the insert is idempotent. The loop never dies on a batch.
                log.warning("audit_write_failed", error=repr(exc), batch=len(msgs), retry_in_s=delay)
                for m in msgs:
                    await m.nak(delay=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 15.0)
        await sub.unsubscribe()

    async def write(self, msgs: list[Msg]) -> None:
        """Decode, insert in one transaction, then ack. Undecodable events go to the DLQ."""
        rows: list[tuple[object, ...]] = []
        good: list[Msg] = []
        for m in msgs:
            try:
                rows.append(row(decode_event(m.data)))
                good.append(m)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.error("bad_event", error=str(exc))
                await self.pub.dead_letter(
                    "audit", m.data, subject=m.subject, code=ErrorCode.INVALID_REQUEST.value, error=str(exc)
                )
                await m.term()
        if rows:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.executemany(_INSERT, rows)
        for m in good:
            await m.ack()
        if rows:
            log.debug("audited", rows=len(rows))
