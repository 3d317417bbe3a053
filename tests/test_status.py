"""`switchyard status`: the queues and consumers, every live process found through its micro service, each
pool's replicas, breaker, lag, success rate and latency, and an exit code that says whether the fleet is
healthy. One fleet for the module, run by workers/processes.py as in production: a dispatcher, two worker
replicas of pool `openai` and an auditor."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from nats.aio.client import Client as NATS

from router import breaker
from router.breaker import BreakerState
from router.config import Config
from router.providers.fakes import FakeOpenAI
from schemas import Done
from workers import configstore
from workers.health import now_ms, reset_breaker
from workers.runtime import ensure_topology

from .conftest import fleet_config
from .helpers import ask_raw, request, switchyard

# module_conn, module_server: the fixtures `conn` and `server`
from .process_fleet import ProcessFleet, fleet_env, live, module_conn, module_server, whole_fleet  # noqa: F401

pytestmark = pytest.mark.asyncio(loop_scope="module")

SWITCHYARD = str(Path(sys.executable).parent / "switchyard")
KEY_ENV = "SY_TEST_OPENAI_KEY"
WAIT = "1.5"
"""--wait for the processes' answers: generous, the machine is shared."""


@pytest.fixture(scope="module")
def env(server: str) -> Iterator[None]:
    with fleet_env(server, {KEY_ENV: "sk-test-Hq7ZtK2mPw9xJd"}):
        yield


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def provider() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI()
    await fake.start()
    yield fake
    await fake.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cfg(provider: FakeOpenAI) -> Config:
    return fleet_config({"openai": provider.url + "/v1"})


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(server: str, pg_url: str, cfg: Config, env: None) -> AsyncIterator[ProcessFleet]:
    async with whole_fleet(server, pg_url, cfg, ["openai", "openai"]) as f:
        yield f


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def started(fleet: ProcessFleet, conn: NATS) -> ProcessFleet:
    """The whole fleet answers, its workers have checked their provider, and a request went through."""
    await live(conn, "dispatcher", 1, fleet=fleet)
    await live(conn, "auditor", 1, fleet=fleet)
    await live(conn, "worker", 2, pool="openai", fleet=fleet, checked=True)
    replies = await ask_raw(conn, request("count me"), timeout=30)
    assert isinstance(replies[-1], Done)
    return fleet


@pytest.fixture
def ready(started: ProcessFleet) -> ProcessFleet:
    started.check()  # no process ended on its own since
    return started


def status_json(out: str) -> dict[str, Any]:
    """The JSON object status printed (the fleet in this process may log lines around it)."""
    for line in out.splitlines():
        if line.startswith("{") and '"fleet"' in line:
            decoded: dict[str, Any] = json.loads(line)
            return decoded
    raise AssertionError(f"no status JSON in: {out}")


def pool_of(status: dict[str, Any], name: str) -> dict[str, Any]:
    return next(p for p in status["fleet"]["pools"] if p["name"] == name)


