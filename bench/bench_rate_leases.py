"""Rate leases (workers/ratelimits.py): what the account rate check adds to the dispatcher's hop with and
without leases, for traffic shapes with many or few requests per account per lease validity.

One `Dispatcher` in this process on a fresh nats-server (as bench/bench_limits.py's dispatcher rows):
requests published into LLM_REQ for `--accounts` accounts in turn, timed until their work item reaches
`llm.work.<pool>`, closed loop at 64 in flight (saturation) then open loop at 100 requests/s. Modes:

- `off`: no rate limiter, no budgets;
- `rate`: the rate check as shipped (leases); `rate without leases`: every decision a compare-and-set;
- `both`: rate and budget as shipped; `both without leases`: the budget as shipped, the rate without leases.

"Without leases" sets router.ratelimit.LEASE_SHARE so large that no lease is ever more than one token. The
rate limit is `--rate per_second,burst` (default 1e6,1e6: everything is admitted; a lease is at most
burst / 4 tokens, valid burst / 4 / per_second seconds, 0.25 s by default). Besides latency, each cell
counts the rate state's KV writes per request and the share of decisions made from a lease.

    .venv/bin/python bench/bench_rate_leases.py [--accounts 100,10] [--seconds 5] [--rounds 2]
        [--modes off,rate,"rate without leases",both,"both without leases"] [--rate 1e6,1e6]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import time
import uuid

import msgspec
import nats
import uvloop
from machine import cpu_model, version  # bench/ is on sys.path when a bench runs
from servers import start_nats  # bench/ is on sys.path when a bench runs

from router import config as config_mod
from router import ratelimit
from schemas import decode_work
from workers.budget import Budgets
from workers.dispatcher import Dispatcher
from workers.publish import Publisher
from workers.ratelimits import BUCKET, RateLimiter
from workers.runtime import configure_logging, ensure_topology

MODES = ("off", "rate", "rate without leases", "both", "both without leases")


def _pct(ms: list[float]) -> tuple[float, float]:
    ms = sorted(ms)
    return ms[len(ms) // 2], ms[min(len(ms) - 1, int(len(ms) * 0.99))]


def _config(per_second: float, burst: int) -> config_mod.Config:
    return config_mod.from_mapping({
        "providers": {"openai": {"format": "openai", "base_url": "http://127.0.0.1:9/v1"}},
        "pools": {"openai": {"provider": "openai", "concurrency": 64}},
        "routes": {"draft": {"default": ["openai:gpt-4o-mini"]}},
        "limits": {"default": {"rate": {"per_second": per_second, "burst": burst},
                               "budget": {"daily_usd": 1e9, "monthly_usd": 1e9}}},
    })


async def _cell(url: str, mode: str, accounts: int, seconds: float, per_second: float, burst: int) -> str:
    cfg = _config(per_second, burst)
    nc = await nats.connect(url)
    js = nc.jetstream()
    await ensure_topology(js, cfg)
    await js.purge_stream("LLM_WORK")
    dnc = await nats.connect(url)
    djs = dnc.jetstream()
    rates = await RateLimiter.open(djs) if mode != "off" else None
    budgets = await Budgets.open(djs, "llm") if mode.startswith("both") else None
    share = ratelimit.LEASE_SHARE
    if mode.endswith("without leases"):
        ratelimit.LEASE_SHARE = 10**18
    stop = asyncio.Event()
    disp = Dispatcher(djs, Publisher(dnc, djs, "llm"), cfg, rates=rates, budgets=budgets)
    task = asyncio.create_task(disp.serve(stop))
    sent: dict[str, float] = {}
    lat: list[float] = []
    waiters: dict[str, asyncio.Future[None]] = {}
    tag = uuid.uuid4().hex[:6]  # fresh accounts per cell: no state or lease left from another cell

    async def on_work(msg: object) -> None:
        rid = decode_work(msg.data).request.id  # type: ignore[attr-defined]
        if rid in sent:
            lat.append((time.perf_counter() - sent.pop(rid)) * 1000)
            fut = waiters.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    await nc.subscribe("llm.work.openai", cb=on_work)
    loop = asyncio.get_running_loop()

    async def send(i: int) -> asyncio.Future[None]:
        rid = uuid.uuid4().hex
        account = f"a{tag}{i % accounts}"
        body = msgspec.json.encode({"id": rid, "account": account, "reply_to": "_INBOX.bench", "max_tokens": 100,
                                    "messages": [{"role": "user", "content": "Write a haiku about queues"}]})
        fut: asyncio.Future[None] = loop.create_future()
        waiters[rid] = fut
        sent[rid] = time.perf_counter()
        await nc.publish(f"llm.req.draft.{account}", body)  # core publish: JetStream stores it
        return fut

    async def writes() -> int:
        try:
            return int((await js.stream_info(f"KV_{BUCKET}")).state.last_seq)
        except Exception:
            return 0

    def counted(n: int, w0: int, w1: int, local0: int) -> str:
        if rates is None or n == 0:
            return "—"
        return f"{(w1 - w0) / n:.2f} writes/req, {(rates.local - local0) / n:.0%} from a lease"

    try:
        await asyncio.sleep(0.5)
        count = 0
        end = time.perf_counter() + seconds
        w0, local0 = await writes(), rates.local if rates else 0

        async def closed(k: int) -> None:
            nonlocal count
            while time.perf_counter() < end:
                await asyncio.wait_for(await send(k * 7919 + count), 10)
                count += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(closed(k) for k in range(64)))
        rps = count / (time.perf_counter() - t0)
        p50, _ = _pct(lat)
        sat = f"{rps:,.0f} req/s, p50 {p50:.2f} ms; {counted(count, w0, await writes(), local0)}"
        lat.clear()
        futs = []
        w0, local0 = await writes(), rates.local if rates else 0
        t0 = time.perf_counter()
        n = int(100 * seconds)
        for i in range(n):
            await asyncio.sleep(max(0.0, t0 + i / 100 - time.perf_counter()))
            futs.append(await send(i))
        await asyncio.wait_for(asyncio.gather(*futs), 10)
        p50, p99 = _pct(lat)
        slow = f"p50 {p50:.3f} ms, p99 {p99:.3f} ms; {counted(n, w0, await writes(), local0)}"
    finally:
        stop.set()
        await task
        if budgets is not None:
            await budgets.stop()
        ratelimit.LEASE_SHARE = share
        await dnc.close()
        await nc.close()
    return f"| {mode} | {accounts} | {sat} | {slow} |"


async def main(accounts: list[int], seconds: float, rounds: int, modes: list[str], per_second: float,
               burst: int) -> None:
    url, proc = start_nats()
    try:
        print("| dispatcher limits | accounts | saturation (64 in flight) | 100 req/s open loop |")
        print("|---|--:|---|---|")
        for rnd in range(rounds):  # interleaved, so a burst of load from elsewhere does not hit one mode only
            for n in accounts:
                for mode in modes:
                    row = await _cell(url, mode, n, seconds, per_second, burst)
                    print(row.replace(f"| {mode} |", f"| {mode} (round {rnd + 1}) |", 1), flush=True)
    finally:
        proc.terminate()
        proc.wait(10)
    print(f"\n{cpu_model()}, Python {platform.python_version()}, nats-py {version('nats-py')}, "
          f"uvloop {version('uvloop')}", file=sys.stderr)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accounts", default="100,10", help="numbers of accounts to spread requests over (default 100,10)")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per cell and phase (default 5)")
    p.add_argument("--rounds", type=int, default=2, help="rounds (default 2)")
    p.add_argument("--modes", default=",".join(MODES), help="modes, comma-separated (default: all)")
    p.add_argument("--rate", default="1e6,1e6", help="every account's per_second,burst (default 1e6,1e6)")
    a = p.parse_args()
    a_modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    try:
        nums = [int(x) for x in a.accounts.split(",") if x.strip()]
        ps, b = a.rate.split(",")
        rate_ps, rate_burst = float(ps), int(float(b))
    except ValueError:
        p.error("--accounts takes integers, --rate per_second,burst")
    if not a_modes or any(m not in MODES for m in a_modes) or not nums or min(nums) < 1:
        p.error(f"--modes: choose among {', '.join(MODES)}; --accounts: positive integers")
    configure_logging("error")
    uvloop.run(main(nums, a.seconds, a.rounds, a_modes, rate_ps, rate_burst))
