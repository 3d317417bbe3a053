"""Golden files of what `build()` sends to the Anthropic Messages API.

Regenerate with `UPDATE_GOLDEN=1 pytest tests/test_anthropic_golden.py`, then review the diff
against Anthropic's Messages API reference before committing it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from router.providers import anthropic as adapter
from schemas import ImagePart, Message, NamedToolChoice, Request, TextPart, Tool, ToolCall

GOLDEN = Path(__file__).parent / "golden" / "anthropic"
BASE_URL = "https://api.anthropic.com"
KEY = "test-key"

WEATHER = Tool(
    name="get_weather",
    description="The current weather in a city.",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
CLOCK = Tool(name="get_time", parameters={"type": "object", "properties": {"tz": {"type": "string"}}})


def request(*messages: Message, **kw: Any) -> Request:
    return Request(id="r1", account="acme", reply_to="_INBOX.x", messages=list(messages), **kw)


CASES: dict[str, tuple[Request, str | None]] = {
    "plain_system": (
        request(
            Message(role="system", content="You are terse."),
            Message(role="user", content="Name a prime number."),
            Message(role="assistant", content="7"),
            Message(role="user", content="Another one."),
            max_tokens=256,
            temperature=0.2,
        ),
        KEY,
    ),
    "vision": (
        request(
            Message(role="user", content=[
                TextPart(text="What differs between these two pictures?"),
                ImagePart(url="https://example.com/a.jpg"),
                ImagePart(data="iVBORw0KGgoAAAANSUhEUgAAAAE=", media_type="image/png"),
            ]),
            stream=True,
        ),
        KEY,
    ),
    "tools_named_choice": (
        request(
            Message(role="user", content="What's the weather in Lyon?"),
            tools=[WEATHER, CLOCK],
            tool_choice=NamedToolChoice(name="get_weather"),
            max_tokens=512,
        ),
        KEY,
    ),
    "tool_conversation": (
        request(
            Message(role="system", content="Use tools when they help."),
            Message(role="system", content="Answer in Celsius."),
            Message(role="user", content="Is it warmer in Paris or in Oslo right now?"),
            Message(role="assistant", content="Let me check both cities.", tool_calls=[
                ToolCall(id="toolu_01", name="get_weather", arguments={"city": "Paris"}),
                ToolCall(id="toolu_02", name="get_weather", arguments={"city": "Oslo"}),
            ]),
            Message(role="tool", tool_call_id="toolu_01", content="18°C, sunny"),
            Message(role="tool", tool_call_id="toolu_02", content="4°C, rain"),
            Message(role="assistant", content="Paris is warmer: 18°C against 4°C."),
            Message(role="user", content="And what time is it in Oslo?"),
            Message(role="assistant", tool_calls=[
                ToolCall(id="toolu_03", name="get_time", arguments={"tz": "Europe/Oslo"}),
            ]),
            Message(role="tool", tool_call_id="toolu_03", content=[TextPart(text="14:05")]),
            tools=[WEATHER, CLOCK],
            tool_choice="required",
            stream=True,
        ),
        KEY,
    ),
    "no_key_defaults": (
        # No key (a proxy adds it), no max_tokens, and an OpenAI-range temperature above Anthropic's 1.0.
        request(Message(role="user", content="Hi"), temperature=1.5, tool_choice="none"),
        None,
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_build_matches_golden(name: str) -> None:
    req, key = CASES[name]
    headers = {"anthropic-beta": "example-beta"} if name == "no_key_defaults" else {}
    call = adapter.build(req, model="claude-haiku-4-5", base_url=BASE_URL, api_key=key, headers=headers)
    got = {"url": call.url, "headers": call.headers, "body": call.body}
    path = GOLDEN / f"{name}.json"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(got, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    want = json.loads(path.read_text(encoding="utf-8"))
    # Through JSON, as the body goes on the wire.
    assert json.loads(json.dumps(got)) == want


def test_every_golden_file_has_a_case() -> None:
    assert {p.stem for p in GOLDEN.glob("*.json")} == set(CASES)
