"""The producer client: publish a request, read its replies.

One wildcard inbox per client, demultiplexed by request id::

    client = await Client.connect(nc)
    done = await client.complete("draft", "acme", [Message(role="user", content="Hi")])
    async for text in client.stream("draft", "acme", messages):
        print(text, end="")
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from schemas import Chunk, Done, Error, Message, Reply, Request, decode_reply, encode
from schemas.limits import id_problem

from .errors import ErrorCode, SwitchyardError

__all__ = ["Client", "Message", "Stream", "SwitchyardError", "new_request_id"]

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_TRACE_CONTEXT = TraceContextTextMapPropagator()


def new_request_id() -> str:
    """A ULID: 48 bits of milliseconds then 80 random bits, Crockford base32 (sortable by time)."""
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")


def _name_problem(what: str, name: str) -> str | None:
    if _NAME.fullmatch(name):
        return None
    return f"{what} {name[:140]!r} is not 1-128 characters from A-Z a-z 0-9 _ -"


class Stream:
    """The replies of one streaming request. Iterate for text; `done` is set at the end."""

    def __init__(self, client: Client, request: Request) -> None:
        self._client = client
        self.request = request
        self.done: Done | None = None
        self._queue: asyncio.Queue[Reply] = asyncio.Queue()
        self._next = 0

    def __aiter__(self) -> AsyncIterator[str]:
        return self._texts()

    async def _texts(self) -> AsyncIterator[str]:
        try:
            await self._client._publish(self.request)
            deadline = self.request.timeout_ms / 1000 + self._client.grace_s
            while True:
                try:
                    async with asyncio.timeout(deadline):
                        reply = await self._queue.get()
                except TimeoutError:
                    raise SwitchyardError(
                        ErrorCode.TIMEOUT, f"no reply from the fleet within {deadline:.0f} s"
                    ) from None
                if isinstance(reply, Error):
                    # Terminal whatever its seq: after a lost worker it says only how far the fleet knows
                    # the stream got, which may be short of what arrived.
                    raise SwitchyardError.from_reply(reply)
                if reply.seq < self._next:
                    continue  # a duplicate after a redelivery
                if reply.seq > self._next:
                    raise SwitchyardError(
                        ErrorCode.INTERNAL, f"reply stream has a gap: expected seq {self._next}, got {reply.seq}"
                    )
                self._next += 1
                match reply:
                    case Chunk(text=text):
                        yield text
                    case Done() as done:
                        self.done = done
                        return
                    case Error() as err:
                        raise SwitchyardError.from_reply(err)
        finally:
            self._client._pending.pop(self.request.id, None)


class Client:
    """Publishes requests on `<prefix>.req.<use_case>.<account>` and reads their replies."""

    def __init__(self, nc: NATS, *, prefix: str = "llm", grace_s: float = 5.0) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.prefix = prefix
        self.grace_s = grace_s
        # The connection's inbox prefix: with NATS credentials, a producer may read only its own
        # (`_INBOX.<account>`, see deploy/nats/).
        self._inbox = nc.new_inbox()
        self._pending: dict[str, Stream] = {}
        self._sub: Subscription | None = None

    @classmethod
    async def connect(cls, nc: NATS, *, prefix: str = "llm") -> Client:
        client = cls(nc, prefix=prefix)
        client._sub = await nc.subscribe(f"{client._inbox}.*", cb=client._on_reply)
        return client

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def _on_reply(self, msg: Msg) -> None:
        rid = msg.subject.rsplit(".", 1)[-1]
        stream = self._pending.get(rid)
        if stream is None or not msg.data:
            return
        try:
            reply = decode_reply(msg.data)
        except ValueError:
            return
        stream._queue.put_nowait(reply)

    def request(
        self,
        use_case: str,
        account: str,
        messages: Sequence[Message],
        *,
        stream: bool,
        **fields: Any,
    ) -> Request:
        rid = fields.pop("id", None) or new_request_id()
        # Checked here as the dispatcher would: a refusal could not reach this client's inbox
        # (the id is the inbox's last token), so it would only wait for its timeout.
        problem = id_problem(rid) or _name_problem("use case", use_case) or _name_problem("account", account)
        if problem:
            raise SwitchyardError(ErrorCode.INVALID_REQUEST, f"invalid request: {problem}")
        return Request(
            id=rid,
            use_case=use_case,
            account=account,
            messages=list(messages),
            stream=stream,
            reply_to=f"{self._inbox}.{rid}",
            **fields,
        )

    async def _publish(self, req: Request) -> None:
        if self._sub is None:
            raise RuntimeError("Client is not connected: use `await Client.connect(nc)`")
        # Deduplication scoped by account: another account's request with the same id is not a duplicate.
        headers = {"Nats-Msg-Id": f"{req.account}:{req.id}"}
        # The caller's current OpenTelemetry span, if any, becomes the parent of the fleet's spans for this request.
        if trace.get_current_span().get_span_context().is_valid:
            _TRACE_CONTEXT.inject(headers)
        await self.js.publish(f"{self.prefix}.req.{req.use_case}.{req.account}", encode(req), headers=headers)

    def stream(self, use_case: str, account: str, messages: Sequence[Message], **fields: Any) -> Stream:
        """Start a streaming request; iterate the result for text. Raises SwitchyardError on an `error`."""
        s = Stream(self, self.request(use_case, account, messages, stream=True, **fields))
        self._pending[s.request.id] = s
        return s

    async def complete(self, use_case: str, account: str, messages: Sequence[Message], **fields: Any) -> Done:
        """Send a request and wait for its `done`. Raises SwitchyardError carrying the error code."""
        s = Stream(self, self.request(use_case, account, messages, stream=False, **fields))
        self._pending[s.request.id] = s
        async for _ in s:
            pass
        assert s.done is not None
        return s.done
