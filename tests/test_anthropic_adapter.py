"""The Anthropic adapter, run over real HTTP against FakeAnthropic."""

from __future__ import annotations

import httpx
import pytest

from router.config import Temperature
from router.errors import ErrorCode, ProviderFailure, StreamBroken
from router.pricing import cost_usd
from router.providers import anthropic as adapter
from router.providers.base import Event, Finished, TextDelta, run
from router.providers.fakes.anthropic import FakeAnthropic
from router.providers.fakes.common import Scenario
from router.providers.sse import SSEvent
from schemas import ImagePart, Message, Request, TextPart, ToolCall

from .adapters import KEY, TIMEOUT, WEATHER, collect, fake_fixture, request, split, user
from .adapters import http as http  # re-exported so that pytest finds the `http` fixture here

MODEL = "claude-haiku-4-5"

fake = fake_fixture(FakeAnthropic)


async def call(fake: FakeAnthropic, http: httpx.AsyncClient, req: Request) -> list[Event]:
    return await collect(http, adapter, req, model=MODEL, base_url=fake.url)


async def test_text(fake: FakeAnthropic, http: httpx.AsyncClient) -> None:
    req = request(Message(role="system", content="Be brief."), user("What is a switchyard?"))
    text, done = split(await call(fake, http, req))
    assert "switchyard" in text
    assert done.finish_reason == "stop"
    assert done.model == MODEL
    assert done.usage.input_tokens > 0 and done.usage.output_tokens > 0
    assert done.tool_calls == []
    sent = fake.requests[-1]
    assert sent["system"] == "Be brief."
    assert sent["max_tokens"] == 1024
    assert sent["messages"] == [{"role": "user", "content": "What is a switchyard?"}]
    assert "stream" not in sent
    headers = {k.lower(): v for k, v in fake.request_headers[-1].items()}
    assert headers["x-api-key"] == KEY
    assert headers["anthropic-version"] == "2023-06-01"


async def test_stream(fake: FakeAnthropic, http: httpx.AsyncClient) -> None:
    whole, _ = split(await call(fake, http, request(user("Tell me about rivers"))))
    events = await call(fake, http, request(user("Tell me about rivers"), stream=True, max_tokens=300))
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert len(deltas) > 1
    text, done = split(events)
    assert text == whole
    assert done.finish_reason == "stop"
    assert done.model == MODEL
    assert done.usage.output_tokens > 0
    assert fake.requests[-1]["stream"] is True
    assert fake.requests[-1]["max_tokens"] == 300


@pytest.mark.parametrize("stream", [False, True])
async def test_vision(fake: FakeAnthropic, http: httpx.AsyncClient, stream: bool) -> None:
    msg = Message(role="user", content=[
        TextPart(text="Compare these."),
        ImagePart(url="https://example.com/cat.jpg"),
        ImagePart(data="iVBORw0KGgo=", media_type="image/png"),
    ])
    text, _ = split(await call(fake, http, request(msg, stream=stream)))
    assert text
    assert fake.requests[-1]["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "Compare these."},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
    ]}]


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_round_trip(fake: FakeAnthropic, http: httpx.AsyncClient, stream: bool) -> None:
    question = user("[[fake:weather_tool]] What is the weather in Paris?")
    first = request(question, stream=stream, tools=[WEATHER], tool_choice="auto")
    text, done = split(await call(fake, http, first))
    assert text == ""
    assert done.finish_reason == "tool_calls"
    [tool_call] = done.tool_calls
    assert tool_call.name == "get_weather"
    assert tool_call.arguments == {"city": "Paris"}
    assert tool_call.id.startswith("toolu_")
    assert fake.requests[-1]["tool_choice"] == {"type": "auto"}

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
    sent = fake.requests[-1]["messages"]
    assert sent[1] == {"role": "assistant", "content": [
        {"type": "tool_use", "id": tool_call.id, "name": "get_weather", "input": {"city": "Paris"}},
    ]}
    assert sent[2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": tool_call.id, "content": "18°C and sunny"},
    ]}


