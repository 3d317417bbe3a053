"""What the shared pool health (workers/health.py) adds per call, on a fresh nats-server.

Two worker replicas of one pool (`PoolHealth`, each on its own NATS connection) and one dispatcher
view (`HealthView`), in this process under uvloop:

- closed: `admit()` + `record(SUCCESS)` on a closed breaker, what every call of a healthy pool pays;
- checks: the dispatcher's `pool_open` + `provider_exhausted` + `pool_has_key` for one target;
- failure: `record(FAILURE)` (a compare-and-set) on a breaker that never opens, one at a time;
- contended: both replicas recording failures at once, 8 at a time each, on a breaker that never opens
  (compare-and-set conflicts without end: the worst case);
- burst: 64 calls of a pool failing at the same instant, 32 on each replica, with `failures` = 5;
- probe: a half-open probe's claim (`admit`) and release (`record(IGNORED)`), two compare-and-sets;
- seen: from a replica's write until the dispatcher's view has it (the watch);
- put: a plain `kv.put`, for reference.

    .venv/bin/python bench/bench_health.py [--n 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import time
from collections.abc import Awaitable, Callable

import nats
import uvloop
from machine import cpu_model, version  # bench/ is on sys.path when a bench runs
from servers import start_nats  # bench/ is on sys.path when a bench runs

from router import breaker
from router.breaker import BreakerState, Ticket, Verdict
from router.config import BreakerPolicy
from workers.health import HealthView, PoolHealth, now_ms


async def _timed(n: int, step: Callable[[], Awaitable[object]]) -> list[float]:
    """Milliseconds per awaited step."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await step()
        out.append((time.perf_counter() - t) * 1000)
    return out


def _row(name: str, ms: list[float], note: str = "") -> str:
    ms = sorted(ms)
    p50, p99 = ms[len(ms) // 2], ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    if p50 < 0.1:
        return f"| {name} | {p50 * 1000:.1f} µs | {p99 * 1000:.1f} µs | {note} |"
    return f"| {name} | {p50:.3f} ms | {p99:.3f} ms | {note} |"


async def main(n: int) -> None:
    url, proc = start_nats()
    conns = [await nats.connect(url) for _ in range(3)]
    try:
        never = BreakerPolicy(failures=10**9, cooldown_ms=60_000, successes=10**9, probes=10**9)
        replicas = [PoolHealth(HealthView(c.jetstream()), pool="openai", policy=never, provider="openai",
                               credit_cooldown_ms=60_000, has_key=True) for c in conns[:2]]
        for r in replicas:
            await r.start()
        view = HealthView(conns[2].jetstream())
        await view.start()
        a, b = replicas
        rows = ["| what | p50 | p99 | note |", "|---|---|---|---|"]

        async def closed_call() -> None:
            ticket = await a.admit(lease_ms=1000)
            assert ticket is not None
            await a.record(ticket, Verdict.SUCCESS)

        rows.append(_row("closed: admit + record(SUCCESS)", await _timed(n * 10, closed_call), "no I/O"))

        def checks() -> None:
            now = now_ms()
            view.pool_open("openai", now)
            view.provider_exhausted("openai", now)
            view.pool_has_key("openai")

        t = time.perf_counter()
        for _ in range(n * 10):
            checks()
        per = (time.perf_counter() - t) / (n * 10) * 1000
        rows.append(_row("dispatcher: the three checks", [per], "mean, no I/O"))

        closed = Ticket(None, 0)
        rows.append(_row("failure: record(FAILURE)", await _timed(n, lambda: a.record(closed, Verdict.FAILURE)),
                         "one compare-and-set"))

        lat: list[float] = []

        async def contend(r: PoolHealth) -> None:
            for _ in range(n // 16):
                s = time.perf_counter()
                await r.record(closed, Verdict.FAILURE)
                lat.append((time.perf_counter() - s) * 1000)

        before = (await a._read())[0].failures
        t = time.perf_counter()
        await asyncio.gather(*(contend(r) for r in (a, b) for _ in range(8)))
        wall = time.perf_counter() - t
        after = (await a._read())[0].failures
        assert after - before == len(lat), (after - before, len(lat))  # none lost, none twice
        rows.append(_row("contended: 2 replicas × 8 at once", lat,
                         f"{len(lat) / wall:.0f} counted failures/s, all {len(lat)} counted once"))

        # A pool whose provider goes down with 64 calls in flight: all fail at once, the breaker opens.
        burst_lat: list[float] = []
        for _ in range(20):
            pool = f"burst{len(burst_lat)}"
            five = BreakerPolicy(failures=5, cooldown_ms=60_000)
            pair = [PoolHealth(r.view, pool=pool, policy=five, provider="openai", credit_cooldown_ms=60_000,
                               has_key=True) for r in replicas]

            async def fail(r: PoolHealth) -> None:
                s = time.perf_counter()
                await r.record(closed, Verdict.FAILURE)
                burst_lat.append((time.perf_counter() - s) * 1000)

            await asyncio.gather(*(fail(r) for r in pair for _ in range(32)))
            assert (await pair[0]._read())[0].state == "open"
        rows.append(_row("burst: 64 calls fail at once, failures=5", burst_lat, "20 bursts; each opens it"))

        # A half-open breaker with room for every probe: each call claims and gives back a slot.
        half = BreakerState(state="half_open", since_ms=now_ms(), probe_limit=10**9)
        await a.view.breakers.kv.put("openai", breaker.encode(half))
        await asyncio.sleep(0.1)

        async def probe() -> None:
            ticket = await a.admit(lease_ms=60_000)
            assert ticket is not None and ticket.token is not None
            await a.record(ticket, Verdict.IGNORED)

        rows.append(_row("probe: claim + release", await _timed(n // 2, probe), "two compare-and-sets"))

        await a.view.breakers.kv.put("openai", breaker.encode(BreakerState()))  # closed again: failures count
        await asyncio.sleep(0.1)
        seen: list[float] = []
        for _ in range(n // 4):
            s = time.perf_counter()
            await b.record(closed, Verdict.FAILURE)
            rev = b.view.breaker("openai")[1]
            while view.breaker("openai")[1] < rev:
                await asyncio.sleep(0)
            seen.append((time.perf_counter() - s) * 1000)
        rows.append(_row("seen: write until the dispatcher's view has it", seen, "CAS + watch delivery"))

        kv = a.view.breakers.kv
        value = breaker.encode(BreakerState())
        rows.append(_row("put: a plain kv.put", await _timed(n, lambda: kv.put("other", value)), "reference"))

        print(f"{cpu_model()}, {platform.python_version()}, nats-py {version('nats-py')}, uvloop, n={n}\n")
        print("\n".join(rows))
        for r in replicas:
            await r.stop()
        await view.stop()
    finally:
        for c in conns:
            await c.close()
        proc.terminate()
        proc.wait(5)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    uvloop.run(main(ap.parse_args().n))
