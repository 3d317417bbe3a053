"""The OpenAI Chat Completions adapter, run over real HTTP against FakeOpenAI."""

from __future__ import annotations

import json
import socket
from typing import Any

import httpx
import msgspec
import pytest

from router.config import Temperature
from router.errors import ErrorCode, ProviderFailure, StreamBroken
from router.pricing import cost_usd
from router.providers import openai as adapter
from router.providers.base import Event, Finished, TextDelta, run
from router.providers.fakes.common import FakeToolCall, Scenario
from router.providers.fakes.openai import FakeOpenAI
from router.providers.sse import SSEvent
from schemas import ImagePart, Message, Request, TextPart, ToolCall

from .adapters import KEY, TIMEOUT, WEATHER, collect, fake_fixture, request, split, user
from .adapters import http as http  # re-exported so that pytest finds the `http` fixture here

MODEL = "gpt-4o-mini"

fake = fake_fixture(FakeOpenAI)


async def call(
    fake: FakeOpenAI, http: httpx.AsyncClient, req: Request, *, timeout: httpx.Timeout = TIMEOUT
) -> list[Event]:
    return await collect(http, adapter, req, model=MODEL, base_url=fake.url + "/v1", timeout=timeout)


async def test_text(fake: FakeOpenAI, http: httpx.AsyncClient) -> None:
    req = request(Message(role="system", content="Be brief."), user("What is a switchyard?"))
    text, done = split(await call(fake, http, req))
    assert "switchyard" in text
    assert done.finish_reason == "stop"
    assert done.model == MODEL
    assert done.usage.input_tokens > 0 and done.usage.output_tokens > 0
    assert done.tool_calls == []
    sent = fake.requests[-1]
    assert sent == {"model": MODEL, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a switchyard?"},
    ]}
    headers = {k.lower(): v for k, v in fake.request_headers[-1].items()}
    assert headers["authorization"] == f"Bearer {KEY}"
    assert headers["content-type"] == "application/json"


async def test_stream(fake: FakeOpenAI, http: httpx.AsyncClient) -> None:
    whole, whole_done = split(await call(fake, http, request(user("Tell me about rivers"))))
    events = await call(fake, http, request(user("Tell me about rivers"), stream=True, max_tokens=300))
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert len(deltas) > 1
    text, done = split(events)
    assert text == whole
    assert done.finish_reason == "stop"
    assert done.model == MODEL
    # The fake sends usage only when asked with stream_options.include_usage, as OpenAI does.
    assert done.usage == whole_done.usage
    assert done.usage.output_tokens > 0
    sent = fake.requests[-1]
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["max_tokens"] == 300


@pytest.mark.parametrize("stream", [False, True])
async def test_vision(fake: FakeOpenAI, http: httpx.AsyncClient, stream: bool) -> None:
    msg = Message(role="user", content=[
        TextPart(text="Compare these."),
        ImagePart(url="https://example.com/cat.jpg"),
        ImagePart(data="iVBORw0KGgo=", media_type="image/png"),
    ])
    text, _ = split(await call(fake, http, request(msg, stream=stream)))
    assert text
    assert fake.requests[-1]["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "Compare these."},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    ]}]


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_round_trip(fake: FakeOpenAI, http: httpx.AsyncClient, stream: bool) -> None:
    question = user("[[fake:weather_tool]] What is the weather in Paris?")
    first = request(question, stream=stream, tools=[WEATHER], tool_choice="auto")
    text, done = split(await call(fake, http, first))
    assert text == ""
    assert done.finish_reason == "tool_calls"
    [tool_call] = done.tool_calls
    assert tool_call.name == "get_weather"
    assert tool_call.arguments == {"city": "Paris"}
    assert tool_call.id.startswith("call_")
    sent = fake.requests[-1]
    assert sent["tool_choice"] == "auto"
    assert sent["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "The current weather in a city.", "parameters": WEATHER.parameters,
    }}]

    second = request(
        question,
        Message(role="assistant", tool_calls=done.tool_calls),
        Message(role="tool", tool_call_id=tool_call.id, content="18°C and sunny"),
        stream=stream, tools=[WEATHER],
    )
    text, done = split(await call(fake, http, second))
    assert text
    assert done.finish_reason == "stop"
    assert done.tool_calls == []
    sent_messages = fake.requests[-1]["messages"]
    assistant = sent_messages[1]
    assert assistant["role"] == "assistant"
    assert assistant["content"] is None
    [sent_call] = assistant["tool_calls"]
    assert sent_call["id"] == tool_call.id
    assert sent_call["type"] == "function"
    assert sent_call["function"]["name"] == "get_weather"
    # OpenAI carries arguments as a JSON string, not an object.
    assert isinstance(sent_call["function"]["arguments"], str)
    assert json.loads(sent_call["function"]["arguments"]) == {"city": "Paris"}
    assert sent_messages[2] == {"role": "tool", "content": "18°C and sunny", "tool_call_id": tool_call.id}


