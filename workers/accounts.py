"""Accounts' own routes and limits, from PostgreSQL's `llm_account_routes` (workers/migrations/003)
and `llm_account_limits` (workers/migrations/009).

An account may have its own route for a use case, for one tier or for every tier (`*`); the
dispatcher tries it before the config's route (router/routing.py). An account may also have its own
rate limit and budget, which win over the config's (router/limits.py). Each dispatcher keeps the
active rows of both tables in memory (`AccountRoutes`) and follows them (workers/follow.py):

- LISTEN on the channels `llm_account_routes` and `llm_account_limits`, which triggers notify at the
  commit of every change: both tables are read again (a row per account and use case at most, and a
  row per account);
- a `SELECT 1` every second on that connection, so a connection that died without a word is
  noticed, replaced and the table read again;
- a full read every 30 s whatever happens, as a safety net.

So a dispatcher is at most about two seconds behind the table while PostgreSQL can be reached.
When it cannot, the dispatcher keeps serving with the routes it last read and tries again with a
backoff. Without DATABASE_URL a dispatcher runs with no account routes at all, and says so once
in its log (`account_routes_off`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg
import msgspec
import structlog

from router.config import parse_target
from router.limits import AccountLimits
from router.routing import AccountRoute

from .follow import PING_S, QUERY_S, RELOAD_S, TableFollower

log = structlog.get_logger("accounts")

CHANNEL = "llm_account_routes"
LIMITS_CHANNEL = "llm_account_limits"
APPLICATION = "switchyard-account-routes"
"""The listening connection's application_name, as pg_stat_activity shows it."""
ALL_TIERS = "*"

_COLUMNS = "account, use_case, tier, targets, key_ref, active, updated_at"


class RouteRow(msgspec.Struct, kw_only=True):
    """One row of `llm_account_routes`, as `switchyard accounts route list --json` prints it."""

    account: str
    use_case: str
    tier: str
    targets: list[str]
    key_ref: str | None
    active: bool
    updated_at: datetime


def _row(record: Any) -> RouteRow:
    return RouteRow(
        account=record["account"], use_case=record["use_case"], tier=record["tier"], targets=list(record["targets"]),
        key_ref=record["key_ref"], active=record["active"], updated_at=record["updated_at"],
    )


def to_route(row: RouteRow) -> AccountRoute | None:
    """The row as a route; None (logged) when a target is not `pool:model` (written by hand)."""
    try:
        targets = [parse_target(t) for t in row.targets]
    except ValueError as exc:
        log.warning("account_route_ignored", account=row.account, use_case=row.use_case, tier=row.tier,
                    error=str(exc))
        return None
    return AccountRoute(account=row.account, use_case=row.use_case, tier=row.tier, targets=targets,
                        key_ref=row.key_ref)


Table = dict[tuple[str, str], dict[str, AccountRoute]]


def _table(rows: Sequence[RouteRow]) -> Table:
    table: Table = {}
    for row in rows:
        route = to_route(row)
        if route is not None:
            table.setdefault((row.account, row.use_case), {})[row.tier] = route
    return table


def _pick(tiers: dict[str, AccountRoute] | None, tier: str) -> AccountRoute | None:
    if tiers is None:
        return None
    return tiers.get(tier) or tiers.get(ALL_TIERS)


async def rows(conn: asyncpg.Connection, account: str | None = None, *, active_only: bool = False) -> list[RouteRow]:
    """Every row (of one account), ordered by account, use case and tier."""
    where = ["($1::text IS NULL OR account = $1)"]
    if active_only:
        where.append("active")
    sql = f"SELECT {_COLUMNS} FROM llm_account_routes WHERE {' AND '.join(where)} ORDER BY account, use_case, tier"
    return [_row(r) for r in await conn.fetch(sql, account)]


async def find(conn: asyncpg.Connection, account: str, use_case: str, tier: str) -> AccountRoute | None:
    """The active route an account's request of this use case and tier follows: its tier's, else `*`'s."""
    records = await conn.fetch(
        f"SELECT {_COLUMNS} FROM llm_account_routes"
        " WHERE account = $1 AND use_case = $2 AND tier IN ($3, '*') AND active",
        account, use_case, tier,
    )
    return _pick(_table([_row(r) for r in records]).get((account, use_case)), tier)


async def put(conn: asyncpg.Connection, account: str, use_case: str, tier: str, targets: list[str]) -> bool:
    """Set (and activate) a route. True when it replaced one."""
    replaced: bool = await conn.fetchval(
        "INSERT INTO llm_account_routes (account, use_case, tier, targets) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (account, use_case, tier) DO UPDATE SET targets = EXCLUDED.targets, active = true"
        " RETURNING xmax <> 0",
        account, use_case, tier, targets,
    )
    return replaced


