"""The Gemini adapter driven by `run()` over real HTTP against FakeGemini."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import httpx
import msgspec
import pytest

from router.config import Temperature
from router.errors import ErrorCode, ProviderFailure, StreamBroken
from router.pricing import cost_usd
from router.providers import gemini
from router.providers.base import Event, Finished, TextDelta, run
from router.providers.fakes.common import FakeToolCall, Scenario
from router.providers.fakes.gemini import FakeGemini, google_error
from router.providers.sse import SSEvent
from schemas import ImagePart, Message, NamedToolChoice, Request, TextPart, ToolCall, Usage

from . import adapters
from .adapters import collect, fake_fixture, user
from .adapters import http as http  # re-exported so that pytest finds the `http` fixture here

MODEL = "gemini-2.5-flash"
# Gemini's own key, timeout, tool description and request ids, not the shared ones.
KEY = "test-gemini-key"
TIMEOUT = httpx.Timeout(connect=5, read=10, write=5, pool=5)
PNG_1PX = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
WEATHER = msgspec.structs.replace(adapters.WEATHER, description="Current weather in a city")

fake = fake_fixture(FakeGemini)


def request(*messages: Message, **kw: Any) -> Request:
    return adapters.request(*messages, request_id="req-1", reply_to="_INBOX.test", **kw)


async def call(http: httpx.AsyncClient, fake: FakeGemini, req: Request, key: str | None = KEY) -> list[Event]:
    return await collect(http, gemini, req, model=MODEL, base_url=fake.url, api_key=key, timeout=TIMEOUT)


def text_of(events: list[Event]) -> str:
    return "".join(ev.text for ev in events if isinstance(ev, TextDelta))


def finished(events: list[Event]) -> Finished:
    assert isinstance(events[-1], Finished)
    assert sum(isinstance(ev, Finished) for ev in events) == 1
    return events[-1]


# --- answers ---------------------------------------------------------------------


async def test_text_answer(http: httpx.AsyncClient, fake: FakeGemini) -> None:
    fake.default = Scenario(text="Paris is the capital of France.")
    req = request(
        Message(role="system", content="Answer in one sentence."),
        user("What is the capital of France?"),
        max_tokens=64,
        temperature=0.2,
    )

    events = await call(http, fake, req)

    assert events[:-1] == [TextDelta("Paris is the capital of France.")]
    done = finished(events)
    assert (done.finish_reason, done.model, done.tool_calls) == ("stop", MODEL, [])
    assert done.usage.input_tokens > 0 and done.usage.output_tokens > 0
    sent = fake.requests[0]
    assert sent["systemInstruction"] == {"parts": [{"text": "Answer in one sentence."}]}
    assert sent["contents"] == [{"role": "user", "parts": [{"text": "What is the capital of France?"}]}]
    assert sent["generationConfig"] == {"maxOutputTokens": 64, "temperature": 0.2}


async def test_streamed_answer(http: httpx.AsyncClient, fake: FakeGemini) -> None:
    fake.default = Scenario(text="one two three four five six seven", words_per_chunk=2)

    events = await call(http, fake, request(user("count"), stream=True))

    deltas = [ev for ev in events if isinstance(ev, TextDelta)]
    assert len(deltas) == 4
    assert text_of(events) == "one two three four five six seven"
    done = finished(events)
    assert done.finish_reason == "stop"
    assert done.model == MODEL
    # The usage is that of the last chunk, which counts the whole answer.
    assert done.raw_usage is not None
    assert done.usage.output_tokens == done.raw_usage["candidatesTokenCount"]
    assert fake.paths == [f"/v1beta/models/{MODEL}:streamGenerateContent?alt=sse"]


@pytest.mark.parametrize(
    ("gemini_reason", "ours"),
    [("MAX_TOKENS", "length"), ("SAFETY", "content_filter"), ("RECITATION", "content_filter"),
     ("SPII", "content_filter"), ("MALFORMED_FUNCTION_CALL", "error"), ("OTHER", "error")],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_finish_reasons(
    http: httpx.AsyncClient, fake: FakeGemini, gemini_reason: str, ours: str, stream: bool
) -> None:
    fake.default = Scenario(text="cut short", finish_reason=gemini_reason)

    events = await call(http, fake, request(user("hi"), stream=stream))

    assert finished(events).finish_reason == ours


async def test_vision_input(http: httpx.AsyncClient, fake: FakeGemini) -> None:
    fake.default = Scenario(text="Two cats.")
    req = request(user([
        TextPart(text="What is in these pictures?"),
        ImagePart(url="https://example.com/photos/cat.JPG?size=large"),
        ImagePart(data=PNG_1PX, media_type="image/png"),
        ImagePart(url="gs://bucket/no-extension", media_type="image/webp"),
    ]))

    events = await call(http, fake, req)

    assert text_of(events) == "Two cats."
    assert fake.requests[0]["contents"][0]["parts"] == [
        {"text": "What is in these pictures?"},
        {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/photos/cat.JPG?size=large"}},
        {"inlineData": {"mimeType": "image/png", "data": PNG_1PX}},
        {"fileData": {"mimeType": "image/webp", "fileUri": "gs://bucket/no-extension"}},
    ]


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_call_round_trip(http: httpx.AsyncClient, fake: FakeGemini, stream: bool) -> None:
    question = user("[[fake:weather_tool]] What's the weather in Paris?")
    first = await call(
        http, fake,
        request(question, tools=[WEATHER], tool_choice=NamedToolChoice(name="get_weather"), stream=stream),
    )

    done = finished(first)
    assert text_of(first) == ""
    assert done.finish_reason == "tool_calls"
    # Gemini gave no id, so the adapter made one up; its thought signature is kept to be sent back.
    signature = done.tool_calls[0].signature
    assert isinstance(signature, str) and signature
    assert done.tool_calls == [
        ToolCall(id="call_0", name="get_weather", arguments={"city": "Paris"}, signature=signature)
    ]
    assert fake.requests[0]["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}
    }

    second = await call(http, fake, request(
        question,
        Message(role="assistant", tool_calls=done.tool_calls),
        Message(role="tool", tool_call_id="call_0", content='{"temp_c": 18, "sky": "sunny"}'),
        tools=[WEATHER],
        stream=stream,
    ))

    final = finished(second)
    assert final.finish_reason == "stop" and final.tool_calls == []
    assert text_of(second).startswith("Here is a short answer about")
    model_turn, answer = fake.requests[1]["contents"][1:]
    assert model_turn["role"] == "model"
    assert model_turn["parts"][0] == {
        "functionCall": {"id": "call_0", "name": "get_weather", "args": {"city": "Paris"}},
        "thoughtSignature": signature,
    }
    assert answer == {"role": "user", "parts": [{"functionResponse": {
        "id": "call_0", "name": "get_weather", "response": {"result": {"temp_c": 18, "sky": "sunny"}},
    }}]}


async def test_parallel_calls_keep_the_ids_gemini_gives(http: httpx.AsyncClient, fake: FakeGemini) -> None:
    fake.scenarios["two_calls"] = Scenario(tool_calls=[
        FakeToolCall(name="get_weather", arguments={"city": "Paris"}, id="fc-a"),
        FakeToolCall(name="get_weather", arguments={"city": "Rome"}, id="fc-b"),
    ])
    question = user("[[fake:two_calls]] Paris and Rome?")

    done = finished(await call(http, fake, request(question, tools=[WEATHER])))
    assert [(c.id, c.arguments["city"]) for c in done.tool_calls] == [("fc-a", "Paris"), ("fc-b", "Rome")]

    second = await call(http, fake, request(
        question,
        Message(role="assistant", tool_calls=done.tool_calls),
        Message(role="tool", tool_call_id="fc-a", content="18C"),
        Message(role="tool", tool_call_id="fc-b", content="24C"),
        tools=[WEATHER],
    ))

    # The fake, like Gemini, refuses unless both answers come in one content.
    assert finished(second).finish_reason == "stop"
    # Gemini signs only the first of parallel calls; each goes back as it came.
    first_sig, second_sig = (c.signature for c in done.tool_calls)
    assert isinstance(first_sig, str) and first_sig and second_sig is msgspec.UNSET
    model_parts = fake.requests[1]["contents"][1]["parts"]
    assert [p.get("thoughtSignature") for p in model_parts] == [first_sig, None]
    answers = fake.requests[1]["contents"][2]["parts"]
    assert [a["functionResponse"]["response"] for a in answers] == [{"result": "18C"}, {"result": "24C"}]


async def test_usage_with_cached_and_reasoning_tokens(http: httpx.AsyncClient, fake: FakeGemini) -> None:
    prompt = "[[fake:cached]] " + "Tell me about the long history of the city of Paris. " * 3

    events = await call(http, fake, request(user(prompt)))

    done = finished(events)
    raw: dict[str, Any] | None = done.raw_usage
    assert raw is not None and raw["cachedContentTokenCount"] == 8 and raw["thoughtsTokenCount"] == 3
    assert done.usage == Usage(
        input_tokens=raw["promptTokenCount"],  # cached tokens included
        output_tokens=raw["candidatesTokenCount"] + 3,  # reasoning included
        cache_read_tokens=8,
        reasoning_tokens=3,
    )
    cost = cost_usd(done.usage, MODEL, provider_id="google")
    assert isinstance(cost, float) and cost > 0


async def test_key_travels_in_a_header_never_in_the_url(http: httpx.AsyncClient, fake: FakeGemini) -> None:
    await call(http, fake, request(user("hi")))
    await call(http, fake, request(user("hi"), stream=True))

    assert len(fake.paths) == 2
    assert all(KEY not in path and "key=" not in path for path in fake.paths)
    assert [h["x-goog-api-key"] for h in fake.request_headers] == [KEY, KEY]


async def test_no_key_no_header(http: httpx.AsyncClient, fake: FakeGemini) -> None:
    await call(http, fake, request(user("hi")), key=None)

    assert "x-goog-api-key" not in {k.lower() for k in fake.request_headers[0]}


# --- errors ----------------------------------------------------------------------

RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
QUOTA_FAILURE = "type.googleapis.com/google.rpc.QuotaFailure"
PROVIDER_TEXT = "The provider's own words, which must not reach the caller."


def quota(value: str, retry_delay: str | None = None) -> list[dict[str, Any]]:
    details: list[dict[str, Any]] = [{"@type": QUOTA_FAILURE, "violations": [{
        "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
        "quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
        "quotaDimensions": {"location": "global", "model": MODEL},
        "quotaValue": value,
    }]}]
    if retry_delay:
        details.append({"@type": RETRY_INFO, "retryDelay": retry_delay})
    return details


BILLING = "You exceeded your current quota, please check your plan and billing details."
KEY_INVALID = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}}]


class Row(NamedTuple):
    scenario: Scenario
    code: ErrorCode
    retry: bool
    retry_after_ms: int | None = None
    credit_exhausted: bool = False


def failing(status: int, message: str | None = None, details: list[dict[str, Any]] | None = None,
            headers: dict[str, str] | None = None) -> Scenario:
    body = google_error(status, message, details) if message or details else None
    return Scenario(status=status, error_body=body, headers=headers or {})


UNAVAILABLE, PROVIDER_ERROR = ErrorCode.PROVIDER_UNAVAILABLE, ErrorCode.PROVIDER_ERROR
TOO_LONG = "The input token count (1200000) exceeds the maximum number of tokens allowed (1048576)."
PREPAY = "Your prepayment credits are depleted. Please go to AI Studio to manage your billing."

ERROR_TABLE: dict[str, Row] = {
    "429 Retry-After": Row(failing(429, headers={"retry-after": "3"}), PROVIDER_ERROR, True, 3000),
    "429 RetryInfo": Row(
        failing(429, "Resource has been exhausted.", [{"@type": RETRY_INFO, "retryDelay": "2.5s"}]),
        PROVIDER_ERROR, True, 2500,
    ),
    "429 billing words, real limit": Row(
        failing(429, BILLING + "\n* limit: 20", quota("20", "36s")), PROVIDER_ERROR, True, 36000
    ),
    "429 free tier limit 0": Row(
        failing(429, BILLING + "\n* limit: 0", quota("0", "36s")), UNAVAILABLE, False, credit_exhausted=True
    ),
    "429 prepay depleted": Row(failing(429, PREPAY), UNAVAILABLE, False, credit_exhausted=True),
    "429 billing words only": Row(failing(429, BILLING), UNAVAILABLE, False, credit_exhausted=True),
    "500 INTERNAL": Row(failing(500), PROVIDER_ERROR, True),
    "503 UNAVAILABLE": Row(failing(503, headers={"retry-after": "1"}), PROVIDER_ERROR, True, 1000),
    "504 DEADLINE_EXCEEDED": Row(failing(504), PROVIDER_ERROR, True),
    "401 UNAUTHENTICATED": Row(failing(401, PROVIDER_TEXT), ErrorCode.UNAUTHORIZED, False),
    "403 PERMISSION_DENIED": Row(failing(403, PROVIDER_TEXT), ErrorCode.UNAUTHORIZED, False),
    "400 API_KEY_INVALID": Row(
        failing(400, "API key not valid. " + PROVIDER_TEXT, KEY_INVALID), ErrorCode.UNAUTHORIZED, False
    ),
    "400 API key not valid, no details": Row(
        failing(400, "API key not valid. " + PROVIDER_TEXT), ErrorCode.UNAUTHORIZED, False
    ),
    "400 input too long": Row(failing(400, TOO_LONG), ErrorCode.CONTEXT_TOO_LONG, False),
    "404 NOT_FOUND": Row(failing(404), PROVIDER_ERROR, False),
    "400 other": Row(
        failing(400, "* GenerateContentRequest.tools: bad schema " + "x" * 500),
        ErrorCode.INVALID_REQUEST,
        False,
    ),
}


@pytest.mark.parametrize("row", list(ERROR_TABLE))
@pytest.mark.parametrize("stream", [False, True])
async def test_error_table(http: httpx.AsyncClient, fake: FakeGemini, row: str, stream: bool) -> None:
    scenario, code, retry, delay, credit = ERROR_TABLE[row]
    fake.scenarios["row"] = scenario

    with pytest.raises(ProviderFailure) as info:
        await call(http, fake, request(user("[[fake:row]] hi"), stream=stream))

    err = info.value
    assert not isinstance(err, StreamBroken)
    assert (err.code, err.retry, err.retry_after_ms, err.credit_exhausted) == (code, retry, delay, credit)
    assert err.http_status == scenario.status
    assert KEY not in err.message
    if code is ErrorCode.UNAUTHORIZED:
        assert PROVIDER_TEXT not in err.message and "not valid" not in err.message
    if code is ErrorCode.INVALID_REQUEST:
        assert "bad schema" in err.message and len(err.message) < 400


# --- broken streams --------------------------------------------------------------


@pytest.mark.parametrize("fault", ["disconnect", "malformed", "truncated"])
async def test_broken_stream_raises_after_text(http: httpx.AsyncClient, fake: FakeGemini, fault: str) -> None:
    c = gemini.build(request(user(f"[[fake:{fault}]] tell me a story"), stream=True),
                     model=MODEL, base_url=fake.url, api_key=KEY, headers={})
    seen: list[Event] = []

    with pytest.raises(StreamBroken):
        async for ev in run(http, gemini, c, stream=True, timeout=TIMEOUT):
            seen.append(ev)

    assert [type(ev) for ev in seen] == [TextDelta, TextDelta]
    assert not any(isinstance(ev, Finished) for ev in seen)


def test_error_object_mid_stream_is_broken() -> None:
    parser = gemini.stream_parser()
    parser.feed(SSEvent("message", '{"candidates": [{"content": {"parts": [{"text": "Hel"}]}, "index": 0}]}'))

    with pytest.raises(StreamBroken):
        parser.feed(SSEvent("message", json.dumps(google_error(503))))


def test_blocked_prompt_is_a_content_filter_finish() -> None:
    body = json.dumps({
        "promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}, "usageMetadata": {"promptTokenCount": 9}
    }).encode()

    [done] = gemini.parse_response(body)

    assert isinstance(done, Finished)
    assert done.finish_reason == "content_filter"
    assert done.usage.input_tokens == 9


def test_tool_result_without_a_call_is_refused() -> None:
    req = request(user("hi"), Message(role="tool", tool_call_id="nope", content="42"))

    with pytest.raises(ProviderFailure) as info:
        gemini.build(req, model=MODEL, base_url="http://x", api_key=None, headers={})

    assert info.value.code is ErrorCode.INVALID_REQUEST


@pytest.mark.parametrize(
    ("model", "rule", "sent"),
    [
        ("gemini-2.5-flash", None, {"temperature": 1.5}),
        ("gemini-3-pro-preview", None, {"temperature": 1.5}),
        # The config's rule (passed in) wins over the table.
        ("gemini-2.5-flash", "max_1", {"temperature": 1.0}),
        ("gemini-2.5-flash", "only_1", None),
    ],
)
def test_temperature_follows_the_models_rule(
    model: str, rule: Temperature | None, sent: dict[str, float] | None
) -> None:
    req = request(user("Hi"), temperature=1.5)
    body = gemini.build(req, model=model, base_url="http://x", api_key=None, headers={}, temperature_rule=rule).body
    assert body.get("generationConfig") == sent


def test_a_streamed_signature_comes_back_on_its_call() -> None:
    parser = gemini.stream_parser()
    part = {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}, "thoughtSignature": "c2ln"}
    for parts, reason in (([{"text": ""}], {}), ([part], {"finishReason": "STOP"})):
        candidate = {"content": {"role": "model", "parts": parts}, **reason}
        parser.feed(SSEvent(event="message", data=json.dumps({"candidates": [candidate]})))
    (done,) = parser.close()
    assert isinstance(done, Finished)
    assert done.tool_calls == [ToolCall(id="call_0", name="get_weather", arguments={"city": "Oslo"}, signature="c2ln")]

    replay = request(user("Oslo?"), Message(role="assistant", tool_calls=done.tool_calls),
                     Message(role="tool", tool_call_id="call_0", content="4C"))
    body = gemini.build(replay, model="gemini-3-pro-preview", base_url="http://x", api_key=None, headers={}).body
    contents: Any = body["contents"]
    assert contents[1]["parts"] == [{**part, "functionCall": {"id": "call_0", **part["functionCall"]}}]