@pytest.mark.parametrize("stream", [False, True])
async def test_parallel_tool_calls_with_nested_arguments(
    fake: FakeOpenAI, http: httpx.AsyncClient, stream: bool
) -> None:
    # Streamed, the fake splits each call's arguments into two fragments, mid-JSON.
    forecast = {"city": "São Paulo", "units": {"temp": "C"}, "days": [1, 2, 3], "alerts": True}
    fake.scenarios["two_tools"] = Scenario(tool_calls=[
        FakeToolCall(name="get_weather", arguments=forecast, id="call_a"),
        FakeToolCall(name="get_time", arguments={"tz": "America/Sao_Paulo"}, id="call_b"),
    ])
    _, done = split(await call(fake, http, request(user("[[fake:two_tools]] Weather and time?"), stream=stream)))
    assert done.finish_reason == "tool_calls"
    assert done.tool_calls == [
        ToolCall(id="call_a", name="get_weather", arguments=forecast),
        ToolCall(id="call_b", name="get_time", arguments={"tz": "America/Sao_Paulo"}),
    ]


LONG_PROMPT = "[[fake:cache]] Summarise the manual: " + "the relay closes when the coil is live. " * 150


@pytest.mark.parametrize("stream", [False, True])
async def test_usage_with_cache_and_reasoning(fake: FakeOpenAI, http: httpx.AsyncClient, stream: bool) -> None:
    fake.scenarios["cache"] = Scenario(cache_read_tokens=1024, reasoning_tokens=64)
    _, done = split(await call(fake, http, request(user(LONG_PROMPT), stream=stream)))
    raw = done.raw_usage
    assert raw is not None
    prompt_tokens = raw["prompt_tokens"]
    completion_tokens = raw["completion_tokens"]
    assert isinstance(prompt_tokens, int) and prompt_tokens > 1024
    assert isinstance(completion_tokens, int)
    assert raw["prompt_tokens_details"] == {"cached_tokens": 1024, "audio_tokens": 0}
    # OpenAI counts cached tokens inside prompt_tokens and reasoning inside completion_tokens: kept as is.
    assert done.usage.input_tokens == prompt_tokens
    assert done.usage.cache_read_tokens == 1024
    assert done.usage.output_tokens == completion_tokens
    assert done.usage.output_tokens > 64
    assert done.usage.reasoning_tokens == 64
    assert done.usage.cache_write_tokens == 0

    cost = cost_usd(done.usage, MODEL, provider_id="openai")
    uncached = cost_usd(msgspec.structs.replace(done.usage, cache_read_tokens=0), MODEL, provider_id="openai")
    assert isinstance(cost, float) and isinstance(uncached, float)
    assert 0 < cost < uncached


async def test_builtin_cached_scenario(fake: FakeOpenAI, http: httpx.AsyncClient) -> None:
    _, done = split(await call(fake, http, request(user("[[fake:cached]] " + "many words here " * 20))))
    assert (done.usage.cache_read_tokens, done.usage.reasoning_tokens) == (8, 3)


# --- errors -------------------------------------------------------------------

QUOTA_BODY = {"error": {
    "message": "You exceeded your current quota, please check your plan and billing details.",
    "type": "insufficient_quota", "param": None, "code": "insufficient_quota",
}}
# Newer billing errors keep the type and name the cause in `code` (credit_balance_exhausted,
# organization_spend_limit_exceeded, project_spend_limit_exceeded, ...).
QUOTA_CODE_BODY = {"error": {
    "message": "You exceeded your current quota, please check your plan and billing details.",
    "type": "insufficient_quota", "param": None, "code": "credit_balance_exhausted",
}}
TOO_LONG_BODY = {"error": {
    "message": "This model's maximum context length is 128000 tokens. However, your messages resulted in "
               "131072 tokens. Please reduce the length of the messages.",
    "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded",
}}
# Auth errors whose text quotes the key: neither may reach our message.
AUTH_BODY = {"error": {
    "message": f"Incorrect API key provided: {KEY}. You can find your API key in your account settings.",
    "type": "invalid_request_error", "param": None, "code": "invalid_api_key",
}}
PERM_BODY = {"error": {
    "message": f"Project of key {KEY} does not have access to model {MODEL}",
    "type": "invalid_request_error", "param": None, "code": "model_not_found",
}}
BAD_BODY = {"error": {
    "message": "Invalid 'messages[0].content': " + "x" * 1000,
    "type": "invalid_request_error", "param": "messages[0].content", "code": "invalid_value",
}}
NOT_FOUND_BODY = {"error": {
    "message": "The model `gpt-0` does not exist or you do not have access to it.",
    "type": "invalid_request_error", "param": None, "code": "model_not_found",
}}

