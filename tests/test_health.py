"""The shared health state (workers/health.py) on a real nats-server: one breaker per pool across
replicas (compare-and-set), provider credit, key reports, and `switchyard breaker status|reset`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS

from router.breaker import Ticket, Verdict
from router.config import BreakerPolicy
from workers import health
from workers.health import HealthView, KeyReport, PoolHealth, breaker_status, now_ms, reset_breaker
from workers.runtime import ensure_topology

from .conftest import fleet_config
from .helpers import switchyard


async def eventually(check: Callable[[], bool], timeout: float = 3.0) -> None:
    end = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > end:
            raise AssertionError("not within the time allowed")
        await asyncio.sleep(0.01)


class Replicas:
    """Worker-side health objects, each on its own NATS connection as separate processes would be."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conns: list[NATS] = []
        self.started: list[PoolHealth | HealthView] = []

    async def view(self) -> HealthView:
        c = await nats.connect(self.url)
        self.conns.append(c)
        view = HealthView(c.jetstream())
        await view.start()
        self.started.append(view)
        return view

    async def pool(
        self, policy: BreakerPolicy, *, pool: str = "openai", provider: str = "openai", has_key: bool = True,
        credit_cooldown_ms: int = 60_000,
    ) -> PoolHealth:
        c = await nats.connect(self.url)
        self.conns.append(c)
        ph = PoolHealth(HealthView(c.jetstream()), pool=pool, policy=policy, provider=provider,
                        credit_cooldown_ms=credit_cooldown_ms, has_key=has_key)
        await ph.start()
        self.started.append(ph)
        return ph

    async def close(self) -> None:
        for s in self.started:
            await s.stop()
        for c in self.conns:
            await c.close()


@pytest.fixture
async def replicas(nats_url: str) -> AsyncIterator[Replicas]:
    r = Replicas(nats_url)
    yield r
    await r.close()


CLOSED_TICKET = Ticket(None, 0)


async def test_failures_on_two_replicas_are_counted_exactly_once_each(replicas: Replicas) -> None:
    policy = BreakerPolicy(failures=20, cooldown_ms=60_000)
    a, b = await replicas.pool(policy), await replicas.pool(policy)
    # All at once, from copies that are stale for all but the first write: compare-and-set retries.
    await asyncio.gather(*(r.record(CLOSED_TICKET, Verdict.FAILURE) for r in (a, b) for _ in range(8)))
    state, _ = await a._read()
    assert state.state == "closed" and state.failures == 16
    await asyncio.gather(*(r.record(CLOSED_TICKET, Verdict.FAILURE) for r in (a, b) for _ in range(2)))
    state, _ = await b._read()
    assert state.state == "open" and state.failures == 20


async def test_every_replica_and_the_dispatcher_see_the_breaker_open(replicas: Replicas) -> None:
    policy = BreakerPolicy(failures=5, cooldown_ms=60_000)
    a, b = await replicas.pool(policy), await replicas.pool(policy)
    dispatcher = await replicas.view()
    assert not dispatcher.pool_open("openai", now_ms())
    for _ in range(5):
        await a.record(CLOSED_TICKET, Verdict.FAILURE)
    await eventually(lambda: dispatcher.pool_open("openai", now_ms()))
    await eventually(lambda: b.view.pool_open("openai", now_ms()))
    assert await b.admit(lease_ms=1000) is None  # refused without any call
    assert not dispatcher.pool_open("anthropic", now_ms())  # one breaker per pool


