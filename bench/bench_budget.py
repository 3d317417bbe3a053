"""What the budget checks add to a request: the dispatcher's reservation and the worker's settlement.

Started here, in a temporary directory that is removed at the end: the `nats-server` binary beside
sys.executable, with JetStream, on a free port. In this process, under uvloop, on one connection as a
dispatcher and another as a worker, for requests of one account priced by the config:

- paced: --rate requests/s for --duration seconds, each one `Budgets.reserve` (on the request's path:
  the dispatcher awaits it before forwarding) then `Budgets.settle` (off the path: it runs alongside
  the terminal reply); p50/p99 of each;
- saturated: --concurrency requests in flight, reserve then settle, for --duration seconds: requests/s
  and the CPU this process spent per request (both roles' client side; nats-server's apart).

    .venv/bin/python bench/bench_budget.py [--duration 5] [--rate 100] [--concurrency 64]

The markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import msgspec
import nats
import uvloop
from nats.aio.client import Client as NATS

from router import config as config_mod
from router.config import Config
from router.routing import Selection, Source
from schemas import Request, Target, WorkItem
from workers.budget import Budgets
from workers.publish import now_ms
from workers.runtime import ensure_topology

CHAIN = [Target(pool="fake", model="metered")]


def _config() -> Config:
    return config_mod.from_mapping({
        "providers": {"fake": {"format": "openai", "base_url": "http://127.0.0.1:9/v1"}},
        "pools": {"fake": {"provider": "fake"}},
        "models": {"metered": {"input_usd_per_mtok": 1.0, "output_usd_per_mtok": 2.0}},
        "routes": {"draft": {"default": ["fake:metered"]}},
        "limits": {"default": {"budget": {"daily_usd": 1e9, "monthly_usd": 1e9}}},
    })


def _request() -> Request:
    return msgspec.convert({"id": uuid.uuid4().hex, "account": "acme", "use_case": "draft", "reply_to": "_INBOX.b",
                            "max_tokens": 200, "messages": [{"role": "user", "content": "hello " * 50}]}, Request)


async def _one(cfg: Config, d: Budgets, w: Budgets, reserve_ms: list[float], settle_ms: list[float]) -> None:
    req = _request()
    published = now_ms()
    t0 = time.perf_counter()
    selection = Selection(chain=CHAIN, skipped=[], source=Source.DEFAULT_ROUTE, prompt_tokens=75)
    reserved = await d.reserve(cfg, req, selection, published)
    t1 = time.perf_counter()
    w.settle(cfg, WorkItem(request=req, route=CHAIN, accepted_ms=published, reserved_usd=reserved), 0.0002,
             failed=False)
    t2 = time.perf_counter()
    reserve_ms.append((t1 - t0) * 1000)
    settle_ms.append((t2 - t1) * 1000)


def _pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


async def main(args: argparse.Namespace, port: int) -> None:
    await asyncio.sleep(0.5)
    cfg = _config()
    dnc, wnc = await nats.connect(f"nats://127.0.0.1:{port}"), await nats.connect(f"nats://127.0.0.1:{port}")
    await ensure_topology(dnc.jetstream(), cfg)
    d, w = await Budgets.open(dnc.jetstream(), "llm"), await Budgets.open(wnc.jetstream(), "llm")
    for _ in range(200):  # warm up
        await _one(cfg, d, w, [], [])
    reserve_ms: list[float] = []
    settle_ms: list[float] = []
    end = time.perf_counter() + args.duration
    pending: set[asyncio.Task[None]] = set()
    while time.perf_counter() < end:
        task = asyncio.create_task(_one(cfg, d, w, reserve_ms, settle_ms))
        pending.add(task)
        task.add_done_callback(pending.discard)
        await asyncio.sleep(1 / args.rate)
    await asyncio.gather(*pending)

    done = 0
    stop_at = time.perf_counter() + args.duration
    cpu0, t0 = time.process_time(), time.perf_counter()

    async def loop() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await _one(cfg, d, w, [], [])
            done += 1

    await asyncio.gather(*(loop() for _ in range(args.concurrency)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    print(f"| paced {args.rate}/s, reserve (on the path) | {len(reserve_ms)} | {_pct(reserve_ms, 50):.3f} |"
          f" {_pct(reserve_ms, 99):.3f} | |")
    print(f"| paced {args.rate}/s, settle (beside the reply) | {len(settle_ms)} | {_pct(settle_ms, 50):.3f} |"
          f" {_pct(settle_ms, 99):.3f} | |")
    print(f"| saturated, concurrency {args.concurrency}, reserve + settle | {done} | | |"
          f" {done / wall:,.0f}/s, {cpu / done * 1e6:.0f} µs CPU each |")
    await budgets_close(d, w, dnc, wnc)


async def budgets_close(d: Budgets, w: Budgets, *conns: NATS) -> None:
    await d.stop()
    await w.stop()
    for c in conns:
        await c.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--concurrency", type=int, default=64)
    os.environ.setdefault("SWITCHYARD_LOG_LEVEL", "warning")
    with tempfile.TemporaryDirectory() as tmp:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            free = sock.getsockname()[1]
        server = subprocess.Popen([str(Path(sys.executable).parent / "nats-server"), "-js", "-a", "127.0.0.1",
                                   "-p", str(free), "-sd", tmp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            uvloop.run(main(p.parse_args(), free))
        finally:
            server.terminate()
            server.wait(10)
