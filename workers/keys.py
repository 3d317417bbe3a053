"""Provider keys stored encrypted in PostgreSQL's `llm_provider_keys` (workers/migrations/008).

A key is stored under the name of the environment variable a provider's `api_key_env` names
(`OPENAI_API_KEY`), for every account (global) or for one account (`--account`). Which key a call
uses (`PoolWorker.key_for`): the account's own stored key, else the environment variable, else the
global stored key.

Each provider worker keeps the keys it can decrypt in memory (`KeyRing`), and tells
router/redact.py of every one, and follows the table as workers/accounts.py follows account
routes (workers/follow.py): LISTEN on `llm_provider_keys` (a trigger notifies at the commit of every
change), a `SELECT 1` every second on that connection, a full read every 30 s. So a set, rotated or
deleted key is used within about two seconds, without a restart. A worker without DATABASE_URL or without
SWITCHYARD_MASTER_KEYS uses environment keys only, and says so once in its log (`stored_keys_off`).

Decrypted keys are never written anywhere: not to a message, a log line, an error or a row.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Any

import asyncpg
import msgspec
import structlog

from router.redact import remember_secret
from router.secrets import MasterKeys, Sealed, SecretsError, describe, mask, master_keys_from_env

from .db import migrate
from .follow import PING_S, QUERY_S, RELOAD_S, TableFollower

log = structlog.get_logger("keys")

CHANNEL = "llm_provider_keys"
APPLICATION = "switchyard-provider-keys"
"""The listening connection's application_name, as pg_stat_activity shows it."""
FIRST_LOAD_S = 10.0
"""How long a worker waits for its first read of the table before it serves (with what it has)."""

_COLUMNS = "name, account, ciphertext, nonce, key_version, created_at, rotated_at"
_ORDER = "ORDER BY name, account NULLS FIRST"

Slot = tuple[str, str | None]
"""(name, account or None for the global key)."""


class KeyRow(msgspec.Struct, kw_only=True):
    """One row as `switchyard keys list --json` prints it: the key masked, never whole."""

    name: str
    account: str | None
    key: str | None
    """Masked (`sk-…f3a9`); None when this command's master keys cannot decrypt it (`problem` says why)."""
    version: int
    """The master key version it is encrypted under."""
    created_at: datetime
    rotated_at: datetime | None
    problem: str | None = None


class Rotation(msgspec.Struct, kw_only=True):
    """What `switchyard keys rotate` did."""

    version: int
    """The master key version every row is encrypted under now."""
    rotated: int
    already: int
    """Rows that were under that version already, left as they were."""
    from_versions: dict[str, int]
    """Rows re-encrypted, by the version they were under (keys are versions as text, for JSON)."""


def _sealed(record: Any) -> Sealed:
    return Sealed(ciphertext=bytes(record["ciphertext"]), nonce=bytes(record["nonce"]), version=record["key_version"])


async def put(conn: asyncpg.Connection, master: MasterKeys, name: str, account: str | None, secret: str) -> bool:
    """Store (or replace) a key, encrypted under the newest master key. True when it replaced one."""
    sealed = master.seal(name, account, secret)
    replaced: bool = await conn.fetchval(
        "INSERT INTO llm_provider_keys (name, account, ciphertext, nonce, key_version) VALUES ($1, $2, $3, $4, $5)"
        " ON CONFLICT (name, (coalesce(account, ''))) DO UPDATE SET ciphertext = EXCLUDED.ciphertext,"
        " nonce = EXCLUDED.nonce, key_version = EXCLUDED.key_version, created_at = now(), rotated_at = NULL"
        " RETURNING xmax <> 0",
        name, account, sealed.ciphertext, sealed.nonce, sealed.version,
    )
    return replaced


async def delete(conn: asyncpg.Connection, name: str, account: str | None) -> bool:
    """True when there was such a key."""
    status: str = await conn.execute(
        "DELETE FROM llm_provider_keys WHERE name = $1 AND account IS NOT DISTINCT FROM $2", name, account
    )
    return status != "DELETE 0"


async def listing(conn: asyncpg.Connection, master: MasterKeys | None) -> list[KeyRow]:
    """Every row, its key masked when `master` decrypts it."""
    out: list[KeyRow] = []
    for r in await conn.fetch(f"SELECT {_COLUMNS} FROM llm_provider_keys {_ORDER}"):
        shown, problem = None, None
        if master is not None:
            try:
                shown = mask(master.open(r["name"], r["account"], _sealed(r)))
            except SecretsError as exc:
                problem = str(exc)
        out.append(KeyRow(name=r["name"], account=r["account"], key=shown, version=r["key_version"],
                          created_at=r["created_at"], rotated_at=r["rotated_at"], problem=problem))
    return out


