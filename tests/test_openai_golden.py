"""Golden files of what `build()` sends to the OpenAI Chat Completions API.

Regenerate with `UPDATE_GOLDEN=1 pytest tests/test_openai_golden.py`, then review the diff
against OpenAI's Chat Completions API reference before committing it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import pytest

from router.providers import openai as adapter
from schemas import ImagePart, Message, NamedToolChoice, Request, TextPart, ToolCall

from .adapters import CLOCK, KEY, WEATHER, check_golden, request

GOLDEN = Path(__file__).parent / "golden" / "openai"
BASE_URL = "https://api.openai.com/v1"


class Case(NamedTuple):
    req: Request
    key: str | None = KEY
    headers: dict[str, str] | None = None
    base_url: str = BASE_URL
    model: str = "gpt-4o-mini"


CASES: dict[str, Case] = {
    "plain_system": Case(request(
        Message(role="system", content="You are terse."),
        Message(role="user", content="Name a prime number."),
        Message(role="assistant", content="7"),
        Message(role="user", content="Another one."),
        max_tokens=256,
        temperature=0.2,
    )),
    "vision": Case(request(
        Message(role="user", content=[
            TextPart(text="What differs between these two pictures?"),
            ImagePart(url="https://example.com/a.jpg"),
            ImagePart(data="iVBORw0KGgoAAAANSUhEUgAAAAE=", media_type="image/png"),
        ]),
    )),
    "tools_named_choice": Case(request(
        Message(role="user", content="What's the weather in Lyon?"),
        tools=[WEATHER, CLOCK],
        tool_choice=NamedToolChoice(name="get_weather"),
        max_tokens=512,
    )),
    "tools_required": Case(request(
        Message(role="user", content="Is it warmer in Lyon or in Oslo?"),
        tools=[WEATHER],
        tool_choice="required",
    )),
    "tool_conversation": Case(request(
        Message(role="system", content="Use tools when they help."),
        Message(role="user", content="Is it warmer in Paris or in Oslo right now?"),
        Message(role="assistant", content="Let me check both cities.", tool_calls=[
            ToolCall(id="call_01", name="get_weather", arguments={"city": "Paris"}),
            ToolCall(id="call_02", name="get_weather", arguments={"city": "Oslo"}),
        ]),
        Message(role="tool", tool_call_id="call_01", content="18°C, sunny"),
        Message(role="tool", tool_call_id="call_02", content="4°C, rain"),
        Message(role="assistant", content="Paris is warmer: 18°C against 4°C."),
        Message(role="user", content="And what time is it in Oslo?"),
        Message(role="assistant", tool_calls=[
            ToolCall(id="call_03", name="get_time", arguments={"tz": "Europe/Oslo"}),
        ]),
        Message(role="tool", tool_call_id="call_03", content=[TextPart(text="14:05")]),
        tools=[WEATHER, CLOCK],
        tool_choice="auto",
    )),
    "stream": Case(request(
        Message(role="user", content="Tell me about rivers."),
        stream=True,
        max_tokens=300,
    )),
    "no_key": Case(
        # A local OpenAI-compatible proxy that adds the key itself; its base URL ends with a slash.
        request(Message(role="user", content="Hi"), temperature=1.5),
        key=None,
        headers={"openai-organization": "org-test"},
        base_url="http://127.0.0.1:4000/v1/",
    ),
    "reasoning_model": Case(
        # OpenAI's reasoning models accept only their default temperature: the request's is left out.
        request(Message(role="user", content="Prove that there are infinitely many primes."),
                max_tokens=2048, temperature=0.2),
        model="o4-mini-2025-04-16",
    ),
    "compatible_server": Case(
        # Z.ai's OpenAI-compatible endpoint: the token limit goes as `max_tokens`, not OpenAI's newer field.
        request(Message(role="user", content="Summarise: queues decouple producers from consumers."),
                max_tokens=128),
        base_url="https://api.z.ai/api/paas/v4",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_build_matches_golden(name: str) -> None:
    case = CASES[name]
    call = adapter.build(case.req, model=case.model, base_url=case.base_url, api_key=case.key,
                         headers=case.headers or {})
    check_golden(GOLDEN, name, {"url": call.url, "headers": call.headers, "body": call.body})


def test_every_golden_file_has_a_case() -> None:
    assert {p.stem for p in GOLDEN.glob("*.json")} == set(CASES)


def test_no_golden_file_holds_a_secret() -> None:
    for path in GOLDEN.glob("*.json"):
        headers = json.loads(path.read_text(encoding="utf-8"))["headers"]
        assert headers.get("authorization") in (None, f"Bearer {KEY}"), path.name
