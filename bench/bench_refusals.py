"""Refusals per second from one dispatcher, with and without the kept refusal (workers/progress.py).

A refusal decided on state that changes (rate, budget, route, deadline) is written to `llm_streams` before
it goes out, so that a redelivery gives the same one. This bench measures what that write costs a flood of
refusals: one `Dispatcher` in this process on a fresh nats-server, `--n` requests of one account published
at once (core publish, JetStream stores them), timed until their refusals have come back, interleaved over
`--rounds` rounds, for

- `budget`: a daily budget of $0 (every request `BUDGET_EXCEEDED`: reply, dead-letter copy and event);
- `rate`: 1 request/s, burst 1 (nearly every request `RATE_LIMITED`: reply and event, no dead-letter copy;
  the few admitted are not waited for).

    .venv/bin/python bench/bench_refusals.py [--kind budget|rate] [--n 3000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid

import msgspec
import nats
import uvloop
from machine import describe  # bench/ is on sys.path when a bench runs
from servers import nats_server  # bench/ is on sys.path when a bench runs

from router import config as config_mod
from workers.budget import Budgets
from workers.dispatcher import Dispatcher
from workers.progress import Progress, ensure_bucket
from workers.publish import Publisher
from workers.ratelimits import RateLimiter
from workers.runtime import configure_logging, ensure_topology

LIMITS = {
    "budget": {"rate": {"per_second": "unlimited"}, "budget": {"daily_usd": 0, "monthly_usd": 1e9}},
    "rate": {"rate": {"per_second": 1, "burst": 1},
             "budget": {"daily_usd": "unlimited", "monthly_usd": "unlimited"}},
}
ADMITTED_AT_MOST = 50
"""Requests the `rate` flood may have admitted (1/s): not waited for."""


def _config(kind: str) -> config_mod.Config:
    return config_mod.from_mapping({
        "providers": {"openai": {"format": "openai", "base_url": "http://127.0.0.1:9/v1"}},
        "pools": {"openai": {"provider": "openai", "concurrency": 64}},
        "routes": {"draft": {"default": ["openai:gpt-4o-mini"]}},
        "limits": {"default": LIMITS[kind]},
    })


async def _flood(url: str, kind: str, keep: bool, n: int) -> tuple[float, float]:
    """(refusals/s, µs of this process's CPU per refusal)."""
    nc, dnc = await nats.connect(url), await nats.connect(url)
    cfg = _config(kind)
    await ensure_topology(nc.jetstream(), cfg)
    djs = dnc.jetstream()
    budgets = await Budgets.open(djs, "llm")
    dispatcher = Dispatcher(djs, Publisher(dnc, djs, "llm"), cfg, budgets=budgets, rates=await RateLimiter.open(djs),
                            progress=Progress(dnc, await ensure_bucket(djs)) if keep else None)
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.serve(stop))
    inbox = f"_INBOX.refusals.{uuid.uuid4().hex}"
    want = n - (ADMITTED_AT_MOST if kind == "rate" else 0)
    got = 0
    done = asyncio.Event()

    async def on_reply(_msg: object) -> None:
        nonlocal got
        got += 1
        if got >= want:
            done.set()

    await nc.subscribe(inbox, cb=on_reply)
    await asyncio.sleep(0.5)
    account = f"a{uuid.uuid4().hex[:6]}"
    t0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        await nc.publish(f"llm.req.draft.{account}", msgspec.json.encode({
            "id": uuid.uuid4().hex, "account": account, "reply_to": inbox, "max_tokens": 100,
            "messages": [{"role": "user", "content": "hi"}]}))
    await asyncio.wait_for(done.wait(), 120)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    stop.set()
    await task
    await budgets.stop()
    await dnc.close()
    await nc.close()
    return got / elapsed, cpu / got * 1e6


async def main(kind: str, n: int, rounds: int) -> None:
    with nats_server() as url:
        print(f"| {kind} refusals | refusals/s | µs CPU per refusal |")
        print("|---|--:|--:|")
        for rnd in range(rounds):
            for keep in (False, True):
                rps, us = await _flood(url, kind, keep, n)
                print(f"| {'kept' if keep else 'not kept'} (round {rnd + 1}) | {rps:,.0f} | {us:.0f} |", flush=True)
    print(f"\n{describe('nats-py', 'uvloop')}", file=sys.stderr)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=sorted(LIMITS), default="budget", help="what refuses (default budget)")
    p.add_argument("--n", type=int, default=3000, help="requests per flood (default 3000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    a = p.parse_args()
    if a.n <= ADMITTED_AT_MOST or a.rounds < 1:
        p.error(f"--n must be over {ADMITTED_AT_MOST} and --rounds at least 1")
    configure_logging("error")
    uvloop.run(main(a.kind, a.n, a.rounds))
