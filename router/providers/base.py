"""What every adapter produces, and the one driver that runs an adapter over httpx.

Adapters only translate: our request to the provider's HTTP body, the provider's
answer (whole or streamed) to events, the provider's errors to our codes.
Retry, breaker and fallback live outside them.
"""

from __future__ import annotations

import email.utils
import json
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol

import httpx
from msgspec import Struct

from schemas import Request, ToolCall, Usage

from ..config import Temperature
from ..errors import ErrorCode, ProviderFailure, StreamBroken
from .sse import SSEvent, iter_events


class TextDelta(Struct):
    text: str


class Finished(Struct, kw_only=True):
    """The terminal event of a call: everything the `done` reply needs from the provider."""

    finish_reason: str
    usage: Usage
    raw_usage: dict[str, object] | None = None
    tool_calls: list[ToolCall] = []
    model: str | None = None


Event = TextDelta | Finished

# One vocabulary of finish reasons across providers.
FINISH_REASONS = ("stop", "length", "tool_calls", "content_filter", "error")


class HttpCall(NamedTuple):
    url: str
    headers: dict[str, str]
    body: dict[str, object]


class StreamParser(Protocol):
    def feed(self, event: SSEvent) -> list[Event]:
        """Translate one SSE event; raise StreamBroken on a malformed or error event."""

    def close(self) -> list[Event]:
        """The stream ended: return the Finished event, or raise StreamBroken if it ended early."""


class Adapter(Protocol):
    format: str

    def build(
        self,
        req: Request,
        *,
        model: str,
        base_url: str,
        api_key: str | None,
        headers: Mapping[str, str],
        temperature_rule: Temperature | None = None,
    ) -> HttpCall: ...

    def parse_response(self, body: bytes) -> list[Event]: ...

    def stream_parser(self) -> StreamParser: ...

    def translate_error(self, status: int, headers: httpx.Headers, body: bytes) -> ProviderFailure: ...

    def probe(self, *, base_url: str, api_key: str | None, headers: Mapping[str, str]) -> HttpCall: ...


def retry_after_ms(headers: httpx.Headers, *, now: datetime | None = None) -> int | None:
    """Delay asked for by `retry-after-ms`, or `Retry-After` in seconds or as an HTTP date
    (RFC 9110: `Wed, 21 Oct 2015 07:28:00 GMT`), if any. A date in the past asks for no wait."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0, int(float(ms)))
        except (ValueError, OverflowError):
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0, int(float(value) * 1000))
    except (ValueError, OverflowError):
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # `-0000` parses as naive; HTTP dates are always UTC
        when = when.replace(tzinfo=UTC)
    wait = when - (now or datetime.now(UTC))
    return max(0, int(wait.total_seconds() * 1000))


def event_json(event: SSEvent) -> dict[str, Any]:
    """The JSON object a stream event carries. Raises StreamBroken when it is not one."""
    try:
        data = json.loads(event.data)
    except ValueError as exc:
        raise StreamBroken("the provider sent a malformed stream event") from exc
    if not isinstance(data, dict):
        raise StreamBroken("the provider sent a malformed stream event")
    return data


def error_body(body: bytes) -> dict[str, object]:
    """The provider's JSON error body, or {} when it is not JSON."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


async def run(
    http: httpx.AsyncClient,
    adapter: Adapter,
    call: HttpCall,
    *,
    stream: bool,
    timeout: httpx.Timeout,
) -> AsyncIterator[Event]:
    """Make the call and yield its events, ending with exactly one Finished.

    Raises ProviderFailure (connect/read failures and HTTP errors translated by the
    adapter) and StreamBroken when a stream ends without the provider's terminal event.
    """
    started = False
    try:
        if not stream:
            resp = await http.post(call.url, json=call.body, headers=call.headers, timeout=timeout)
            if resp.status_code >= 400:
                raise adapter.translate_error(resp.status_code, resp.headers, resp.content)
            for ev in adapter.parse_response(resp.content):
                yield ev
            return
        async with http.stream(
            "POST", call.url, json=call.body, headers=call.headers, timeout=timeout
        ) as resp:
            if resp.status_code >= 400:
                raise adapter.translate_error(resp.status_code, resp.headers, await resp.aread())
            parser = adapter.stream_parser()
            async for sse in iter_events(resp.aiter_lines()):
                for ev in parser.feed(sse):
                    started = True
                    yield ev
            for ev in parser.close():
                yield ev
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise _unreachable(exc) from exc
    except httpx.TimeoutException as exc:
        if started:
            raise StreamBroken(f"the provider stopped sending mid-stream ({type(exc).__name__})") from exc
        raise ProviderFailure(
            ErrorCode.PROVIDER_ERROR, f"provider timed out ({type(exc).__name__})", retry=True
        ) from exc
    except httpx.TransportError as exc:
        if started:
            raise StreamBroken(f"the provider's connection broke mid-stream ({type(exc).__name__})") from exc
        raise ProviderFailure(
            ErrorCode.PROVIDER_ERROR, f"could not reach the provider ({type(exc).__name__})", retry=True
        ) from exc


def _unreachable(exc: httpx.ConnectError | httpx.ConnectTimeout) -> ProviderFailure:
    """The failure for a connection that could not be made, saying why when the OS said."""
    # The aiohttp transport reports a refused connection as ConnectTimeout too, so the exception's
    # type cannot tell an operator "nothing listens there" from "no answer": the OS error it was
    # raised from can (both transports chain the ConnectionRefusedError).
    cause: BaseException | None = exc
    for _ in range(8):  # a chain is short; the bound only guards against a cycle
        if cause is None or isinstance(cause, ConnectionRefusedError):
            break
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ConnectionRefusedError):
        why = "connection refused"
    elif isinstance(exc, httpx.ConnectTimeout):
        why = "timed out connecting"
    else:
        why = type(exc).__name__
    return ProviderFailure(ErrorCode.PROVIDER_ERROR, f"could not reach the provider ({why})", retry=True)


async def run_probe(http: httpx.AsyncClient, adapter: Adapter, call: HttpCall, *, timeout: httpx.Timeout) -> int:
    """Make an adapter's `probe` call (a GET of the provider's models list, which costs no tokens) and
    return the HTTP status of its success: the provider answered and took the key.

    Raises ProviderFailure: unreachable, timed out, an HTTP error translated by the adapter, or an
    answer that is not a JSON object (a URL that is not the provider's API).
    """
    try:
        resp = await http.get(call.url, headers=call.headers, timeout=timeout)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise _unreachable(exc) from exc
    except httpx.TimeoutException as exc:
        raise ProviderFailure(
            ErrorCode.PROVIDER_ERROR, f"provider timed out ({type(exc).__name__})", retry=True
        ) from exc
    except httpx.TransportError as exc:
        raise ProviderFailure(
            ErrorCode.PROVIDER_ERROR, f"could not reach the provider ({type(exc).__name__})", retry=True
        ) from exc
    if resp.status_code >= 400:
        raise adapter.translate_error(resp.status_code, resp.headers, resp.content)
    if not error_body(resp.content):  # every format's models list is a non-empty JSON object
        raise ProviderFailure(
            ErrorCode.PROVIDER_ERROR,
            f"the answer to {httpx.URL(call.url).path} is not a models list (HTTP {resp.status_code});"
            " is the base URL the provider's API?",
            retry=False, http_status=resp.status_code,
        )
    return resp.status_code
