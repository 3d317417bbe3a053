"""How far each stream got, in a KV bucket, so a redelivered work item knows what a lost worker sent.

A worker marks a stream as started before its first chunk goes out (an awaited write),
records the next seq as it streams (at most every PROGRESS_EVERY_S, without waiting
for an acknowledgement) and marks it done after its terminal reply. When JetStream hands
the work item to another worker because the first was lost, that worker ends a started
stream with an `error` instead of streaming a second, different answer, and does not call
the provider again for a request that was already answered (streamed or not).

A dispatcher keeps here, before it goes out, a refusal that a redelivery of the same request message
might not give again (rate, budget, route): the redelivery answers the same, and never forwards a
request already refused.
"""

from __future__ import annotations

import hashlib
import time
from typing import NamedTuple

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue

BUCKET = "llm_streams"
TTL_S = 2 * 3600.0
"""Longer than the longest request (timeout_ms is at most one hour)."""
PROGRESS_EVERY_S = 0.25
DONE = b"done"
EVENT = b"event:"


async def ensure_bucket(js: JetStreamContext) -> KeyValue:
    try:
        return await js.key_value(BUCKET)
    except BucketNotFoundError:
        return await js.create_key_value(
            js_api.KeyValueConfig(bucket=BUCKET, ttl=TTL_S, history=1, storage=js_api.StorageType.FILE)
        )


def _key(account: str, request_id: str) -> str:
    # Request ids may hold characters a KV key may not; two accounts may use the same id.
    return hashlib.sha256(f"{account}:{request_id}".encode()).hexdigest()[:40]


class Finished(NamedTuple):
    """The terminal reply went out. `event` is the completion event when it was kept here because
    publishing it failed, so a redelivery can publish it without calling the provider again."""

    event: bytes | None = None


class Progress:
    def __init__(self, nc: NATS, kv: KeyValue) -> None:
        self.nc = nc
        self.kv = kv
        self._last: dict[str, float] = {}

    async def started(self, account: str, request_id: str) -> None:
        """Before chunk 0 is published: durable, so a lost worker's stream is always known."""
        key = _key(account, request_id)
        await self.kv.put(key, b"0")
        self._last[key] = time.monotonic()

    async def sent(self, account: str, request_id: str, next_seq: int) -> None:
        """After a chunk went out; cheap (no round trip) and throttled, so a lower bound."""
        key = _key(account, request_id)
        now = time.monotonic()
        if now - self._last.get(key, 0.0) >= PROGRESS_EVERY_S:
            self._last[key] = now
            await self.nc.publish(f"$KV.{BUCKET}.{key}", str(next_seq).encode())

    async def finished(self, account: str, request_id: str) -> None:
        """After the terminal reply was published (streamed or not), before the work item is acked."""
        key = _key(account, request_id)
        self._last.pop(key, None)
        await self.nc.publish(f"$KV.{BUCKET}.{key}", DONE)

    async def keep_event(self, account: str, request_id: str, event: bytes) -> None:
        """The terminal reply went out but its completion event could not be published: keep the
        event (awaited) for the redelivery that publishes it."""
        await self.kv.put(_key(account, request_id), EVENT + event)

    async def lookup(self, account: str, request_id: str) -> int | Finished | None:
        """None: nothing went out; Finished: the terminal reply went out; n: at least n chunks went out."""
        try:
            entry = await self.kv.get(_key(account, request_id))
        except KeyNotFoundError:
            return None
        value = entry.value or b""
        if value == DONE:
            return Finished()
        if value.startswith(EVENT):
            return Finished(value[len(EVENT):])
        try:
            return int(value)
        except ValueError:
            return 0

    async def refusing(self, stream_seq: int, reply: bytes) -> None:
        """Before a dispatcher's refusal of the request message `stream_seq` (of LLM_REQ) goes out, awaited: the
        refusal (an encoded `error` reply) that a redelivery of that message gives again, rather than deciding
        anew (a rate or a budget may admit it by then, and the producer would get a second terminal reply)."""
        await self.kv.put(f"refused.{stream_seq}", reply)

    async def refusal(self, stream_seq: int) -> bytes | None:
        """The refusal `refusing` kept for the request message `stream_seq`, None when there is none."""
        try:
            entry = await self.kv.get(f"refused.{stream_seq}")
        except KeyNotFoundError:
            return None
        return entry.value or None

    async def count_hold(self, stream_seq: int) -> None:
        """A work item goes back to the queue to wait for its provider: one more delivery that is not a
        failure (the pull loop asks `holds` before it gives up on an item)."""
        key = f"hold.{stream_seq}"
        await self.kv.put(key, str(await self.holds(stream_seq) + 1).encode())

    async def holds(self, stream_seq: int) -> int:
        try:
            entry = await self.kv.get(f"hold.{stream_seq}")
        except KeyNotFoundError:
            return 0
        try:
            return int(entry.value or b"0")
        except ValueError:
            return 0
