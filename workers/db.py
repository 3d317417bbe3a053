"""PostgreSQL: connection URL at the edge, and the SQL migrations shipped with the package."""

from __future__ import annotations

import os
from pathlib import Path

import asyncpg

_LOCK_ID = 0x5357_4954  # advisory lock so that concurrent replicas migrate one at a time


def database_url() -> str | None:
    return os.environ.get("DATABASE_URL")


def _migrations() -> list[tuple[str, str]]:
    folder = Path(__file__).with_name("migrations")
    return sorted((f.name, f.read_text()) for f in folder.glob("*.sql"))


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply every migration not applied yet, each in its own transaction. Returns those applied."""
    applied: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS switchyard_migrations"
            " (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["name"] for r in await conn.fetch("SELECT name FROM switchyard_migrations")}
        for name, sql in _migrations():
            if name in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO switchyard_migrations (name) VALUES ($1)", name)
            applied.append(name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
    return applied
