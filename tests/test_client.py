"""The producer client: complete, stream, typed errors, one wildcard inbox per client."""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.client import Client as NATS

from router.client import Client, Message, SwitchyardError, new_request_id
from router.errors import ErrorCode

from .conftest import Fleet

HELLO = [Message(role="user", content="Hello there")]


async def test_complete_returns_the_done(fleet: Fleet, nc: NATS) -> None:
    client = await Client.connect(nc)
    done = await client.complete("draft", "acme", HELLO, tier="pro", metadata={"job": "t"})
    assert done.provider == "openai" and "Hello there" in done.text
    await client.close()


async def test_stream_yields_text_then_sets_done(fleet: Fleet, nc: NATS) -> None:
    client = await Client.connect(nc)
    stream = client.stream("draft", "acme", HELLO)
    texts = [t async for t in stream]
    assert len(texts) > 3
    assert stream.done is not None and stream.done.text == "".join(texts)
    await client.close()


async def test_errors_raise_with_their_code(fleet: Fleet, nc: NATS) -> None:
    client = await Client.connect(nc)
    with pytest.raises(SwitchyardError) as info:
        await client.complete("no-such-use-case", "acme", HELLO)
    assert info.value.code is ErrorCode.NO_ROUTE and info.value.status == 404 and not info.value.retryable
    with pytest.raises(SwitchyardError) as info:
        async for _ in client.stream("draft", "acme", [Message(role="user", content="x [[fake:unauthorized]]")]):
            pass
    assert info.value.code is ErrorCode.UNAUTHORIZED
    await client.close()


async def test_many_concurrent_requests_share_one_inbox_subscription(fleet: Fleet, nc: NATS) -> None:
    client = await Client.connect(nc)
    await client.complete("draft", "acme", HELLO)  # JetStream's own response inbox appears on first publish
    before = len(nc._subs)
    dones = await asyncio.gather(*(client.complete("draft", "acme", [Message(role="user", content=f"q{i}")])
                                   for i in range(20)))
    assert [f"q{i}" in d.text for i in range(20) for d in [dones[i]]] == [True] * 20
    assert len(nc._subs) == before
    assert not client._pending
    await client.close()


def test_request_ids_are_sortable_ulids() -> None:
    a, b = new_request_id(), new_request_id()
    assert len(a) == 26 and a != b
    assert set(a) <= set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")


async def test_an_error_is_terminal_even_with_a_stale_seq(nc: NATS) -> None:
    # What a producer sees after a worker was lost mid-stream: the error's seq lags the chunks.
    from schemas import Chunk, Error, encode

    client = await Client.connect(nc)
    stream = client.stream("draft", "acme", HELLO)
    stream._client._publish = _no_publish  # type: ignore[method-assign]
    subject = stream.request.reply_to
    for reply in (Chunk(id=stream.request.id, seq=0, text="a"), Chunk(id=stream.request.id, seq=1, text="b"),
                  Error(id=stream.request.id, seq=1, code="PROVIDER_ERROR", status=502, message="lost",
                        retryable=True)):
        await nc.publish(subject, encode(reply))
    texts: list[str] = []
    with pytest.raises(SwitchyardError) as info:
        async for t in stream:
            texts.append(t)
    assert texts == ["a", "b"] and info.value.code is ErrorCode.PROVIDER_ERROR
    await client.close()


async def _no_publish(req: object) -> None:
    return None
