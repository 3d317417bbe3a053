"""`switchyard config push|show` and the live config every process follows, against a real nats-server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from router import config as config_mod
from workers import configstore
from workers.configstore import LiveConfig

from .conftest import fleet_config
from .helpers import switchyard
from .test_dlq_cli import js  # noqa: F401  (the `js` fixture: streams, NATS_URL)

TOML = """
[providers.openai]
format = "openai"
base_url = "http://127.0.0.1:9/v1"

[pools.openai]
provider = "openai"

[routes.draft]
default = ["openai:gpt-4o-mini"]
"""


async def test_a_push_is_shown_and_followed_by_a_running_process(
    js: JetStreamContext, capsys: pytest.CaptureFixture[str], tmp_path: Path  # noqa: F811
) -> None:
    live = LiveConfig(fleet_config({"openai": "http://127.0.0.1:9/v1"}))
    seen: list[list[str]] = []
    live.on_change(lambda cfg: seen.append(sorted(cfg.routes)))
    stop = asyncio.Event()
    follower = asyncio.create_task(live.follow(js, stop))
    try:
        path = tmp_path / "routes.toml"
        path.write_text(TOML + '\n[routes.summary]\ndefault = ["openai:gpt-4o"]\n')
        pushed = await switchyard(capsys, "config", "push", str(path))
        assert pushed.code == 0, pushed.err
        assert "pushed revision 1: 1 providers, pools openai; use cases draft, summary" in pushed.out
        async with asyncio.timeout(2):  # applied everywhere within 2 s
            while live.current.routes.keys() != {"draft", "summary"}:
                await asyncio.sleep(0.02)
        assert seen == [["draft", "summary"]]
        shown = await switchyard(capsys, "config", "show")
        assert shown.code == 0 and "summary.default" in shown.out and "openai:gpt-4o" in shown.out
        as_json = json.loads((await switchyard(capsys, "config", "show", "--json")).out)
        assert as_json["revision"] == live.revision and "summary" in as_json["config"]["routes"]
    finally:
        stop.set()
        await follower


@pytest.mark.parametrize(("text", "words"), [
    (TOML.replace('"openai:gpt-4o-mini"', '"nowhere:gpt-4o-mini"'), "routes.draft.default[0]: unknown pool 'nowhere'"),
    (TOML.replace("concurrency", "x") + "[pools.openai.retry]\nattempts = 0\n", "attempts"),
    ("not toml [", "not valid TOML"),
])
async def test_a_broken_push_changes_nothing(
    js: JetStreamContext, capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, words: str  # noqa: F811
) -> None:
    good = tmp_path / "good.toml"
    good.write_text(TOML)
    assert (await switchyard(capsys, "config", "push", str(good))).code == 0
    before = await configstore.current(js)
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    result = await switchyard(capsys, "config", "push", str(bad))
    assert result.code == 1 and words in result.err and "the running config stays" in result.err
    assert "Traceback" not in result.err and len(result.err.strip().splitlines()) == 1
    assert await configstore.current(js) == before


async def test_show_before_any_push_says_how_to_push(js: JetStreamContext, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    result = await switchyard(capsys, "config", "show")
    assert result.code == 1 and "config push" in result.err


async def test_a_stored_value_that_does_not_decode_leaves_the_running_config(js: JetStreamContext, nc: NATS) -> None:  # noqa: F811
    start = fleet_config({"openai": "http://127.0.0.1:9/v1"})
    live = LiveConfig(start)
    stop = asyncio.Event()
    follower = asyncio.create_task(live.follow(js, stop))
    try:
        kv = await configstore.bucket(js)
        await kv.put(configstore.KEY, b'{"providers": 7}')
        good = config_mod.from_mapping({**msgspec.to_builtins(start), "routes": {"only": {"default": ["openai:m"]}}})
        await configstore.push(js, good)
        async with asyncio.timeout(2):
            while "only" not in live.current.routes:
                await asyncio.sleep(0.02)
    finally:
        stop.set()
        await follower
