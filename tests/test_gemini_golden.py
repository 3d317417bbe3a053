"""Golden files of the Gemini request translation: what `build()` sends for typical requests.

Regenerate with `UPDATE_GOLDEN=1 pytest tests/test_gemini_golden.py`, then review the diff
against Google's Gemini API reference before committing it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from router.providers import gemini
from schemas import ImagePart, Message, NamedToolChoice, Request, TextPart, Tool, ToolCall

from . import adapters
from .adapters import KEY, check_golden

GOLDEN = Path(__file__).parent / "golden" / "gemini"
BASE_URL = "https://generativelanguage.googleapis.com"
PNG_1PX = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="

WEATHER = Tool(
    name="get_weather",
    description="Current weather in a city",
    parameters={
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city"],
    },
)
LOCAL_TIME = Tool(
    name="get_local_time",
    description="Local time in a city",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
NOW = Tool(name="utc_now", description="The current UTC time")  # no arguments


def request(*messages: Message, **kw: object) -> Request:
    return adapters.request(*messages, request_id="req-1", reply_to="_INBOX.golden", **kw)


CASES: dict[str, Request] = {
    "text_with_system": request(
        Message(role="system", content="You are a terse assistant."),
        Message(role="user", content="Name three rivers in France."),
        max_tokens=200,
        temperature=0.3,
    ),
    "vision": request(
        Message(role="user", content=[
            TextPart(text="Compare these two images."),
            ImagePart(url="https://example.com/images/bridge.png"),
            ImagePart(data=PNG_1PX, media_type="image/png"),
        ]),
    ),
    "tools_named_choice": request(
        Message(role="user", content="What's the weather in Lyon?"),
        tools=[WEATHER, NOW],
        tool_choice=NamedToolChoice(name="get_weather"),
        stream=True,
    ),
    "tool_conversation": request(
        Message(role="system", content="Use the tools when they help."),
        Message(role="user", content="Weather and local time in Paris?"),
        Message(role="assistant", tool_calls=[
            ToolCall(id="call_0", name="get_weather", arguments={"city": "Paris"}),
            ToolCall(id="call_1", name="get_local_time", arguments={"city": "Paris"}),
        ]),
        Message(role="tool", tool_call_id="call_0", content='{"temp_c": 18, "sky": "sunny"}'),
        Message(role="tool", tool_call_id="call_1", content="14:05"),
        Message(role="assistant", content="It is 18°C and sunny, and 14:05 in Paris."),
        Message(role="user", content="And in Rome?"),
        Message(role="assistant", content="Let me check Rome.", tool_calls=[
            ToolCall(id="call_0", name="get_weather", arguments={"city": "Rome", "unit": "celsius"}),
        ]),
        Message(role="tool", tool_call_id="call_0", content="[24, 26]"),
        tools=[WEATHER, LOCAL_TIME],
        tool_choice="auto",
        stream=True,
    ),
    "tool_conversation_signed": request(
        # Calls Gemini made carry its thought signatures, which go back as they came: on the first of
        # the parallel calls only. The last step's call came from elsewhere and gets the skip value.
        Message(role="user", content="Weather and local time in Paris?"),
        Message(role="assistant", tool_calls=[
            ToolCall(id="call_0", name="get_weather", arguments={"city": "Paris"}, signature="c2lnLXN0ZXAtMQ=="),
            ToolCall(id="call_1", name="get_local_time", arguments={"city": "Paris"}),
        ]),
        Message(role="tool", tool_call_id="call_0", content='{"temp_c": 18}'),
        Message(role="tool", tool_call_id="call_1", content="14:05"),
        Message(role="assistant", content="Checking Rome too.", tool_calls=[
            ToolCall(id="call_2", name="get_weather", arguments={"city": "Rome"}, signature="c2lnLXN0ZXAtMg=="),
        ]),
        Message(role="tool", tool_call_id="call_2", content='{"temp_c": 24}'),
        Message(role="assistant", tool_calls=[
            ToolCall(id="call_3", name="get_local_time", arguments={"city": "Rome"}),
        ]),
        Message(role="tool", tool_call_id="call_3", content="14:05"),
        tools=[WEATHER, LOCAL_TIME],
        temperature=1.5,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_request_translation_matches_golden(name: str) -> None:
    call = gemini.build(CASES[name], model="gemini-2.5-flash", base_url=BASE_URL + "/", api_key=KEY,
                        headers={"x-switchyard-request": "req-1"})
    # Compared as built, not through a JSON round trip.
    check_golden(GOLDEN, name, {"url": call.url, "headers": call.headers, "body": call.body}, through_json=False)
