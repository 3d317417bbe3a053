"""Golden files of what `build()` sends to the Anthropic Messages API.

Regenerate with `UPDATE_GOLDEN=1 pytest tests/test_anthropic_golden.py`, then review the diff
against Anthropic's Messages API reference before committing it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from router.providers import anthropic as adapter
from schemas import ImagePart, Message, NamedToolChoice, Request, TextPart, ToolCall

from .adapters import CLOCK, KEY, WEATHER, check_golden, request

GOLDEN = Path(__file__).parent / "golden" / "anthropic"
BASE_URL = "https://api.anthropic.com"


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
    check_golden(GOLDEN, name, {"url": call.url, "headers": call.headers, "body": call.body})


def test_every_golden_file_has_a_case() -> None:
    assert {p.stem for p in GOLDEN.glob("*.json")} == set(CASES)
