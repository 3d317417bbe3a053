"""Audit retention (`audit.retention_days`): the auditor deletes ledger rows older than it, in small batches,
when it starts and then periodically; the config refuses a retention it could not honour."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from nats.aio.client import Client as NATS

from router import config as config_mod
from router.config import ConfigError
from schemas import CompletionEvent, encode
from workers import processes, retention
from workers.retention import Retention

from .conftest import fleet_config
from .helpers import audit_row

NOW = datetime.now(UTC)


async def _rows(db: asyncpg.Pool, ages_days: Iterable[tuple[str, float]]) -> None:
    await db.executemany(
        "INSERT INTO llm_audit (request_id, account, use_case, tier, status, started_at, finished_at)"
        " VALUES ($1, 'acme', 'draft', 'default', 'ok', $2, $2)",
        [(rid, NOW - timedelta(days=age)) for rid, age in ages_days],
    )


async def _ids(db: asyncpg.Pool) -> set[str]:
    return {r["request_id"] for r in await db.fetch("SELECT request_id FROM llm_audit")}


def test_the_config_takes_a_retention_in_days_and_nothing_else() -> None:
    base: dict[str, object] = {"providers": {}, "pools": {}, "routes": {}}
    assert config_mod.from_mapping(base).audit.retention_days is None  # kept for good unless set
    assert config_mod.from_mapping({**base, "audit": {"retention_days": 90}}).audit.retention_days == 90
    for value, message in ((0, "audit.retention_days: Expected `int` >= 1"),
                           (-5, "audit.retention_days: Expected `int` >= 1"),
                           ("90d", "audit.retention_days: Expected `int | null`, got `str`")):
        with pytest.raises(ConfigError) as exc:
            config_mod.from_mapping({**base, "audit": {"retention_days": value}})
        assert str(exc.value) == message
    with pytest.raises(ConfigError, match="audit: Object contains unknown field `retention`"):
        config_mod.from_mapping({**base, "audit": {"retention": 90}})


async def test_a_sweep_deletes_only_rows_past_the_retention_a_small_batch_at_a_time(db: asyncpg.Pool) -> None:
    old = [(f"old-{i}", 31 + i) for i in range(10)]
    kept = [("day-old", 1), ("almost", 29.9), ("fresh", 0)]
    await _rows(db, [*old, *kept])

    assert await Retention(db, None, batch=3).sweep() == (0, 0)  # no retention: nothing deleted
    assert len(await _ids(db)) == 13

    assert await Retention(db, 30, batch=3).sweep() == (10, 4)  # 3 + 3 + 3 + 1
    assert await _ids(db) == {rid for rid, _ in kept}
    assert await Retention(db, 30, batch=3).sweep() == (0, 0)  # nothing left past it
    assert await Retention(db, 1, batch=3).sweep() == (2, 1)  # a shorter retention takes more
    assert await _ids(db) == {"fresh"}


async def test_two_replicas_sweeping_at_once_delete_each_row_once(db: asyncpg.Pool) -> None:
    await _rows(db, [*((f"old-{i}", 40) for i in range(200)), ("fresh", 0)])
    a, b = await asyncio.gather(Retention(db, 30, batch=7).sweep(), Retention(db, 30, batch=7).sweep())
    assert a[0] + b[0] == 200
    assert await _ids(db) == {"fresh"}


async def test_the_auditor_expires_rows_at_start_and_periodically_while_it_writes(
    nats_url: str, nc: NATS, db: asyncpg.Pool, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retention, "SWEEP_EVERY_S", 0.5)
    monkeypatch.setattr(retention, "BATCH", 2)
    await _rows(db, [("old-1", 45), ("old-2", 31), ("old-3", 100), ("recent", 2)])
    cfg = fleet_config({"openai": "http://127.0.0.1:9/v1"}, audit={"retention_days": 30})
    stop = asyncio.Event()
    auditor = asyncio.create_task(processes.run_auditor(stop, cfg, nats_url, pg_url))
    try:
        async with asyncio.timeout(30):
            while await _ids(db) != {"recent"}:  # the sweep at start
                assert not auditor.done(), auditor
                await asyncio.sleep(0.05)
            # an event the auditor writes meanwhile is a row like any other; an old row written later goes
            finished = int(NOW.timestamp() * 1000)
            await nc.jetstream().publish("llm.events.completed", encode(CompletionEvent(
                id="new", account="acme", use_case="draft", status="ok", started_ms=finished - 10,
                finished_ms=finished)))
            await audit_row(db, "new")
            await _rows(db, [("old-late", 60)])
            while await _ids(db) != {"recent", "new"}:  # a later sweep
                assert not auditor.done(), auditor
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(auditor, 15)
