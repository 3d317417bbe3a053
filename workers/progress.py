"""How far each stream got, in a KV bucket, so a redelivered work item knows what a lost worker sent.

A worker marks a stream as started before its first chunk goes out (an awaited write),
records the next seq as it streams (at most every PROGRESS_EVERY_S, without waiting
for an acknowledgement) and marks it done after its `done`. When JetStream hands the
work item to another worker because the first was lost, that worker ends a started
stream with an `error` instead of streaming a second, different answer.
"""

from __future__ import annotations

import hashlib
import time
from typing import Literal

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


async def ensure_bucket(js: JetStreamContext) -> KeyValue:
    try:
        return await js.key_value(BUCKET)
    except BucketNotFoundError:
        return await js.create_key_value(
            js_api.KeyValueConfig(bucket=BUCKET, ttl=TTL_S, history=1, storage=js_api.StorageType.FILE)
        )


def _key(request_id: str) -> str:
    # Request ids may hold characters a KV key may not.
    return hashlib.sha256(request_id.encode()).hexdigest()[:40]


class Progress:
    def __init__(self, nc: NATS, kv: KeyValue) -> None:
        self.nc = nc
        self.kv = kv
        self._last: dict[str, float] = {}

    async def started(self, request_id: str) -> None:
        """Before chunk 0 is published: durable, so a lost worker's stream is always known."""
        await self.kv.put(_key(request_id), b"0")
        self._last[request_id] = time.monotonic()

    async def sent(self, request_id: str, next_seq: int) -> None:
        """After a chunk went out; cheap (no round trip) and throttled, so a lower bound."""
        now = time.monotonic()
        if now - self._last.get(request_id, 0.0) >= PROGRESS_EVERY_S:
            self._last[request_id] = now
            await self.nc.publish(f"$KV.{BUCKET}.{_key(request_id)}", str(next_seq).encode())

    async def finished(self, request_id: str) -> None:
        """After the terminal reply was published, before the work item is acked."""
        self._last.pop(request_id, None)
        await self.nc.publish(f"$KV.{BUCKET}.{_key(request_id)}", DONE)

    async def lookup(self, request_id: str) -> int | Literal["done"] | None:
        """None: nothing was streamed; "done": the terminal reply went out; n: at least n chunks went out."""
        try:
            entry = await self.kv.get(_key(request_id))
        except KeyNotFoundError:
            return None
        value = entry.value or b""
        if value == DONE:
            return "done"
        try:
            return int(value)
        except ValueError:
            return 0
