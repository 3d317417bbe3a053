"""Route selection in a running fleet: what a producer sees of it in its replies and the audit ledger.

The rules themselves are tested one by one in tests/test_selection.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS

from router.config import Config, load
from router.providers.fakes import FakeOpenAI
from router.routing import AlwaysHealthy, Health, select
from schemas import Done, Error, Message, Request
from workers import admin
from workers.accounts import AccountRoutes
from workers.auditor import Auditor
from workers.dispatcher import Dispatcher
from workers.processes import DEFAULT_CONFIG, http_client
from workers.progress import Progress, ensure_bucket
from workers.provider import PoolWorker
from workers.publish import Publisher
from workers.runtime import ensure_topology

from .conftest import fleet_config
from .helpers import ask_raw, audit_row, request
from .test_selection import NOW, FakeHealth


@contextlib.asynccontextmanager
async def serving(
    nats_url: str, cfg: Config, db: asyncpg.Pool | None, *, health: Health | None = None,
    accounts: AccountRoutes | None = None, with_admin: bool = False,
) -> AsyncIterator[Dispatcher]:
    """A dispatcher built with `health` and `accounts` (and the admin service when `with_admin`), one
    worker per pool and the auditor (with `db`), each on its own NATS connection."""
    stop = asyncio.Event()
    conns: list[NATS] = []

    async def conn() -> NATS:
        c = await nats.connect(nats_url)
        conns.append(c)
        return c

    first = await conn()
    await ensure_topology(first.jetstream(), cfg)
    dnc = await conn()
    djs = dnc.jetstream()
    dispatcher = Dispatcher(djs, Publisher(dnc, djs, cfg.subject_prefix), cfg, health=health, accounts=accounts)
    service = await admin.start(dnc, dispatcher, cfg.subject_prefix) if with_admin else None
    started = asyncio.Event()

    async def run() -> None:
        async with http_client() as http, asyncio.TaskGroup() as tg:
            tg.create_task(dispatcher.serve(stop))
            for pool in cfg.pools:
                wnc = await conn()
                wjs = wnc.jetstream()
                progress = Progress(wnc, await ensure_bucket(wjs))
                keys = {name: "sk-test-not-a-real-key" for name in cfg.providers}
                worker = PoolWorker(wjs, Publisher(wnc, wjs, cfg.subject_prefix), http, cfg, pool, keys, progress)
                tg.create_task(worker.serve(stop))
            if db is not None:
                anc = await conn()
                ajs = anc.jetstream()
                tg.create_task(Auditor(ajs, Publisher(anc, ajs, cfg.subject_prefix), db).serve(stop))
            started.set()

    task = asyncio.create_task(run())
    await asyncio.wait([task, asyncio.create_task(started.wait())], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    if accounts is not None:
        await asyncio.wait_for(accounts.loaded.wait(), 10)
    try:
        yield dispatcher
    finally:
        stop.set()
        if service is not None:
            await service.stop()
        await asyncio.wait_for(task, 10)
        for c in conns:
            await c.close()


def two_pools(url: str, **extra: Any) -> Config:
    """Pools `openai` and `backup`, both served by the same fake OpenAI."""
    routes = {
        "draft": {"default": ["backup:gpt-4o-mini", "openai:gpt-4o-mini"], "pro": ["openai:gpt-4o"]},
    }
    return fleet_config({"openai": url, "backup": url}, routes=routes, **extra)


def test_every_route_of_the_shipped_config_selects_its_own_targets() -> None:
    cfg = load(DEFAULT_CONFIG)
    for use_case, tiers in cfg.routes.items():
        for tier, names in tiers.items():
            r = Request(id="r", use_case=use_case, account="acme", tier=tier, reply_to="_INBOX.x",
                        messages=[Message(role="user", content="hi")])
            s = select(cfg, r, AlwaysHealthy(), now_ms=NOW)
            assert [str(t) for t in s.chain] == names and s.skipped == [], (use_case, tier)


async def test_a_default_tier_request_forcing_a_pro_only_model_gets_no_route(
    nats_url: str, nc: NATS, fake_openai: FakeOpenAI
) -> None:
    cfg = two_pools(fake_openai.url + "/v1")
    async with serving(nats_url, cfg, None):
        replies = await ask_raw(nc, request(model="gpt-4o"))
        pro = await ask_raw(nc, request(model="gpt-4o", tier="pro"))
    [err] = replies
    assert isinstance(err, Error) and err.code == "NO_ROUTE"
    assert "may not be forced by tier 'default'" in err.message and "openai:gpt-4o" in err.message
    assert isinstance(pro[-1], Done) and pro[-1].model == "gpt-4o"
    assert len(fake_openai.requests) == 1  # only the pro request reached a provider


async def test_a_skipped_target_shows_in_the_dones_attempts_and_the_ledger(
    nats_url: str, nc: NATS, fake_openai: FakeOpenAI, db: asyncpg.Pool
) -> None:
    cfg = two_pools(fake_openai.url + "/v1")
    async with serving(nats_url, cfg, db, health=FakeHealth(keys={"backup": False})):
        body = request()
        [done] = await ask_raw(nc, body)
        row = await audit_row(db, body["id"])
    assert isinstance(done, Done)
    first, second = done.attempts
    assert (first.pool, first.model, first.error, first.latency_ms) == ("backup", "gpt-4o-mini", "SKIPPED_NO_KEY", None)
    assert (second.pool, second.error) == ("openai", None) and second.latency_ms is not None
    assert [a["error"] for a in msgspec.json.decode(row["attempts"])] == ["SKIPPED_NO_KEY", None]


async def test_every_target_down_is_provider_unavailable_and_recorded(
    nats_url: str, nc: NATS, fake_openai: FakeOpenAI, db: asyncpg.Pool
) -> None:
    cfg = two_pools(fake_openai.url + "/v1")
    far = 2 * NOW
    async with serving(nats_url, cfg, db, health=FakeHealth(open={"backup": far}, exhausted={"openai"})):
        body = request()
        [err] = await ask_raw(nc, body)
        row = await audit_row(db, body["id"])
    assert isinstance(err, Error) and err.code == "PROVIDER_UNAVAILABLE" and err.retryable
    assert "backup:gpt-4o-mini (breaker_open" in err.message and "openai:gpt-4o-mini (credit_exhausted" in err.message
    assert fake_openai.requests == []
    assert row["code"] == "PROVIDER_UNAVAILABLE"
    errors = [a["error"] for a in msgspec.json.decode(row["attempts"])]
    assert errors == ["SKIPPED_BREAKER_OPEN", "SKIPPED_CREDIT_EXHAUSTED"]
    # A passing refusal its producer heard is not dead-lettered: an outage would flood the queue.
    assert (await nc.jetstream().stream_info("LLM_DLQ")).state.messages == 0


@pytest.mark.parametrize("image", [False, True])
async def test_an_image_request_skips_a_text_only_model_in_the_fleet(
    nats_url: str, nc: NATS, fake_openai: FakeOpenAI, image: bool
) -> None:
    url = fake_openai.url + "/v1"
    cfg = fleet_config({"openai": url, "backup": url},
                       routes={"draft": {"default": ["backup:gpt-3.5-turbo", "openai:gpt-4o-mini"]}})
    content: Any = "describe it"
    if image:
        content = [{"type": "text", "text": "describe it"}, {"type": "image", "url": "https://example.com/a.png"}]
    async with serving(nats_url, cfg, None):
        [done] = await ask_raw(nc, request(messages=[{"role": "user", "content": content}]))
    assert isinstance(done, Done)
    assert done.model == ("gpt-4o-mini" if image else "gpt-3.5-turbo")
    assert [a.error for a in done.attempts] == (["SKIPPED_NO_VISION", None] if image else [None])