@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("scenario", "code", "retry", "delay", "credit"),
    [
        pytest.param(Scenario(status=429, headers={"retry-after": "1"}), ErrorCode.PROVIDER_ERROR, True, 1000,
                     False, id="429"),
        pytest.param(Scenario(status=429, headers={"retry-after-ms": "250"}), ErrorCode.PROVIDER_ERROR, True, 250,
                     False, id="429-ms"),
        pytest.param(Scenario(status=429, error_body=QUOTA_BODY, headers={"retry-after": "20"}),
                     ErrorCode.PROVIDER_UNAVAILABLE, False, None, True, id="429-quota"),
        pytest.param(Scenario(status=429, error_body=QUOTA_CODE_BODY), ErrorCode.PROVIDER_UNAVAILABLE, False,
                     None, True, id="429-quota-specific-code"),
        pytest.param(Scenario(status=500), ErrorCode.PROVIDER_ERROR, True, None, False, id="500"),
        pytest.param(Scenario(status=503, headers={"retry-after": "2"}), ErrorCode.PROVIDER_ERROR, True, 2000,
                     False, id="503"),
        pytest.param(Scenario(status=408), ErrorCode.PROVIDER_ERROR, True, None, False, id="408"),
        pytest.param(Scenario(status=409), ErrorCode.PROVIDER_ERROR, True, None, False, id="409"),
        pytest.param(Scenario(status=401, error_body=AUTH_BODY), ErrorCode.UNAUTHORIZED, False, None, False,
                     id="401"),
        pytest.param(Scenario(status=403, error_body=PERM_BODY), ErrorCode.UNAUTHORIZED, False, None, False,
                     id="403"),
        pytest.param(Scenario(status=400, error_body=TOO_LONG_BODY), ErrorCode.CONTEXT_TOO_LONG, False, None,
                     False, id="too-long"),
        pytest.param(Scenario(status=400, error_body=BAD_BODY), ErrorCode.INVALID_REQUEST, False, None, False,
                     id="400"),
        # An OpenAI-compatible server whose error body is not OpenAI's shape.
        pytest.param(Scenario(status=422, error_body={"detail": "Unprocessable"}), ErrorCode.INVALID_REQUEST,
                     False, None, False, id="422-foreign-body"),
        pytest.param(Scenario(status=404, error_body=NOT_FOUND_BODY), ErrorCode.PROVIDER_ERROR, False, None,
                     False, id="404"),
    ],
)
async def test_errors(
    fake: FakeOpenAI, http: httpx.AsyncClient, stream: bool, scenario: Scenario, code: ErrorCode,
    retry: bool, delay: int | None, credit: bool,
) -> None:
    fake.scenarios["this"] = scenario
    with pytest.raises(ProviderFailure) as info:
        await call(fake, http, request(user("[[fake:this]] hello"), stream=stream))
    err = info.value
    assert type(err) is ProviderFailure
    assert err.code is code
    assert err.retry is retry
    assert err.retry_after_ms == delay
    assert err.credit_exhausted is credit
    assert err.http_status == scenario.status
    assert KEY not in err.message
    provider_text = str((scenario.error_body or {}).get("error", {}).get("message", ""))
    if code is ErrorCode.UNAUTHORIZED:
        assert provider_text and provider_text not in err.message
        assert "Incorrect API key" not in err.message
        assert "does not have access" not in err.message
    if scenario.error_body is BAD_BODY:
        assert "Invalid 'messages[0].content': xxx" in err.message
        assert len(err.message) < 400
    if scenario.status == 422:
        assert err.message == "the provider refused the request (HTTP 422)"


