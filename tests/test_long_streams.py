"""A stream longer than the work consumer's ack_wait is kept alive with in-progress acks."""

from __future__ import annotations

from nats.aio.client import Client as NATS

from router.providers.fakes import FakeOpenAI, Scenario
from schemas import Chunk, Done, Error

from .conftest import fleet_config, running_fleet
from .helpers import ask_raw, request

SLOW = Scenario(text=" ".join(f"w{i}" for i in range(25)), words_per_chunk=1, chunk_ms=100)  # ~2.5 s


async def _run(nats_url: str, fake: FakeOpenAI, nc: NATS, keepalive_s: float | None) -> list[object]:
    fake.scenarios["slow"] = SLOW
    cfg = fleet_config({"openai": fake.url + "/v1"})
    cfg.pools["openai"].ack_wait_ms = 1000
    async with running_fleet(nats_url, cfg, None, keepalive_s=keepalive_s):
        info = await nc.jetstream().consumer_info("LLM_WORK", "pool-openai")
        assert info.config.ack_wait == 1.0
        return await ask_raw(nc, request("[[fake:slow]]", stream=True), timeout=15)


async def test_in_progress_acks_keep_a_long_stream_from_being_redelivered(
    nats_url: str, fake_openai: FakeOpenAI, nc: NATS
) -> None:
    replies = await _run(nats_url, fake_openai, nc, keepalive_s=None)  # the pool's own beat: ack_wait / 3
    assert len(fake_openai.requests) == 1  # served once, never handed to a second delivery
    assert [r.seq for r in replies] == list(range(len(replies)))  # type: ignore[attr-defined]
    assert sum(isinstance(r, Chunk) for r in replies) == 25 and isinstance(replies[-1], Done)


async def test_without_them_the_stream_would_be_redelivered(
    nats_url: str, fake_openai: FakeOpenAI, nc: NATS
) -> None:
    # The control: with no beat inside ack_wait the work item is handed to another delivery
    # mid-flight, which (seeing the stream started) ends it as lost.
    replies = await _run(nats_url, fake_openai, nc, keepalive_s=30.0)
    assert isinstance(replies[-1], Error) and "lost" in replies[-1].message
