"""`switchyard status` shows each queue and consumer, with live replicas as open pull requests."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from .conftest import Fleet
from .helpers import ask_raw, request


async def test_status_lists_queues_consumers_and_live_replicas(fleet: Fleet, nc: NATS, nats_url: str) -> None:
    await ask_raw(nc, request("count me"))
    await asyncio.sleep(0.3)
    env = {**os.environ, "NATS_URL": nats_url}
    out = await asyncio.to_thread(
        subprocess.run, [str(Path(sys.executable).parent / "switchyard"), "status"],
        env=env, capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for stream in ("LLM_REQ", "LLM_WORK", "LLM_EVENTS", "LLM_DLQ", "LLM_RES"):
        assert re.search(rf"^{stream}\s+\d+\s+\d+$", text, re.M), text
    row = re.search(r"^pool-openai\s+LLM_WORK\s+(\d+)\s+(\d+) \(\s*(\d+)\)\s+(\d+)\s+(\d+)$", text, re.M)
    assert row, text
    waiting, in_flight, cap, _redelivered, pulls = map(int, row.groups())
    assert (waiting, in_flight, cap) == (0, 0, 8) and pulls >= 1  # the fleet's one worker is waiting for work
    assert re.search(r"^dispatch\s+LLM_REQ\s", text, re.M) and re.search(r"^audit\s+LLM_EVENTS\s", text, re.M)


@pytest.mark.parametrize("command", [["status"], ["ask", "hello"]])
def test_the_cli_says_when_nats_cannot_be_reached(command: list[str]) -> None:
    # One attempt and a sentence, not a reconnect loop printing tracebacks.
    env = {**os.environ, "NATS_URL": "nats://127.0.0.1:1"}
    out = subprocess.run([str(Path(sys.executable).parent / "switchyard"), *command],
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "cannot reach NATS at nats://127.0.0.1:1" in out.stderr
    assert "Traceback" not in out.stderr