@pytest.mark.parametrize("stream", [False, True])
async def test_usage_with_cache(fake: FakeAnthropic, http: httpx.AsyncClient, stream: bool) -> None:
    fake.scenarios["cache_rw"] = Scenario(cache_read_tokens=1200, cache_write_tokens=300)
    req = request(user("[[fake:cache_rw]] Summarise the manual"), stream=stream)
    _, done = split(await call(fake, http, req))
    raw = done.raw_usage
    assert raw is not None
    assert raw["cache_read_input_tokens"] == 1200
    assert raw["cache_creation_input_tokens"] == 300
    uncached = raw["input_tokens"]
    assert isinstance(uncached, int) and uncached > 0
    assert done.usage.input_tokens == uncached + 1200 + 300
    assert done.usage.cache_read_tokens == 1200
    assert done.usage.cache_write_tokens == 300
    assert done.usage.output_tokens == raw["output_tokens"]
    assert done.usage.output_tokens > 0
    cost = cost_usd(done.usage, MODEL, provider_id="anthropic")
    assert isinstance(cost, float) and cost > 0


CREDIT_BODY = {"type": "error", "error": {
    "type": "invalid_request_error",
    "message": "Your credit balance is too low to access the Anthropic API.",
}}
TOO_LONG_BODY = {"type": "error", "error": {
    "type": "invalid_request_error", "message": "prompt is too long: 201000 tokens > 200000 maximum",
}}
# Auth errors whose text quotes the key: neither may reach our message.
AUTH_BODY = {"type": "error", "error": {
    "type": "authentication_error", "message": f"invalid x-api-key {KEY}",
}}
PERM_BODY = {"type": "error", "error": {
    "type": "permission_error", "message": f"key {KEY} lacks access to this model",
}}
BAD_BODY = {"type": "error", "error": {"type": "invalid_request_error", "message": "messages: " + "x" * 1000}}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("scenario", "code", "retry", "delay", "credit"),
    [
        (Scenario(status=429, headers={"retry-after": "7"}), ErrorCode.PROVIDER_ERROR, True, 7000, False),
        (Scenario(status=429, headers={"retry-after-ms": "250"}), ErrorCode.PROVIDER_ERROR, True, 250, False),
        (Scenario(status=529), ErrorCode.PROVIDER_ERROR, True, None, False),
        (Scenario(status=500), ErrorCode.PROVIDER_ERROR, True, None, False),
        (Scenario(status=503), ErrorCode.PROVIDER_ERROR, True, None, False),
        (Scenario(status=401, error_body=AUTH_BODY), ErrorCode.UNAUTHORIZED, False, None, False),
        (Scenario(status=403, error_body=PERM_BODY), ErrorCode.UNAUTHORIZED, False, None, False),
        (Scenario(status=401), ErrorCode.UNAUTHORIZED, False, None, False),
        (Scenario(status=400, error_body=TOO_LONG_BODY), ErrorCode.CONTEXT_TOO_LONG, False, None, False),
        (Scenario(status=400, error_body=CREDIT_BODY), ErrorCode.PROVIDER_UNAVAILABLE, False, None, True),
        (Scenario(status=400, error_body=BAD_BODY), ErrorCode.INVALID_REQUEST, False, None, False),
        (Scenario(status=404), ErrorCode.PROVIDER_ERROR, False, None, False),
    ],
    ids=[
        "429", "429-ms", "529", "500", "503", "401", "403", "401-no-body", "too-long", "credit", "400", "404",
    ],
)
async def test_errors(
    fake: FakeAnthropic, http: httpx.AsyncClient, stream: bool, scenario: Scenario, code: ErrorCode,
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
    if code is ErrorCode.UNAUTHORIZED:
        assert "x-api-key" not in err.message
        assert "lacks access" not in err.message
    if scenario.error_body is BAD_BODY:
        assert "messages: xxx" in err.message
        assert len(err.message) < 400


async def test_builtin_credit_and_context_scenarios(fake: FakeAnthropic, http: httpx.AsyncClient) -> None:
    with pytest.raises(ProviderFailure) as info:
        await call(fake, http, request(user("[[fake:credit_exhausted]] hi")))
    assert info.value.code is ErrorCode.PROVIDER_UNAVAILABLE and info.value.credit_exhausted
    with pytest.raises(ProviderFailure) as info:
        await call(fake, http, request(user("[[fake:prompt_too_long]] hi")))
    assert info.value.code is ErrorCode.CONTEXT_TOO_LONG


@pytest.mark.parametrize("scenario", ["disconnect", "malformed", "truncated"])
async def test_broken_stream(fake: FakeAnthropic, http: httpx.AsyncClient, scenario: str) -> None:
    req = request(user(f"[[fake:{scenario}]] Tell me about rivers"), stream=True)
    built = adapter.build(req, model=MODEL, base_url=fake.url, api_key=KEY, headers={})
    seen: list[Event] = []
    with pytest.raises(StreamBroken):
        async for ev in run(http, adapter, built, stream=True, timeout=TIMEOUT):
            seen.append(ev)
    assert seen and all(isinstance(e, TextDelta) for e in seen)


# --- the stream parser on events the fake does not send --------------------------


def feed_all(events: list[tuple[str, str]]) -> list[Event]:
    parser = adapter.stream_parser()
    out: list[Event] = []
    for name, data in events:
        out += parser.feed(SSEvent(name, data))
    return out + parser.close()


START = ("message_start", '{"type":"message_start","message":{"model":"m","usage":{"input_tokens":5}}}')
STOP = ("message_stop", '{"type":"message_stop"}')


def test_parser_error_event_breaks_stream() -> None:
    error = ("error", '{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}')
    with pytest.raises(StreamBroken, match="overloaded_error"):
        feed_all([START, error, STOP])


def test_parser_ignores_ping_and_unknown_events() -> None:
    events = feed_all([
        START,
        ("ping", '{"type":"ping"}'),
        ("content_block_start",
         '{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}'),
        ("content_block_delta",
         '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}'),
        ("future_event", '{"type":"future_event","what":1}'),
        ("message_delta",
         '{"type":"message_delta","delta":{"stop_reason":"max_tokens"},"usage":{"output_tokens":3}}'),
        STOP,
    ])
    assert events[0] == TextDelta("Hi")
    done = events[-1]
    assert isinstance(done, Finished)
    assert done.finish_reason == "length"
    assert (done.usage.input_tokens, done.usage.output_tokens) == (5, 3)


def test_parser_rejects_delta_for_unknown_block() -> None:
    orphan = ("content_block_delta",
              '{"type":"content_block_delta","index":4,"delta":{"type":"input_json_delta","partial_json":"{"}}')
    with pytest.raises(StreamBroken):
        feed_all([START, orphan, STOP])


def test_parser_rejects_tool_input_that_is_not_json() -> None:
    start = ("content_block_start",
             '{"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"t1","name":"f","input":{}}}')
    frag = ("content_block_delta",
            '{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{\\"a\\":"}}')
    with pytest.raises(StreamBroken):
        feed_all([START, start, frag, STOP])


@pytest.mark.parametrize(
    ("stop_reason", "ours"),
    [("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
     ("refusal", "content_filter")],
)
async def test_stop_reasons(
    fake: FakeAnthropic, http: httpx.AsyncClient, stop_reason: str, ours: str
) -> None:
    fake.scenarios["end"] = Scenario(finish_reason=stop_reason)
    for stream in (False, True):
        _, done = split(await call(fake, http, request(user("[[fake:end]] hi"), stream=stream)))
        assert done.finish_reason == ours


def test_tool_results_share_one_user_turn() -> None:
    calls = [ToolCall(id="toolu_1", name="get_weather", arguments={"city": "Paris"}),
             ToolCall(id="toolu_2", name="get_weather", arguments={"city": "Oslo"})]
    req = request(
        user("Paris and Oslo?"),
        Message(role="assistant", content="Checking both.", tool_calls=calls),
        Message(role="tool", tool_call_id="toolu_1", content="18°C"),
        Message(role="tool", tool_call_id="toolu_2", content="4°C"),
        user("Which is warmer?"),
        tools=[WEATHER], tool_choice="required",
    )
    body = adapter.build(req, model=MODEL, base_url="http://x", api_key=None, headers={}).body
    assert body["tool_choice"] == {"type": "any"}
    assert body["messages"] == [
        {"role": "user", "content": "Paris and Oslo?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Checking both."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Oslo"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18°C"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": "4°C"},
        ]},
        {"role": "user", "content": "Which is warmer?"},
    ]


@pytest.mark.parametrize(
    ("model", "rule", "asked", "sent"),
    [
        ("claude-haiku-4-5-20251001", None, 1.5, 1.0),
        ("claude-sonnet-4-5", None, 0.3, 0.3),
        # Anthropic's API caps every model at 1, even one the table does not know or the config calls "any".
        ("claude-next", None, 2.0, 1.0),
        ("claude-next", "any", 2.0, 1.0),
        ("claude-next", "only_1", 0.3, None),
    ],
)
def test_temperature_follows_the_models_rule(
    model: str, rule: Temperature | None, asked: float, sent: float | None
) -> None:
    req = request(user("Hi"), temperature=asked)
    body = adapter.build(req, model=model, base_url="http://x", api_key=None, headers={}, temperature_rule=rule).body
    assert body.get("temperature") == sent
