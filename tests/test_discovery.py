"""Discovery and health: each fleet process is a NATS micro service with a health endpoint; each worker checks
its provider periodically; `switchyard health --role` is a probe with exit codes. One fleet for the module,
run by workers/processes.py as in production: a dispatcher, an auditor, a worker of pool `openai` (a fake
that answers) and one of pool `broken` (a fake whose models list is refused with the key in its message).
The pure parts (the window, the fleet's judgement, the retention setting) are tested at the end."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import msgspec
import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from router import config as config_mod
from router.config import Config, ConfigError
from router.fleetstatus import Lag, Observed, judge
from router.providers.fakes import FakeOpenAI, Scenario
from router.vitals import ProcessStats, ProviderHealth, Summary, Vitals, Window, percentile
from schemas import Done
from workers import discovery
from workers.auditor import Auditor
from workers.publish import Publisher

from .conftest import fleet_config
from .helpers import ask_raw, request, switchyard

# module_conn, module_server: the fixtures `conn` and `server`
from .process_fleet import ProcessFleet, fleet_env, live, module_conn, module_server, whole_fleet  # noqa: F401

SWITCHYARD = str(Path(sys.executable).parent / "switchyard")
BROKEN_KEY = "zz-broken-Rt5Yw8NcL2vQpM"
"""Not shaped like any known key: masked only because the worker holds it."""


@pytest.fixture(scope="module")
def env(server: str) -> Iterator[None]:
    with fleet_env(server, {"SY_TEST_OPENAI_KEY": "sk-test-Vb3NqL8sXe2Rk", "SY_TEST_BROKEN_KEY": BROKEN_KEY}):
        yield


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fakes() -> AsyncIterator[tuple[FakeOpenAI, FakeOpenAI]]:
    good = FakeOpenAI()
    broken = FakeOpenAI(default=Scenario(status=400, error_body={"error": {
        "message": f"API key {BROKEN_KEY} is not allowed to list models", "type": "invalid_request_error",
    }}))
    await good.start()
    await broken.start()
    yield good, broken
    await broken.stop()
    await good.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cfg(fakes: tuple[FakeOpenAI, FakeOpenAI]) -> Config:
    good, broken = fakes
    return fleet_config({"openai": good.url + "/v1", "broken": broken.url + "/v1"},
                        audit={"events_retention_days": 3})


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(server: str, pg_url: str, cfg: Config, env: None, conn: NATS) -> AsyncIterator[ProcessFleet]:
    async with whole_fleet(server, pg_url, cfg, ["openai", "broken"]) as f:
        await live(conn, "dispatcher", 1, fleet=f)
        await live(conn, "auditor", 1, fleet=f)
        await live(conn, "worker", 1, pool="openai", fleet=f, checked=True)
        await live(conn, "worker", 1, pool="broken", fleet=f, checked=True)
        yield f


@pytest.fixture
def ready(fleet: ProcessFleet) -> ProcessFleet:
    fleet.check()  # no process ended on its own since
    return fleet


async def _micro(nc: NATS, verb: str, service: str) -> list[dict[str, object]]:
    """Every answer to `$SRV.<verb>.<service>` within a second."""
    answers: list[dict[str, object]] = []

    async def on(msg: Msg) -> None:
        if not (msg.headers and msg.headers.get("Status")):
            answers.append(msgspec.json.decode(msg.data))

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on)
    await nc.publish(f"$SRV.{verb}.{service}", b"", reply=inbox)
    await asyncio.sleep(1.0)
    await sub.unsubscribe()
    return answers


@pytest.mark.asyncio(loop_scope="module")
async def test_every_process_is_a_micro_service_with_its_role_in_its_metadata(ready: ProcessFleet, conn: NATS) -> None:
    host = socket.gethostname()
    dispatchers, workers, auditors, pings = await asyncio.gather(
        _micro(conn, "INFO", "switchyard-dispatcher"), _micro(conn, "INFO", "switchyard-worker"),
        _micro(conn, "INFO", "switchyard-auditor"), _micro(conn, "PING", "switchyard-worker"),
    )
    assert [d["metadata"] for d in dispatchers] == [{"role": "dispatcher", "host": host,
                                                     "version": discovery.switchyard_version()}]
    assert sorted(str(w["metadata"]["pool"]) for w in workers) == ["broken", "openai"]  # type: ignore[index]
    assert all(w["metadata"]["role"] == "worker" for w in workers)  # type: ignore[index]
    assert [a["metadata"]["role"] for a in auditors] == ["auditor"]  # type: ignore[index]
    endpoints = {e["name"]: e["subject"] for e in workers[0]["endpoints"]}  # type: ignore[attr-defined]
    assert set(endpoints) == {"providers-test", "health"}
    assert len(pings) == 2
    # The admin service the dispatchers served before is there as it was.
    reply = await conn.request("llm.admin.explain", b'{"use_case": "draft"}', timeout=10)
    assert msgspec.json.decode(reply.data)["chain"][0]["pool"] == "openai"


@pytest.mark.asyncio(loop_scope="module")
async def test_the_health_endpoint_says_what_the_process_knows(ready: ProcessFleet, conn: NATS) -> None:
    replies = await ask_raw(conn, request("hello there"), timeout=30)
    assert isinstance(replies[-1], Done)
    answer = await conn.request(discovery.health_subject("llm", "worker", "openai"), b"", timeout=10)
    stats = msgspec.json.decode(answer.data, type=ProcessStats)
    assert (stats.role, stats.pool, stats.provider, stats.healthy) == ("worker", "openai", "openai", True)
    assert stats.id and stats.host == socket.gethostname() and stats.uptime_s >= 0 and stats.version
    assert stats.recent.count >= 1 and stats.recent.success_rate == 1.0
    assert stats.recent.p50_ms is not None and stats.recent.p95_ms is not None
    dispatcher = msgspec.json.decode(
        (await conn.request(discovery.health_subject("llm", "dispatcher"), b"", timeout=10)).data, type=ProcessStats)
    assert dispatcher.role == "dispatcher" and dispatcher.recent.count >= 1 and dispatcher.healthy
    auditor = msgspec.json.decode(
        (await conn.request(discovery.health_subject("llm", "auditor"), b"", timeout=10)).data, type=ProcessStats)
    assert auditor.role == "auditor" and auditor.healthy and auditor.provider_health is None


@pytest.mark.asyncio(loop_scope="module")
async def test_a_failing_provider_is_unhealthy_with_its_error_masked(
    ready: ProcessFleet, conn: NATS, capsys: pytest.CaptureFixture[str]
) -> None:
    [broken] = await live(conn, "worker", 1, pool="broken", checked=True)
    check = broken.provider_health
    assert check is not None and check.healthy is False and check.status == 400 and check.code == "INVALID_REQUEST"
    assert check.error is not None and "[redacted]" in check.error and BROKEN_KEY not in check.error
    assert check.last_ok_ms is None and check.latency_ms is not None and check.last_error == check.error
    [good] = await live(conn, "worker", 1, pool="openai", checked=True)
    assert good.provider_health is not None and good.provider_health.healthy and good.provider_health.status == 200
    # status shows it (a warning: the pool is served, only its provider check fails), and never the key.
    text = await switchyard(capsys, "status", "--wait", "1.5")
    assert "warning: pool broken's provider check fails: the provider refused the request (HTTP 400):" in text.out
    assert "FAILING INVALID_REQUEST" in text.out and "[redacted]" in text.out
    data = await switchyard(capsys, "status", "--json", "--wait", "1.5")
    assert BROKEN_KEY not in text.out + text.err + data.out + data.err
    assert text.code == data.code == 0, text.out


@pytest.mark.asyncio(loop_scope="module")
async def test_the_events_retention_is_the_configured_one(ready: ProcessFleet, conn: NATS) -> None:
    info = await conn.jetstream().stream_info("LLM_EVENTS")
    assert info.config.max_age == 3 * 86_400


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("args", [
    ["--role", "dispatcher"], ["--role", "worker"], ["--role", "worker", "--pool", "openai"],
    ["--role", "auditor"], ["--role", "dispatcher", "--local"],
])
async def test_health_exits_0_when_a_live_process_of_the_role_is_healthy(
    ready: ProcessFleet, args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    result = await switchyard(capsys, "health", *args)
    assert result.code == 0, result.err
    assert f"healthy: {args[1]}" in result.out


@pytest.mark.asyncio(loop_scope="module")
async def test_health_exits_1_when_no_process_of_the_role_answers(
    ready: ProcessFleet, conn: NATS, capsys: pytest.CaptureFixture[str]
) -> None:
    result = await switchyard(capsys, "health", "--role", "worker", "--pool", "nosuch", "--timeout", "1")
    assert result.code == 1
    assert result.err.strip().splitlines() == ["switchyard: health: unhealthy: no live worker of pool nosuch answered"
                                               " within 1 s"]
    auditor = next(p for p in ready.procs if p.name == "auditor")
    await ready.stop(auditor)
    try:
        await live(conn, "auditor", 0)
        gone = await switchyard(capsys, "health", "--role", "auditor", "--timeout", "1")
        assert gone.code == 1 and "no live auditor answered" in gone.err
    finally:
        ready.auditor()
    await live(conn, "auditor", 1, fleet=ready)


@pytest.mark.asyncio(loop_scope="module")
async def test_an_auditor_whose_ledger_refuses_its_batches_answers_unhealthy(
    ready: ProcessFleet, conn: NATS, server: str, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The auditor of the fleet steps aside for one whose database has no `llm_audit` table (an outage to
    # it: every batch is retried, none written), wired as workers/processes.py wires an auditor.
    good = next(p for p in ready.procs if p.name == "auditor")
    await ready.stop(good)
    admin = await asyncpg.connect(pg_url)
    await admin.execute("CREATE SCHEMA IF NOT EXISTS sy_no_ledger")
    await admin.close()
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=2, server_settings={"search_path": "sy_no_ledger"})
    nc = await nats.connect(server)
    js = nc.jetstream()
    auditor = Auditor(js, Publisher(nc, js, "llm"), pool)
    stop = asyncio.Event()
    service = await discovery.start(nc, discovery.Reporter("auditor", auditor.vitals), "llm", stop)
    task = asyncio.create_task(auditor.serve(stop))
    try:
        replies = await ask_raw(conn, request("an event for a ledger that is not there"), timeout=30)
        assert isinstance(replies[-1], Done)
        end = asyncio.get_running_loop().time() + 30
        while True:
            probe = await switchyard(capsys, "health", "--role", "auditor", "--timeout", "1")
            if probe.code != 0:
                break
            assert asyncio.get_running_loop().time() < end, "the auditor never said it fails"
        assert probe.code == 1
        [line] = probe.err.strip().splitlines()
        assert line.startswith("switchyard: health: unhealthy: auditor: ") and ": failing for " in line, line
        assert 'relation "llm_audit" does not exist' in line
        status = await switchyard(capsys, "status", "--wait", "1.5")
        assert status.code == 1 and "problem: auditor on " in status.out and "is unhealthy: failing for" in status.out
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await discovery.stop_quietly(service)
        await nc.close()
        await pool.close()
        ready.auditor()
    await live(conn, "auditor", 1, fleet=ready)


@pytest.mark.asyncio(loop_scope="module")
async def test_health_exits_1_when_nats_cannot_be_reached() -> None:
    env = {**os.environ, "NATS_URL": "nats://127.0.0.1:1"}
    out = await asyncio.to_thread(subprocess.run, [SWITCHYARD, "health", "--role", "dispatcher"], env=env,
                                  capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.splitlines() == ["switchyard: health: unhealthy: cannot reach NATS at nats://127.0.0.1:1"
                                       " (NoServersError)"]


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(("args", "says"), [
    ([], "health: no --role; give --role dispatcher, --role worker or --role auditor"),
    (["--role", "router"], "health: --role 'router'; give --role dispatcher, --role worker or --role auditor"),
    (["--role", "auditor", "--pool", "openai"], "health: --pool goes with --role worker only (a auditor serves"
                                                " every pool)"),
    (["--role", "worker", "--timeout", "0"], "--timeout '0' is not a number of seconds above 0 (e.g. --timeout 5)"),
])
async def test_health_usage_errors_are_one_line_and_exit_2(
    env: None, args: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    result = await switchyard(capsys, "health", *args)
    assert result.code == 2
    assert result.err.strip().splitlines() == [f"switchyard: {says}"]


# --- the pure parts ------------------------------------------------------------------------------


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0 and percentile(values, 95) == 95.0 and percentile(values, 100) == 100.0
    assert percentile([7.0], 95) == 7.0 and percentile([], 50) is None


def test_the_window_is_bounded_in_count_and_in_age() -> None:
    w = Window(size=3, span_ms=1000)
    for i, ok in enumerate([False, True, True, True]):
        w.record(ok, latency_ms=10.0 * (i + 1), now_ms=100 + i)
    s = w.summary(now_ms=200)
    assert (s.count, s.ok, s.success_rate, s.p50_ms, s.p95_ms) == (3, 3, 1.0, 30.0, 40.0)  # the oldest left
    assert w.summary(now_ms=1103) == Summary(window_s=1.0)  # all older than the span: nothing to say


async def test_working_counts_in_flight_and_a_refusal_marked_inside_it_as_a_failure() -> None:
    clock = iter(range(0, 10_000, 5))
    v = Vitals(clock=lambda: next(clock))

    async def handle(refuse: bool) -> None:
        assert v.in_flight >= 1
        if refuse:
            Vitals.fail()
        await asyncio.sleep(0)

    tracked = v.tracked(handle)
    await asyncio.gather(tracked(True), tracked(False), tracked(False))
    Vitals.fail()  # outside any work: changes nothing
    s = v.summary()
    assert v.in_flight == 0 and (s.count, s.ok) == (3, 2)
    with pytest.raises(RuntimeError), v.working():
        raise RuntimeError("boom")
    assert v.summary().ok == 2 and v.summary().count == 4
    with v.working(0):  # an empty batch: no outcome
        pass
    assert v.summary().count == 4


def _proc(role: str, pool: str | None = None, **kw: object) -> ProcessStats:
    return msgspec.convert({"role": role, "pool": pool, "id": f"{role}-{pool}", "host": "h", **kw}, ProcessStats)


def _seen(**kw: object) -> Observed:
    base: dict[str, object] = {
        "processes": [_proc("dispatcher"), _proc("auditor"), _proc("worker", "a")], "pools": ["a"],
        "routed": {"a"}, "consumers": {}, "breakers": {}, "oldest_unwritten_s": None,
        "events_retention_s": 7 * 86_400.0,
    }
    base.update(kw)
    return msgspec.convert(base, Observed)


def test_the_judgement_of_the_fleet() -> None:
    assert judge(_seen(), max_audit_lag_s=60).healthy
    unrouted = judge(_seen(pools=["a", "b"]), max_audit_lag_s=60)  # b has no worker and no route: fine
    assert unrouted.healthy and [p.routed for p in unrouted.pools] == [True, False]
    half_open = judge(_seen(breakers={"a": "half_open"}), max_audit_lag_s=60)
    assert half_open.healthy and half_open.warnings == ["pool a's breaker is half-open: probing its provider"]
    sick = _proc("auditor", problem="failing for 3 s: LedgerUnavailable: connection refused", healthy=False)
    assert judge(_seen(processes=[_proc("dispatcher"), sick, _proc("worker", "a")]), max_audit_lag_s=60).problems \
        == ["auditor on h (auditor-None) is unhealthy: failing for 3 s: LedgerUnavailable: connection refused"]
    behind = judge(_seen(oldest_unwritten_s=61.0), max_audit_lag_s=60)
    assert behind.problems == ["the auditor is behind: the oldest unwritten event is 61 s old (more than"
                               " --max-audit-lag 60 s)"]
    # Past half the retention, even with a lax --max-audit-lag: events would age out unwritten.
    aging = judge(_seen(oldest_unwritten_s=3.6 * 86_400), max_audit_lag_s=1e9)
    assert aging.problems == ["completion events age out unwritten soon: the oldest is 86.4 h old, and LLM_EVENTS"
                              " keeps them 168.0 h (audit.events_retention_days)"]
    assert judge(_seen(oldest_unwritten_s=3.4 * 86_400), max_audit_lag_s=1e9).healthy
    nothing = judge(_seen(processes=[], routed=None, consumers={"dispatch": Lag(pending=3)}), max_audit_lag_s=60)
    assert nothing.problems == ["pool a is routed but no live worker serves it",
                                "no dispatcher answers: requests wait in LLM_REQ (3 now)",
                                "no auditor answers: completion events are not written to the audit ledger"]
    assert nothing.warnings == ["no config was pushed to this fleet: every pool with a consumer counts as routed"]


def test_the_provider_check_keeps_when_it_last_succeeded_and_its_last_error() -> None:
    v = Vitals(clock=lambda: 0)
    v.check_provider(ProviderHealth(healthy=True, checked_ms=10))
    assert v.provider is not None and v.provider.last_error is None
    v.check_provider(ProviderHealth(healthy=False, checked_ms=20, code="PROVIDER_ERROR", error="down"))
    assert v.provider is not None and v.provider.last_ok_ms == 10 and not v.provider.healthy
    assert (v.provider.last_error, v.provider.last_error_ms) == ("down", 20)
    v.check_provider(ProviderHealth(healthy=True, checked_ms=30, latency_ms=5))
    assert v.provider.healthy and v.provider.error is None and v.provider.last_ok_ms == 30
    assert (v.provider.last_error, v.provider.last_error_ms) == ("down", 20)  # recovered, the error kept


@pytest.mark.parametrize(("value", "error"), [
    (0, "audit.events_retention_days: Expected `int` >= 1"),
    (366, "audit.events_retention_days: Expected `int` <= 365"),
    ("7d", "audit.events_retention_days: Expected `int`, got `str`"),
])
def test_the_events_retention_is_validated(value: object, error: str) -> None:
    raw = {"providers": {}, "pools": {}, "routes": {}, "audit": {"events_retention_days": value}}
    with pytest.raises(ConfigError) as caught:
        config_mod.from_mapping(raw)
    assert str(caught.value) == error


def test_a_reporter_says_why_its_process_is_unhealthy() -> None:
    v = Vitals(clock=lambda: 0)
    r = discovery.Reporter("auditor", v)
    assert r.snapshot().healthy and r.snapshot().problem is None
    v.failing("LedgerUnavailable: connection refused")
    snap = r.snapshot()
    assert not snap.healthy and snap.problem is not None and snap.problem.endswith(
        ": LedgerUnavailable: connection refused")
    v.recovered()
    r.stop = asyncio.Event()
    r.stop.set()
    assert r.snapshot().problem == "stopping"
