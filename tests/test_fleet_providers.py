"""Each wire format through the running fleet (real NATS, real PostgreSQL, fake providers).

Text, streaming, vision, a tool round trip, usage and cost, every row of the error
tables, and broken streams, as a producer sees them in its reply stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from nats.aio.client import Client as NATS

from router.providers.fakes import FakeAnthropic, FakeGemini, FakeOpenAI, FakeServer, Scenario
from schemas import Chunk, Done, Error
from workers.health import HealthView

from .conftest import Fleet, fleet_config, running_fleet
from .helpers import ask_raw, audit_row, request

FORMATS = ["openai", "anthropic", "gemini"]
BASE_PATH = {"openai": "/v1", "anthropic": "", "gemini": ""}
MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5", "gemini": "gemini-2.5-flash"}
IMAGE_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="

# Per format: (status, body) of a credit-exhausted and a context-too-long answer.
CREDIT = {
    "openai": (429, {"error": {"message": "You exceeded your current quota.", "type": "insufficient_quota",
                               "param": None, "code": "insufficient_quota"}}),
    "anthropic": (400, {"type": "error", "error": {"type": "invalid_request_error",
                        "message": "Your credit balance is too low to access the Anthropic API."}}),
    "gemini": (429, {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED",
                               "message": "You exceeded your current quota, please check your plan and billing "
                                          "details. Quota exceeded for metric: generate_content_free_tier_requests,"
                                          " limit: 0"}}),
}
CONTEXT = {
    "openai": (400, {"error": {"message": "This model's maximum context length is 128000 tokens.",
                               "type": "invalid_request_error", "param": "messages",
                               "code": "context_length_exceeded"}}),
    "anthropic": (400, {"type": "error", "error": {"type": "invalid_request_error",
                        "message": "prompt is too long: 215000 tokens > 200000 maximum"}}),
    "gemini": (400, {"error": {"code": 400, "status": "INVALID_ARGUMENT",
                               "message": "The input token count (1200000) exceeds the maximum number of tokens "
                                          "allowed (1048576)."}}),
}


class Fakes:
    def __init__(self) -> None:
        self.by_format: dict[str, FakeServer] = {
            "openai": FakeOpenAI(), "anthropic": FakeAnthropic(), "gemini": FakeGemini(),
        }

    def __getitem__(self, fmt: str) -> FakeServer:
        return self.by_format[fmt]


@pytest.fixture
async def fakes() -> AsyncIterator[Fakes]:
    f = Fakes()
    for server in f.by_format.values():
        await server.start()
    yield f
    for server in f.by_format.values():
        await server.stop()


@pytest.fixture
async def multi(nats_url: str, fakes: Fakes, db: asyncpg.Pool) -> AsyncIterator[Fleet]:
    cfg = fleet_config({fmt: fakes[fmt].url + BASE_PATH[fmt] for fmt in FORMATS})
    async with running_fleet(nats_url, cfg, db) as f:
        yield f


def subject(fmt: str) -> str:
    return f"llm.req.only_{fmt}.acme"


async def ask(nc: NATS, fmt: str, body: dict[str, Any]) -> list[Any]:
    return await ask_raw(nc, body, subject=subject(fmt))


@pytest.mark.parametrize("fmt", FORMATS)
async def test_text_usage_cost_and_audit(multi: Fleet, nc: NATS, db: asyncpg.Pool, fakes: Fakes, fmt: str) -> None:
    fakes[fmt].scenarios["cached"] = Scenario(cache_read_tokens=4, reasoning_tokens=2)
    body = request("Summarise the meeting notes [[fake:cached]]")
    [done] = await ask(nc, fmt, body)
    assert isinstance(done, Done)
    assert "meeting notes" in done.text
    assert done.provider == fmt and done.model == MODELS[fmt]
    assert done.finish_reason == "stop"
    assert done.usage.input_tokens > 0 and done.usage.output_tokens > 0
    assert done.usage.cache_read_tokens == 4
    assert done.cost_usd is not None and done.cost_usd > 0
    row = await audit_row(db, body["id"])
    assert row["provider"] == fmt and row["cache_read_tokens"] == 4
    assert float(row["cost_usd"]) == pytest.approx(done.cost_usd)
    assert row["raw_usage"] is not None  # kept so costs can be recomputed when prices change


@pytest.mark.parametrize("fmt", FORMATS)
async def test_streaming(multi: Fleet, nc: NATS, fmt: str) -> None:
    replies = await ask(nc, fmt, request("Tell me about queues", stream=True))
    chunks = [r for r in replies if isinstance(r, Chunk)]
    assert len(chunks) > 5
    assert [r.seq for r in replies] == list(range(len(replies)))
    assert isinstance(replies[-1], Done) and replies[-1].text == "".join(c.text for c in chunks)


@pytest.mark.parametrize("fmt", FORMATS)
async def test_vision_input_reaches_the_provider(multi: Fleet, nc: NATS, fakes: Fakes, fmt: str) -> None:
    content = [
        {"type": "text", "text": "What is on this whiteboard?"},
        {"type": "image", "url": "https://example.com/board.png"},
        {"type": "image", "data": IMAGE_B64, "media_type": "image/png"},
    ]
    body = request()
    body["messages"] = [{"role": "user", "content": content}]
    [done] = await ask(nc, fmt, body)
    assert isinstance(done, Done)
    sent = str(fakes[fmt].requests[-1])
    assert "https://example.com/board.png" in sent and IMAGE_B64 in sent and "image/png" in sent


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fmt", FORMATS)
async def test_tool_call_round_trip(multi: Fleet, nc: NATS, fmt: str, stream: bool) -> None:
    tools = [{"name": "get_weather", "description": "Weather for a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    question = {"role": "user", "content": "What's the weather in Paris? [[fake:weather_tool]]"}
    first = await ask(nc, fmt, request(stream=stream, tools=tools, tool_choice="auto") | {"messages": [question]})
    done = first[-1]
    assert isinstance(done, Done), done
    assert done.finish_reason == "tool_calls"
    [call] = done.tool_calls
    assert call.name == "get_weather" and call.arguments == {"city": "Paris"}

    conversation = [
        question,
        {"role": "assistant", "tool_calls": [{"id": call.id, "name": call.name, "arguments": call.arguments}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 18, "sky": "clear"}'},
    ]
    second = await ask(nc, fmt, request(stream=stream, tools=tools) | {"messages": conversation})
    final = second[-1]
    assert isinstance(final, Done) and final.finish_reason == "stop" and final.text and not final.tool_calls


def _error_rows(fmt: str) -> list[tuple[str, Scenario, str, bool]]:
    """(name, scenario, expected code, retryable) for each row of the format's error table."""
    credit_status, credit_body = CREDIT[fmt]
    ctx_status, ctx_body = CONTEXT[fmt]
    rows = [
        ("unauthorized", Scenario(status=401), "UNAUTHORIZED", False),
        ("forbidden", Scenario(status=403), "UNAUTHORIZED", False),
        ("server_error", Scenario(status=500), "PROVIDER_ERROR", True),
        ("rate_limited", Scenario(status=429, headers={"retry-after": "0"}), "PROVIDER_ERROR", True),
        ("credit", Scenario(status=credit_status, error_body=credit_body), "PROVIDER_UNAVAILABLE", True),
        ("context", Scenario(status=ctx_status, error_body=ctx_body), "CONTEXT_TOO_LONG", False),
    ]
    if fmt == "anthropic":
        rows.append(("overloaded", Scenario(status=529), "PROVIDER_ERROR", True))
    return rows


