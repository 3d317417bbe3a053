"""Accounts' own routes: the table, the dispatcher's cache of it, a fleet following it, and the CLI."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest
from nats.aio.client import Client as NATS

from router import config as config_mod
from router.providers.fakes import FakeOpenAI
from schemas import Done
from workers import accounts as store
from workers.accounts import APPLICATION, AccountRoutes

from .helpers import ask_raw, request, switchyard
from .test_routing import serving, two_pools

FRESH_S = 2.0
"""How stale a dispatcher's account routes may be."""


@pytest.fixture
async def account(db: asyncpg.Pool) -> AsyncIterator[str]:
    """An account of its own (the database is shared by the session); its routes are removed after."""
    name = f"acct-{uuid.uuid4().hex[:10]}"
    yield name
    await db.execute("DELETE FROM llm_account_routes WHERE account = $1", name)


@pytest.fixture
async def routes(pg_url: str, db: asyncpg.Pool) -> AsyncIterator[AccountRoutes]:
    cache = AccountRoutes(pg_url)
    stop = asyncio.Event()
    task = asyncio.create_task(cache.run(stop))
    await asyncio.wait_for(cache.loaded.wait(), 10)
    yield cache
    stop.set()
    await asyncio.wait_for(task, 10)


async def seen_within(check: Callable[[], bool], seconds: float = FRESH_S) -> float:
    """Seconds until `check()` holds; fails after `seconds`."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > seconds:
            raise AssertionError(f"not seen within {seconds} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def targets_of(cache: AccountRoutes, account: str, tier: str = "default") -> list[str] | None:
    route = cache.lookup(account, "draft", tier)
    return None if route is None else [str(t) for t in route.targets]


async def test_the_cache_follows_every_change_within_two_seconds(
    db: asyncpg.Pool, routes: AccountRoutes, account: str
) -> None:
    async with db.acquire() as conn:
        await store.put(conn, account, "draft", "*", ["openai:gpt-4o"])
        await seen_within(lambda: targets_of(routes, account) == ["openai:gpt-4o"])
        await store.put(conn, account, "draft", "pro", ["anthropic:claude-sonnet-4-5"])
        await seen_within(lambda: targets_of(routes, account, "pro") == ["anthropic:claude-sonnet-4-5"])
        assert targets_of(routes, account, "free") == ["openai:gpt-4o"]  # `*` serves the other tiers
        await conn.execute("UPDATE llm_account_routes SET active = false WHERE account = $1 AND tier = '*'", account)
        await seen_within(lambda: targets_of(routes, account, "free") is None)
        assert targets_of(routes, account, "pro") == ["anthropic:claude-sonnet-4-5"]
        assert await store.delete(conn, account, "draft", "pro")
        await seen_within(lambda: targets_of(routes, account, "pro") is None)
    assert routes.lookup(account, "summary", "pro") is None


async def test_a_lost_listening_connection_is_replaced_and_what_changed_meanwhile_is_read(
    db: asyncpg.Pool, routes: AccountRoutes, account: str
) -> None:
    async with db.acquire() as conn:
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1", APPLICATION)
        assert killed >= 1
        await store.put(conn, account, "draft", "*", ["gemini:gemini-2.5-flash"])
    await seen_within(lambda: targets_of(routes, account) == ["gemini:gemini-2.5-flash"])


async def test_a_row_whose_target_is_not_pool_model_is_ignored(
    db: asyncpg.Pool, routes: AccountRoutes, account: str
) -> None:
    await db.execute("INSERT INTO llm_account_routes (account, use_case, tier, targets) VALUES ($1, 'draft', '*',"
                     " ARRAY['not-a-target'])", account)
    await db.execute("INSERT INTO llm_account_routes (account, use_case, tier, targets) VALUES ($1, 'draft', 'pro',"
                     " ARRAY['openai:gpt-4o'])", account)
    await seen_within(lambda: targets_of(routes, account, "pro") == ["openai:gpt-4o"])
    assert targets_of(routes, account, "default") is None


async def test_the_table_refuses_what_cannot_be_a_route(db: asyncpg.Pool, account: str) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("INSERT INTO llm_account_routes (account, use_case, tier, targets) VALUES ($1, 'draft',"
                         " 'a.b', ARRAY['openai:gpt-4o'])", account)
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("INSERT INTO llm_account_routes (account, use_case, targets) VALUES ($1, 'draft', '{}')",
                         account)


async def test_an_accounts_route_carries_its_requests_and_a_change_is_followed_within_two_seconds(
    nats_url: str, nc: NATS, fake_openai: FakeOpenAI, db: asyncpg.Pool, pg_url: str, account: str
) -> None:
    cfg = two_pools(fake_openai.url + "/v1")  # draft: backup first, then openai
    async with db.acquire() as conn:
        await store.put(conn, account, "draft", "*", ["openai:gpt-4o"])
    async with serving(nats_url, cfg, db, accounts=AccountRoutes(pg_url)):
        mine = await ask_raw(nc, request(account=account), subject=f"llm.req.draft.{account}")
        other = await ask_raw(nc, request())
        assert isinstance(mine[-1], Done) and isinstance(other[-1], Done)
        assert [(a.pool, a.model) for a in mine[-1].attempts] == [("openai", "gpt-4o")]
        assert [(a.pool, a.model) for a in other[-1].attempts] == [("backup", "gpt-4o-mini")]

        async with db.acquire() as conn:
            await store.put(conn, account, "draft", "*", ["backup:gpt-4o"])
        changed = time.monotonic()
        while True:
            [done] = await ask_raw(nc, request(account=account), subject=f"llm.req.draft.{account}")
            assert isinstance(done, Done)
            if done.attempts[-1].pool == "backup":
                break
            assert time.monotonic() - changed < FRESH_S, "the dispatcher still follows the old route"
        async with db.acquire() as conn:
            await store.delete(conn, account, "draft", "*")
        await asyncio.sleep(FRESH_S)
        [done] = await ask_raw(nc, request(account=account), subject=f"llm.req.draft.{account}")
        assert isinstance(done, Done) and done.attempts[-1].pool == "backup" and done.model == "gpt-4o-mini"


# --- switchyard accounts route set|list|delete ------------------------------------------------




@pytest.fixture
def fleet_dir(tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data directory whose config.json has pools openai and backup; DATABASE_URL set."""
    monkeypatch.setenv("DATABASE_URL", pg_url)
    (tmp_path / "config.json").write_bytes(config_mod.encode(two_pools("http://127.0.0.1:9/v1")))
    return tmp_path