async def test_status_lists_queues_consumers_and_live_replicas(ready: ProcessFleet, server: str) -> None:
    out = await asyncio.to_thread(
        subprocess.run, [SWITCHYARD, "status", "--wait", WAIT], env={**os.environ, "NATS_URL": server},
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    for stream in ("LLM_REQ", "LLM_WORK", "LLM_EVENTS", "LLM_DLQ", "LLM_RES"):
        assert re.search(rf"^{stream}\s+\d+\s+\d+$", text, re.M), text
    row = re.search(r"^pool-openai\s+LLM_WORK\s+(\d+)\s+(\d+) \(\s*(\d+)\)\s+(\d+)\s+(\d+)$", text, re.M)
    assert row, text
    waiting, in_flight, cap, _redelivered, pulls = map(int, row.groups())
    assert (waiting, in_flight, cap) == (0, 0, 8) and pulls >= 1  # the pool's workers wait for work
    assert re.search(r"^dispatch\s+LLM_REQ\s", text, re.M) and re.search(r"^audit\s+LLM_EVENTS\s", text, re.M)
    # The pool: routed, two replicas, nothing in flight, breaker closed, no lag, its one request a success.
    pool = re.search(r"^openai\s+yes\s+2\s+0\s+closed\s+0\s+100\.0%\s+\d+\s+\d+\s+ok \(\d+ ms\)$", text, re.M)
    assert pool, text
    assert len(re.findall(r"^worker\s+openai\s", text, re.M)) == 2, text
    assert re.search(r"^dispatcher\s+-\s", text, re.M) and re.search(r"^auditor\s+-\s", text, re.M), text
    assert "fleet: healthy" in text and "problem:" not in text


async def test_json_shows_both_replicas_of_the_pool(ready: ProcessFleet, capsys: pytest.CaptureFixture[str]) -> None:
    result = await switchyard(capsys, "status", "--json", "--wait", WAIT)
    assert result.code == 0, result.out + result.err
    status = status_json(result.out)
    fleet = status["fleet"]
    assert fleet["healthy"] is True and fleet["problems"] == []
    pool = pool_of(status, "openai")
    assert pool["routed"] is True and pool["replicas"] == 2 and pool["breaker"] == "closed"
    assert pool["lag"] == {"pending": 0, "ack_pending": 0}
    assert pool["requests"] >= 1 and pool["success_rate"] == 1.0 and pool["p50_ms"] is not None
    assert pool["provider"]["healthy"] is True and pool["provider"]["error"] is None
    workers = [w for w in fleet["workers"] if w["pool"] == "openai"]
    assert len(workers) == 2 and len({w["id"] for w in workers}) == 2  # two processes, not one counted twice
    assert all(w["healthy"] and w["provider"] == "openai" and w["version"] for w in workers)
    assert len(fleet["dispatchers"]) == 1 and len(fleet["auditors"]) == 1
    assert fleet["dispatchers"][0]["recent"]["count"] >= 1  # it forwarded the request
    assert {c["name"] for c in status["consumers"]} >= {"dispatch", "audit", "pool-openai"}
    assert fleet["audit"]["retention_s"] == 7 * 86_400


async def test_an_open_breaker_makes_the_fleet_unhealthy(
    ready: ProcessFleet, conn: NATS, capsys: pytest.CaptureFixture[str]
) -> None:
    js = conn.jetstream()
    kv = await js.key_value("llm_breakers")
    now = now_ms()
    await kv.put("openai", breaker.encode(BreakerState(state="open", failures=5, since_ms=now, until_ms=now + 600_000)))
    try:
        result = await switchyard(capsys, "status", "--json", "--wait", WAIT)
        assert result.code == 1, result.out + result.err
        status = status_json(result.out)
        assert pool_of(status, "openai")["breaker"] == "open"
        assert status["fleet"]["healthy"] is False
        assert "pool openai's breaker is open: its targets are skipped" in status["fleet"]["problems"]
        text = await switchyard(capsys, "status", "--wait", WAIT)
        assert text.code == 1
        assert re.search(r"^openai\s+yes\s+2\s+\d+\s+open\s", text.out, re.M), text.out
        assert "problem: pool openai's breaker is open" in text.out and "fleet: UNHEALTHY (1 problem)" in text.out
    finally:
        await reset_breaker(js, "openai")


async def test_a_routed_pool_without_a_live_worker_makes_the_fleet_unhealthy(
    ready: ProcessFleet, conn: NATS, cfg: Config, provider: FakeOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    js = conn.jetstream()
    spare = fleet_config({"openai": provider.url + "/v1", "spare": provider.url + "/v1"})
    await ensure_topology(js, spare)
    await configstore.push(js, spare)
    try:
        result = await switchyard(capsys, "status", "--json", "--wait", WAIT)
        assert result.code == 1, result.out + result.err
        status = status_json(result.out)
        pool = pool_of(status, "spare")
        assert pool["routed"] is True and pool["replicas"] == 0
        assert "pool spare is routed but no live worker serves it" in status["fleet"]["problems"]
        assert pool_of(status, "openai")["replicas"] == 2
    finally:
        await configstore.push(js, cfg)
    again = await switchyard(capsys, "status", "--json", "--wait", WAIT)
    assert again.code == 0, again.out
    assert "spare" not in {p["name"] for p in status_json(again.out)["fleet"]["pools"]}


async def test_no_auditor_and_an_auditor_behind_make_the_fleet_unhealthy(
    ready: ProcessFleet, conn: NATS, capsys: pytest.CaptureFixture[str]
) -> None:
    auditor = next(p for p in ready.procs if p.name == "auditor")
    await ready.stop(auditor)
    try:
        await live(conn, "auditor", 0)
        replies = await ask_raw(conn, request("an event nobody writes yet"), timeout=30)
        assert isinstance(replies[-1], Done)
        await asyncio.sleep(1)  # the unwritten event gets older than --max-audit-lag 0.5
        result = await switchyard(capsys, "status", "--json", "--wait", WAIT, "--max-audit-lag", "0.5")
        assert result.code == 1, result.out + result.err
        fleet = status_json(result.out)["fleet"]
        assert fleet["auditors"] == []
        problems = fleet["problems"]
        assert "no auditor answers: completion events are not written to the audit ledger" in problems
        assert any(p.startswith("the auditor is behind: the oldest unwritten event is") for p in problems), problems
        assert fleet["audit"]["lag"]["pending"] >= 1 and fleet["audit"]["oldest_unwritten_s"] > 0.5
    finally:
        ready.auditor()
    await live(conn, "auditor", 1, fleet=ready)
    # The new auditor writes the backlog: nothing is left unwritten, and the fleet is healthy again.
    end = asyncio.get_running_loop().time() + 30
    while True:
        result = await switchyard(capsys, "status", "--json", "--wait", WAIT, "--max-audit-lag", "1")
        fleet = status_json(result.out)["fleet"]
        if fleet["audit"]["oldest_unwritten_s"] is None:
            break
        assert asyncio.get_running_loop().time() < end, fleet["audit"]
    assert result.code == 0, result.out


async def test_watch_refreshes_until_interrupted(ready: ProcessFleet, server: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        SWITCHYARD, "status", "--json", "--watch", "0.2", "--wait", "0.5",
        env={**os.environ, "NATS_URL": server}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        seen = []
        while len(seen) < 2:
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            assert line, "status --watch ended by itself"
            seen.append(json.loads(line))
        assert all(s["fleet"]["healthy"] for s in seen)
    finally:
        proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), 30)
    assert code == 130


@pytest.mark.parametrize(("args", "says"), [
    (["--watch", "0"], "--watch '0' is not a number of seconds above 0"),
    (["--max-audit-lag", "soon"], "--max-audit-lag 'soon' is not a number of seconds above 0"),
    (["--wait", "-1"], "--wait '-1' is not a number of seconds above 0"),
])
async def test_a_wrong_option_is_one_line_and_exit_2(
    env: None, args: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    result = await switchyard(capsys, "status", *args)
    assert result.code == 2
    assert result.err.strip().splitlines() == [f"switchyard: {says} (e.g. {args[0]} 5)"]


@pytest.mark.parametrize("command", [["status"], ["ask", "hello"]])
async def test_the_cli_says_when_nats_cannot_be_reached(command: list[str]) -> None:
    # One attempt and a sentence, not a reconnect loop printing tracebacks.
    env = {**os.environ, "NATS_URL": "nats://127.0.0.1:1"}
    out = await asyncio.to_thread(subprocess.run, [SWITCHYARD, *command], env=env, capture_output=True, text=True,
                                  timeout=30)
    assert out.returncode == 2 and "cannot reach NATS at nats://127.0.0.1:1" in out.stderr
    assert "Traceback" not in out.stderr