ERROR_CASES = [(fmt, *row) for fmt in FORMATS for row in _error_rows(fmt)]


@pytest.mark.parametrize(("fmt", "name", "scenario", "code", "retryable"), ERROR_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in ERROR_CASES])
async def test_error_table_through_the_fleet(
    multi: Fleet, nc: NATS, db: asyncpg.Pool, fakes: Fakes,
    fmt: str, name: str, scenario: Scenario, code: str, retryable: bool,
) -> None:
    fakes[fmt].scenarios[name] = scenario
    before = len(fakes[fmt].requests)
    body = request(f"hello [[fake:{name}]]", stream=True)
    [err] = await ask(nc, fmt, body)
    assert isinstance(err, Error), err
    assert err.code == code and err.retryable is retryable and err.seq == 0
    assert "sk-test" not in err.message  # the fleet's key never shows
    if code == "UNAUTHORIZED":
        assert f"SY_TEST_{fmt.upper()}_KEY" in err.message  # ...but where it comes from does
    tries = len(fakes[fmt].requests) - before
    # Retryable provider failures are tried again (the pool's policy: 2 attempts); the rest once.
    assert tries == (2 if code == "PROVIDER_ERROR" else 1)
    row = await audit_row(db, body["id"])
    assert row["status"] == "error" and row["code"] == code