async def rotate(conn: asyncpg.Connection, master: MasterKeys) -> Rotation:
    """Re-encrypt every row not under the newest master key, in one transaction: all or none. Raises
    SecretsError (nothing changed) when a row does not decrypt with the listed master keys."""
    moved: dict[str, int] = {}
    already = 0
    async with conn.transaction():
        for r in await conn.fetch(f"SELECT {_COLUMNS} FROM llm_provider_keys {_ORDER} FOR UPDATE"):
            name, account = r["name"], r["account"]
            secret = master.open(name, account, _sealed(r))  # every row is checked, the newest ones too
            if r["key_version"] == master.newest:
                already += 1
                continue
            sealed = master.seal(name, account, secret)
            await conn.execute(
                "UPDATE llm_provider_keys SET ciphertext = $3, nonce = $4, key_version = $5, rotated_at = now()"
                " WHERE name = $1 AND account IS NOT DISTINCT FROM $2",
                name, account, sealed.ciphertext, sealed.nonce, sealed.version,
            )
            moved[str(r["key_version"])] = moved.get(str(r["key_version"]), 0) + 1
    return Rotation(version=master.newest, rotated=sum(moved.values()), already=already, from_versions=moved)


async def stored_names(url: str) -> set[str]:
    """The names that have a stored key (global or an account's), for `switchyard up` to know which
    providers have a key. Migrates the database first."""
    conn = await asyncpg.connect(url, timeout=QUERY_S)
    try:
        await migrate(conn)
        return {r["name"] for r in await conn.fetch("SELECT DISTINCT name FROM llm_provider_keys")}
    finally:
        await conn.close()


async def _decrypt_all(conn: asyncpg.Connection, master: MasterKeys) -> tuple[dict[Slot, str], list[str]]:
    keys: dict[Slot, str] = {}
    problems: list[str] = []
    for r in await conn.fetch(f"SELECT {_COLUMNS} FROM llm_provider_keys {_ORDER}"):
        try:
            secret = master.open(r["name"], r["account"], _sealed(r))
        except SecretsError as exc:
            problems.append(str(exc))
            continue
        remember_secret(secret)  # masked in every reply and log line of this process from now on
        keys[(r["name"], r["account"])] = secret
    return keys, problems


class KeyRing:
    """The stored keys a worker can decrypt, in memory, following the table (see the module's docstring)."""

    def __init__(self, database_url: str, master: MasterKeys, *, ping_s: float = PING_S,
                 reload_s: float = RELOAD_S) -> None:
        self.url = database_url
        self.master = master
        self._keys: dict[Slot, str] = {}
        self._problems: list[str] = []
        self._follower = TableFollower(
            database_url, channels=[CHANNEL], application=APPLICATION, reload=self._reload, log=log,
            event_prefix="stored_keys", unreachable_effect="calls use the stored keys read last",
            # The type alone: an error's message is not needed to act and might quote too much.
            error_detail=lambda exc: type(exc).__name__, ping_s=ping_s, reload_s=reload_s,
        )
        self._listeners: list[Callable[[], None]] = []
        self.loaded = asyncio.Event()
        """Set once the table was read the first time."""

    def get(self, name: str, account: str | None) -> str | None:
        """The stored key of that name for that account (None: the global key), if this worker holds it."""
        return self._keys.get((name, account))

    def has(self, name: str) -> bool:
        """Whether any key of that name is held, global or an account's."""
        return any(n == name for n, _ in self._keys)

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call `callback` (no await) after every read of the table that changed what is held."""
        self._listeners.append(callback)

    async def first_load(self, timeout_s: float = FIRST_LOAD_S) -> None:
        """Wait for the first read of the table, at most `timeout_s` (then go on with no stored key)."""
        try:
            async with asyncio.timeout(timeout_s):
                await self.loaded.wait()
        except TimeoutError:
            log.warning("stored_keys_not_loaded", waited_s=timeout_s,
                        effect="serving with environment keys until the table can be read")

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the table until `stop`; never raises but CancelledError."""
        await self._follower.run(stop)

    async def _reload(self, conn: asyncpg.Connection) -> None:
        async with asyncio.timeout(QUERY_S):
            keys, problems = await _decrypt_all(conn, self.master)
        changed = keys != self._keys
        for problem in problems:
            if problem not in self._problems:  # once per problem, not at every read
                log.error("stored_key_unreadable", problem=problem, effect="calls needing it use the next key in"
                          " line (environment, then the global stored key)")
        self._problems = problems
        if changed or not self.loaded.is_set():
            # Names and accounts only: which keys, never what they are.
            log.info("stored_keys_loaded", keys=[describe(n, a) for n, a in keys], unreadable=len(problems))
        self._keys = keys
        self.loaded.set()
        if changed:
            for callback in self._listeners:
                callback()


def keyring_for_worker(database_url: str | None) -> KeyRing | None:
    """A worker's KeyRing, from DATABASE_URL and SWITCHYARD_MASTER_KEYS (read here, at the process's edge);
    None, said once in the log, when either is missing or the master keys are malformed: the worker then
    uses environment keys only."""
    if not database_url:
        log.info("stored_keys_off", reason="DATABASE_URL is not set", effect="environment keys only")
        return None
    try:
        master = master_keys_from_env()
    except SecretsError as exc:
        log.warning("stored_keys_off", reason=str(exc), effect="environment keys only")
        return None
    return KeyRing(database_url, master)
