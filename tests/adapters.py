"""What the provider adapter tests share: builders, constants, fixtures and the golden-file check.

Used by test_{openai,anthropic,gemini}_adapter.py, test_{openai,anthropic,gemini}_golden.py and the
SDK tests. A module that wants the `http` fixture re-exports it by name, `from .adapters import http as http`
(pytest only loads conftest.py by itself; the redundant alias keeps ruff from calling the import unused).
A provider that differs (Gemini's key, timeout, tool description, request ids) keeps its own value in its
test module and passes it here explicitly.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from router.providers.base import Adapter, Event, Finished, TextDelta, run
from router.providers.fakes.common import FakeServer
from schemas import ImagePart, Message, Request, TextPart, Tool

KEY = "test-key"
TIMEOUT = httpx.Timeout(connect=2, read=5, write=2, pool=2)
WEATHER = Tool(
    name="get_weather",
    description="The current weather in a city.",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
CLOCK = Tool(name="get_time", parameters={"type": "object", "properties": {"tz": {"type": "string"}}})

F = TypeVar("F", bound=FakeServer)


# --- fixtures --------------------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


def fake_fixture(cls: type[F]) -> Callable[[], AsyncIterator[F]]:
    """A function-scoped fixture that runs a fresh `cls()` fake; a module binds it as `fake = fake_fixture(...)`."""

    @pytest.fixture
    async def fake() -> AsyncIterator[F]:
        server = cls()
        await server.start()
        yield server
        await server.stop()

    return fake


# --- requests and events -----------------------------------------------------------


def request(*messages: Message, request_id: str = "r1", reply_to: str = "_INBOX.x", **kw: Any) -> Request:
    return Request(id=request_id, account="acme", reply_to=reply_to, messages=list(messages), **kw)


def user(content: str | list[TextPart | ImagePart]) -> Message:
    return Message(role="user", content=content)


async def collect(
    http: httpx.AsyncClient, adapter: Adapter, req: Request, *, model: str, base_url: str,
    api_key: str | None = KEY, timeout: httpx.Timeout = TIMEOUT,
) -> list[Event]:
    """Build `req` for the adapter and run it over `http`: every event, the Finished one last."""
    built = adapter.build(req, model=model, base_url=base_url, api_key=api_key, headers={})
    return [ev async for ev in run(http, adapter, built, stream=req.stream, timeout=timeout)]


def split(events: list[Event]) -> tuple[str, Finished]:
    """The text of an answer made only of text deltas, and its Finished event."""
    *deltas, finished = events
    assert isinstance(finished, Finished)
    assert all(isinstance(d, TextDelta) for d in deltas)
    return "".join(d.text for d in deltas if isinstance(d, TextDelta)), finished


# --- golden files --------------------------------------------------------------------


def check_golden(folder: Path, name: str, got: dict[str, Any], *, through_json: bool = True) -> None:
    """`got` must equal `folder/<name>.json`; with UPDATE_GOLDEN=1 the file is (re)written from `got` first.

    `through_json` compares `got` as it goes on the wire (after a JSON round trip); without it, as built.
    The checks raise AssertionError themselves, with a diff: pytest does not rewrite asserts outside
    test modules and conftest.py.
    """
    path = folder / f"{name}.json"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(got, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if not path.exists():
        raise AssertionError(f"no golden file {path.name}; run with UPDATE_GOLDEN=1 to write it")
    want = json.loads(path.read_text(encoding="utf-8"))
    actual = json.loads(json.dumps(got)) if through_json else got
    if actual != want:
        diff = difflib.unified_diff(
            _pretty(want).splitlines(), _pretty(actual).splitlines(), f"golden {path.name}", "build()", lineterm=""
        )
        # Values that print alike but differ (a tuple against a list) leave no diff: show both.
        lines = list(diff) or [f"want: {want!r}", f"got:  {actual!r}"]
        raise AssertionError(f"build() no longer matches {path.name}:\n" + "\n".join(lines))


def _pretty(value: object) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=repr)