async def test_route_set_list_and_delete(
    capsys: pytest.CaptureFixture[str], fleet_dir: Path, db: asyncpg.Pool, account: str
) -> None:
    d = str(fleet_dir)
    r = await switchyard(capsys, "accounts", "route", "set", account, "--use-case", "draft", "--data-dir", d,
                         "openai:gpt-4o", "backup:house-model")
    assert r.code == 0, r.err
    assert f"set the route of account {account} for use case draft, every tier: openai:gpt-4o, backup:house-model" \
        in r.out
    assert f"pools checked against the fleet's {fleet_dir / 'config.json'}" in r.out
    assert "model 'house-model' is not in the model table; it is used as configured" in r.out

    r = await switchyard(capsys, "accounts", "route", "set", account, "--use-case", "draft", "--tier", "pro",
                         "--data-dir", d, "backup:gpt-4o")
    assert r.code == 0 and "tier pro: backup:gpt-4o" in r.out
    r = await switchyard(capsys, "accounts", "route", "set", account, "--use-case", "draft", "--tier", "pro",
                         "--data-dir", d, "openai:gpt-4o-mini")
    assert r.code == 0 and r.out.startswith("replaced the route")

    r = await switchyard(capsys, "accounts", "route", "list", "--account", account, "--data-dir", d)
    lines = r.out.splitlines()
    assert r.code == 0 and lines[0].split()[:3] == ["account", "use", "case"]
    assert [line.split()[:4] for line in lines[1:3]] == [
        [account, "draft", "*", "yes"], [account, "draft", "pro", "yes"]]
    assert lines[1].endswith("openai:gpt-4o, backup:house-model") and lines[-1] == "2 account routes"

    r = await switchyard(capsys, "accounts", "route", "list", "--account", account, "--json", "--data-dir", d)
    listed = json.loads(r.out)
    assert [(x["tier"], x["targets"], x["active"]) for x in listed] == [
        ("*", ["openai:gpt-4o", "backup:house-model"], True), ("pro", ["openai:gpt-4o-mini"], True)]

    r = await switchyard(capsys, "accounts", "route", "delete", account, "--use-case", "draft", "--tier", "pro",
                         "--data-dir", d)
    assert r.code == 0 and r.out == f"deleted the route of account {account} for use case draft, tier pro\n"
    r = await switchyard(capsys, "accounts", "route", "delete", account, "--use-case", "draft", "--tier", "pro",
                         "--data-dir", d)
    assert r.code == 1 and r.out == ""
    assert r.err == (f"switchyard: account {account} has no route for use case draft, tier pro;"
                     f" `switchyard accounts route list --account {account}` shows what it has\n")
    rows = await db.fetch("SELECT tier FROM llm_account_routes WHERE account = $1", account)
    assert [x["tier"] for x in rows] == ["*"]


