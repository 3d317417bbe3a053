"""The official google-genai SDK accepts what FakeGemini sends: proof the fake speaks the real format."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from google import genai
from google.genai import errors, types

from router.providers.fakes.common import Scenario
from router.providers.fakes.gemini import FakeGemini

from .adapters import fake_fixture

MODEL = "gemini-2.5-flash"

# google-genai subclasses aiohttp.ClientSession, which aiohttp deprecates; not our code to fix.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Inheritance class AiohttpClientSession from ClientSession is discouraged:DeprecationWarning"
)


fake = fake_fixture(FakeGemini)


@pytest.fixture(params=["aiohttp", "httpx"])
async def client(fake: FakeGemini, request: pytest.FixtureRequest) -> AsyncIterator[genai.Client]:
    """The SDK over both of its async transports: aiohttp (its default when installed) and httpx."""
    async with httpx.AsyncClient() as http:
        options = types.HttpOptions(
            base_url=fake.url,
            api_version="v1beta",  # the version our adapter speaks; the SDK's own default is v1
            httpx_async_client=http if request.param == "httpx" else None,
        )
        c = genai.Client(api_key="test-key", http_options=options)
        yield c
        await c.aio.aclose()


async def test_sdk_reads_a_whole_answer(fake: FakeGemini, client: genai.Client) -> None:
    fake.default = Scenario(text="Bonjour from the fake.", cache_read_tokens=2, reasoning_tokens=3)

    resp = await client.aio.models.generate_content(
        model=MODEL,
        contents="Say hello",
        config=types.GenerateContentConfig(system_instruction="Be brief.", max_output_tokens=50),
    )

    assert resp.text == "Bonjour from the fake."
    assert resp.candidates is not None
    assert resp.candidates[0].finish_reason == types.FinishReason.STOP
    assert resp.model_version == MODEL
    assert resp.response_id
    usage = resp.usage_metadata
    assert usage is not None and usage.prompt_token_count and usage.candidates_token_count
    assert usage.cached_content_token_count == 2
    assert usage.thoughts_token_count == 3
    assert usage.total_token_count == usage.prompt_token_count + usage.candidates_token_count + 3
    # The SDK sent what we expect a real client to send.
    assert fake.paths == [f"/v1beta/models/{MODEL}:generateContent"]
    assert fake.request_headers[0]["x-goog-api-key"] == "test-key"
    assert fake.requests[0]["systemInstruction"]["parts"] == [{"text": "Be brief."}]


async def test_sdk_reads_a_streamed_answer(fake: FakeGemini, client: genai.Client) -> None:
    fake.default = Scenario(text="one two three four five", words_per_chunk=2)

    chunks = [c async for c in await client.aio.models.generate_content_stream(model=MODEL, contents="Count")]

    assert "".join(c.text or "" for c in chunks) == "one two three four five"
    assert len(chunks) == 4  # three text chunks, then the one with finishReason
    last = chunks[-1]
    assert last.candidates is not None and last.candidates[0].finish_reason == types.FinishReason.STOP
    assert last.usage_metadata is not None and last.usage_metadata.candidates_token_count
    assert fake.paths == [f"/v1beta/models/{MODEL}:streamGenerateContent?alt=sse"]


async def test_sdk_reads_a_function_call(fake: FakeGemini, client: genai.Client) -> None:
    weather = types.Tool(function_declarations=[types.FunctionDeclaration(
        name="get_weather",
        description="Weather in a city",
        parameters=types.Schema(
            type=types.Type.OBJECT, properties={"city": types.Schema(type=types.Type.STRING)}
        ),
    )])
    config = types.GenerateContentConfig(
        tools=[weather],
        automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
    )

    resp = await client.aio.models.generate_content(
        model=MODEL, contents="[[fake:weather_tool]] Weather in Paris?", config=config
    )

    assert resp.function_calls is not None
    [call] = resp.function_calls
    assert (call.name, call.args) == ("get_weather", {"city": "Paris"})
    assert resp.candidates is not None and resp.candidates[0].content is not None
    parts = resp.candidates[0].content.parts or []
    assert parts[0].thought_signature  # bytes, decoded from base64 by the SDK

    # The SDK sends the call back with its answer; the fake then answers in text.
    history = [
        types.Content(role="user", parts=[types.Part(text="[[fake:weather_tool]] Weather in Paris?")]),
        resp.candidates[0].content,
        types.Content(role="user", parts=[
            types.Part.from_function_response(name="get_weather", response={"result": "18C, sunny"})
        ]),
    ]
    final = await client.aio.models.generate_content(model=MODEL, contents=history, config=config)
    assert final.function_calls is None
    assert final.text


@pytest.mark.parametrize(
    ("scenario", "error", "code", "status"),
    [
        ("unauthorized", errors.ClientError, 401, "UNAUTHENTICATED"),
        ("forbidden", errors.ClientError, 403, "PERMISSION_DENIED"),
        ("rate_limited", errors.ClientError, 429, "RESOURCE_EXHAUSTED"),
        ("server_error", errors.ServerError, 500, "INTERNAL"),
        ("overloaded", errors.ServerError, 529, "UNAVAILABLE"),
    ],
)
async def test_sdk_raises_its_own_errors(
    client: genai.Client, scenario: str, error: type[errors.APIError], code: int, status: str
) -> None:
    with pytest.raises(error) as info:
        await client.aio.models.generate_content(model=MODEL, contents=f"[[fake:{scenario}]] hi")
    assert info.value.code == code
    assert info.value.status == status
    assert info.value.message


async def test_sdk_stream_raises_for_an_error_status(client: genai.Client) -> None:
    with pytest.raises(errors.ServerError) as info:
        async for _ in await client.aio.models.generate_content_stream(
            model=MODEL, contents="[[fake:server_error]] hi"
        ):
            pass
    assert info.value.code == 500


async def test_sdk_rate_limit_carries_retry_info(client: genai.Client) -> None:
    with pytest.raises(errors.ClientError) as info:
        await client.aio.models.generate_content(model=MODEL, contents="[[fake:rate_limited]] hi")
    details = info.value.details["error"]["details"]
    assert {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1s"} in details


async def test_sdk_default_api_version_is_served_too(fake: FakeGemini) -> None:
    async with genai.Client(api_key="test-key", http_options=types.HttpOptions(base_url=fake.url)).aio as c:
        resp = await c.models.generate_content(model=MODEL, contents="hi")
    assert resp.text
    assert fake.paths == [f"/v1/models/{MODEL}:generateContent"]


async def test_sdk_lists_the_fakes_models_and_reads_its_faults(fake: FakeGemini, client: genai.Client) -> None:
    """The models list `switchyard providers test` calls, as the SDK reads it."""
    models = [m async for m in await client.aio.models.list()]
    assert [m.name for m in models] == ["models/gemini-2.5-flash"]
    assert models[0].input_token_limit == 1048576
    assert fake.listed[-1]["x-goog-api-key"] == "test-key"
    fake.default = Scenario(status=401)
    with pytest.raises(errors.ClientError) as info:
        await client.aio.models.list()
    assert info.value.code == 401
