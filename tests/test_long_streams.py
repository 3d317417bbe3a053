"""A stream longer than the work consumer's ack_wait is kept alive with in-progress acks."""

from __future__ import annotations

import pytest
from nats.aio.client import Client as NATS

from router.providers.fakes import FakeOpenAI, Scenario
from schemas import Chunk, Done
from workers.runtime import pool_consumer

from .conftest import fleet_config, running_fleet
from .helpers import ask_raw, request

ACK_WAIT_S = 1.0
SLOW = Scenario(text=" ".join(f"w{i}" for i in range(25)), words_per_chunk=1, chunk_ms=100)  # ~2.5 s


async def _run(nats_url: str, fake: FakeOpenAI, nc: NATS, keepalive_s: float) -> list[object]:
    fake.scenarios["slow"] = SLOW
    cfg = fleet_config({"openai": fake.url + "/v1"})
    async with running_fleet(nats_url, cfg, None, keepalive_s=keepalive_s):
        short = pool_consumer("llm", "openai", 8)
        short.ack_wait = ACK_WAIT_S
        await nc.jetstream().add_consumer("LLM_WORK", short)
        return await ask_raw(nc, request("[[fake:slow]]", stream=True), timeout=15)


async def test_in_progress_acks_keep_a_long_stream_from_being_redelivered(
    nats_url: str, fake_openai: FakeOpenAI, nc: NATS
) -> None:
    replies = await _run(nats_url, fake_openai, nc, keepalive_s=0.3)
    assert len(fake_openai.requests) == 1  # served once, never handed to a second delivery
    assert [r.seq for r in replies] == list(range(len(replies)))  # type: ignore[attr-defined]
    assert sum(isinstance(r, Chunk) for r in replies) == 25 and isinstance(replies[-1], Done)


@pytest.mark.parametrize("keepalive_s", [30.0])
async def test_without_them_the_stream_would_be_redelivered(
    nats_url: str, fake_openai: FakeOpenAI, nc: NATS, keepalive_s: float
) -> None:
    # The control: the same stream with no beat inside ack_wait is redelivered mid-flight.
    await _run(nats_url, fake_openai, nc, keepalive_s=keepalive_s)
    assert len(fake_openai.requests) >= 2
