"""The one pull loop every consumer of a work queue runs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg
from nats.js import JetStreamContext


async def serve_pull(
    sub: JetStreamContext.PullSubscription,
    handle: Callable[[Msg], Awaitable[None]],
    stop: asyncio.Event,
    *,
    limit: int,
    batch: int = 32,
) -> None:
    """Run `handle` on each message, at most `limit` at once, until `stop` is set; then drain.

    Fetches only as many messages as there are free slots, so no message waits in this
    process while another replica is idle. `handle` is the caller's error boundary.
    """
    slots = asyncio.Semaphore(limit)

    async def guarded(msg: Msg) -> None:
        try:
            await handle(msg)
        finally:
            slots.release()

    async with asyncio.TaskGroup() as tg:
        while not stop.is_set():
            await slots.acquire()
            if stop.is_set():
                slots.release()
                break
            free = 1
            while free < batch and not slots.locked():
                await slots.acquire()
                free += 1
            try:
                msgs = await sub.fetch(free, timeout=1)
            except TimeoutError:  # nats' own TimeoutError derives from it
                msgs = []
            for _ in range(free - len(msgs)):
                slots.release()
            for msg in msgs:
                tg.create_task(guarded(msg))
    await sub.unsubscribe()
