"""Account rate limits on a fresh nats-server: the shared-state mechanisms, and what the check adds to
the dispatcher.

Mechanisms, each replica on its own NATS connection in this process under uvloop:

- `kv-cas`: workers/ratelimits.py as shipped: one GCRA state per account in KV, compare-and-set,
  one decision at a time per account per replica, each replica caching the last state it saw;
- `counter`: one nats-server counter (ADR-49, `Nats-Incr: 1`) per account and fixed window of
  burst / per_second seconds; admitted when the total the PubAck returns is at most the burst.

Rows: `single` (one replica, one account, one admission at a time: the added latency); `concurrent`
(one replica, 64 at once over 1,000 accounts); `hot` (3 replicas, 600 attempts at once on one account
limited to 20/s burst 20: admitted vs the bound, conflicts); `10k` (3 replicas, 10,000 accounts, three
attempts each at once, burst 2: every account must get exactly 2).

Dispatcher: one `Dispatcher` here, requests published into LLM_REQ and timed until their work item
reaches `llm.work.<pool>` (100 accounts, limits that admit everything): closed loop at 64 in flight
(saturation) and open loop at 100 requests/s, in these modes, interleaved over --rounds rounds:

- `off`: no rate limiter and no budgets at all;
- `unlimited`: both there, the config says `"unlimited"` for the rate and both budgets (the off switch);
- `rate`: the rate's compare-and-set only; `budget`: the budget's reservation only;
- `both`: both, in flight together (workers/limits.py, as shipped);
- `both in turn`: both, the rate awaited before the reservation (as before the change),
  for comparison;
- `budget without leases`: the reservation with slices of exactly one reservation (router/budget.py's
  `SLICE_SHARE` at 0 while it runs): both periods' counters incremented per request, as before leases.

No worker runs, so reservations are never settled: the budget is large enough not to matter.

    .venv/bin/python bench/bench_limits.py [--n 2000] [--seconds 5] [--rounds 2] [--dispatcher-only]
        [--modes off,unlimited,rate,budget,both,"both in turn","budget without leases"] [--probe]

`--probe`: only round trips on one connection paced at 100/s (a compare-and-set, increments, a
reservation, alone and two at once), to see which overlap.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable

import msgspec
import nats
import uvloop
from hop import dispatcher_hop, pct  # bench/ is on sys.path when a bench runs
from machine import describe  # bench/ is on sys.path when a bench runs
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api as js_api
from servers import nats_server  # bench/ is on sys.path when a bench runs

from router import budget as budget_policy
from router import config as config_mod
from router.config import RateLimit
from router.limits import AccountLimits
from router.ratelimit import per_second
from router.routing import Selection, Source
from schemas import Request, Target
from workers import limits
from workers.budget import Budgets
from workers.ratelimits import RateLimiter, now_us
from workers.runtime import configure_logging, ensure_topology

Admit = Callable[[str, RateLimit], Awaitable[bool]]


class Counters:
    """The counter mechanism: fixed windows of burst / per_second seconds."""

    def __init__(self, nc: NATS) -> None:
        self.js = nc.jetstream()

    @staticmethod
    async def setup(nc: NATS) -> None:
        await nc.jetstream().add_stream(js_api.StreamConfig(
            name="RATE_COUNTERS", subjects=["ratec.>"], allow_msg_counter=True, allow_direct=True, max_age=3600.0))

    async def admit(self, account: str, limit: RateLimit) -> bool:
        window_us = int(limit.burst / per_second(limit) * 1_000_000)
        ack = await self.js.publish(f"ratec.{account}.{now_us() // window_us}", b"", headers={"Nats-Incr": "1"})
        return int(ack.val or 0) <= limit.burst


async def _rows(name: str, admits: list[Admit], cas: list[RateLimiter], n: int) -> list[str]:
    rows = []
    big = RateLimit(per_second=1e9, burst=10**9)
    tag = uuid.uuid4().hex[:6]
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        await admits[0](f"single{tag}", big)
        lat.append((time.perf_counter() - t) * 1000)
    p50, p99 = pct(lat)
    rows.append(f"| {name} | single | {1000 / statistics.mean(lat):,.0f} | {p50:.3f} | {p99:.3f} | | |")

    gate = asyncio.Semaphore(64)
    lat = []

    async def one(i: int, admit: Admit = admits[0]) -> None:
        async with gate:
            t = time.perf_counter()
            await admit(f"c{tag}{i % 1000}", big)
            lat.append((time.perf_counter() - t) * 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n * 2)))
    p50, p99 = pct(lat)
    rows.append(f"| {name} | concurrent (64, 1,000 accounts) | {n * 2 / (time.perf_counter() - t0):,.0f} "
                f"| {p50:.3f} | {p99:.3f} | | |")

    before = sum(r.conflicts for r in cas)
    hot = RateLimit(per_second=20, burst=20)
    t0 = time.perf_counter()
    got = await asyncio.gather(*(admits[i % 3](f"hot{tag}", hot) for i in range(600)))
    span = time.perf_counter() - t0
    conflicts = sum(r.conflicts for r in cas) - before if name == "kv-cas" else 0
    rows.append(f"| {name} | hot: 3 replicas, 600 at once, 20/s burst 20 | {600 / span:,.0f} | | | "
                f"{sum(got)} admitted (bound 20 + 20 × {span:.2f} s) | {conflicts} |")

    before = sum(r.conflicts for r in cas)
    two = RateLimit(per_second=1, burst=2)
    gate10 = asyncio.Semaphore(64)

    async def acct(i: int) -> int:
        async with gate10:
            return sum(await asyncio.gather(*(admits[k](f"k{tag}{i}", two) for k in range(3))))

    t0 = time.perf_counter()
    per = await asyncio.gather(*(acct(i) for i in range(10_000)))
    span = time.perf_counter() - t0
    conflicts = sum(r.conflicts for r in cas) - before if name == "kv-cas" else 0
    wrong = sum(p != 2 for p in per)
    rows.append(f"| {name} | 10k: 3 replicas, 10,000 accounts × 3 at once, burst 2 | {30_000 / span:,.0f} | | | "
                f"{wrong} accounts not at exactly 2 | {conflicts} |")
    return rows


async def _mechanisms(url: str, n: int) -> list[str]:
    conns = [await nats.connect(url) for _ in range(3)]
    await Counters.setup(conns[0])
    cas = [await RateLimiter.open(c.jetstream()) for c in conns]
    cnt = [Counters(c) for c in conns]

    def kv_admit(r: RateLimiter) -> Admit:
        async def admit(account: str, limit: RateLimit) -> bool:
            return (await r.decide(account, limit, now_us())).admitted
        return admit

    mechs: dict[str, list[Admit]] = {"kv-cas": [kv_admit(r) for r in cas], "counter": [c.admit for c in cnt]}
    rows = []
    for name, admits in mechs.items():
        rows += await _rows(name, admits, cas, n)
    for c in conns:
        await c.close()
    return rows


MODES = ("off", "unlimited", "rate", "budget", "both", "both in turn", "budget without leases")


def _config(mode: str) -> config_mod.Config:
    raw: dict[str, object] = {
        "providers": {"openai": {"format": "openai", "base_url": "http://127.0.0.1:9/v1"}},
        "pools": {"openai": {"provider": "openai", "concurrency": 64}},
        "routes": {"draft": {"default": ["openai:gpt-4o-mini"]}},
    }
    if mode == "unlimited":
        raw["limits"] = {"default": {"rate": {"per_second": "unlimited"},
                                     "budget": {"daily_usd": "unlimited", "monthly_usd": "unlimited"}}}
    else:
        raw["limits"] = {"default": {"rate": {"per_second": 1e6, "burst": 1_000_000},
                                     "budget": {"daily_usd": 1e9, "monthly_usd": 1e9}}}
    return config_mod.from_mapping(raw)


async def _one_after_the_other(
    rates: RateLimiter | None, budgets: Budgets | None, cfg: config_mod.Config, req: Request, msg: Msg,
    published_ms: int, selection: Selection, own: AccountLimits | None,
) -> limits.Held | limits.Admitted:
    """The checks as they were before they ran together: the rate awaited, then the reservation."""
    assert rates is not None and budgets is not None
    held = await rates.admit(req, msg, published_ms, cfg.limits, own)
    if held is not None:
        return limits.Held(held)
    return limits.Admitted(await budgets.reserve(cfg, req, selection, published_ms, own))


async def _dispatcher(url: str, mode: str, seconds: float) -> tuple[str, str]:
    cfg = _config(mode)
    rate = mode in ("unlimited", "rate") or mode.startswith("both")
    budget = mode == "unlimited" or mode.startswith(("both", "budget"))
    share = budget_policy.SLICE_SHARE
    if mode == "budget without leases":
        budget_policy.SLICE_SHARE = 0.0
    shipped = limits.admit
    if mode == "both in turn":
        limits.admit = _one_after_the_other
    try:
        async with dispatcher_hop(url, cfg, rate=rate, budget=budget) as hop:
            _, rps, lat = await hop.saturation(seconds, lambda i: f"acct{i % 100}")
            p50, p99 = pct(lat)
            sat = f"{rps:,.0f} req/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms"
            _, lat = await hop.paced(seconds, lambda i: f"acct{i % 100}")
            p50, p99 = pct(lat)
            slow = f"p50 {p50:.3f} ms, p99 {p99:.3f} ms"
    finally:
        budget_policy.SLICE_SHARE = share
        limits.admit = shipped
    return sat, slow


async def _probe(url: str, rounds: int) -> list[str]:
    """Round trips on one connection, paced at 100/s (300 of each, p50 and p90): what overlaps with what."""
    cfg = _config("both")
    nc = await nats.connect(url)
    js = nc.jetstream()
    await ensure_topology(js, cfg)
    rates, budgets = await RateLimiter.open(js), await Budgets.open(js, "llm")
    rate = cfg.limits.default.rate
    selection = Selection(chain=[Target(pool="openai", model="gpt-4o-mini")], skipped=[], source=Source.DEFAULT_ROUTE,
                          prompt_tokens=7)

    def req(i: int) -> Request:
        return msgspec.convert({"id": uuid.uuid4().hex, "account": f"p{i % 100}", "use_case": "draft",
                                "reply_to": "_INBOX.x", "max_tokens": 100,
                                "messages": [{"role": "user", "content": "hi"}]}, Request)

    async def cas(r: Request) -> None:
        await rates.decide(r.account, rate, now_us())

    async def reserve(r: Request) -> None:
        await budgets.reserve(cfg, r, selection, int(time.time() * 1000))

    async def incr(_r: Request) -> None:
        await js.publish("llm.budget.probe.d1.used", b"", headers={"Nats-Incr": "1", "Nats-Msg-Id": uuid.uuid4().hex})

    async def together(*steps: Callable[[Request], Awaitable[None]], r: Request) -> None:
        await asyncio.gather(*(step(r if k == 0 else req(k + 7)) for k, step in enumerate(steps)))

    cases: dict[str, Callable[[Request], Awaitable[None]]] = {
        "compare-and-set": cas,
        "two compare-and-sets at once": lambda r: together(cas, cas, r=r),
        "one increment": incr,
        "two increments at once": lambda r: together(incr, incr, r=r),
        "a compare-and-set and an increment at once": lambda r: together(cas, incr, r=r),
        "reservation (two increments at once)": reserve,
        "compare-and-set and reservation at once": lambda r: together(cas, reserve, r=r),
        "compare-and-set, then reservation": lambda r: _in_turn(cas, reserve, r),
    }
    rows = []
    for rnd in range(rounds):
        for name, case in cases.items():
            lat = []
            t0 = time.perf_counter()
            for i in range(300):
                await asyncio.sleep(max(0.0, t0 + i / 100 - time.perf_counter()))
                r = req(i)
                t = time.perf_counter()
                await case(r)
                lat.append((time.perf_counter() - t) * 1000)
            lat.sort()
            rows.append(f"| {name} (round {rnd + 1}) | {lat[150]:.3f} | {lat[270]:.3f} |")
    await nc.close()
    return rows


async def _in_turn(first: Callable[[Request], Awaitable[None]], second: Callable[[Request], Awaitable[None]],
                   r: Request) -> None:
    await first(r)
    await second(r)


async def main(n: int, seconds: float, rounds: int, dispatcher_only: bool, modes: list[str], probe: bool) -> None:
    with nats_server() as url:
        if not dispatcher_only and not probe:
            print("| mechanism | case | admissions/s | p50 ms | p99 ms | exactness | CAS conflicts |")
            print("|---|---|--:|--:|--:|---|--:|")
            for row in await _mechanisms(url, n):
                print(row, flush=True)
            print()
        if probe:
            print("| round trips at 100/s, one connection | p50 ms | p90 ms |")
            print("|---|--:|--:|")
            for row in await _probe(url, rounds):
                print(row, flush=True)
            return
        print("| dispatcher limits | saturation (64 in flight) | 100 req/s open loop |")
        print("|---|---|---|")
        for rnd in range(rounds):  # interleaved, so a burst of load from elsewhere does not hit one mode only
            for mode in modes:
                sat, slow = await _dispatcher(url, mode, seconds)
                print(f"| {mode} (round {rnd + 1}) | {sat} | {slow} |", flush=True)
    print(f"\n{describe('nats-py', 'uvloop')}", file=sys.stderr)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="sequential admissions per mechanism (default 2000)")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per dispatcher cell (default 5)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of the dispatcher's modes (default 2)")
    p.add_argument("--dispatcher-only", action="store_true", help="skip the mechanisms' table")
    p.add_argument("--modes", default=",".join(MODES), help="the dispatcher's modes, comma-separated (default: all)")
    p.add_argument("--probe", action="store_true",
                   help="only the overlap probe: which round trips overlap when in flight together")
    a = p.parse_args()
    chosen = [m.strip() for m in a.modes.split(",") if m.strip()]
    if not chosen or any(m not in MODES for m in chosen):
        p.error(f"--modes: choose among {', '.join(MODES)}")
    configure_logging("error")
    uvloop.run(main(a.n, a.seconds, a.rounds, a.dispatcher_only, chosen, a.probe))
