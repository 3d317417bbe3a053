"""How `switchyard up` shapes the config: demo routing, and providers without a key left out."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import msgspec
import pytest

from router import config as config_mod
from router.config import load
from workers.processes import DEFAULT_CONFIG
from workers.up import DEMO_MODEL, STATE_FILE, State, demo_config, keyed_config, up


def test_demo_config_routes_every_use_case_and_tier_to_the_demo() -> None:
    cfg = load(DEFAULT_CONFIG)
    demo = demo_config(cfg, "http://127.0.0.1:9/v1")
    assert set(demo.routes) == set(cfg.routes)
    for uc, tiers in cfg.routes.items():
        assert set(demo.routes[uc]) == set(tiers)
        assert all(t == [f"demo:{DEMO_MODEL}"] for t in demo.routes[uc].values())
    assert demo.providers["demo"].free and list(demo.pools) == ["demo"]


def test_providers_without_a_key_are_left_out_with_their_targets() -> None:
    cfg = load(DEFAULT_CONFIG)
    pruned, missing = keyed_config(cfg, {"openai": "k", "anthropic": None, "gemini": None, "zai": None})
    assert sorted(missing) == ["anthropic", "gemini", "zai"]
    assert list(pruned.providers) == ["openai"] and list(pruned.pools) == ["openai"]
    assert pruned.routes["draft"]["default"] == ["openai:gpt-4o-mini"]
    assert pruned.routes["draft"]["pro"] == ["openai:gpt-4o"]
    # summarize/pro had no openai target: the tier is gone, and `default` serves it.
    assert "pro" not in pruned.routes["summarize"]
    assert [str(t) for t in pruned.route("summarize", "pro") or []] == ["openai:gpt-4o-mini"]


async def test_a_second_up_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / STATE_FILE).write_bytes(msgspec.json.encode(
        State(nats_url="nats://127.0.0.1:1", database_url="postgresql://x", pid=os.getpid())))
    with pytest.raises(SystemExit) as info:
        await up(asyncio.Event(), config_path=None, data_dir=data_dir, nats_port=0)
    assert "already up" in str(info.value) and str(os.getpid()) in str(info.value)
    assert not (data_dir / "pg").exists()  # refused before starting anything


def test_a_key_reference_to_the_database_is_refused_not_ignored() -> None:
    raw = {"providers": {"a": {"format": "openai", "base_url": "http://127.0.0.1:9", "api_key_ref": "db:a"}},
           "pools": {}, "routes": {}}
    with pytest.raises(config_mod.ConfigError, match=r"^providers\.a\.api_key_ref: keys stored encrypted"):
        config_mod.from_mapping(raw)
