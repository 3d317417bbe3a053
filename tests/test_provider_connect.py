"""A provider that cannot be reached: the error says whether nothing listened or nothing answered.

Over the transport the workers use (httpx-aiohttp), which reports a refused connection as
httpx.ConnectTimeout, and over httpx's own, which reports it as httpx.ConnectError.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from httpx_aiohttp import AiohttpTransport

from router.errors import ErrorCode, ProviderFailure
from router.providers import openai as adapter
from router.providers.base import run

from .adapters import KEY, request, user


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def unanswered_port() -> Iterator[int]:
    """A port whose listen queue is full and never accepted from: a connect there waits, unanswered."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = int(server.getsockname()[1])
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        fillers.append(c)
    try:
        yield port
    finally:
        for c in fillers:
            c.close()
        server.close()


@pytest.fixture(params=["aiohttp", "httpx"])
async def http(request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    transport = AiohttpTransport() if request.param == "aiohttp" else None
    async with httpx.AsyncClient(transport=transport) as client:
        yield client


async def failure(http: httpx.AsyncClient, port: int, *, stream: bool = False) -> ProviderFailure:
    call = adapter.build(
        request(user("hi"), stream=stream), model="gpt-4o-mini", base_url=f"http://127.0.0.1:{port}/v1",
        api_key=KEY, headers={},
    )
    timeout = httpx.Timeout(connect=0.5, read=5, write=2, pool=2)
    with pytest.raises(ProviderFailure) as caught:
        async for _ in run(http, adapter, call, stream=stream, timeout=timeout):
            pass
    return caught.value


@pytest.mark.parametrize("stream", [False, True])
async def test_a_refused_connection_says_so(http: httpx.AsyncClient, stream: bool) -> None:
    err = await failure(http, closed_port(), stream=stream)
    assert err.message == "could not reach the provider (connection refused)"
    assert err.code is ErrorCode.PROVIDER_ERROR and err.retryable


async def test_a_connect_that_gets_no_answer_says_it_timed_out(http: httpx.AsyncClient, unanswered_port: int) -> None:
    err = await failure(http, unanswered_port)
    assert err.message == "could not reach the provider (timed out connecting)"
    assert err.retryable