@pytest.mark.parametrize("fmt", FORMATS)
async def test_rate_limit_retry_after_is_honoured_then_succeeds(
    nats_url: str, db: asyncpg.Pool, nc: NATS, fakes: Fakes, fmt: str
) -> None:
    cfg = fleet_config({f: fakes[f].url + BASE_PATH[f] for f in FORMATS})
    cfg.pools[fmt].retry.max_ms = 2000  # a wait longer than the pool's max_ms moves on instead
    fakes[fmt].scenarios["once"] = Scenario(status=429, headers={"retry-after": "1"}, fail_times=1)
    async with running_fleet(nats_url, cfg, db):
        [done] = await ask(nc, fmt, request("hello [[fake:once]]"))
    assert isinstance(done, Done)
    assert done.latency_ms >= 1000  # waited for the provider's Retry-After, not the pool's 10 ms


@pytest.mark.parametrize("fault", ["disconnect", "malformed", "truncated"])
@pytest.mark.parametrize("fmt", FORMATS)
async def test_broken_stream_ends_with_an_error_never_a_done(
    multi: Fleet, nc: NATS, db: asyncpg.Pool, fmt: str, fault: str
) -> None:
    body = request(f"A long answer please [[fake:{fault}]]", stream=True)
    replies = await ask(nc, fmt, body)
    assert any(isinstance(r, Chunk) for r in replies)
    assert not any(isinstance(r, Done) for r in replies)
    err = replies[-1]
    assert isinstance(err, Error) and err.code == "PROVIDER_ERROR"
    assert [r.seq for r in replies] == list(range(len(replies)))
    row = await audit_row(db, body["id"])
    assert row["status"] == "error"


async def test_fallback_to_the_next_target_before_the_first_chunk(
    nats_url: str, fakes: Fakes, db: asyncpg.Pool, nc: NATS
) -> None:
    cfg = fleet_config(
        {fmt: fakes[fmt].url + BASE_PATH[fmt] for fmt in FORMATS},
    )
    cfg.routes["draft"]["default"] = ["openai:gpt-4o-mini", "anthropic:claude-haiku-4-5"]
    fakes["openai"].scenarios["openai_down"] = Scenario(status=500)  # only the first target fails
    async with running_fleet(nats_url, cfg, db):
        body = request("hello [[fake:openai_down]]", stream=True)
        replies = await ask_raw(nc, body)
    done = replies[-1]
    assert isinstance(done, Done) and done.provider == "anthropic"
    assert [(a.pool, a.error) for a in done.attempts] == [("openai", "PROVIDER_ERROR"), ("anthropic", None)]