@pytest.mark.parametrize(("targets", "said"), [
    (["nowhere:gpt-4o"], "target 'nowhere:gpt-4o': no pool 'nowhere' in the fleet's "),
    (["gpt-4o"], "target 'gpt-4o' is not pool:model (e.g. openai:gpt-4o)"),
    (["openai:gpt-4o", "openai:gpt-4o"], "target 'openai:gpt-4o' is given twice"),
])
async def test_a_wrong_target_is_one_line_and_nothing_is_written(
    capsys: pytest.CaptureFixture[str], fleet_dir: Path, db: asyncpg.Pool, account: str, targets: list[str],
    said: str,
) -> None:
    r = await switchyard(capsys, "accounts", "route", "set", account, "--use-case", "draft",
                         "--data-dir", str(fleet_dir), *targets)
    assert r.code == 1 and r.out == ""
    assert r.err.startswith(f"switchyard: {said}") and r.err.count("\n") == 1
    assert await db.fetchval("SELECT count(*) FROM llm_account_routes WHERE account = $1", account) == 0


async def test_targets_are_checked_against_the_given_config(
    capsys: pytest.CaptureFixture[str], fleet_dir: Path, tmp_path: Path, account: str
) -> None:
    toml = tmp_path / "other.toml"
    toml.write_text('[providers.p]\nformat = "openai"\nbase_url = "http://127.0.0.1:9/v1"\n'
                    '[pools.solo]\nprovider = "p"\n[routes.draft]\ndefault = ["solo:gpt-4o"]\n')
    r = await switchyard(capsys, "accounts", "route", "set", account, "--use-case", "draft", "--config", str(toml),
                         "--data-dir", str(fleet_dir), "openai:gpt-4o")
    assert r.code == 1
    assert r.err == f"switchyard: target 'openai:gpt-4o': no pool 'openai' in --config {toml} (pools: solo)\n"
    r = await switchyard(capsys, "accounts", "route", "set", account, "--use-case", "draft", "--config",
                         str(tmp_path / "missing.toml"), "--data-dir", str(fleet_dir), "solo:gpt-4o")
    assert r.code == 1 and r.err == f"switchyard: --config {tmp_path / 'missing.toml'}: no such file\n"


async def test_without_a_database_the_command_says_so_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    r = await switchyard(capsys, "accounts", "route", "list", "--data-dir", str(tmp_path))
    assert r.code == 2 and r.err.startswith("switchyard: no database: set DATABASE_URL") and r.err.count("\n") == 1
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:9/none")
    r = await switchyard(capsys, "accounts", "route", "list", "--data-dir", str(tmp_path))
    assert r.code == 2 and "cannot connect to PostgreSQL at postgresql://nobody@127.0.0.1:9/none" in r.err
    assert "Traceback" not in r.err and r.err.count("\n") == 1


async def test_a_bad_name_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str], fleet_dir: Path) -> None:
    r = await switchyard(capsys, "accounts", "route", "set", "ac.me", "--use-case", "draft", "openai:gpt-4o")
    assert r.code == 2 and "'ac.me' is not a name (1-128 characters from A-Z a-z 0-9 _ -)" in r.err
