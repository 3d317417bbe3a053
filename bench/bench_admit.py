"""`workers/limits.py`'s `admit` in a loop: the Python a request costs the dispatcher when its rate comes
from this dispatcher's lease and its reservation from its budget slices (the fast path, nothing awaited).

A fresh nats-server, one `RateLimiter` and one `Budgets` on it; each account's first request takes its lease
and slices (awaited, not timed); then `--n` requests over `--accounts` accounts in turn, timed in one loop,
best of `--rounds` rounds. Limits large enough to admit every request (10⁶/s burst 10⁶, $10⁹ a day).

    .venv/bin/python bench/bench_admit.py [--n 200000] [--accounts 10] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import msgspec
import nats
import uvloop
from hop import limits_config  # bench/ is on sys.path when a bench runs
from machine import describe  # bench/ is on sys.path when a bench runs
from nats.aio.msg import Msg
from servers import nats_server  # bench/ is on sys.path when a bench runs

from router.routing import AlwaysHealthy, select
from schemas import decode_request
from workers import limits
from workers.budget import Budgets
from workers.publish import now_ms
from workers.ratelimits import RateLimiter
from workers.runtime import configure_logging, ensure_topology


async def main(n: int, accounts: int, rounds: int) -> None:
    cfg = limits_config(1_000_000, 1_000_000)
    with nats_server() as url:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            await ensure_topology(js, cfg)
            rates = await RateLimiter.open(js)
            budgets = await Budgets.open(js, "llm")
            tag = uuid.uuid4().hex[:6]
            published = now_ms()
            reqs = []
            for i in range(n):
                body = msgspec.json.encode({"id": f"r{i}", "account": f"a{tag}{i % accounts}",
                                            "reply_to": "_INBOX.bench", "max_tokens": 100,
                                            "messages": [{"role": "user", "content": "Write a haiku about queues"}]})
                reqs.append(decode_request(body, use_case="draft", account=f"a{tag}{i % accounts}"))
            sels = [select(cfg, r, AlwaysHealthy(), now_ms=published) for r in reqs[:accounts]]
            # Each account's first request: a lease and both slices taken (awaited), then every one in turn.
            for k in range(accounts):
                ts = int(time.time() * 1e9)
                msg = Msg(nc, subject="llm.req.draft.x", reply=f"$JS.ACK.LLM_REQ.dispatch.1.{k + 1}.{k + 1}.{ts}.0")
                first = decode_request(msgspec.json.encode({"id": f"w{k}", "account": reqs[k].account,
                                                            "reply_to": "_INBOX.bench",
                                                           "max_tokens": 100,
                                                           "messages": [{"role": "user", "content": "warm"}]}),
                                       use_case="draft", account=reqs[k].account)
                await limits.admit(rates, budgets, cfg, first, msg, published, sels[k], None)
            await rates.quiet()
            ts = int(time.time() * 1e9)
            msg = Msg(nc, subject="llm.req.draft.x", reply=f"$JS.ACK.LLM_REQ.dispatch.1.9.9.{ts}.0")
            best = float("inf")
            local = rates.local
            for r in range(rounds + 1):  # the first round grows the leases and slices to the loop's pace
                t0 = time.perf_counter()
                for i, req in enumerate(reqs):
                    await limits.admit(rates, budgets, cfg, req, msg, published, sels[i % accounts], None)
                    if i % 1000 == 999:
                        await asyncio.sleep(0)  # (a dispatcher yields between requests: refills taken ahead run)
                if r == 0:
                    local = rates.local
                else:
                    best = min(best, (time.perf_counter() - t0) / n * 1e6)
                budgets._held.clear()  # (the next round reserves again rather than finding its reservations)
                await rates.quiet()
            print(f"limits.admit, lease and slices in hand: {best:.2f} µs a request (best of {rounds} rounds of {n:,},"
                  f" {accounts} accounts; {(rates.local - local) / (rounds * n):.1%} admitted from a lease)")
            await budgets.stop()
            await rates.close()
        finally:
            await nc.close()
    print(describe())


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--accounts", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    configure_logging("error")
    uvloop.run(main(a.n, a.accounts, a.rounds))
