"""`switchyard explain` and `llm.admin.explain`: the chain a request would get, and why targets are skipped."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
from nats.aio.client import Client as NATS

from router import config as config_mod
from router.config import BreakerPolicy, Config
from workers import accounts as store
from workers.admin import Explanation
from workers.health import HealthView, PoolHealth
from workers.runtime import ensure_topology

from .conftest import fleet_config
from .helpers import Result, switchyard
from .test_routing import serving
from .test_selection import FakeHealth


def config(url: str = "http://127.0.0.1:9/v1") -> Config:
    """Pools `openai` and `backup` (each its own provider); a text-only model and one nobody knows."""
    routes = {
        "draft": {"default": ["backup:gpt-4o-mini", "openai:gpt-4o-mini"], "pro": ["openai:gpt-4o"]},
        "vision": {"default": ["backup:gpt-3.5-turbo", "openai:house-model"]},
    }
    return fleet_config({"openai": url, "backup": url}, routes=routes)




@pytest.fixture
async def fleet_dir(
    tmp_path: Path, nats_url: str, nc: NATS, pg_url: str, db: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """The fleet's streams on a fresh NATS, its database, and a data directory with its config.json."""
    monkeypatch.setenv("NATS_URL", nats_url)
    monkeypatch.setenv("DATABASE_URL", pg_url)
    await ensure_topology(nc.jetstream(), config())
    (tmp_path / "config.json").write_bytes(config_mod.encode(config()))
    return tmp_path


@pytest.fixture
async def account(db: asyncpg.Pool) -> AsyncIterator[str]:
    name = f"acct-{uuid.uuid4().hex[:10]}"
    yield name
    await db.execute("DELETE FROM llm_account_routes WHERE account = $1", name)


async def explain(capsys: pytest.CaptureFixture[str], fleet_dir: Path, *args: str) -> Result:
    return await switchyard(capsys, "explain", "--data-dir", str(fleet_dir), *args)


async def test_the_chain_of_a_use_case_and_tier(capsys: pytest.CaptureFixture[str], fleet_dir: Path) -> None:
    r = await explain(capsys, fleet_dir, "--use-case", "draft", "--tier", "pro", "--prompt-tokens", "1200")
    assert r.code == 0, r.err
    assert r.out.splitlines() == [
        f"use case draft, tier pro; config: the fleet's {fleet_dir / 'config.json'}",
        "chain, from the route of draft, tier pro:",
        "  1. openai:gpt-4o",
        "prompt estimate: 1,200 tokens",
    ]


async def test_skipped_targets_say_why_and_an_unknown_model_says_so(
    capsys: pytest.CaptureFixture[str], fleet_dir: Path
) -> None:
    r = await explain(capsys, fleet_dir, "--use-case", "vision", "--image")
    assert r.code == 0, r.err
    assert "chain, from the default route of vision:\n  1. openai:house-model  (unknown model: used as configured)\n" \
        in r.out
    assert "skipped:\n  - backup:gpt-3.5-turbo: no_vision: model gpt-3.5-turbo does not accept images\n" in r.out


async def test_the_fleets_live_breakers_credit_and_keys_are_read(
    capsys: pytest.CaptureFixture[str], fleet_dir: Path, nc: NATS
) -> None:
    js = nc.jetstream()
    policy = BreakerPolicy()
    backup = PoolHealth(HealthView(js), pool="backup", policy=policy, provider="backup",
                        credit_cooldown_ms=60_000, has_key=True)
    openai = PoolHealth(HealthView(js), pool="openai", policy=policy, provider="openai",
                        credit_cooldown_ms=60_000, has_key=False)
    await backup.start()
    await openai.start()  # reports that its worker has no key
    try:
        await backup.out_of_credit()
        r = await explain(capsys, fleet_dir, "--use-case", "draft")
    finally:
        await backup.stop()
        await openai.stop()
    assert r.code == 1
    assert "refused with PROVIDER_UNAVAILABLE: no target can be called now:" in r.out
    assert "  - backup:gpt-4o-mini: credit_exhausted: provider backup is out of credit\n" in r.out
    assert ("  - openai:gpt-4o-mini: no_key: pool openai's workers have no API key for provider openai:"
            " set SY_TEST_OPENAI_KEY in the environment of pool openai's workers\n") in r.out


async def test_an_accounts_own_route_from_postgresql(
    capsys: pytest.CaptureFixture[str], fleet_dir: Path, db: asyncpg.Pool, account: str
) -> None:
    async with db.acquire() as conn:
        await store.put(conn, account, "draft", "*", ["openai:gpt-4o", "backup:gpt-4o"])
    r = await explain(capsys, fleet_dir, "--use-case", "draft", "--tier", "pro", "--account", account)
    assert r.code == 0, r.err
    chain = "\n  1. openai:gpt-4o\n  2. backup:gpt-4o\n"
    assert f"chain, from account {account}'s own route for draft, every tier:{chain}" in r.out


