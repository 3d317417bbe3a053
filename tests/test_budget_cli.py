"""`switchyard budget status|set|reset` against a running fleet with budgets."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from router import config as config_mod
from router.providers.fakes import FakeOpenAI, Scenario
from schemas import Done, Error

from .conftest import running_fleet
from .helpers import ask_raw, request, switchyard
from .test_budget_fleet import ANSWER, MAX_TOKENS, PROMPT, _config
from .test_limits_fleet import account, limited_fleet, seen, settled

__all__ = ["account"]  # the fixture, shared with test_limits_fleet


@pytest.fixture
async def metered_fake() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI(default=Scenario(text=ANSWER))
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
def cli_env(nats_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("NATS_URL", nats_url)
    return tmp_path


async def test_status_set_and_reset(
    capsys: pytest.CaptureFixture[str], cli_env: Path, nats_url: str, pg_url: str, metered_fake: FakeOpenAI,
    nc: NATS, account: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", pg_url)
    cfg = _config(metered_fake, daily_usd=1.0)
    (cli_env / "config.json").write_bytes(config_mod.encode(cfg))  # what `switchyard up` would leave for the CLI
    where = ("--data-dir", str(cli_env))
    subj = f"llm.req.draft.{account}"
    async with limited_fleet(nats_url, pg_url, cfg) as routes:
        [done] = await ask_raw(nc, request(PROMPT, max_tokens=MAX_TOKENS, account=account), subject=subj)
        assert isinstance(done, Done) and done.cost_usd is not None
        assert (await settled(nc, account))[1] > 0  # the worker's flush after the reply settled it

        got = await switchyard(capsys, "budget", "status", "--account", account, "--json", *where)
        assert got.code == 0, got.err
        [row] = json.loads(got.out)
        day, month = row["periods"]
        assert (day["period"], month["period"]) == ("day", "month")
        assert day["spent_usd"] == pytest.approx(done.cost_usd, abs=1e-6) and day["reserved_usd"] == 0
        assert day["limit_usd"] == 1.0 and day["percent"] == pytest.approx(done.cost_usd * 100, abs=0.1)
        assert month["limit_usd"] == 1000.0 and row["limit_source"] == "limits.default"

        table = await switchyard(capsys, "budget", "status", *where)
        assert table.code == 0
        assert table.out.splitlines()[0].split() == ["account", "period", "spent", "reserved", "limit", "used",
                                                     "limits", "from"]
        assert account in table.out and "$1.00" in table.out

        # A limit below one request's reservation: refused at once by the dispatcher, no restart.
        got = await switchyard(capsys, "budget", "set", "--account", account, "--daily", "0.05", *where)
        assert got.code == 0, got.err
        await seen(lambda: (own := routes.limits(account)) is not None and own.daily_usd == 0.05)
        [refused] = await ask_raw(nc, request(PROMPT, max_tokens=MAX_TOKENS, account=account), subject=subj)
        assert isinstance(refused, Error) and refused.code == "BUDGET_EXCEEDED"
        assert f"daily budget of $0.05 for account {account}" in refused.message
        shown = json.loads((await switchyard(capsys, "budget", "status", "--account", account, "--json",
                                             *where)).out)
        assert shown[0]["limit_source"] == "account table over limits.default"
        assert shown[0]["periods"][0]["limit_usd"] == 0.05

        # `budget set` wrote the same row `accounts limits` shows and sets.
        got = await switchyard(capsys, "accounts", "limits", "show", "--account", account, "--json", *where)
        assert got.code == 0, got.err
        [limits] = json.loads(got.out)
        assert limits["own"]["daily_usd"] == 0.05 and limits["own"]["monthly_usd"] is None
        assert limits["applies"]["monthly_usd"] == 1000.0

        assert (await switchyard(capsys, "budget", "set", "--account", account, "--daily", "5", *where)).code == 0
        reset = await switchyard(capsys, "budget", "reset", "--account", account, "--period", "day", *where)
        assert reset.code == 0 and "day" in reset.out
        shown = await switchyard(capsys, "budget", "status", "--account", account, "--json", *where)
        after = json.loads(shown.out)[0]
        assert after["periods"][0]["spent_usd"] == 0 and after["periods"][0]["limit_usd"] == 5.0
        assert after["periods"][1]["spent_usd"] == pytest.approx(done.cost_usd, abs=1e-6)  # the month kept
        await seen(lambda: (own := routes.limits(account)) is not None and own.daily_usd == 5.0)
        [again] = await ask_raw(nc, request(PROMPT, max_tokens=MAX_TOKENS, account=account), subject=subj)
        assert isinstance(again, Done)

        # No budget for the month: shown as such, and nothing refuses for it.
        got = await switchyard(capsys, "budget", "set", "--account", account, "--monthly", "unlimited", *where)
        assert got.code == 0, got.err
        await seen(lambda: (own := routes.limits(account)) is not None and own.monthly_usd == math.inf)
        shown = await switchyard(capsys, "budget", "status", "--account", account, "--json", *where)
        assert json.loads(shown.out)[0]["periods"][1]["limit_usd"] is None
        text = await switchyard(capsys, "budget", "status", "--account", account, *where)
        assert "unlimited" in text.out


async def test_set_needs_an_amount(capsys: pytest.CaptureFixture[str], cli_env: Path, nats_url: str, nc: NATS,
                                   metered_fake: FakeOpenAI) -> None:
    async with running_fleet(nats_url, _config(metered_fake), None, budgets=True):
        got = await switchyard(capsys, "budget", "set", "--account", "acme")
    assert got.code == 1 and "--daily and/or --monthly" in got.err


async def test_no_fleet_is_exit_2(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_URL", "nats://127.0.0.1:9")
    got = await switchyard(capsys, "budget", "status")
    assert got.code == 2 and "cannot reach NATS" in got.err
