"""The one pull loop every consumer of a work queue runs.

nats-py's `fetch(n)` holds messages it already has while it waits for the rest of
its batch; with several replicas on one consumer that left messages waiting up to
the fetch timeout (bench/RESULTS.md). This loop keeps one pull request open at a
time, sized to the free handler slots, and hands each message to a handler the
moment it arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

log = structlog.get_logger("pull")

EXPIRES_S = 5.0
"""Life of one pull request; an idle consumer asks again this often."""
_GRACE_S = 1.0
"""How long after its expiry a request whose end-of-request status was lost still counts."""
_RETRY_S = 0.5
"""Pause before asking again after a pull request could not be sent."""
_NAK_DELAY_S = 1.0
"""Pause before a message whose handler failed is delivered again."""


class _Request:
    """The one open pull request: how many messages it may still bring, and until when."""

    def __init__(self) -> None:
        self.left = 0
        self.deadline = 0.0

    @property
    def open(self) -> bool:
        return self.left > 0 and time.monotonic() < self.deadline


GiveUp = Callable[[Msg, str], Awaitable[None]]
"""Copies a message the loop gives up on to the dead-letter queue, with the reason."""
Holds = Callable[[Msg], Awaitable[int]]
"""How many of a message's deliveries were holds (the handler naked it on purpose, to see it again
later), which do not count toward `max_deliver`."""


async def serve_pull(
    nc: NATS,
    stream: str,
    consumer: str,
    handle: Callable[[Msg], Awaitable[None]],
    stop: asyncio.Event,
    *,
    limit: int,
    give_up: GiveUp,
    max_deliver: int,
    batch: int = 64,
    api_prefix: str = "$JS.API",
    holds: Holds | None = None,
) -> None:
    """Run `handle` on each message of a durable pull consumer, at most `limit` at once, until
    `stop` is set; then let the running handlers finish.

    `handle` is the caller's error boundary; this loop is the last one. A handler that raises has
    its message redelivered after a pause; on its `max_deliver`-th delivery, or on any later one
    (the consumer itself sets no limit, so a message whose handling kills the process comes back
    too), the message is given up on: `give_up` copies it to the dead-letter queue and it is
    terminated. No message stays in the stream unhandled, and nothing a message does ends the loop.
    Deliveries that `holds` says were holds are not counted (asked only once the count matters).
    """
    next_subject = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
    inbox = nc.new_inbox()
    req = _Request()
    wake = asyncio.Event()
    busy = 0

    async def last_resort(msg: Msg, reason: str, *, final: bool) -> None:
        try:
            if final:
                await give_up(msg, reason)
                await msg.term()
            else:
                await msg.nak(delay=_NAK_DELAY_S)
        except Exception:
            # NATS itself is failing: the message is not acked, so JetStream delivers it again.
            log.exception("give_up_failed", subject=msg.subject, stream=stream, consumer=consumer)

    async with asyncio.TaskGroup() as tg:

        async def guarded(msg: Msg) -> None:
            nonlocal busy
            try:
                delivered = msg.metadata.num_delivered
                if holds is not None and delivered >= max_deliver:
                    try:
                        delivered -= await holds(msg)
                    except Exception:
                        # Whether it was held cannot be told now: look again later rather than give up on it.
                        log.exception("holds_unknown", subject=msg.subject, stream=stream, consumer=consumer)
                        await last_resort(msg, "", final=False)
                        return
                if delivered > max_deliver:
                    reason = f"delivered {delivered} times without being handled (the handler never finished)"
                    log.error("poison_message", subject=msg.subject, stream=stream, deliveries=delivered)
                    await last_resort(msg, reason, final=True)
                    return
                try:
                    await handle(msg)
                except Exception as exc:
                    log.exception("handler_failed", subject=msg.subject, stream=stream, consumer=consumer)
                    reason = f"the handler failed ({type(exc).__name__}) on delivery {delivered} of {max_deliver}"
                    await last_resort(msg, reason, final=delivered >= max_deliver)
            finally:
                busy -= 1
                if not req.open:
                    wake.set()

        async def on_msg(msg: Msg) -> None:
            nonlocal busy
            headers = msg.headers or {}
            status = headers.get("Status")
            if status is not None:
                if status != "100":  # 100 is a heartbeat; 404/408/409 end the request
                    if status not in ("404", "408"):
                        log.info("pull_request_ended", status=status, description=headers.get("Description"))
                    req.left = 0
                    wake.set()
                return
            req.left -= 1
            busy += 1
            tg.create_task(guarded(msg))
            if req.left <= 0:
                wake.set()

        sub = await nc.subscribe(inbox, cb=on_msg)
        try:
            while not stop.is_set():
                free = limit - busy
                if not req.open and free > 0:
                    req.left = min(free, batch)
                    req.deadline = time.monotonic() + EXPIRES_S + _GRACE_S
                    body = {"batch": req.left, "expires": int(EXPIRES_S * 1e9)}
                    try:
                        await nc.publish(next_subject, json.dumps(body).encode(), reply=inbox)
                    except Exception as exc:
                        if nc.is_closed:
                            raise  # closed for good: the process ends (exit 1) and is started again
                        # Reconnecting, or the buffer is full: ask again shortly rather than end the process.
                        log.warning("pull_request_failed", error=repr(exc), stream=stream, consumer=consumer)
                        req.left = 0
                        req.deadline = time.monotonic() + _RETRY_S
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(1.0, max(0.01, req.deadline - time.monotonic()))):
                        await wake.wait()
        finally:
            # Messages pulled but not yet handed over are not acked: JetStream redelivers them.
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
