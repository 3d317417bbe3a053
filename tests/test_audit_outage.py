"""An audit that loses nothing, counted against what was sent, on a real nats-server and PostgreSQL:
PostgreSQL unreachable while requests flow, an auditor SIGKILLed in the middle of a batch, two auditor
replicas at once; and the refusals a dispatcher makes are in the ledger too.

Every committed write into `llm_audit` is recorded by a trigger the tests add (an AFTER trigger: a
write rolled back leaves no record), so "written once, none twice" is counted, not assumed from the
table's key.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import SplitResult, parse_qs, urlencode, urlsplit, urlunsplit

import asyncpg
import nats
import pytest
from nats.aio.client import Client as NATS

from router import config as config_mod
from router.providers.fakes import FakeOpenAI
from schemas import Done, Error, encode
from workers.auditor import Auditor
from workers.publish import Publisher
from workers.runtime import audit_consumer, ensure_topology

from .conftest import fleet_config, running_fleet
from .helpers import ask_raw, audit_row, request
from .test_auditor import auditor as replica
from .test_auditor import dlq_size, event, settled

_WRITES = """
CREATE TABLE test_audit_writes (account text, request_id text, op text, app text);
CREATE FUNCTION test_audit_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO test_audit_writes VALUES (NEW.account, NEW.request_id, TG_OP, current_setting('application_name'));
    RETURN NULL;
END $$;
CREATE TRIGGER test_audit_write AFTER INSERT OR UPDATE ON llm_audit FOR EACH ROW EXECUTE FUNCTION test_audit_write();
"""
_NO_WRITES = """
DROP TRIGGER IF EXISTS test_audit_write ON llm_audit;
DROP FUNCTION IF EXISTS test_audit_write();
DROP TABLE IF EXISTS test_audit_writes;
"""


@pytest.fixture
async def writes(db: asyncpg.Pool) -> AsyncIterator[asyncpg.Pool]:
    """Record every committed write into llm_audit (the session's database: removed afterwards)."""
    await db.execute(_NO_WRITES)
    await db.execute(_WRITES)
    try:
        yield db
    finally:
        await db.execute(_NO_WRITES)


async def written_once(db: asyncpg.Pool, ids: set[str]) -> dict[str, int]:
    """Assert the ledger holds exactly `ids`, each inserted once and never updated; returns the rows
    each application (by application_name) wrote."""
    rows = await db.fetch("SELECT request_id, op, app FROM test_audit_writes")
    assert [r["op"] for r in rows if r["op"] != "INSERT"] == []
    inserted = [r["request_id"] for r in rows]
    assert len(inserted) == len(ids) and set(inserted) == ids
    assert {r["request_id"] for r in await db.fetch("SELECT request_id FROM llm_audit")} == ids
    by_app: dict[str, int] = {}
    for r in rows:
        by_app[r["app"]] = by_app.get(r["app"], 0) + 1
    return by_app


async def rows(db: asyncpg.Pool) -> int:
    return int(await db.fetchval("SELECT count(*) FROM llm_audit"))


async def wait_rows(db: asyncpg.Pool, n: int, timeout: float = 40.0) -> None:
    async with asyncio.timeout(timeout):
        while await rows(db) < n:
            await asyncio.sleep(0.1)
    assert await rows(db) == n


def with_app(url: str, app: str) -> str:
    """`url` with its connections named `app` in pg_stat_activity (asyncpg passes unknown parameters on
    as server settings)."""
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    return urlunsplit(parts._replace(query=urlencode({**query, "application_name": app})))


# --- a PostgreSQL the test can cut off ------------------------------------------------------------


class Proxy:
    """A TCP proxy in front of a server (a Unix socket or a TCP port). `cut()` drops every connection and
    hangs up on each new one (counted) until `restore()`."""

    def __init__(self, *, unix: str | None = None, tcp: tuple[str, int] | None = None) -> None:
        self._unix = unix
        self._tcp = tcp or ("127.0.0.1", 0)
        self._pg: SplitResult | None = None
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self.down = False
        self.refused = 0
        """Connections hung up on while cut."""
        self.held = False
        """Connections kept open, what is sent on them dropped (see `hold()`)."""

    @classmethod
    def postgres(cls, pg_url: str) -> Proxy:
        """In front of the session's PostgreSQL, by its Unix socket or its TCP port."""
        parts = urlsplit(pg_url)
        socket_dir = parse_qs(parts.query).get("host", [""])[-1]
        unix = next((str(p) for p in Path(socket_dir).glob(".s.PGSQL.*") if p.suffix != ".lock"), None) \
            if socket_dir.startswith("/") else None
        proxy = cls(unix=unix, tcp=(parts.hostname or "127.0.0.1", parts.port or 5432))
        proxy._pg = parts
        return proxy

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        """The PostgreSQL URL through the proxy."""
        assert self._pg is not None
        user = self._pg.username or "postgres"
        auth = f"{user}:{self._pg.password}" if self._pg.password else user
        query = {k: v[-1] for k, v in parse_qs(self._pg.query).items() if k != "host"}
        return urlunsplit(self._pg._replace(netloc=f"{auth}@127.0.0.1:{self.port}", query=urlencode(query)))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)

    async def stop(self) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()

    def cut(self) -> None:
        self.down = True
        for w in list(self._open):
            w.transport.abort()
        self._open.clear()

    def restore(self) -> None:
        self.down = False

    def hold(self) -> None:
        """Keep every connection open but forward nothing more, either way: to each end the other has gone
        quiet, and what it sends is lost."""
        self.held = True

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            self.refused += 1
            writer.transport.abort()
            return
        if self._unix:
            up_reader, up_writer = await asyncio.open_unix_connection(self._unix)
        else:
            up_reader, up_writer = await asyncio.open_connection(*self._tcp)
        self._open |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)
        self._open -= {writer, up_writer}

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                if not self.held:
                    dst.write(data)
                    await dst.drain()
        finally:
            dst.transport.abort()