@pytest.mark.parametrize(
    ("name", "code", "retry", "delay"),
    [
        ("rate_limited", ErrorCode.PROVIDER_ERROR, True, 1000),
        ("rate_limited_ms", ErrorCode.PROVIDER_ERROR, True, 250),
        ("server_error", ErrorCode.PROVIDER_ERROR, True, None),
        ("overloaded", ErrorCode.PROVIDER_ERROR, True, None),
        ("unauthorized", ErrorCode.UNAUTHORIZED, False, None),
        ("forbidden", ErrorCode.UNAUTHORIZED, False, None),
    ],
)
async def test_builtin_error_scenarios(
    fake: FakeOpenAI, http: httpx.AsyncClient, name: str, code: ErrorCode, retry: bool, delay: int | None
) -> None:
    with pytest.raises(ProviderFailure) as info:
        await call(fake, http, request(user(f"[[fake:{name}]] hi")))
    err = info.value
    assert (err.code, err.retry, err.retry_after_ms) == (code, retry, delay)
    # The fake's own texts for 401/403 must not leak either.
    assert "Incorrect API key" not in err.message
    assert "Request forbidden" not in err.message


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("stream", [False, True])
async def test_connect_failure_is_retryable(http: httpx.AsyncClient, stream: bool) -> None:
    req = request(user("hello"), stream=stream)
    built = adapter.build(req, model=MODEL, base_url=f"http://127.0.0.1:{closed_port()}/v1", api_key=KEY,
                          headers={})
    with pytest.raises(ProviderFailure) as info:
        async for _ in run(http, adapter, built, stream=stream, timeout=TIMEOUT):
            pass
    err = info.value
    assert type(err) is ProviderFailure
    assert err.code is ErrorCode.PROVIDER_ERROR
    assert err.retry is True
    assert err.http_status is None
    assert "connection refused" in err.message  # the cause, not the exception class that carried it


@pytest.mark.parametrize("stream", [False, True])
async def test_read_timeout_is_retryable(fake: FakeOpenAI, http: httpx.AsyncClient, stream: bool) -> None:
    fake.scenarios["late"] = Scenario(ttft_ms=600)
    short = httpx.Timeout(connect=2, read=0.1, write=2, pool=2)
    with pytest.raises(ProviderFailure) as info:
        await call(fake, http, request(user("[[fake:late]] hello"), stream=stream), timeout=short)
    err = info.value
    # Nothing was streamed yet, so this is a plain failure that may be retried, not a broken stream.
    assert type(err) is ProviderFailure
    assert err.code is ErrorCode.PROVIDER_ERROR
    assert err.retry is True
    assert "ReadTimeout" in err.message


@pytest.mark.parametrize("scenario", ["disconnect", "malformed", "truncated"])
async def test_broken_stream(fake: FakeOpenAI, http: httpx.AsyncClient, scenario: str) -> None:
    req = request(user(f"[[fake:{scenario}]] Tell me about rivers"), stream=True)
    built = adapter.build(req, model=MODEL, base_url=fake.url + "/v1", api_key=KEY, headers={})
    seen: list[Event] = []
    with pytest.raises(StreamBroken) as info:
        async for ev in run(http, adapter, built, stream=True, timeout=TIMEOUT):
            seen.append(ev)
    assert seen and all(isinstance(e, TextDelta) for e in seen)
    assert info.value.retry is True


@pytest.mark.parametrize(
    ("finish_reason", "ours"),
    [("stop", "stop"), ("length", "length"), ("tool_calls", "tool_calls"), ("function_call", "tool_calls"),
     ("content_filter", "content_filter")],
)
async def test_finish_reasons(fake: FakeOpenAI, http: httpx.AsyncClient, finish_reason: str, ours: str) -> None:
    fake.scenarios["end"] = Scenario(finish_reason=finish_reason)
    for stream in (False, True):
        _, done = split(await call(fake, http, request(user("[[fake:end]] hi"), stream=stream)))
        assert done.finish_reason == ours


# --- the stream parser on events the fake does not send --------------------------


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> str:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m", "choices": choices,
                       **extra})


def feed_all(datas: list[str]) -> list[Event]:
    parser = adapter.stream_parser()
    out: list[Event] = []
    for data in datas:
        out += parser.feed(SSEvent("message", data))
    return out + parser.close()


def test_parser_error_object_mid_stream_breaks_stream() -> None:
    parser = adapter.stream_parser()
    assert parser.feed(SSEvent("message", chunk({"role": "assistant", "content": ""}))) == []
    assert parser.feed(SSEvent("message", chunk({"content": "Hel"}))) == [TextDelta("Hel")]
    error = json.dumps({"error": {"message": "The server had an error while processing your request.",
                                  "type": "server_error", "param": None, "code": None}})
    with pytest.raises(StreamBroken):
        parser.feed(SSEvent("message", error))


