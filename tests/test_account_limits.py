"""Which rate limit and budget an account meets (router/limits.py): the account table over the config's
account, tier and default sections, and the `"unlimited"` off switch, as the config validates it."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from router import config as config_mod
from router.config import ConfigError, LimitsConfig
from router.limits import AccountLimits, Resolved, ResolvedLimits, budget_limit, rate_limit, source
from router.ratelimit import RateState, decide, describe
from schemas import BudgetLimits

from .helpers import switchyard


def _limits(**sections: Any) -> LimitsConfig:
    raw = {"providers": {"p": {"format": "openai", "base_url": "http://127.0.0.1:1/v1"}},
           "pools": {"p": {"provider": "p"}}, "routes": {"draft": {"default": ["p:m"]}}, "limits": sections}
    return config_mod.from_mapping(raw).limits


LIMITS = _limits(
    default={"rate": {"per_second": 1, "burst": 5}, "budget": {"daily_usd": 10, "monthly_usd": 100}},
    tiers={"pro": {"rate": {"per_second": 2, "burst": 6, "tokens_per_minute": 1000},
                   "budget": {"daily_usd": 20, "monthly_usd": 200, "alert_at": 0.5}}},
    accounts={"big": {"rate": {"per_second": 3, "burst": 7}, "budget": {"daily_usd": 30, "monthly_usd": 300}}},
)


def test_the_table_wins_field_by_field_over_account_then_tier_then_default() -> None:
    assert rate_limit(LIMITS, "acme", "free") == config_mod.RateLimit(per_second=1, burst=5)
    assert rate_limit(LIMITS, "acme", "pro") == config_mod.RateLimit(per_second=2, burst=6, tokens_per_minute=1000)
    assert rate_limit(LIMITS, "big", "pro") == config_mod.RateLimit(per_second=3, burst=7)
    own = AccountLimits(per_second=9, daily_usd=1.5)
    assert rate_limit(LIMITS, "acme", "pro", own) == config_mod.RateLimit(per_second=9, burst=6,
                                                                          tokens_per_minute=1000)
    assert rate_limit(LIMITS, "big", "pro", own) == config_mod.RateLimit(per_second=9, burst=7)
    assert budget_limit(LIMITS, "acme", "pro", own) == BudgetLimits(daily_usd=1.5, monthly_usd=200, alert_at=0.5)
    assert budget_limit(LIMITS, "big", "free", own) == BudgetLimits(daily_usd=1.5, monthly_usd=300, alert_at=0.8)
    assert budget_limit(LIMITS, "big", "free", AccountLimits()) == BudgetLimits(daily_usd=30, monthly_usd=300)
    assert source(LIMITS, "big", "pro", own) == "account table over limits.accounts.big"
    assert source(LIMITS, "acme", "pro", None) == "limits.tiers.pro"
    assert source(LIMITS, "acme", "free", AccountLimits()) == "limits.default"



def test_resolved_limits_are_kept_only_while_the_config_and_the_row_are_the_same() -> None:
    kept = ResolvedLimits(size=2)
    own = AccountLimits(per_second=9, daily_usd=1.5)
    first = kept.of(LIMITS, "acme", "pro", own)
    assert first == Resolved(rate_limit(LIMITS, "acme", "pro", own), budget_limit(LIMITS, "acme", "pro", own))
    assert kept.of(LIMITS, "acme", "pro", own) is first  # nothing changed: the same answer, not resolved again
    # A row read again with other values, a config pushed with other limits: resolved again, never the old answer.
    changed = AccountLimits(per_second=4, daily_usd=1.5)
    assert kept.of(LIMITS, "acme", "pro", changed).rate == config_mod.RateLimit(per_second=4, burst=6,
                                                                              tokens_per_minute=1000)
    assert kept.of(LIMITS, "acme", "pro", None).rate == rate_limit(LIMITS, "acme", "pro")
    pushed = _limits(default={"rate": {"per_second": 7, "burst": 5}, "budget": {"daily_usd": "unlimited",
                                                                               "monthly_usd": "unlimited"}})
    assert kept.of(pushed, "acme", "free") == Resolved(config_mod.RateLimit(per_second=7, burst=5), None)
    assert kept.of(LIMITS, "acme", "free").rate == config_mod.RateLimit(per_second=1, burst=5)
    # Bounded: past its size it forgets, and answers the same by resolving again.
    for name in ("a", "b", "c"):
        assert kept.of(LIMITS, name, "free").budget == BudgetLimits(daily_usd=10, monthly_usd=100)
    assert len(kept._kept) <= 2

def test_unlimited_in_the_config_switches_a_limit_off() -> None:
    off = _limits(default={"rate": {"per_second": "unlimited"},
                           "budget": {"daily_usd": "unlimited", "monthly_usd": "unlimited"}},
                  tiers={"metered": {"rate": {"per_second": "unlimited", "tokens_per_minute": 500},
                                     "budget": {"daily_usd": "unlimited", "monthly_usd": 50}}})
    assert rate_limit(off, "acme", "default") is None
    assert budget_limit(off, "acme", "default") is None
    tokens_only = rate_limit(off, "acme", "metered")
    assert tokens_only is not None and math.isinf(float(tokens_only.per_second))
    assert tokens_only.tokens_per_minute == 500 and describe(tokens_only) == "500 tokens/min"
    assert budget_limit(off, "acme", "metered") == BudgetLimits(daily_usd=None, monthly_usd=50)
    # Only the tokens count: requests come as fast as they like while the tokens last.
    state = RateState()
    for _ in range(100):
        d = decide(state, tokens_only, 1_000_000, tokens=5)
        assert d.admitted
        state = d.state
    assert not decide(state, tokens_only, 1_000_000, tokens=5).admitted


def test_the_table_lifts_or_sets_limits_whatever_the_config_says() -> None:
    lifted = AccountLimits(per_second=math.inf, tokens_per_minute=math.inf, daily_usd=math.inf, monthly_usd=math.inf)
    assert rate_limit(LIMITS, "acme", "pro", lifted) is None
    assert budget_limit(LIMITS, "big", "pro", lifted) is None
    off = _limits(default={"rate": {"per_second": "unlimited"},
                           "budget": {"daily_usd": "unlimited", "monthly_usd": "unlimited"}})
    assert rate_limit(off, "acme", "default", AccountLimits(per_second=4)) == config_mod.RateLimit(per_second=4,
                                                                                                   burst=50)
    assert budget_limit(off, "acme", "default", AccountLimits(monthly_usd=7)) == BudgetLimits(monthly_usd=7)


def test_a_zero_budget_is_a_budget_of_zero_not_none() -> None:
    zero = _limits(default={"budget": {"daily_usd": 0}})
    assert budget_limit(zero, "acme", "default") == BudgetLimits(daily_usd=0.0, monthly_usd=1000.0)


@pytest.mark.parametrize(("section", "field", "value"), [
    ("rate", "per_second", "off"), ("rate", "per_second", 0), ("budget", "daily_usd", "none"),
    ("budget", "monthly_usd", -1),
])
def test_other_spellings_of_no_limit_are_refused_naming_the_field(section: str, field: str, value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        _limits(tiers={"pro": {section: {field: value}}})
    assert str(caught.value).startswith(f"limits.tiers.pro.{section}.{field}:")


@pytest.fixture
def cli_db(pg_url: str, db: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The CLI pointed at the test database; a data directory with no fleet (the shipped example config)."""
    monkeypatch.setenv("DATABASE_URL", pg_url)
    monkeypatch.delenv("SWITCHYARD_CONFIG", raising=False)
    return tmp_path


