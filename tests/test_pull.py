"""The pull loop: every message handled once across replicas, never more than `limit` at once, drained on stop."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable

import nats
from nats.aio.msg import Msg
from nats.js import api

from workers.pull import serve_pull


async def test_two_replicas_share_the_work_within_their_limits(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(api.StreamConfig(name="S", subjects=["s.>"], retention=api.RetentionPolicy.WORK_QUEUE))
    await js.add_consumer("S", api.ConsumerConfig(durable_name="c", ack_policy=api.AckPolicy.EXPLICIT,
                                                  max_ack_pending=100, ack_wait=30))
    seen: Counter[str] = Counter()
    by_replica: Counter[int] = Counter()
    running = [0, 0]
    peak = [0, 0]
    stop = asyncio.Event()

    def handler(replica: int) -> Callable[[Msg], Awaitable[None]]:
        async def handle(msg: Msg) -> None:
            running[replica] += 1
            peak[replica] = max(peak[replica], running[replica])
            await asyncio.sleep(0.01)
            seen[msg.data.decode()] += 1
            by_replica[replica] += 1
            running[replica] -= 1
            await msg.ack()
        return handle

    conns = [await nats.connect(nats_url) for _ in range(2)]
    replicas = [asyncio.create_task(serve_pull(c, "S", "c", handler(i), stop, limit=4, batch=3))
                for i, c in enumerate(conns)]
    for i in range(200):
        await js.publish("s.x", str(i).encode())
    async with asyncio.timeout(20):
        while len(seen) < 200:
            await asyncio.sleep(0.02)
    stop.set()
    await asyncio.gather(*replicas)
    assert set(seen) == {str(i) for i in range(200)} and set(seen.values()) == {1}
    assert max(peak) <= 4  # the limit holds in each replica
    assert by_replica[0] > 0 and by_replica[1] > 0  # both took a share
    info = await js.consumer_info("S", "c")
    assert info.num_ack_pending == 0 and info.num_pending == 0
    for c in [*conns, nc]:
        await c.close()


async def test_stop_lets_running_handlers_finish(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(api.StreamConfig(name="S", subjects=["s.>"], retention=api.RetentionPolicy.WORK_QUEUE))
    await js.add_consumer("S", api.ConsumerConfig(durable_name="c", ack_policy=api.AckPolicy.EXPLICIT))
    started, finished = asyncio.Event(), []
    stop = asyncio.Event()

    async def slow(msg: Msg) -> None:
        started.set()
        await asyncio.sleep(0.5)
        await msg.ack()
        finished.append(msg.data)

    task = asyncio.create_task(serve_pull(nc, "S", "c", slow, stop, limit=2))
    await js.publish("s.x", b"one")
    await asyncio.wait_for(started.wait(), 5)
    stop.set()
    await asyncio.wait_for(task, 10)
    assert finished == [b"one"]
    await nc.close()


async def test_a_handler_that_raises_does_not_stop_the_loop(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(api.StreamConfig(name="S", subjects=["s.>"], retention=api.RetentionPolicy.WORK_QUEUE))
    await js.add_consumer("S", api.ConsumerConfig(durable_name="c", ack_policy=api.AckPolicy.EXPLICIT))
    handled: list[bytes] = []
    stop = asyncio.Event()

    async def fragile(msg: Msg) -> None:
        if msg.data == b"boom":
            raise RuntimeError("the handler's own error boundary failed")
        await msg.ack()
        handled.append(msg.data)

    task = asyncio.create_task(serve_pull(nc, "S", "c", fragile, stop, limit=4))
    await js.publish("s.x", b"boom")
    await js.publish("s.x", b"after")
    async with asyncio.timeout(5):
        while b"after" not in handled:
            await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, 10)
    await nc.close()
