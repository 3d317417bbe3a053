"""The official `openai` SDK accepts the fake (and demo) provider's answers: the fake speaks the real format."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import openai
import pytest

from router.providers.fakes import FakeOpenAI, Scenario


@pytest.fixture
async def sdk(fake_openai: FakeOpenAI) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=fake_openai.url + "/v1", api_key="test-key", max_retries=0)
    yield client
    await client.close()


async def test_non_streaming_answer(sdk: openai.AsyncOpenAI) -> None:
    r = await sdk.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "What is a queue?"}]
    )
    assert r.object == "chat.completion"
    assert r.choices[0].finish_reason == "stop"
    assert "queue" in (r.choices[0].message.content or "")
    assert r.usage is not None and r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0


async def test_streaming_answer_with_usage(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Stream please"}],
        stream=True, stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    async for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
        usage = chunk.usage or usage
    assert "Stream please" in text and finish == "stop"
    assert usage is not None and usage.completion_tokens > 0


async def test_streamed_tool_call_is_assembled_by_the_sdk(sdk: openai.AsyncOpenAI) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    async with sdk.chat.completions.stream(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Weather? [[fake:weather_tool]]"}],
        tools=tools,  # type: ignore[arg-type]
    ) as stream:
        final = await stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    assert final.choices[0].finish_reason == "tool_calls"


async def test_errors_map_to_the_sdks_own_exceptions(sdk: openai.AsyncOpenAI) -> None:
    msgs = [{"role": "user", "content": "x [[fake:rate_limited]]"}]
    with pytest.raises(openai.RateLimitError):
        await sdk.chat.completions.create(model="gpt-4o-mini", messages=msgs)  # type: ignore[arg-type]
    with pytest.raises(openai.AuthenticationError):
        await sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "[[fake:unauthorized]]"}]
        )
    with pytest.raises(openai.InternalServerError):
        await sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "[[fake:server_error]]"}]
        )


async def test_demo_provider_pacing_is_accepted_too() -> None:
    demo = FakeOpenAI(default=Scenario(ttft_ms=50, chunk_ms=5))
    await demo.start()
    try:
        client = openai.AsyncOpenAI(base_url=demo.url + "/v1", api_key="unused", max_retries=0)
        stream = await client.chat.completions.create(
            model="switchyard-demo", messages=[{"role": "user", "content": "hello"}], stream=True
        )
        pieces = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
        assert len(pieces) > 10
        await client.close()
    finally:
        await demo.stop()


async def test_the_sdk_lists_the_fakes_models_and_reads_its_faults(
    sdk: openai.AsyncOpenAI, fake_openai: FakeOpenAI
) -> None:
    """The models list `switchyard providers test` calls, as the SDK reads it."""
    ids = [m.id async for m in sdk.models.list()]
    assert ids == ["gpt-4o-mini", "gpt-4o"]
    assert fake_openai.listed[-1]["authorization"] == "Bearer test-key"
    with pytest.raises(openai.AuthenticationError):
        await sdk.models.list(extra_headers={"x-fake-scenario": "unauthorized"})