async def test_json_is_the_admin_subjects_shape_and_a_refusal_exits_1(
    capsys: pytest.CaptureFixture[str], fleet_dir: Path
) -> None:
    r = await explain(capsys, fleet_dir, "--use-case", "draft", "--model", "gpt-4o", "--json")
    assert r.code == 1
    answer = msgspec.json.decode(r.out, type=Explanation)
    assert (answer.source, answer.code, answer.chain) == ("model_override", "NO_ROUTE", [])
    assert [(s.pool, s.model, s.reason) for s in answer.skipped] == [("openai", "gpt-4o", "not_allowed_for_tier")]
    assert (answer.account_routes, answer.live_health) == ("off", True)


async def test_without_a_fleet_explain_says_so_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NATS_URL", "nats://127.0.0.1:9")
    r = await switchyard(capsys, "explain", "--use-case", "draft", "--data-dir", str(tmp_path))
    assert r.code == 2 and r.err.startswith("switchyard: cannot reach NATS at nats://127.0.0.1:9")
    assert r.err.count("\n") == 1


# --- llm.admin.explain ------------------------------------------------------------------------------


async def ask_admin(nc: NATS, body: dict[str, Any] | bytes) -> tuple[dict[str, str], Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    msg = await nc.request("llm.admin.explain", data, timeout=5)
    return dict(msg.headers or {}), json.loads(msg.data)


async def test_the_admin_subject_answers_with_the_dispatchers_own_state(
    nats_url: str, nc: NATS, db: asyncpg.Pool, pg_url: str, account: str
) -> None:
    from workers.accounts import AccountRoutes

    async with db.acquire() as conn:
        await store.put(conn, account, "draft", "pro", ["backup:gpt-4o", "openai:gpt-4o"])
    health = FakeHealth(open={"backup": 2 * 10**13})
    async with serving(nats_url, config(), None, health=health, accounts=AccountRoutes(pg_url), with_admin=True):
        headers, mine = await ask_admin(nc, {"use_case": "draft", "tier": "pro", "account": account,
                                             "prompt_tokens": 1200, "future_field": 1})
        _, other = await ask_admin(nc, {"use_case": "draft"})
        _, vision = await ask_admin(nc, {"use_case": "vision", "image": True})
    assert headers == {}
    answer = msgspec.convert(mine, Explanation)
    assert (answer.source, answer.code, answer.prompt_tokens) == ("account_route", None, 1200)
    assert [(c.pool, c.model, c.known, c.vision) for c in answer.chain] == [("openai", "gpt-4o", True, True)]
    assert [(s.pool, s.reason, s.detail) for s in answer.skipped] == [
        ("backup", "breaker_open", "pool backup's breaker is open")]
    assert answer.account_route is not None and answer.account_route.tier == "pro"
    assert answer.account_route.targets == ["backup:gpt-4o", "openai:gpt-4o"]
    assert (answer.account_routes, answer.live_health) == ("on", True)
    assert other["source"] == "default_route" and [c["pool"] for c in other["chain"]] == ["openai"]
    assert vision["chain"] == [{"pool": "openai", "model": "house-model", "provider": "openai", "known": False,
                                "context_window": None, "vision": None, "tools": None}]


@pytest.mark.parametrize(("body", "said"), [
    (b"not json", "invalid explain request: JSON is malformed"),
    ({"tier": "pro"}, "invalid explain request: Object missing required field `use_case`"),
    ({"use_case": "draft", "prompt_tokens": -1}, "Expected `int` >= 0 - at `$.prompt_tokens`"),
])
async def test_a_bad_admin_call_is_answered_400_in_headers_and_json(
    nats_url: str, nc: NATS, body: dict[str, Any] | bytes, said: str
) -> None:
    async with serving(nats_url, config(), None, with_admin=True):
        headers, answer = await ask_admin(nc, body)
    assert headers["Nats-Service-Error-Code"] == "400" and said in headers["Nats-Service-Error"]
    assert answer["error"]["code"] == "400" and said in answer["error"]["message"]


async def test_the_admin_service_is_discoverable_and_says_when_it_runs_without_a_database(
    nats_url: str, nc: NATS
) -> None:
    async with serving(nats_url, config(), None, with_admin=True):
        ping = json.loads((await nc.request("$SRV.PING.switchyard", b"", timeout=5)).data)
        info = json.loads((await nc.request("$SRV.INFO.switchyard", b"", timeout=5)).data)
        _, answer = await ask_admin(nc, {"use_case": "draft", "account": "acme"})
    assert ping["name"] == "switchyard"
    assert [(e["name"], e["subject"]) for e in info["endpoints"]] == [("explain", "llm.admin.explain")]
    assert (answer["account_routes"], answer["live_health"], answer["account_route"]) == ("off", False, None)