async def test_accounts_limits_set_show_and_delete(
    capsys: pytest.CaptureFixture[str], cli_db: Path, db: asyncpg.Pool
) -> None:
    account = f"cli-{uuid.uuid4().hex[:10]}"
    where = ("--data-dir", str(cli_db))
    try:
        got = await switchyard(capsys, "accounts", "limits", "set", "--account", account, "--per-second", "2",
                               "--burst", "4", "--daily", "unlimited", *where)
        assert got.code == 0, got.err
        assert "per_second 2, burst 4, daily_usd unlimited" in got.out
        # A second set changes only what it names.
        got = await switchyard(capsys, "accounts", "limits", "set", "--account", account, "--tokens-per-minute",
                               "9000", "--alert-at", "0.5", *where)
        assert got.code == 0, got.err
        row = await db.fetchrow("SELECT * FROM llm_account_limits WHERE account = $1", account)
        assert (row["per_second"], row["burst"], row["tokens_per_minute"], row["alert_at"]) == (2, 4, 9000, 0.5)
        assert math.isinf(row["daily_usd"]) and row["monthly_usd"] is None

        got = await switchyard(capsys, "accounts", "limits", "show", "--account", account, "--json", *where)
        assert got.code == 0, got.err
        [shown] = json.loads(got.out)
        assert shown["own"] == {"per_second": 2.0, "burst": 4, "tokens_per_minute": 9000.0,
                                "daily_usd": "unlimited", "monthly_usd": None, "alert_at": 0.5}
        # What applies: the row over the shipped example's default section.
        assert shown["applies"]["per_second"] == 2.0 and shown["applies"]["daily_usd"] == "unlimited"
        assert shown["applies"]["monthly_usd"] == 1000.0 and shown["source"].startswith("account table over ")
        text = await switchyard(capsys, "accounts", "limits", "show", "--account", account, *where)
        assert text.code == 0 and text.out.startswith(f"{account}: own per_second 2, burst 4")

        assert (await switchyard(capsys, "accounts", "limits", "delete", "--account", account, *where)).code == 0
        assert await db.fetchval("SELECT count(*) FROM llm_account_limits WHERE account = $1", account) == 0
        again = await switchyard(capsys, "accounts", "limits", "delete", "--account", account, *where)
        assert again.code == 1 and "has no limits of its own" in again.err and "Traceback" not in again.err
    finally:
        await db.execute("DELETE FROM llm_account_limits WHERE account = $1", account)