@pytest.mark.parametrize("fmt", FORMATS)
async def test_read_timeout_and_refused_connection_are_retryable_provider_errors(
    nats_url: str, fakes: Fakes, db: asyncpg.Pool, nc: NATS, fmt: str
) -> None:
    from .conftest import free_port

    urls = {fmt: fakes[fmt].url + BASE_PATH[fmt], "closed": f"http://127.0.0.1:{free_port()}/v1"}
    cfg = fleet_config(urls)
    cfg.pools[fmt].timeout_ms = 300
    fakes[fmt].scenarios["stalls"] = Scenario(ttft_ms=1500)
    async with running_fleet(nats_url, cfg, db):
        before = len(fakes[fmt].requests)
        [timed_out] = await ask_raw(nc, request("[[fake:stalls]]", stream=True), subject=subject(fmt))
        [refused] = await ask_raw(nc, request("anyone there?"), subject="llm.req.only_closed.acme")
    assert isinstance(timed_out, Error) and timed_out.code == "PROVIDER_ERROR" and timed_out.retryable
    assert "timed out" in timed_out.message
    assert len(fakes[fmt].requests) - before == 2  # the pool's retry policy tried twice
    assert isinstance(refused, Error) and refused.code == "PROVIDER_ERROR" and refused.retryable
    assert "could not reach" in refused.message


async def test_a_missing_key_is_named_and_the_next_target_serves(
    nats_url: str, fakes: Fakes, db: asyncpg.Pool, nc: NATS
) -> None:
    cfg = fleet_config({fmt: fakes[fmt].url + BASE_PATH[fmt] for fmt in FORMATS})
    cfg.routes["draft"]["default"] = ["openai:gpt-4o-mini", "anthropic:claude-haiku-4-5"]
    keys: dict[str, str | None] = {"openai": None, "anthropic": "test-key", "gemini": "test-key"}
    async with running_fleet(nats_url, cfg, db, api_keys=keys):
        health = HealthView(nc.jetstream())
        await health.start()
        try:
            async with asyncio.timeout(10):  # the pool's workers report they have no key
                while health.pool_has_key("openai") is not False:
                    await asyncio.sleep(0.05)
        finally:
            await health.stop()
        [refused] = await ask_raw(nc, request("hi"), subject=subject("openai"))
        [served] = await ask_raw(nc, request("hi"))
    assert isinstance(refused, Error) and refused.code == "UNAUTHORIZED"
    assert "set SY_TEST_OPENAI_KEY" in refused.message
    assert not fakes["openai"].requests  # never called without a key
    assert isinstance(served, Done) and served.provider == "anthropic"
    # Skipped at the dispatcher, and said so in the attempts.
    assert [(a.pool, a.error) for a in served.attempts] == [("openai", "SKIPPED_NO_KEY"), ("anthropic", None)]


async def test_a_key_of_no_known_shape_echoed_by_a_provider_is_masked_in_the_reply(
    nats_url: str, db: asyncpg.Pool, nc: NATS, fakes: Fakes
) -> None:
    planted = "zaiprobe." + "K3yN0tShap3dL1ke4nyth1ng"
    cfg = fleet_config({f: fakes[f].url + BASE_PATH[f] for f in FORMATS})
    fakes["openai"].scenarios["echo_key"] = Scenario(status=400, error_body={"error": {
        "message": f"Invalid request made with key {planted}", "type": "invalid_request_error", "code": None}})
    keys: dict[str, str | None] = {"openai": planted, "anthropic": "test-key", "gemini": "test-key"}
    async with running_fleet(nats_url, cfg, db, api_keys=keys):
        [err] = await ask(nc, "openai", request("[[fake:echo_key]]"))
    assert isinstance(err, Error) and err.code == "INVALID_REQUEST"
    assert "Invalid request made with key [redacted]" in err.message
    assert "K3yN0tShap3dL1ke4nyth1ng" not in err.message
    # The log lines go through the same scrub (tests/test_redact.py: the processor masks remembered keys).


async def test_a_provider_message_quoting_a_key_is_masked(multi: Fleet, nc: NATS, fakes: Fakes) -> None:
    leaked = "sk-proj-" + "Zz9Yy8Xx7Ww6Vv5Uu4Tt3Ss2"
    fakes["openai"].scenarios["echo"] = Scenario(status=400, error_body={"error": {
        "message": f"Invalid value for 'user': {leaked}", "type": "invalid_request_error", "code": None}})
    [err] = await ask(nc, "openai", request("[[fake:echo]]"))
    assert isinstance(err, Error) and err.code == "INVALID_REQUEST"
    assert leaked not in err.message and "[redacted]" in err.message