async def test_one_probe_slot_is_claimed_by_one_replica_only(replicas: Replicas) -> None:
    policy = BreakerPolicy(failures=1, cooldown_ms=200, successes=1, probes=1)
    a, b = await replicas.pool(policy), await replicas.pool(policy)
    dispatcher = await replicas.view()
    await a.record(CLOSED_TICKET, Verdict.FAILURE)
    await eventually(lambda: b.view.pool_open("openai", now_ms()))
    await asyncio.sleep(0.25)
    assert not dispatcher.pool_open("openai", now_ms())  # cooled down: a probe may go
    tickets = await asyncio.gather(*(r.admit(lease_ms=5000) for r in (a, b) for _ in range(5)))
    probes = [t for t in tickets if t is not None]
    assert len(probes) == 1 and probes[0].token is not None
    await eventually(lambda: dispatcher.pool_open("openai", now_ms()))  # half-open, its one slot taken
    winner = a if tickets.index(probes[0]) < 5 else b
    await winner.record(probes[0], Verdict.SUCCESS)
    # Every replica's copy catches up (each follows the bucket on its own), then both call again.
    await eventually(lambda: all(v.breaker("openai")[0].state == "closed" for v in (dispatcher, a.view, b.view)))
    assert await a.admit(lease_ms=1000) is not None and await b.admit(lease_ms=1000) is not None


async def test_a_success_resets_the_count_for_every_replica(replicas: Replicas) -> None:
    policy = BreakerPolicy(failures=3)
    a, b = await replicas.pool(policy), await replicas.pool(policy)
    for _ in range(2):
        await a.record(CLOSED_TICKET, Verdict.FAILURE)
    await eventually(lambda: b.view.breaker("openai")[0].failures == 2)
    await b.record(CLOSED_TICKET, Verdict.SUCCESS)
    await eventually(lambda: a.view.breaker("openai")[0].failures == 0)
    await a.record(CLOSED_TICKET, Verdict.FAILURE)
    state, _ = await a._read()
    assert state.state == "closed" and state.failures == 1


async def test_credit_exhaustion_is_seen_by_every_process_and_ends_after_its_cool_down(replicas: Replicas) -> None:
    worker = await replicas.pool(BreakerPolicy(), pool="anthropic", provider="anthropic", credit_cooldown_ms=500)
    other_pool = await replicas.pool(BreakerPolicy(), pool="anthropic_batch", provider="anthropic")
    dispatcher = await replicas.view()
    until = await worker.out_of_credit()
    await eventually(lambda: dispatcher.provider_exhausted("anthropic", now_ms()))
    await eventually(lambda: other_pool.credit_until() == until)  # every pool of the provider
    assert not dispatcher.provider_exhausted("openai", now_ms())
    await asyncio.sleep(max(0, until - now_ms()) / 1000 + 0.01)
    assert not dispatcher.provider_exhausted("anthropic", now_ms())
    assert other_pool.credit_until() is None
    assert (await health.credit_status(dispatcher.js))["anthropic"].until_ms == until


async def test_key_presence_per_pool_and_unknown_without_a_live_worker(replicas: Replicas) -> None:
    dispatcher = await replicas.view()
    assert dispatcher.pool_has_key("openai") is None
    keyless = await replicas.pool(BreakerPolicy(), has_key=False)
    await eventually(lambda: dispatcher.pool_has_key("openai") is False)
    keyed = await replicas.pool(BreakerPolicy(), has_key=True)
    await eventually(lambda: dispatcher.pool_has_key("openai") is True)  # one worker with a key serves
    await keyed.stop()
    await keyless.stop()
    replicas.started = [s for s in replicas.started if s not in (keyed, keyless)]
    await eventually(lambda: dispatcher.pool_has_key("openai") is None)  # both said goodbye


async def test_a_report_older_than_its_ttl_is_not_believed(replicas: Replicas) -> None:
    dispatcher = await replicas.view()
    kv = dispatcher.pools.kv
    stale = KeyReport(pool="gemini", provider="gemini", has_key=True, until_ms=now_ms() + 300)
    await kv.put("gemini.lost-worker", msgspec.json.encode(stale))  # a worker killed right after writing
    await eventually(lambda: dispatcher.pool_has_key("gemini") is True)
    await asyncio.sleep(0.35)
    assert dispatcher.pool_has_key("gemini") is None


