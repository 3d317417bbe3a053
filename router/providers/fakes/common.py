"""What every fake provider shares: scenarios, their selection, the answer text, the HTTP server.

A fake is a real local HTTP server speaking one provider's wire format. Each request
follows a Scenario: picked by name with a `[[fake:NAME]]` marker anywhere in the
request's text or an `x-fake-scenario` header, else the server's default.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web
from msgspec import Struct, field

MARKER = re.compile(r"\[\[fake:([A-Za-z0-9_-]+)\]\]")


class FakeToolCall(Struct, kw_only=True):
    name: str
    arguments: dict[str, Any] = {}
    id: str | None = None


class Scenario(Struct, kw_only=True):
    text: str | None = None
    """The answer; None makes one up from the prompt."""
    ttft_ms: int = 0
    """Delay before the first byte of the answer."""
    chunk_ms: int = 0
    """Delay between streamed chunks."""
    words_per_chunk: int = 2
    status: int | None = None
    """Answer with this HTTP error status instead (body from `error_body`, or the format's own)."""
    error_body: dict[str, Any] | None = None
    headers: dict[str, str] = {}
    disconnect_after: int | None = None
    """Drop the connection after this many streamed text chunks."""
    malformed_after: int | None = None
    """Send a malformed event after this many streamed text chunks."""
    truncate_after: int | None = None
    """End the stream cleanly after this many text chunks, without the terminal event."""
    tool_calls: list[FakeToolCall] = []
    finish_reason: str | None = None
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    fail_times: int | None = None
    """Apply `status` only to the first N requests that pick this scenario, then answer normally."""
    hits: int = field(default=0)


BUILTIN: dict[str, Scenario] = {
    "rate_limited": Scenario(status=429, headers={"retry-after": "1"}),
    "rate_limited_ms": Scenario(status=429, headers={"retry-after-ms": "250"}),
    "server_error": Scenario(status=500),
    "overloaded": Scenario(status=529),
    "unauthorized": Scenario(status=401),
    "forbidden": Scenario(status=403),
    "disconnect": Scenario(disconnect_after=2, words_per_chunk=1),
    "malformed": Scenario(malformed_after=2, words_per_chunk=1),
    "truncated": Scenario(truncate_after=2, words_per_chunk=1),
    "slow": Scenario(ttft_ms=300, chunk_ms=50),
    "cached": Scenario(cache_read_tokens=8, reasoning_tokens=3),
    "weather_tool": Scenario(tool_calls=[FakeToolCall(name="get_weather", arguments={"city": "Paris"})]),
    # A wait longer than any pool's retry.max_ms: the fleet moves on to the next target instead of waiting.
    "retry_after_40s": Scenario(status=429, headers={"retry-after": "40"}),
    # OpenAI's words for an account out of credit, which the Gemini adapter reads as such too (Anthropic's
    # own is its fake's `credit_exhausted`): the provider is skipped for its credit cool-down.
    "insufficient_quota": Scenario(status=429, error_body={"error": {
        "message": "You exceeded your current quota, please check your plan and billing details.",
        "type": "insufficient_quota", "param": None, "code": "insufficient_quota",
    }}),
}


def texts_in(body: object) -> list[str]:
    """Every string found in a JSON body, for scenario markers and the made-up answer."""
    out: list[str] = []

    def walk(x: object) -> None:
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(body)
    return out


def made_up_answer(prompt: str) -> str:
    """A plausible, deterministic answer for a prompt, so demos look alive offline."""
    topic = MARKER.sub("", prompt).strip().rstrip("?.!") or "your request"
    if len(topic) > 80:
        topic = topic[:77] + "..."
    return (
        f"Here is a short answer about {topic!r}. "
        "This reply comes from Switchyard's built-in demo provider, which streams text the way a real "
        "model would so that you can see the whole path work offline: your request went through the "
        "dispatcher, a provider worker pool and back to you, and its completion was written to the audit "
        "table. Set a provider key (for example OPENAI_API_KEY) to route to a real model."
    )


def chunks_of(text: str, words_per_chunk: int) -> list[str]:
    words = re.findall(r"\S+\s*", text)
    n = max(1, words_per_chunk)
    return ["".join(words[i : i + n]) for i in range(0, len(words), n)] or [""]


def count_tokens(text: str) -> int:
    return max(1, len(text) // 4)


class FakeServer:
    """Base of the fakes: an aiohttp app on 127.0.0.1, scenario registry, request log."""

    def __init__(self, default: Scenario | None = None) -> None:
        self.default = default or Scenario()
        self.scenarios: dict[str, Scenario] = {k: msgspec.structs.replace(v) for k, v in BUILTIN.items()}
        self.requests: list[dict[str, Any]] = []
        self.request_headers: list[dict[str, str]] = []
        self.listed: list[dict[str, str]] = []
        """The headers (names in lower case) of every models-list request; `requests` holds generation requests."""
        self._runner: web.AppRunner | None = None
        self.port = 0

    def routes(self) -> list[web.RouteDef]:
        raise NotImplementedError

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> str:
        app = web.Application()
        app.add_routes(self.routes())
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        # aiohttp has no public accessor for the port the OS picked for port 0.
        sockets = getattr(site._server, "sockets", None)
        assert sockets
        self.port = int(sockets[0].getsockname()[1])
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def pick(self, request: web.Request, body: object) -> Scenario:
        name = request.headers.get("x-fake-scenario")
        if name is None:
            for text in texts_in(body):
                m = MARKER.search(text)
                if m:
                    name = m.group(1)
                    break
        if name is None or name not in self.scenarios:
            return self.default
        sc = self.scenarios[name]
        sc.hits += 1
        if sc.fail_times is not None and sc.hits > sc.fail_times:
            return msgspec.structs.replace(sc, status=None, hits=0)
        return sc

    async def list_models(
        self, request: web.Request, answer: dict[str, Any], error_for: Callable[[int], dict[str, Any]]
    ) -> web.Response:
        """The models list `answer`, or the fault of the request's scenario (picked by `x-fake-scenario`: a
        GET has no prompt to carry a marker), with `error_for(status)` as the format's error body."""
        self.listed.append({k.lower(): v for k, v in request.headers.items()})
        sc = self.pick(request, None)
        await sleep_ms(sc.ttft_ms)
        if sc.status is not None:
            return web.json_response(sc.error_body or error_for(sc.status), status=sc.status, headers=sc.headers)
        return web.json_response(answer)

    async def read_json(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text='{"error": "body is not JSON"}') from None
        self.requests.append(body)
        self.request_headers.append(dict(request.headers))
        return body if isinstance(body, dict) else {}


async def sleep_ms(ms: int) -> None:
    if ms > 0:
        await asyncio.sleep(ms / 1000)


async def stream_sse(
    request: web.Request,
    sc: Scenario,
    pieces: list[str],
    event_for: Callable[[int, str], bytes],
    head: bytes,
    tail: Callable[[], bytes],
    malformed: bytes = b"data: {not json\n\n",
    prepare: Callable[[web.StreamResponse], Awaitable[None]] | None = None,
) -> web.StreamResponse:
    """Stream `pieces` as SSE with the scenario's pacing and faults."""
    resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
    await resp.prepare(request)
    if prepare is not None:
        await prepare(resp)
    await sleep_ms(sc.ttft_ms)
    if head:
        await resp.write(head)
    for i, piece in enumerate(pieces):
        if i:
            await sleep_ms(sc.chunk_ms)
        if sc.disconnect_after is not None and i >= sc.disconnect_after:
            assert request.transport is not None
            request.transport.abort()
            return resp
        if sc.malformed_after is not None and i >= sc.malformed_after:
            await resp.write(malformed)
            await resp.write_eof()
            return resp
        if sc.truncate_after is not None and i >= sc.truncate_after:
            await resp.write_eof()
            return resp
        await resp.write(event_for(i, piece))
    await resp.write(tail())
    await resp.write_eof()
    return resp


def sse(data: object, event: str | None = None) -> bytes:
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
