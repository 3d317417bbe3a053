"""The pull loop of the dispatcher and the workers, against nats-py's `fetch()`, with 1-3 replicas.

One work-queue stream and one durable consumer on a fresh nats-server; C producers in a closed
loop publish through JetStream and wait until a replica has handled (acked) their message;
each replica is its own NATS connection in this process (uvloop). Measures messages/s and the
publish-to-handled latency. `fetch` is nats-py's `sub.fetch(batch, timeout=1)` loop (what the
fleet used before); `serve_pull` is workers/pull.py.

    .venv/bin/python bench/bench_pull.py [--duration 4] [--cases 1x4,2x4,2x16,2x64,3x16]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable

import nats
import uvloop
from nats.aio.msg import Msg
from nats.js import api
from servers import start_nats  # bench/ is on sys.path when a bench runs

from workers.pull import serve_pull


async def _fetch_loop(nc: nats.NATS, handle: Callable[[Msg], Awaitable[None]], stop: asyncio.Event,
                      batch: int) -> None:
    sub = await nc.jetstream().pull_subscribe_bind("c", "S")
    while not stop.is_set():
        try:
            msgs = await sub.fetch(batch, timeout=1)
        except TimeoutError:
            continue
        for m in msgs:
            await handle(m)



async def run(url: str, loop_kind: str, replicas: int, conc: int, duration: float) -> str:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(api.StreamConfig(name="S", subjects=["s.>"], retention=api.RetentionPolicy.WORK_QUEUE))
    await js.add_consumer("S", api.ConsumerConfig(durable_name="c", ack_policy=api.AckPolicy.EXPLICIT,
                                                  max_ack_pending=256, max_waiting=512))
    waiters: dict[str, asyncio.Future[float]] = {}
    stop = asyncio.Event()

    async def handle(m: Msg) -> None:
        await m.ack()
        f = waiters.pop(m.data.decode(), None)
        if f is not None:
            f.set_result(time.perf_counter())

    async def give_up(m: Msg, reason: str) -> None:
        raise RuntimeError(f"the bench's handler never fails: {reason}")

    conns = [await nats.connect(url) for _ in range(replicas)]
    if loop_kind == "serve_pull":
        tasks = [asyncio.create_task(serve_pull(c, "S", "c", handle, stop, limit=256, give_up=give_up, max_deliver=5))
                 for c in conns]
    else:
        tasks = [asyncio.create_task(_fetch_loop(c, handle, stop, 32)) for c in conns]
    await asyncio.sleep(0.3)
    lat: list[float] = []
    end = time.perf_counter() + duration

    async def producer(i: int) -> None:
        k = 0
        while time.perf_counter() < end:
            key = f"{i}-{k}"
            k += 1
            fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
            waiters[key] = fut
            t = time.perf_counter()
            await js.publish("s.x", key.encode())
            lat.append(await fut - t)

    await asyncio.gather(*(producer(i) for i in range(conc)))
    stop.set()
    await asyncio.gather(*tasks)
    for c in [*conns, nc]:
        await c.close()
    lat.sort()
    slow = sum(x > 0.5 for x in lat)
    return (f"| {loop_kind} | {replicas} | {conc} | {len(lat) / duration:,.0f} | {lat[len(lat) // 2] * 1000:.2f} "
            f"| {lat[int(len(lat) * 0.99)] * 1000:.1f} | {lat[-1] * 1000:.0f} | {slow} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--cases", default="1x4,2x4,2x16,2x64,3x16", help="replicas x producers, comma-separated")
    args = p.parse_args()
    print("| loop | replicas | producers | msgs/s | p50 ms | p99 ms | max ms | over 500 ms |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    for case in args.cases.split(","):
        replicas, conc = (int(x) for x in case.split("x"))
        for kind in ("fetch", "serve_pull"):
            url, proc = start_nats()  # a fresh server (and stream) per cell
            try:
                print(uvloop.run(run(url, kind, replicas, conc, args.duration)), flush=True)
            finally:
                proc.terminate()
                proc.wait()


if __name__ == "__main__":
    main()
