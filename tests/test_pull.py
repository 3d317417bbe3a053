"""The pull loop: every message handled once across replicas, never more than `limit` at once, drained on stop."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import nats
from nats.aio.msg import Msg
from nats.js import api

from workers.pull import serve_pull


async def _never(msg: Msg, reason: str) -> None:
    raise AssertionError(f"gave up on {msg.data!r}: {reason}")


NO_DLQ: dict[str, Any] = {"give_up": _never, "max_deliver": 5}


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
    replicas = [asyncio.create_task(serve_pull(c, "S", "c", handler(i), stop, limit=4, batch=3, **NO_DLQ))
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

    task = asyncio.create_task(serve_pull(nc, "S", "c", slow, stop, limit=2, **NO_DLQ))
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

    task = asyncio.create_task(serve_pull(nc, "S", "c", fragile, stop, limit=4, **NO_DLQ))
    await js.publish("s.x", b"boom")
    await js.publish("s.x", b"after")
    async with asyncio.timeout(5):
        while b"after" not in handled:
            await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, 10)
    await nc.close()


async def _stream(nats_url: str, ack_wait: float = 30) -> tuple[nats.NATS, Any]:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(api.StreamConfig(name="S", subjects=["s.>"], retention=api.RetentionPolicy.WORK_QUEUE))
    await js.add_consumer("S", api.ConsumerConfig(durable_name="c", ack_policy=api.AckPolicy.EXPLICIT,
                                                  ack_wait=ack_wait))
    return nc, js


async def test_a_message_whose_handler_always_fails_is_given_up_on_its_last_delivery(nats_url: str) -> None:
    nc, js = await _stream(nats_url)
    deliveries: list[int] = []
    given_up: list[tuple[bytes, str]] = []
    stop = asyncio.Event()

    async def broken(msg: Msg) -> None:
        deliveries.append(msg.metadata.num_delivered)
        raise RecursionError("deep")

    async def give_up(msg: Msg, reason: str) -> None:
        given_up.append((msg.data, reason))

    task = asyncio.create_task(serve_pull(nc, "S", "c", broken, stop, limit=4, give_up=give_up, max_deliver=3))
    await js.publish("s.x", b"poison")
    async with asyncio.timeout(15):
        while not given_up:
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.wait_for(task, 10)
    assert deliveries == [1, 2, 3]
    assert given_up == [(b"poison", "the handler failed (RecursionError) on delivery 3 of 3")]
    assert (await js.stream_info("S")).state.messages == 0  # terminated, not left in the work queue
    await nc.close()


async def test_a_message_that_never_finishes_is_given_up_before_it_is_handled_again(nats_url: str) -> None:
    # A handler that returns without acking stands for a process killed while handling: the
    # consumer delivers again after ack_wait, and past max_deliver the loop gives up unhandled.
    nc, js = await _stream(nats_url, ack_wait=1)
    deliveries: list[int] = []
    given_up: list[str] = []
    stop = asyncio.Event()

    async def vanishing(msg: Msg) -> None:
        deliveries.append(msg.metadata.num_delivered)

    async def give_up(msg: Msg, reason: str) -> None:
        given_up.append(reason)

    task = asyncio.create_task(serve_pull(nc, "S", "c", vanishing, stop, limit=4, give_up=give_up, max_deliver=2))
    await js.publish("s.x", b"killer")
    async with asyncio.timeout(20):
        while not given_up:
            await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 10)
    assert deliveries == [1, 2]
    assert given_up == ["delivered 3 times without being handled (the handler never finished)"]
    assert (await js.stream_info("S")).state.messages == 0
    await nc.close()
