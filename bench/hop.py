"""The dispatcher's hop, timed: requests published into LLM_REQ until their work item reaches `llm.work.openai`.

One `Dispatcher` runs in the bench process on a connection of its own, with the rate limiter and the budgets
the caller asks for; a second connection publishes the requests and watches the work items. No worker runs, so
reservations are never settled. Used by bench_limits.py and bench_rate_leases.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from router import config as config_mod
from schemas import decode_work
from workers.budget import Budgets
from workers.dispatcher import Dispatcher
from workers.publish import Publisher
from workers.ratelimits import RateLimiter
from workers.runtime import ensure_topology, settle_heap


def limits_config(per_second: float, burst: int) -> config_mod.Config:
    """One pool, one route, and every account limited to `per_second` with `burst` and $10⁹ a day and a month
    (a budget that never refuses: no worker settles in these benches)."""
    return config_mod.from_mapping({
        "providers": {"openai": {"format": "openai", "base_url": "http://127.0.0.1:9/v1"}},
        "pools": {"openai": {"provider": "openai", "concurrency": 64}},
        "routes": {"draft": {"default": ["openai:gpt-4o-mini"]}},
        "limits": {"default": {"rate": {"per_second": per_second, "burst": burst},
                               "budget": {"daily_usd": 1e9, "monthly_usd": 1e9}}},
    })


def pct(ms: list[float]) -> tuple[float, float]:
    """p50 and p99 of `ms`."""
    ms = sorted(ms)
    return ms[len(ms) // 2], ms[min(len(ms) - 1, int(len(ms) * 0.99))]


class Hop:
    """A running dispatcher and a producer that times its requests to their work items."""

    def __init__(self, js: JetStreamContext, rates: RateLimiter | None, budgets: Budgets | None) -> None:
        self.js = js
        """The producer's JetStream context (for stream info)."""
        self.rates = rates
        self.budgets = budgets
        self._sent: dict[str, float] = {}
        self._lat: list[float] = []
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self._send_nc: NATS | None = None

    async def on_work(self, msg: Msg) -> None:
        rid = decode_work(msg.data).request.id
        if rid in self._sent:
            self._lat.append((time.perf_counter() - self._sent.pop(rid)) * 1000)
            fut = self._waiters.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    async def send(self, account: str) -> asyncio.Future[None]:
        """Publish one request of `account`; the future is done when its work item is seen."""
        assert self._send_nc is not None
        rid = uuid.uuid4().hex
        body = msgspec.json.encode({"id": rid, "account": account, "reply_to": "_INBOX.bench", "max_tokens": 100,
                                    "messages": [{"role": "user", "content": "Write a haiku about queues"}]})
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[rid] = fut
        self._sent[rid] = time.perf_counter()
        await self._send_nc.publish(f"llm.req.draft.{account}", body)  # core publish: JetStream stores it
        return fut

    async def saturation(self, seconds: float, account: Callable[[int], str], in_flight: int = 64
                         ) -> tuple[int, float, list[float]]:
        """A closed loop of `in_flight` requests for `seconds`: (requests, requests/s, latencies in ms)."""
        self._lat = []
        count = 0
        end = time.perf_counter() + seconds

        async def closed(k: int) -> None:
            nonlocal count
            while time.perf_counter() < end:
                await asyncio.wait_for(await self.send(account(k * 7919 + count)), 10)
                count += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(closed(k) for k in range(in_flight)))
        return count, count / (time.perf_counter() - t0), self._lat

    async def paced(self, seconds: float, account: Callable[[int], str], per_second: int = 100
                    ) -> tuple[int, list[float]]:
        """An open loop at `per_second` for `seconds`: (requests, latencies in ms)."""
        self._lat = []
        futs = []
        t0 = time.perf_counter()
        n = int(per_second * seconds)
        for i in range(n):
            await asyncio.sleep(max(0.0, t0 + i / per_second - time.perf_counter()))
            futs.append(await self.send(account(i)))
        await asyncio.wait_for(asyncio.gather(*futs), 10)
        return n, self._lat


@asynccontextmanager
async def dispatcher_hop(url: str, cfg: config_mod.Config, *, rate: bool, budget: bool, settle: bool = True
                         ) -> AsyncIterator[Hop]:
    """A dispatcher with a rate limiter and/or budgets on a clean `LLM_WORK`, half a second after it started,
    with the process's heap settled as a dispatcher process settles its own (`settle_heap`; not with
    `settle=False`). On the way out it stops, and its budgets give back the slices they leased, as a
    dispatcher's do."""
    nc = await nats.connect(url)
    dnc = await nats.connect(url)
    stop = asyncio.Event()
    task: asyncio.Task[None] | None = None
    budgets: Budgets | None = None
    try:
        js = nc.jetstream()
        await ensure_topology(js, cfg)
        await js.purge_stream("LLM_WORK")
        djs = dnc.jetstream()
        rates = await RateLimiter.open(djs) if rate else None
        budgets = await Budgets.open(djs, "llm") if budget else None
        disp = Dispatcher(djs, Publisher(dnc, djs, "llm"), cfg, rates=rates, budgets=budgets)
        task = asyncio.create_task(disp.serve(stop))
        hop = Hop(js, rates, budgets)
        hop._send_nc = nc
        await nc.subscribe("llm.work.openai", cb=hop.on_work)
        await asyncio.sleep(0.5)
        if settle:
            settle_heap()
        yield hop
    finally:
        stop.set()
        if task is not None:
            await task
        if budgets is not None:
            await budgets.stop()
        await dnc.close()
        await nc.close()
