"""A worker SIGKILLed mid-stream: the producer gets one terminal `error`, never a second answer spliced in."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
from nats.aio.client import Client as NATS

from router import config as config_mod
from router.providers.fakes import FakeOpenAI, Scenario
from schemas import Chunk, Done, Error, Reply, decode_reply

from .conftest import fleet_config, running_fleet
from .helpers import audit_row, request


def _spawn_worker(cfg_file: Path, nats_url: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "NATS_URL": nats_url, "SY_TEST_OPENAI_KEY": "test-key", "SWITCHYARD_LOG_LEVEL": "warning"}
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "switchyard"), "worker", "--pool", "openai", "--config", str(cfg_file)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


async def test_stream_of_a_killed_worker_ends_with_one_error(
    tmp_path: Path, nats_url: str, fake_openai: FakeOpenAI, nc: NATS, db: asyncpg.Pool
) -> None:
    fake_openai.scenarios["long"] = Scenario(text=" ".join(f"w{i}" for i in range(80)), words_per_chunk=1,
                                             chunk_ms=50)
    cfg = fleet_config({"openai": fake_openai.url + "/v1"})
    cfg.pools["openai"].ack_wait_ms = 1500  # notice the lost worker quickly
    cfg_file = tmp_path / "config.json"
    cfg_file.write_bytes(config_mod.encode(cfg))
    replies: list[Reply] = []
    ended = asyncio.Event()

    async def on_reply(msg: Any) -> None:
        reply = decode_reply(msg.data)
        replies.append(reply)
        if isinstance(reply, Done | Error):
            ended.set()

    body = request("[[fake:long]]", stream=True)
    inbox = f"_INBOX.loss.{body['id']}"
    async with running_fleet(nats_url, cfg, db, pools=[]):  # dispatcher and auditor here; the workers apart
        first = _spawn_worker(cfg_file, nats_url)
        second: subprocess.Popen[bytes] | None = None
        try:
            await nc.subscribe(inbox, cb=on_reply)
            await nc.jetstream().publish("llm.req.draft.acme", msgspec.json.encode({**body, "reply_to": inbox}))
            async with asyncio.timeout(20):
                while sum(isinstance(r, Chunk) for r in replies) < 15:
                    await asyncio.sleep(0.02)
            first.send_signal(signal.SIGKILL)
            first.wait()
            second = _spawn_worker(cfg_file, nats_url)
            await asyncio.wait_for(ended.wait(), 20)
            await asyncio.sleep(0.5)  # anything more would arrive by now
        finally:
            for p in (first, second):
                if p is not None and p.poll() is None:
                    p.terminate()
                    p.wait(10)

    terminal = [r for r in replies if isinstance(r, Done | Error)]
    assert len(terminal) == 1, replies
    err = terminal[0]
    assert isinstance(err, Error) and err.code == "PROVIDER_ERROR" and "lost" in err.message
    chunks = [r for r in replies if isinstance(r, Chunk)]
    assert [c.seq for c in chunks] == list(range(len(chunks)))  # no second generation spliced in
    assert 0 < err.seq <= len(chunks)  # a lower bound of what went out: at most the next seq
    assert len(fake_openai.requests) == 1  # the provider was not asked again
    row = await audit_row(db, body["id"])
    assert row["status"] == "error" and row["code"] == "PROVIDER_ERROR"
