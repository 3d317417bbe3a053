"""The auditor acks a batch only after its commit, so no event is lost while the ledger is unwritable."""

from __future__ import annotations

import asyncio

import asyncpg
from nats.aio.client import Client as NATS

from schemas import CompletionEvent, encode

from .conftest import Fleet
from .helpers import audit_row, dlq_messages


def event(rid: str) -> CompletionEvent:
    return CompletionEvent(id=rid, account="acme", use_case="draft", status="ok", provider="openai",
                           model="gpt-4o-mini", started_ms=1_700_000_000_000, finished_ms=1_700_000_001_000,
                           cost_usd=0.001)


async def test_events_wait_for_the_database_and_are_written_once(fleet: Fleet, nc: NATS, db: asyncpg.Pool) -> None:
    js = nc.jetstream()
    await db.execute("ALTER TABLE llm_audit RENAME TO llm_audit_away")  # every insert now fails
    try:
        for i in range(5):
            await js.publish("llm.events.completed", encode(event(f"ev-{i}")))
        await asyncio.sleep(1.5)  # the auditor tries, fails, and naks
        info = await js.consumer_info("LLM_EVENTS", "audit")
        assert info.num_ack_pending + info.num_pending == 5  # nothing acked, nothing lost
    finally:
        await db.execute("ALTER TABLE llm_audit_away RENAME TO llm_audit")
    for i in range(5):
        await audit_row(db, f"ev-{i}", timeout=20)
    # A duplicate event (a redelivery, a replayed publish) does not make a second row.
    await js.publish("llm.events.completed", encode(event("ev-0")))
    await js.publish("llm.events.completed", encode(event("ev-5")))
    await audit_row(db, "ev-5")
    assert await db.fetchval("SELECT count(*) FROM llm_audit WHERE request_id LIKE 'ev-%'") == 6


async def test_an_undecodable_event_goes_to_the_dead_letter_queue(fleet: Fleet, nc: NATS, db: asyncpg.Pool) -> None:
    js = nc.jetstream()
    await js.publish("llm.events.completed", b'{"id": 42}')
    await js.publish("llm.events.completed", encode(event("after-bad")))
    [copy] = await dlq_messages(nc, "audit")
    assert copy.data == b'{"id": 42}' and copy.headers["Switchyard-Error-Code"] == "INVALID_REQUEST"
    await audit_row(db, "after-bad")
