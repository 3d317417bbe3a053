"""Cost through the running fleet: a provider whose config name genai-prices does not know is still priced."""

from __future__ import annotations

import asyncpg
import pytest
from nats.aio.client import Client as NATS

from router.pricing import cost_usd
from router.providers.fakes import FakeOpenAI
from schemas import Done

from .conftest import fleet_config, running_fleet
from .helpers import ask_raw, audit_row, request


async def test_a_provider_named_oai_at_an_openai_url_reports_a_cost(
    nats_url: str, nc: NATS, db: asyncpg.Pool, fake_openai: FakeOpenAI
) -> None:
    cfg = fleet_config({"oai": fake_openai.url + "/v1"})
    assert cfg.providers["oai"].format == "openai" and cfg.providers["oai"].genai_prices_id is None
    async with running_fleet(nats_url, cfg, db):
        body = request("Price this answer")
        [done] = await ask_raw(nc, body, subject="llm.req.only_oai.acme")

    assert isinstance(done, Done) and done.provider == "oai" and done.model == "gpt-4o-mini"
    expected = cost_usd(done.usage, "gpt-4o-mini", provider_id="openai")
    assert expected is not None and expected > 0
    assert done.cost_usd == pytest.approx(expected)
    row = await audit_row(db, body["id"])
    assert float(row["cost_usd"]) == pytest.approx(expected)