@pytest.mark.parametrize(("args", "said"), [
    (["--per-second", "0"], "above 0, or `unlimited`"),
    (["--per-second", "fast"], "is not a number (or `unlimited`)"),
    (["--tokens-per-minute", "1.5"], "a whole number above 0"),
    (["--burst", "0"], "a burst is at least 1"),
    (["--daily", "-1"], "at least 0, or `unlimited`"),
    (["--alert-at", "80"], "above 0 and at most 1"),
    ([], "give at least one limit to set"),
])
async def test_a_wrong_limit_is_one_line_and_nothing_is_written(
    capsys: pytest.CaptureFixture[str], cli_db: Path, db: asyncpg.Pool, args: list[str], said: str
) -> None:
    account = f"cli-{uuid.uuid4().hex[:10]}"
    got = await switchyard(capsys, "accounts", "limits", "set", "--account", account, *args,
                           "--data-dir", str(cli_db))
    assert got.code in (1, 2) and said in got.err and "Traceback" not in got.err
    assert await db.fetchval("SELECT count(*) FROM llm_account_limits WHERE account = $1", account) == 0


async def test_the_table_refuses_what_cannot_be_a_limit(db: asyncpg.Pool) -> None:
    for column, value in (("per_second", 0.0), ("burst", 0), ("tokens_per_minute", 1.5), ("daily_usd", -1.0),
                          ("alert_at", 1.5)):
        with pytest.raises(asyncpg.CheckViolationError):
            await db.execute(f"INSERT INTO llm_account_limits (account, {column}) VALUES ('bad', $1)", value)