async def delete(conn: asyncpg.Connection, account: str, use_case: str, tier: str) -> bool:
    """True when there was such a route."""
    status: str = await conn.execute(
        "DELETE FROM llm_account_routes WHERE account = $1 AND use_case = $2 AND tier = $3", account, use_case, tier
    )
    return status != "DELETE 0"


LIMIT_FIELDS = tuple(AccountLimits.__struct_fields__)
_LIMIT_COLUMNS = ", ".join(LIMIT_FIELDS)


class LimitsRow(msgspec.Struct, kw_only=True):
    """One row of `llm_account_limits`, as `switchyard accounts limits show --json` prints it (an amount of
    null: the config's applies; "unlimited": no limit)."""

    account: str
    limits: AccountLimits
    updated_at: datetime


def _limits_row(record: Any) -> LimitsRow:
    return LimitsRow(account=record["account"], updated_at=record["updated_at"],
                     limits=AccountLimits(**{f: record[f] for f in LIMIT_FIELDS}))


async def limit_rows(conn: asyncpg.Connection, account: str | None = None) -> list[LimitsRow]:
    """Every account's own limits (or one account's), ordered by account."""
    records = await conn.fetch(
        f"SELECT account, {_LIMIT_COLUMNS}, updated_at FROM llm_account_limits"
        " WHERE ($1::text IS NULL OR account = $1) ORDER BY account", account,
    )
    return [_limits_row(r) for r in records]


async def put_limits(conn: asyncpg.Connection, account: str, given: AccountLimits) -> AccountLimits:
    """Set the fields of an account's own limits that `given` sets (the others keep their value). Returns
    the row as it is now."""
    fields = [f for f in LIMIT_FIELDS if getattr(given, f) is not None]
    values = [getattr(given, f) for f in fields]
    columns = ", ".join(["account", *fields])
    params = ", ".join(f"${i}" for i in range(1, len(fields) + 2))
    updates = ", ".join(f"{f} = EXCLUDED.{f}" for f in fields) or "account = EXCLUDED.account"
    record = await conn.fetchrow(
        f"INSERT INTO llm_account_limits ({columns}) VALUES ({params})"
        f" ON CONFLICT (account) DO UPDATE SET {updates} RETURNING account, {_LIMIT_COLUMNS}, updated_at",
        account, *values,
    )
    return _limits_row(record).limits


async def delete_limits(conn: asyncpg.Connection, account: str) -> bool:
    """True when the account had its own limits."""
    status: str = await conn.execute("DELETE FROM llm_account_limits WHERE account = $1", account)
    return status != "DELETE 0"


class AccountRoutes:
    """The active account routes, in memory, following the table (see the module's docstring)."""

    def __init__(self, database_url: str, *, ping_s: float = PING_S, reload_s: float = RELOAD_S) -> None:
        self.url = database_url
        self._table: Table = {}
        self._limits: dict[str, AccountLimits] = {}
        self._follower = TableFollower(
            database_url, channels=[CHANNEL, LIMITS_CHANNEL], application=APPLICATION, reload=self._reload,
            log=log, event_prefix="account_routes", unreachable_effect="requests follow the account routes read last",
            error_detail=lambda exc: repr(exc)[:300], ping_s=ping_s, reload_s=reload_s,
        )
        self.loaded = asyncio.Event()
        """Set once the table was read the first time."""

    def lookup(self, account: str, use_case: str, tier: str) -> AccountRoute | None:
        """The route for a request of this account, use case and tier: its tier's, else `*`'s, else None."""
        return _pick(self._table.get((account, use_case)), tier)

    def limits(self, account: str) -> AccountLimits | None:
        """The account's own limits (its row of `llm_account_limits`), None when it has none."""
        return self._limits.get(account)

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the tables until `stop`; never raises but CancelledError."""
        await self._follower.run(stop)

    async def _reload(self, conn: asyncpg.Connection) -> None:
        async with asyncio.timeout(QUERY_S):
            table = _table(await rows(conn, active_only=True))
            limits = {r.account: r.limits for r in await limit_rows(conn)}
        if table != self._table or limits != self._limits or not self.loaded.is_set():
            log.info("account_routes_loaded", routes=sum(len(t) for t in table.values()), limits=len(limits))
        self._table = table
        self._limits = limits
        self.loaded.set()
