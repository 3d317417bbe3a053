"""A fleet run as production runs it (workers/processes.py: `run_dispatcher`, `run_worker`, `run_auditor`), in
this process: each role on its own connections with its own stop event, so a test can stop one and start it
again. For the tests of discovery and status, which look at what those functions register; `nats_server`
also serves other modules that want a server of their own.

Module-scoped helpers: one nats-server and one fleet per test module. A module that imports `module_server`
and `module_conn` has the fixtures `server` (its own nats-server) and `conn` (a connection to it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NATS

from router import config as config_mod
from router.config import Config
from router.vitals import ProcessStats, Role
from workers import discovery, processes

from .conftest import free_port, nats_server_binary, wait_port


@contextlib.contextmanager
def nats_server(store: Path | None) -> Iterator[str]:
    """A nats-server of the caller's own, with JetStream in `store` (None: without JetStream)."""
    port = free_port()
    jetstream = ["-js", "-sd", str(store)] if store is not None else []
    proc = subprocess.Popen(
        [nats_server_binary(), *jetstream, "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module", name="server")
def module_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with nats_server(tmp_path_factory.mktemp("js")) as url:
        yield url


@pytest_asyncio.fixture(scope="module", loop_scope="module", name="conn")
async def module_conn(server: str) -> AsyncIterator[NATS]:
    c = await nats.connect(server)
    yield c
    await c.close()


@contextlib.contextmanager
def replicas(cfg: Config, tmp_path: Path, nats_url: str, roles: list[list[str]], **env: str
             ) -> Iterator[list[subprocess.Popen[bytes]]]:
    """One `switchyard` process per entry of `roles` (e.g. `["dispatcher"]`, `["worker", "--pool", "openai"]`),
    as replicas that join the fleet at `nats_url` with `cfg` (no DATABASE_URL), terminated on the way out."""
    cfg_file = tmp_path / "config.json"
    cfg_file.write_bytes(config_mod.encode(cfg))
    environ = {**os.environ, "NATS_URL": nats_url, "SWITCHYARD_LOG_LEVEL": "warning", **env}
    environ.pop("DATABASE_URL", None)
    procs = [subprocess.Popen([sys.executable, "-m", "workers.cli", *role, "--config", str(cfg_file)], env=environ,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for role in roles]
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(10)


@contextlib.contextmanager
def fleet_env(server: str, keys: dict[str, str]) -> Iterator[None]:
    """The environment of the fleet and the commands a test runs: NATS_URL `server`, the providers' keys
    (by variable), and no DATABASE_URL."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NATS_URL", server)
        for name, value in keys.items():
            mp.setenv(name, value)
        mp.delenv("DATABASE_URL", raising=False)
        yield


class Proc:
    def __init__(self, name: str, task: asyncio.Task[None], stop: asyncio.Event) -> None:
        self.name = name
        self.task = task
        self.stop = stop


class ProcessFleet:
    """Start and stop the fleet's processes one by one; `close()` stops whatever still runs."""

    def __init__(self, nats_url: str, pg_url: str, cfg: Config) -> None:
        self.nats_url = nats_url
        self.pg_url = pg_url
        self.cfg = cfg
        self.procs: list[Proc] = []

    async def prepare(self) -> None:
        """Streams, the pushed config, the tables: as `switchyard up` does before the processes."""
        await processes.prepare(self.nats_url, self.pg_url, self.cfg)

    def _start(self, name: str, run: object) -> Proc:
        stop = asyncio.Event()
        assert callable(run)
        proc = Proc(name, asyncio.create_task(run(stop)), stop)
        self.procs.append(proc)
        return proc

    def dispatcher(self) -> Proc:
        return self._start("dispatcher", lambda stop: processes.run_dispatcher(stop, self.cfg, self.nats_url))

    def worker(self, pool: str) -> Proc:
        return self._start(f"worker {pool}", lambda stop: processes.run_worker(stop, self.cfg, self.nats_url, pool))

    def auditor(self) -> Proc:
        return self._start("auditor",
                           lambda stop: processes.run_auditor(stop, self.cfg, self.nats_url, self.pg_url))

    async def stop(self, proc: Proc) -> None:
        proc.stop.set()
        await asyncio.wait_for(proc.task, 30)
        self.procs.remove(proc)

    async def close(self) -> None:
        for proc in list(self.procs):
            proc.stop.set()
        for proc in list(self.procs):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.task, 30)
        self.procs.clear()

    def check(self) -> None:
        """Fail the test when a process ended on its own (its error, rather than a later timeout)."""
        for proc in self.procs:
            if proc.task.done():
                proc.task.result()
                raise AssertionError(f"{proc.name} ended without being stopped")


@contextlib.asynccontextmanager
async def whole_fleet(nats_url: str, pg_url: str, cfg: Config, pools: list[str]) -> AsyncIterator[ProcessFleet]:
    """Prepared, then a dispatcher, a worker per entry of `pools` (a pool named twice: two replicas) and an
    auditor; whatever still runs is stopped on leaving."""
    fleet = ProcessFleet(nats_url, pg_url, cfg)
    await fleet.prepare()
    fleet.dispatcher()
    for pool in pools:
        fleet.worker(pool)
    fleet.auditor()
    try:
        yield fleet
    finally:
        await fleet.close()


async def live(
    nc: NATS, role: Role, count: int, *, pool: str | None = None, fleet: ProcessFleet | None = None,
    timeout: float = 60.0, checked: bool = False,
) -> list[ProcessStats]:
    """Wait until exactly `count` processes of `role` (of `pool`) answer `$SRV.STATS` (with their provider
    checked, when `checked`), and return their stats."""

    def wanted(p: ProcessStats) -> bool:
        return (pool is None or p.pool == pool) and (not checked or p.provider_health is not None)

    end = asyncio.get_running_loop().time() + timeout
    while True:
        if fleet is not None:
            fleet.check()
        found = await _gather(nc, role, count, wanted)
        if len(found) == count:
            return found
        if asyncio.get_running_loop().time() > end:
            raise AssertionError(f"{len(found)} {role} processes answer as wanted, not {count}: {found}")
        await asyncio.sleep(0.2)


async def _gather(nc: NATS, role: Role, count: int, wanted: Callable[[ProcessStats], bool]) -> list[ProcessStats]:
    """The wanted answers: as soon as `count` came (0: all that come in half a second)."""
    seen: list[ProcessStats] = []

    def enough(p: ProcessStats) -> bool:
        if wanted(p):
            seen.append(p)
        return 0 < count <= len(seen)

    return [p for p in await discovery.gather(nc, role, 0.5, enough=enough) if wanted(p)]
