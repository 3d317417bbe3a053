"""Test helpers: publishing a request the way any producer would, with plain nats-py."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, NamedTuple

import asyncpg
import msgspec
import pytest
from nats.aio.client import Client as NATS

from schemas import Done, Error, Reply, decode_reply


async def ask_raw(
    nc: NATS, body: dict[str, Any] | bytes, *, subject: str = "llm.req.draft.acme", inbox: str | None = None,
    msg_id: str | None = None, timeout: float = 10.0,
) -> list[Reply]:
    """Publish a request through JetStream and collect its replies until `done` or `error`."""
    inbox = inbox or (body.get("reply_to") if isinstance(body, dict) else None) or f"_INBOX.t{uuid.uuid4().hex}"
    replies: list[Reply] = []
    finished = asyncio.Event()

    async def on_msg(msg: Any) -> None:
        reply = decode_reply(msg.data)
        replies.append(reply)
        if isinstance(reply, Done | Error):
            finished.set()

    sub = await nc.subscribe(inbox, cb=on_msg)
    data = body if isinstance(body, bytes) else msgspec.json.encode({**body, "reply_to": inbox})
    headers = {"Nats-Msg-Id": msg_id} if msg_id else None
    await nc.jetstream().publish(subject, data, headers=headers)
    try:
        await asyncio.wait_for(finished.wait(), timeout)
    finally:
        await sub.unsubscribe()
    return replies


def request(text: str = "Write a haiku about queues", **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "v": 1,
        "id": fields.pop("id", None) or uuid.uuid4().hex,
        "account": "acme",
        "messages": [{"role": "user", "content": text}],
    }
    body.update(fields)
    return body


async def audit_row(db: asyncpg.Pool, request_id: str, timeout: float = 10.0) -> asyncpg.Record:
    """Wait for the auditor to write the request's row."""
    end = asyncio.get_running_loop().time() + timeout
    while True:
        row = await db.fetchrow("SELECT * FROM llm_audit WHERE request_id = $1", request_id)
        if row is not None:
            return row
        if asyncio.get_running_loop().time() > end:
            raise AssertionError(f"no audit row for {request_id} after {timeout} s")
        await asyncio.sleep(0.05)


async def dlq_messages(nc: NATS, stage: str, *, expect: int = 1, timeout: float = 5.0) -> list[Any]:
    """Read the DLQ copies on `llm.dlq.<stage>` (an ordered consumer from the start)."""
    js = nc.jetstream()
    sub = await js.subscribe(f"llm.dlq.{stage}", ordered_consumer=True)
    out: list[Any] = []
    try:
        while len(out) < expect:
            out.append(await sub.next_msg(timeout=timeout))
    finally:
        await sub.unsubscribe()
    return out


class Result(NamedTuple):
    """What a `switchyard` command printed and returned."""

    code: int
    out: str
    err: str


async def switchyard(capsys: pytest.CaptureFixture[str], *args: str) -> Result:
    """`switchyard ARGS` in this process (on a thread: the command runs its own event loop)."""
    from workers.cli import main

    def call() -> int:
        try:
            main(list(args))
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1
        return 0

    capsys.readouterr()  # what this process logged before, not the command's output
    code = await asyncio.to_thread(call)
    out, err = capsys.readouterr()
    return Result(code, out, err)