async def test_postgresql_unreachable_while_requests_flow(
    nats_url: str, nc: NATS, writes: asyncpg.Pool, pg_url: str, fake_openai: FakeOpenAI
) -> None:
    db = writes
    js = nc.jetstream()
    proxy = Proxy.postgres(pg_url)
    await proxy.start()
    ledger = await asyncpg.create_pool(proxy.url, min_size=1, max_size=4)
    sent: set[str] = set()

    async def ask(n: int) -> None:
        bodies = [request(f"hi {i}", id=f"out-{uuid.uuid4().hex[:12]}") for i in range(n)]
        replies = await asyncio.gather(*(ask_raw(nc, b, timeout=20) for b in bodies))
        assert all(isinstance(r[-1], Done) for r in replies), replies
        sent.update(b["id"] for b in bodies)

    try:
        async with running_fleet(nats_url, fleet_config({"openai": fake_openai.url + "/v1"}), ledger):
            await ask(10)
            await wait_rows(db, 10)
            await settled(js)

            proxy.cut()  # PostgreSQL is gone for the auditor: its connections dropped, new ones hung up on
            for _ in range(8):  # requests keep flowing for about ten seconds, and are answered meanwhile
                await ask(5)
                await asyncio.sleep(1)
            assert proxy.down and proxy.refused > 0  # the auditor kept trying...
            assert await rows(db) == 10  # ...and wrote nothing while it was down
            info = await js.consumer_info("LLM_EVENTS", "audit")
            assert info.num_pending + info.num_ack_pending == 40  # every event waits in the stream
            assert await dlq_size(js) == 0  # no event was at fault

            proxy.restore()
            await ask(10)
            await wait_rows(db, 60)
            await settled(js, timeout=20)
    finally:
        await ledger.close()
        await proxy.stop()
    assert len(sent) == 60
    await written_once(db, sent)
    assert await dlq_size(js) == 0


# --- an auditor SIGKILLed in the middle of a batch -----------------------------------------------


def spawn_auditor(config: Path, log: Path, nats_url: str, database_url: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "NATS_URL": nats_url, "DATABASE_URL": database_url}
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "workers.cli", "auditor", "--config", str(config)],
                                env=env, stdout=out, stderr=subprocess.STDOUT)


