"""The fleet rides out a restart of nats-server: processes reconnect and serve again, nothing is lost."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import asyncpg
import nats

from router.providers.fakes import FakeOpenAI
from schemas import Done

from .conftest import fleet_config, free_port, nats_server_binary, running_fleet, wait_port
from .helpers import ask_raw, audit_row, request


def _start(port: int, store: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_port(port)
    return proc


async def test_the_fleet_serves_again_after_nats_server_restarts(
    tmp_path: Path, fake_openai: FakeOpenAI, db: asyncpg.Pool
) -> None:
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    server = _start(port, tmp_path / "js")
    try:
        cfg = fleet_config({"openai": fake_openai.url + "/v1"})
        async with running_fleet(url, cfg, db):
            nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
            before = request("before the restart")
            assert isinstance((await ask_raw(nc, before))[-1], Done)

            server.terminate()
            server.wait(10)
            await asyncio.sleep(0.5)
            server = _start(port, tmp_path / "js")  # same store: streams and consumers come back

            after = request("after the restart", stream=True)
            async with asyncio.timeout(30):
                while True:  # the producer's own connection may still be reconnecting
                    try:
                        replies = await ask_raw(nc, after, timeout=15)
                        break
                    except (nats.errors.NoRespondersError, nats.errors.ConnectionReconnectingError,
                            nats.errors.TimeoutError):
                        await asyncio.sleep(0.2)
            assert isinstance(replies[-1], Done)
            assert [r.seq for r in replies] == list(range(len(replies)))
            await audit_row(db, before["id"])
            await audit_row(db, after["id"], timeout=20)
            await nc.close()
    finally:
        server.terminate()
        server.wait(10)
