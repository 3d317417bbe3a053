"""A pushed config reaches a running fleet without a restart: routes within 2 s, a new pool once a worker
for it runs (started by `switchyard up` itself), and a broken push changes nothing."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS

from router import config as config_mod
from router.providers.fakes import FakeOpenAI
from schemas import Done, Error
from workers import configstore, processes
from workers.runtime import ensure_topology

from .conftest import fleet_config
from .helpers import ask_raw, request
from .test_up import _clean_env
from .test_up_supervise import SWITCHYARD, _switchyard_up


async def test_a_push_reroutes_running_processes_within_two_seconds(
    nats_url: str, nc: NATS, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("SY_TEST_OPENAI_KEY", "sk-test-not-a-real-key")
    cfg = fleet_config({"openai": fake_openai.url + "/v1"})
    await ensure_topology(nc.jetstream(), cfg)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(processes.run_dispatcher(stop, cfg, nats_url)),
             asyncio.create_task(processes.run_worker(stop, cfg, nats_url, "openai"))]
    try:
        [refused] = await ask_raw(nc, request(), subject="llm.req.summary.acme", timeout=15)
        assert isinstance(refused, Error) and refused.code == "NO_ROUTE"

        raw = msgspec.to_builtins(cfg)
        raw["routes"]["summary"] = {"default": ["openai:gpt-4o"]}
        pushed = config_mod.from_mapping(raw)
        await configstore.push(nc.jetstream(), pushed)
        served = None
        async with asyncio.timeout(2):
            while not isinstance(served, Done):
                [served] = await ask_raw(nc, request(), subject="llm.req.summary.acme")
        assert served.model == "gpt-4o"

        # A broken push is refused by the CLI and the fleet keeps routing as before.
        bad = tmp_path / "bad.toml"
        bad.write_text('[providers.x]\nformat = "nope"\nbase_url = "http://127.0.0.1:9"\n')
        env = {**_clean_env(tmp_path), "NATS_URL": nats_url}
        result = await asyncio.to_thread(
            subprocess.run, [SWITCHYARD, "config", "push", str(bad)], env=env, capture_output=True, text=True,
            timeout=60,
        )
        assert result.returncode == 1 and "providers.x.format" in result.stderr
        [still] = await ask_raw(nc, request(), subject="llm.req.summary.acme")
        assert isinstance(still, Done) and still.model == "gpt-4o"
    finally:
        stop.set()
        done, _ = await asyncio.wait(tasks, timeout=15)
        assert len(done) == 2 and all(t.cancelled() or t.exception() is None for t in done)


async def test_up_starts_a_worker_for_a_pool_a_push_adds(tmp_path: Path, nats_url: str, pg_url: str) -> None:
    data_dir = tmp_path / "data"
    env = _clean_env(data_dir) | {"NATS_URL": nats_url, "DATABASE_URL": pg_url}
    async with _switchyard_up(env) as up:
        raw = json.loads((data_dir / "config.json").read_text())
        raw["pools"]["second"] = {"provider": "demo", "concurrency": 4}
        raw["routes"]["extra"] = {"default": ["second:switchyard-demo"]}
        path = tmp_path / "pushed.json"
        path.write_text(json.dumps(raw))
        push = await asyncio.to_thread(
            subprocess.run, [SWITCHYARD, "config", "push", str(path)], env=env, capture_output=True, text=True,
            timeout=60,
        )
        assert push.returncode == 0, push.stderr
        await up.wait_for(r"pool second added by a config push: its worker is started")
        nc = await nats.connect(nats_url)
        try:
            replies = await ask_raw(nc, request(), subject="llm.req.extra.acme", timeout=30)
        finally:
            await nc.close()
        done = replies[-1]
        assert isinstance(done, Done) and [a.pool for a in done.attempts] == ["second"]
        assert up.child("worker", "second").is_running()
        await up.stop_cleanly()