async def backend(db: asyncpg.Pool, app: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await db.fetchrow(
        "SELECT pid, wait_event_type, state, query FROM pg_stat_activity"
        " WHERE application_name = $1 AND query LIKE '%INSERT INTO llm_audit%' AND state <> 'idle'", app)
    return row


async def wait_in_insert(db: asyncpg.Pool, app: str) -> None:
    """Until the auditor connected as `app` is inside its insert, waiting for the lock on `llm_audit`."""
    async with asyncio.timeout(20):
        while (b := await backend(db, app)) is None or b["wait_event_type"] != "Lock":
            await asyncio.sleep(0.05)


async def test_an_auditor_killed_mid_batch_loses_nothing_and_writes_nothing_twice(
    nats_url: str, nc: NATS, writes: asyncpg.Pool, pg_url: str, tmp_path: Path
) -> None:
    db = writes
    cfg = fleet_config({"openai": "http://127.0.0.1:9/v1"})
    js = nc.jetstream()
    await ensure_topology(js, cfg)
    config = tmp_path / "config.json"
    config.write_bytes(config_mod.encode(cfg))
    first = [f"k-{i}" for i in range(100)]
    batch = [f"k-{i}" for i in range(100, 400)]
    for rid in first:
        await js.publish("llm.events.completed", encode(event(rid)))
    app = "sy-audit-killed"
    proc = spawn_auditor(config, tmp_path / "auditor.log", nats_url, with_app(pg_url, app))
    try:
        await wait_rows(db, 100)  # it writes
        await settled(js)  # and has acked what it wrote
        async with db.acquire() as locker, locker.transaction():
            await locker.execute("LOCK TABLE llm_audit IN SHARE MODE")  # inserts now wait for this lock
            for rid in batch:
                await js.publish("llm.events.completed", encode(event(rid)))
            await wait_in_insert(db, app)  # the auditor has taken the events and is inside its insert
            info = await js.consumer_info("LLM_EVENTS", "audit")
            assert info.num_ack_pending > 0 and info.num_ack_pending + info.num_pending == 300
            # Its events come back to the next auditor after ack_wait: shortened, so the test need not wait 60 s.
            quick = audit_consumer("llm")
            quick.ack_wait = 2.0
            await js.add_consumer("LLM_EVENTS", quick)
            proc.send_signal(signal.SIGKILL)
            assert await asyncio.to_thread(proc.wait, 15) == -signal.SIGKILL
        async with asyncio.timeout(20):  # its backend sees the client gone and rolls the batch back
            while await backend(db, app) is not None:
                await asyncio.sleep(0.05)
        assert await rows(db) == 100  # nothing of the killed batch was committed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)

    async with replica(nats_url, db):  # the next auditor
        await wait_rows(db, 400)
        await settled(js, timeout=20)
    await written_once(db, {*first, *batch})
    assert await dlq_size(js) == 0


async def test_an_auditor_lost_between_its_commit_and_its_acks_writes_nothing_twice(
    nats_url: str, nc: NATS, writes: asyncpg.Pool, pg_url: str
) -> None:
    db = writes
    js = nc.jetstream()
    await ensure_topology(js, fleet_config({"openai": "http://127.0.0.1:9/v1"}))
    quick = audit_consumer("llm")
    quick.ack_wait = 2.0  # the events of a lost auditor come back after 2 s rather than 60
    await js.add_consumer("LLM_EVENTS", quick)
    server = urlsplit(nats_url)
    proxy = Proxy(tcp=(server.hostname or "127.0.0.1", server.port or 4222))  # the lost auditor's way to NATS
    await proxy.start()
    app = "sy-audit-lost"
    pool = await asyncpg.create_pool(with_app(pg_url, app), min_size=1, max_size=2)
    conn = await nats.connect(f"nats://127.0.0.1:{proxy.port}")
    first = {f"c-{i}" for i in range(50)}
    lost: asyncio.Task[None] | None = None
    try:
        ljs = conn.jetstream()
        async with db.acquire() as locker, locker.transaction():
            await locker.execute("LOCK TABLE llm_audit IN SHARE MODE")
            for rid in sorted(first):  # all in the stream before its first fetch: one batch
                await js.publish("llm.events.completed", encode(event(rid)))
            lost = asyncio.create_task(Auditor(ljs, Publisher(conn, ljs, "llm"), pool).serve(asyncio.Event()))
            await wait_in_insert(db, app)  # it holds the batch, inside its insert
            proxy.hold()  # its acks will go nowhere
        await wait_rows(db, 50)  # the lock is gone: it commits...
    finally:
        if lost is not None:  # ...and is lost before any ack reached NATS
            lost.cancel()
            with contextlib.suppress(BaseException):
                await lost
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.close(), 5)
        await pool.close()
        await proxy.stop()
    info = await js.consumer_info("LLM_EVENTS", "audit")
    assert info.num_ack_pending + info.num_pending == 50  # committed, yet not one acked

    second = {f"c-{i}" for i in range(50, 60)}
    async with replica(nats_url, db):  # takes the 50 again, and 10 new ones
        for rid in sorted(second):
            await js.publish("llm.events.completed", encode(event(rid)))
        await wait_rows(db, 60)
        await settled(js, timeout=20)  # the 50 came back and were acked, by this replica
    by_app = await written_once(db, first | second)
    assert by_app[app] == 50  # the lost auditor's commit stands; the copies wrote nothing
    assert await dlq_size(js) == 0