def test_parser_assembles_interleaved_tool_call_fragments() -> None:
    def frag(index: int, args: str, **first: str) -> str:
        call: dict[str, Any] = {"index": index, "function": {"arguments": args}}
        if first:
            call.update(id=first["id"], type="function")
            call["function"]["name"] = first["name"]
        return chunk({"tool_calls": [call]}, usage=None)

    events = feed_all([
        chunk({"role": "assistant", "content": None}, usage=None),
        frag(0, "", id="call_w", name="get_weather"),
        frag(1, '{"tz"', id="call_t", name="get_time"),
        frag(0, '{"ci'),
        frag(1, ': "Europe/Oslo"}'),
        frag(0, 'ty": "Oslo", "units"'),
        frag(0, ': {"temp": "C"}}'),
        chunk({}, "tool_calls", usage=None),
        chunk(None, usage={"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}),
        "[DONE]",
    ])
    [done] = events
    assert isinstance(done, Finished)
    assert done.finish_reason == "tool_calls"
    assert done.tool_calls == [
        ToolCall(id="call_w", name="get_weather", arguments={"city": "Oslo", "units": {"temp": "C"}}),
        ToolCall(id="call_t", name="get_time", arguments={"tz": "Europe/Oslo"}),
    ]
    # Every chunk but the last carries "usage": null; only the last one counts.
    assert (done.usage.input_tokens, done.usage.output_tokens) == (9, 4)


def test_parser_without_usage_chunk_reports_zero_usage() -> None:
    events = feed_all([chunk({"content": "Hi"}), chunk({}, "stop"), "[DONE]"])
    assert events[0] == TextDelta("Hi")
    done = events[-1]
    assert isinstance(done, Finished)
    assert done.usage.input_tokens == 0 and done.raw_usage is None


def test_parser_done_without_finish_reason_breaks_stream() -> None:
    with pytest.raises(StreamBroken):
        feed_all([chunk({"content": "Hi"}), "[DONE]"])


def test_parser_finish_without_done_breaks_stream() -> None:
    with pytest.raises(StreamBroken):
        feed_all([chunk({"content": "Hi"}), chunk({}, "stop")])


@pytest.mark.parametrize("arguments", ['{"city": "Par', '["Paris"]'])
def test_parser_rejects_tool_arguments_that_are_not_a_json_object(arguments: str) -> None:
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    with pytest.raises(StreamBroken):
        feed_all([chunk({"tool_calls": [call]}), chunk({}, "tool_calls"), "[DONE]"])


# --- whole answers the fake does not send -------------------------------------------


def completion(message: object) -> bytes:
    return json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "model": "m",
                       "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]}).encode()


ARGS_AS_OBJECT = completion({"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"city": "Paris"}}},
]})


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"<html>Bad gateway</html>", id="not-json"),
        pytest.param(b"{}", id="no-choices"),
        pytest.param(b'{"choices": []}', id="empty-choices"),
        pytest.param(completion({"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{nope"}},
        ]}), id="arguments-not-json"),
        pytest.param(completion(None), id="message-null"),
    ],
)
def test_unreadable_answer_is_a_provider_failure(body: bytes) -> None:
    with pytest.raises(ProviderFailure) as info:
        adapter.parse_response(body)
    assert info.value.retry is True


def test_arguments_sent_as_an_object_are_accepted() -> None:
    # Some OpenAI-compatible servers send the arguments already parsed.
    *_, fin = adapter.parse_response(ARGS_AS_OBJECT)
    assert isinstance(fin, Finished)
    assert [(c.name, c.arguments) for c in fin.tool_calls] == [("f", {"city": "Paris"})]


# --- temperature rules ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "rule", "sent"),
    [
        ("gpt-4o", None, 1.5),
        # Reasoning models refuse any temperature but 1: the request's is left out.
        ("o3-mini", None, None),
        ("gpt-5-mini-2025-08-07", None, None),
        # An Anthropic model behind an OpenAI-compatible gateway keeps Anthropic's cap.
        ("anthropic/claude-sonnet-4-5", None, 1.0),
        # The config's rule (passed in) wins over the table, also for a model the table does not know.
        ("my-local-reasoner", "only_1", None),
        ("o3", "any", 1.5),
    ],
)
def test_temperature_follows_the_models_rule(model: str, rule: Temperature | None, sent: float | None) -> None:
    req = request(user("Hi"), temperature=1.5)
    body = adapter.build(req, model=model, base_url="https://api.openai.com/v1", api_key=KEY, headers={},
                         temperature_rule=rule).body
    assert body.get("temperature") == sent
