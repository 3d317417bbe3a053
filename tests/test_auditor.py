"""The auditor acks a batch only after its commit, so no event is lost while the ledger is unwritable;
an event PostgreSQL can never store goes to `llm.dlq.audit` on its own and the rest are written."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from schemas import CompletionEvent, Usage, encode
from workers.auditor import Auditor, is_outage
from workers.publish import Publisher
from workers.runtime import ensure_topology

from .conftest import Fleet, fleet_config, free_port
from .helpers import audit_row, dlq_messages


def event(rid: str, **fields: Any) -> CompletionEvent:
    base: dict[str, Any] = dict(
        id=rid, account="acme", use_case="draft", status="ok", provider="openai", model="gpt-4o-mini",
        started_ms=1_700_000_000_000, finished_ms=1_700_000_001_000, cost_usd=0.001,
    )
    return CompletionEvent(**{**base, **fields})


def with_raw_json(rid: str, field: str, raw: bytes) -> bytes:
    """An event whose `field` is the given JSON text, for bodies no Struct can encode."""
    body = msgspec.to_builtins(event(rid))
    body.pop(field, None)
    return msgspec.json.encode(body)[:-1] + b',"' + field.encode() + b'":' + raw + b"}"


async def publish_all(js: JetStreamContext, bodies: list[bytes]) -> None:
    for body in bodies:
        await js.publish("llm.events.completed", body)


async def settled(js: JetStreamContext, timeout: float = 10.0) -> None:
    """Wait until the audit consumer has nothing pending and nothing unacknowledged."""
    async with asyncio.timeout(timeout):
        while True:
            info = await js.consumer_info("LLM_EVENTS", "audit")
            if info.num_pending == 0 and info.num_ack_pending == 0:
                return
            await asyncio.sleep(0.05)


async def dlq_size(js: JetStreamContext) -> int:
    return int((await js.stream_info("LLM_DLQ")).state.messages)


@contextlib.asynccontextmanager
async def auditor(nats_url: str, pool: asyncpg.Pool, batch: int = 500) -> AsyncIterator[None]:
    """An auditor of our own in this process, on its own NATS connection, started when the test chooses (the
    `fleet` one starts at once)."""
    conn = await nats.connect(nats_url)
    js = conn.jetstream()
    stop = asyncio.Event()
    task = asyncio.create_task(Auditor(js, Publisher(conn, js, "llm"), pool, batch=batch).serve(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await conn.close()


async def topology(nc: NATS) -> JetStreamContext:
    js = nc.jetstream()
    await ensure_topology(js, fleet_config({"openai": "http://127.0.0.1:9/v1"}))
    return js


async def test_events_wait_for_the_database_and_are_written_once(fleet: Fleet, nc: NATS, db: asyncpg.Pool) -> None:
    js = nc.jetstream()
    await db.execute("ALTER TABLE llm_audit RENAME TO llm_audit_away")  # every insert now fails
    try:
        for i in range(5):
            await js.publish("llm.events.completed", encode(event(f"ev-{i}")))
        await asyncio.sleep(1.5)  # the auditor tries, fails, and naks
        info = await js.consumer_info("LLM_EVENTS", "audit")
        assert info.num_ack_pending + info.num_pending == 5  # nothing acked, nothing lost
        assert await dlq_size(js) == 0  # the ledger was missing, no event was at fault
    finally:
        await db.execute("ALTER TABLE llm_audit_away RENAME TO llm_audit")
    for i in range(5):
        await audit_row(db, f"ev-{i}", timeout=20)
    # A duplicate event (a redelivery, a replayed publish) does not make a second row.
    await js.publish("llm.events.completed", encode(event("ev-0")))
    await js.publish("llm.events.completed", encode(event("ev-5")))
    await audit_row(db, "ev-5")
    assert await db.fetchval("SELECT count(*) FROM llm_audit WHERE request_id LIKE 'ev-%'") == 6
    assert await dlq_size(js) == 0


async def test_an_unreachable_database_dead_letters_nothing(nats_url: str, nc: NATS, db: asyncpg.Pool) -> None:
    js = await topology(nc)
    await publish_all(js, [encode(event(f"down-{i}")) for i in range(3)])
    # Nothing listens on this port: every connection attempt is refused.
    nowhere = await asyncpg.create_pool(f"postgresql://audit@127.0.0.1:{free_port()}/audit", min_size=0, max_size=1)
    try:
        async with auditor(nats_url, nowhere):
            await asyncio.sleep(2)  # several attempts, each refused
            info = await js.consumer_info("LLM_EVENTS", "audit")
            assert info.num_ack_pending + info.num_pending == 3
            assert await dlq_size(js) == 0
    finally:
        await nowhere.close()
    async with auditor(nats_url, db):  # the database is back
        for i in range(3):
            await audit_row(db, f"down-{i}", timeout=20)
        await settled(js)
    assert await dlq_size(js) == 0


async def test_an_undecodable_event_goes_to_the_dead_letter_queue(fleet: Fleet, nc: NATS, db: asyncpg.Pool) -> None:
    js = nc.jetstream()
    await js.publish("llm.events.completed", b'{"id": 42}')
    await js.publish("llm.events.completed", encode(event("after-bad")))
    [copy] = await dlq_messages(nc, "audit")
    assert copy.data == b'{"id": 42}' and copy.headers["Switchyard-Error-Code"] == "INVALID_REQUEST"
    await audit_row(db, "after-bad")


async def test_an_event_with_a_nul_is_dead_lettered_and_the_others_written(
    fleet: Fleet, nc: NATS, db: asyncpg.Pool
) -> None:
    js = nc.jetstream()
    poison = {
        encode(event("nul\x00id")): "id contains a NUL character (U+0000)",
        encode(event("nul-meta", metadata={"job": "night\x00ly"})): "metadata.job contains a NUL character (U+0000)",
    }
    good = [encode(event(f"good-{i}")) for i in range(6)]
    await publish_all(js, [*good[:2], *poison, *good[2:]])
    copies = await dlq_messages(nc, "audit", expect=2)
    assert {c.data for c in copies} == set(poison)
    for c in copies:
        assert c.headers["Switchyard-Error-Code"] == "INVALID_REQUEST"
        assert poison[c.data] in c.headers["Switchyard-Error"]
        assert c.headers["Switchyard-Subject"] == "llm.events.completed"
    for i in range(6):
        await audit_row(db, f"good-{i}")
    assert await db.fetchval("SELECT count(*) FROM llm_audit WHERE request_id LIKE 'nul%'") == 0
    # Nothing is stuck in a retry loop: later events are written and the consumer drains.
    await js.publish("llm.events.completed", encode(event("after-poison")))
    await audit_row(db, "after-poison")
    await settled(js)


async def test_an_event_postgresql_refuses_is_split_out_of_its_batch(
    nats_url: str, nc: NATS, db: asyncpg.Pool
) -> None:
    js = await topology(nc)
    # Too long for a btree index entry: only the INSERT finds out, and it fails the whole transaction.
    refused = encode(event(secrets.token_urlsafe(6000)))
    good = [encode(event(f"batch-{i}")) for i in range(9)]
    await publish_all(js, [*good[:5], refused, *good[5:]])  # all in before the auditor's first fetch
    async with auditor(nats_url, db):
        [copy] = await dlq_messages(nc, "audit", timeout=10)
        for i in range(9):
            await audit_row(db, f"batch-{i}")
        await settled(js)
    assert copy.data == refused
    assert copy.headers["Switchyard-Error-Code"] == "INVALID_REQUEST"
    assert "PostgreSQL refused the event (54000" in copy.headers["Switchyard-Error"]
    assert await db.fetchval("SELECT count(*) FROM llm_audit") == 9


async def test_events_that_cannot_become_rows_are_dead_lettered(fleet: Fleet, nc: NATS, db: asyncpg.Pool) -> None:
    js = nc.jetstream()
    depth = 20_000
    poison = {
        with_raw_json("deep", "raw_usage", b'{"a":' * depth + b"1" + b"}" * depth): "nested deeper than the decoder",
        encode(event("too-many-tokens", usage=Usage(input_tokens=2**31))): "usage.input_tokens=2147483648",
        encode(event("far-future", started_ms=10**15)): "started_ms=1000000000000000",
        with_raw_json("surrogate", "metadata", b'{"job": "\\udc00"}'): "not a completion event",
    }
    await publish_all(js, [*poison, encode(event("after-unreadable"))])
    copies = await dlq_messages(nc, "audit", expect=len(poison))
    for c in copies:
        assert c.headers["Switchyard-Error-Code"] == "INVALID_REQUEST"
        assert poison[c.data] in c.headers["Switchyard-Error"], c.headers["Switchyard-Error"]
    await audit_row(db, "after-unreadable")
    assert await db.fetchval("SELECT count(*) FROM llm_audit") == 1
    await settled(js)


async def test_the_same_request_id_in_two_accounts_makes_two_rows(fleet: Fleet, nc: NATS, db: asyncpg.Pool) -> None:
    js = nc.jetstream()
    await publish_all(js, [
        encode(event("shared-id", account="acme", cost_usd=0.001)),
        encode(event("shared-id", account="globex", cost_usd=0.002)),
        encode(event("shared-id", account="acme", cost_usd=0.001)),  # a redelivery: still one row for acme
        encode(event("after-shared")),
    ])
    await audit_row(db, "after-shared")
    rows = await db.fetch("SELECT account, cost_usd FROM llm_audit WHERE request_id = 'shared-id' ORDER BY account")
    assert [(r["account"], float(r["cost_usd"])) for r in rows] == [("acme", 0.001), ("globex", 0.002)]


async def test_a_poison_event_is_kept_until_its_dead_letter_copy_is_published(
    fleet: Fleet, nc: NATS, db: asyncpg.Pool
) -> None:
    js = nc.jetstream()
    await js.delete_stream("LLM_DLQ")  # dead-lettering now fails
    poison = encode(event("nul\x00kept"))
    await publish_all(js, [poison, encode(event("while-dlq-down"))])
    await audit_row(db, "while-dlq-down")
    await ensure_topology(js, fleet.cfg)  # the DLQ is back, empty: the first copy never made it
    [copy] = await dlq_messages(nc, "audit", timeout=15)  # the event came back and was copied this time
    assert copy.data == poison
    await settled(js)


@pytest.mark.parametrize(
    ("exc", "outage"),
    [
        (ConnectionRefusedError(), True),
        (TimeoutError(), True),  # a pool acquire or statement timeout
        (asyncpg.InterfaceError("connection is closed"), True),
        (asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"), True),
        (asyncpg.CannotConnectNowError("the database system is starting up"), True),
        (asyncpg.TooManyConnectionsError("too many clients"), True),
        (asyncpg.AdminShutdownError("terminating connection"), True),
        (asyncpg.ReadOnlySQLTransactionError("read-only transaction"), True),  # a standby after failover
        (asyncpg.DeadlockDetectedError("deadlock detected"), True),
        (asyncpg.DiskFullError("no space left on device"), True),
        (asyncpg.UndefinedTableError('relation "llm_audit" does not exist'), True),
        (asyncpg.InsufficientPrivilegeError("permission denied"), True),
        (asyncpg.CharacterNotInRepertoireError('invalid byte sequence for encoding "UTF8": 0x00'), False),
        (asyncpg.UntranslatableCharacterError("unsupported Unicode escape sequence"), False),
        (asyncpg.NotNullViolationError("null value"), False),
        (asyncpg.CheckViolationError("violates check constraint"), False),
        (asyncpg.NumericValueOutOfRangeError("numeric field overflow"), False),
        (asyncpg.ProgramLimitExceededError("index row size exceeds maximum"), False),
        (asyncpg.DataError("invalid input for query argument $10"), False),
        (ValueError("value out of int32 range"), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_a_failed_insert_is_an_outage_only_when_no_row_is_to_blame(exc: BaseException, outage: bool) -> None:
    assert is_outage(exc) is outage


async def test_a_refusal_row_gives_way_to_the_outcome_of_the_same_request_sent_again(
    fleet: Fleet, nc: NATS, db: asyncpg.Pool
) -> None:
    # A request refused before any provider was tried, fixed and replayed from the dead-letter queue.
    js = nc.jetstream()
    refused = event("replayed", status="error", code="NO_ROUTE", provider=None, model=None, cost_usd=None)
    await js.publish("llm.events.completed", encode(refused), headers={"Nats-Msg-Id": "refused:1"})
    assert (await audit_row(db, "replayed"))["code"] == "NO_ROUTE"
    await js.publish("llm.events.completed", encode(event("replayed", finished_ms=1_700_000_009_000)))
    async with asyncio.timeout(10):
        while (await audit_row(db, "replayed"))["status"] != "ok":
            await asyncio.sleep(0.05)
    # A row with a provider call is never replaced, by a refusal or anything else.
    late = event("replayed", status="error", code="INVALID_REQUEST", provider=None, model=None, cost_usd=None)
    await js.publish("llm.events.completed", encode(late), headers={"Nats-Msg-Id": "refused:2"})
    await js.publish("llm.events.completed", encode(event("marker")))
    await audit_row(db, "marker")
    row = await audit_row(db, "replayed")
    assert row["status"] == "ok" and row["provider"] == "openai" and float(row["cost_usd"]) == 0.001
