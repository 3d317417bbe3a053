"""The official `anthropic` SDK accepts what FakeAnthropic answers: proof the fake speaks the real format."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anthropic
import pytest
from anthropic.types import MessageParam, ToolParam

from router.providers.fakes.anthropic import FakeAnthropic
from router.providers.fakes.common import Scenario

from .adapters import fake_fixture

MODEL = "claude-haiku-4-5"
WEATHER_TOOL: ToolParam = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


fake = fake_fixture(FakeAnthropic)


@pytest.fixture
async def client(fake: FakeAnthropic) -> AsyncIterator[anthropic.AsyncAnthropic]:
    # No SDK retries: each error scenario must surface on the first answer.
    async with anthropic.AsyncAnthropic(base_url=fake.url, api_key="test-key", max_retries=0) as client:
        yield client


async def test_message(client: anthropic.AsyncAnthropic, fake: FakeAnthropic) -> None:
    msg = await client.messages.create(
        model=MODEL, max_tokens=200, system="Be brief.",
        messages=[{"role": "user", "content": "What is a switchyard?"}],
    )
    assert isinstance(msg, anthropic.types.Message)
    assert msg.role == "assistant"
    assert msg.model == MODEL
    assert msg.stop_reason == "end_turn"
    [block] = msg.content
    assert isinstance(block, anthropic.types.TextBlock)
    assert "switchyard" in block.text
    assert msg.usage.input_tokens > 0
    assert msg.usage.output_tokens > 0
    headers = {k.lower(): v for k, v in fake.request_headers[-1].items()}
    # Older SDKs send the key as `x-api-key`, newer ones as a bearer token.
    assert "test-key" in (headers.get("x-api-key"), headers.get("authorization", "").removeprefix("Bearer "))
    assert headers["anthropic-version"]
    assert fake.requests[-1]["system"] == "Be brief."


async def test_stream(client: anthropic.AsyncAnthropic) -> None:
    async with client.messages.stream(
        model=MODEL, max_tokens=200,
        messages=[{"role": "user", "content": "[[fake:cached]] Tell me a story"}],
    ) as stream:
        pieces = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert len(pieces) > 1
    [block] = final.content
    assert isinstance(block, anthropic.types.TextBlock)
    assert block.text == "".join(pieces)
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 0
    assert final.usage.cache_read_input_tokens == 8


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_use(client: anthropic.AsyncAnthropic, stream: bool) -> None:
    question: MessageParam = {"role": "user", "content": "[[fake:weather_tool]] Weather in Paris?"}
    msg: anthropic.types.Message
    if stream:
        async with client.messages.stream(
            model=MODEL, max_tokens=200, tools=[WEATHER_TOOL], messages=[question]
        ) as s:
            msg = await s.get_final_message()
    else:
        msg = await client.messages.create(
            model=MODEL, max_tokens=200, tools=[WEATHER_TOOL], messages=[question]
        )
    assert msg.stop_reason == "tool_use"
    [block] = msg.content
    assert isinstance(block, anthropic.types.ToolUseBlock)
    assert block.name == "get_weather"
    assert block.input == {"city": "Paris"}
    assert block.id.startswith("toolu_")

    result: MessageParam = {
        "role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "18°C"}],
    }
    answer = await client.messages.create(
        model=MODEL, max_tokens=200, tools=[WEATHER_TOOL], messages=[question, msg.to_param(), result],
    )
    assert answer.stop_reason == "end_turn"
    assert isinstance(answer.content[0], anthropic.types.TextBlock)


@pytest.mark.parametrize(
    ("scenario", "exc", "status", "error_type"),
    [
        ("rate_limited", anthropic.RateLimitError, 429, "rate_limit_error"),
        ("unauthorized", anthropic.AuthenticationError, 401, "authentication_error"),
        ("forbidden", anthropic.PermissionDeniedError, 403, "permission_error"),
        ("server_error", anthropic.InternalServerError, 500, "api_error"),
        ("overloaded", anthropic.InternalServerError, 529, "overloaded_error"),
        ("credit_exhausted", anthropic.BadRequestError, 400, "invalid_request_error"),
    ],
)
async def test_errors(
    client: anthropic.AsyncAnthropic, scenario: str, exc: type[anthropic.APIStatusError], status: int,
    error_type: str,
) -> None:
    with pytest.raises(exc) as info:
        await client.messages.create(
            model=MODEL, max_tokens=50, messages=[{"role": "user", "content": f"[[fake:{scenario}]] hi"}],
        )
    assert info.value.status_code == status
    assert isinstance(info.value.body, dict)
    assert info.value.body["error"]["type"] == error_type
    if scenario == "rate_limited":
        assert info.value.response.headers["retry-after"] == "1"


async def test_stream_error_before_start(client: anthropic.AsyncAnthropic, fake: FakeAnthropic) -> None:
    fake.scenarios["busy"] = Scenario(status=529)
    with pytest.raises(anthropic.InternalServerError) as info:
        async with client.messages.stream(
            model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "[[fake:busy]] hi"}],
        ) as stream:
            await stream.get_final_message()
    assert info.value.status_code == 529


async def test_the_sdk_pages_through_the_fakes_models_and_reads_its_faults(
    client: anthropic.AsyncAnthropic, fake: FakeAnthropic
) -> None:
    """The models list `switchyard providers test` calls (one model a page), as the SDK reads it."""
    ids = [m.id async for m in client.models.list(limit=1)]
    assert ids == ["claude-haiku-4-5-20251001", "claude-sonnet-4-5-20250929"]
    assert len(fake.listed) == 2  # one page each, the second after the first's last_id
    sent = fake.listed[-1]  # the key as `x-api-key` (older SDKs) or a bearer token (newer ones)
    assert "test-key" in (sent.get("x-api-key"), sent.get("authorization", "").removeprefix("Bearer "))
    with pytest.raises(anthropic.AuthenticationError):
        await client.models.list(extra_headers={"x-fake-scenario": "unauthorized"})