async def test_a_value_that_is_not_a_breaker_reads_as_closed(replicas: Replicas) -> None:
    dispatcher = await replicas.view()
    await dispatcher.breakers.kv.put("openai", b"not json")
    worker = await replicas.pool(BreakerPolicy(failures=1))
    assert not dispatcher.pool_open("openai", now_ms())
    await worker.record(CLOSED_TICKET, Verdict.FAILURE)  # overwrites it through compare-and-set
    await eventually(lambda: dispatcher.pool_open("openai", now_ms()))


async def test_reset_closes_an_open_breaker_everywhere(replicas: Replicas) -> None:
    worker = await replicas.pool(BreakerPolicy(failures=1))
    await worker.record(CLOSED_TICKET, Verdict.FAILURE)
    assert (await breaker_status(worker.view.js))["openai"].state == "open"
    await reset_breaker(worker.view.js, "openai")
    await eventually(lambda: worker.view.breaker("openai")[0].state == "closed")
    assert await worker.admit(lease_ms=1000) is not None


# --- switchyard breaker status | reset --------------------------------------------------------




@pytest.fixture
async def fleet_streams(nats_url: str, nc: NATS, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_URL", nats_url)
    cfg = fleet_config({"openai": "http://127.0.0.1:9/v1", "anthropic": "http://127.0.0.1:9"})
    await ensure_topology(nc.jetstream(), cfg)


async def open_breaker(replicas: Replicas, pool: str) -> PoolHealth:
    worker = await replicas.pool(BreakerPolicy(failures=2, cooldown_ms=60_000), pool=pool)
    for _ in range(2):
        await worker.record(CLOSED_TICKET, Verdict.FAILURE)
    return worker


async def test_breaker_status_lists_every_pool(
    fleet_streams: None, replicas: Replicas, capsys: pytest.CaptureFixture[str]
) -> None:
    await open_breaker(replicas, "openai")
    r = await switchyard(capsys, "breaker", "status")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].split() == ["pool", "state", "failures", "since", "(UTC)", "probes"]
    anthropic = next(line for line in lines if line.startswith("anthropic"))
    openai = next(line for line in lines if line.startswith("openai"))
    assert anthropic.split()[1:3] == ["closed", "0"]  # never failed: no stored state, still listed
    assert openai.split()[1:3] == ["open", "2"] and "refuses calls until" in openai

    r = await switchyard(capsys, "breaker", "status", "--json")
    assert r.code == 0
    rows = {row["pool"]: row for row in json.loads(r.out)}
    assert rows["anthropic"]["state"] == "closed" and rows["anthropic"]["since"] is None
    assert rows["openai"]["state"] == "open" and rows["openai"]["failures"] == 2 and rows["openai"]["until"]


async def test_breaker_reset_closes_it_and_refuses_an_unknown_pool(
    fleet_streams: None, replicas: Replicas, capsys: pytest.CaptureFixture[str]
) -> None:
    worker = await open_breaker(replicas, "openai")
    r = await switchyard(capsys, "breaker", "reset", "openai")
    assert r.code == 0 and "reset: closed (was open)" in r.out
    await eventually(lambda: not worker.view.pool_open("openai", now_ms()))

    r = await switchyard(capsys, "breaker", "reset", "nope")
    assert r.code == 1 and "no pool 'nope'" in r.err and "anthropic, openai" in r.err


async def test_breaker_commands_without_a_fleet_exit_2(
    nats_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NATS_URL", nats_url)  # a server, but no fleet streams on it
    r = await switchyard(capsys, "breaker", "status")
    assert r.code == 2 and "no Switchyard streams" in r.err
    from .conftest import free_port

    monkeypatch.setenv("NATS_URL", f"nats://127.0.0.1:{free_port()}")
    r = await switchyard(capsys, "breaker", "reset", "openai")
    assert r.code == 2 and "cannot reach NATS" in r.err