# --- two auditor replicas ---------------------------------------------------------------------------


async def test_two_auditor_replicas_write_each_event_once(
    nats_url: str, nc: NATS, writes: asyncpg.Pool, pg_url: str
) -> None:
    db = writes
    js = nc.jetstream()
    await ensure_topology(js, fleet_config({"openai": "http://127.0.0.1:9/v1"}))
    # A little time per row, so that each replica's batches overlap the other's.
    await db.execute("CREATE FUNCTION test_audit_slow() RETURNS trigger LANGUAGE plpgsql AS $$"
                     " BEGIN PERFORM pg_sleep(0.002); RETURN NEW; END $$;"
                     "CREATE TRIGGER test_audit_slow BEFORE INSERT ON llm_audit"
                     " FOR EACH ROW EXECUTE FUNCTION test_audit_slow()")
    pools = [await asyncpg.create_pool(with_app(pg_url, f"sy-replica-{n}"), min_size=1, max_size=2) for n in "ab"]
    ids = {f"r-{i}" for i in range(600)}
    try:
        async with replica(nats_url, pools[0], batch=20), replica(nats_url, pools[1], batch=20):
            async with asyncio.timeout(10):  # both are asking for events
                while (await js.consumer_info("LLM_EVENTS", "audit")).num_waiting < 2:
                    await asyncio.sleep(0.05)
            for rid in sorted(ids):
                await js.publish("llm.events.completed", encode(event(rid)))
            # and again, as a producer retrying its publish would: each event twice in the stream
            for rid in sorted(ids)[:100]:
                await js.publish("llm.events.completed", encode(event(rid)))
            await wait_rows(db, 600)
            await settled(js, timeout=20)
    finally:
        for p in pools:
            await p.close()
        await db.execute("DROP TRIGGER IF EXISTS test_audit_slow ON llm_audit;"
                         " DROP FUNCTION IF EXISTS test_audit_slow()")
    by_app = await written_once(db, ids)
    assert set(by_app) == {"sy-replica-a", "sy-replica-b"}, by_app  # both replicas wrote
    assert await dlq_size(js) == 0


# --- refusals are in the ledger --------------------------------------------------------------------


async def test_rate_and_budget_refusals_are_ledger_rows(
    nats_url: str, nc: NATS, db: asyncpg.Pool, fake_openai: FakeOpenAI
) -> None:
    cfg = fleet_config({"openai": fake_openai.url + "/v1"},
                       limits={"default": {"rate": {"per_second": 0.01, "burst": 1}, "budget": {"daily_usd": 0}}})
    async with running_fleet(nats_url, cfg, db, budgets=True):
        over_budget = request("hi")  # the one request the rate allows: refused by the budget
        [first] = await ask_raw(nc, over_budget)
        over_rate = request("hi again")
        [second] = await ask_raw(nc, over_rate)
        assert isinstance(first, Error) and first.code == "BUDGET_EXCEEDED", first
        assert isinstance(second, Error) and second.code == "RATE_LIMITED", second
        for body, code in ((over_budget, "BUDGET_EXCEEDED"), (over_rate, "RATE_LIMITED")):
            row = await audit_row(db, body["id"])
            assert (row["status"], row["code"], row["account"], row["provider"]) == ("error", code, "acme", None)
