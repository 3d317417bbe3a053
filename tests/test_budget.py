"""Budget policy (router/budget.py): periods, the worst-case reservation, limits, messages, alert thresholds."""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec
import pytest

from router import budget
from router import config as config_mod
from router.config import Config
from router.limits import AccountLimits
from schemas import Request, Target, Usage


def _ms(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).timestamp() * 1000)


def _cfg(**extra: Any) -> Config:
    raw: dict[str, Any] = {
        "providers": {"p": {"format": "openai", "base_url": "http://127.0.0.1:1/v1"},
                      "free": {"format": "openai", "base_url": "http://127.0.0.1:2/v1", "free": True}},
        "pools": {"p": {"provider": "p"}, "free": {"provider": "free"}},
        "models": {"cheap": {"input_usd_per_mtok": 1.0, "output_usd_per_mtok": 2.0},
                   "dear": {"input_usd_per_mtok": 10.0, "output_usd_per_mtok": 40.0,
                            "max_output_tokens": 8000, "context_window": 100_000}},
        "routes": {"draft": {"default": ["p:cheap"]}},
    }
    raw.update(extra)
    return config_mod.from_mapping(raw)


def _req(**fields: Any) -> Request:
    body = {"id": "r1", "account": "acme", "use_case": "draft", "reply_to": "_INBOX.x",
            "messages": [{"role": "user", "content": "hi"}], **fields}
    return msgspec.convert(body, Request)


def test_periods_follow_the_configured_time_zone_across_midnight_and_month_end() -> None:
    # 22:30 UTC on 30 November is already 1 December in Paris (UTC+1 in winter) and still 30 November in New York.
    at = _ms("2026-11-30T23:30:00+00:00")
    assert budget.periods(at, "UTC") == budget.Periods(day="d20261130", month="m202611")
    assert budget.periods(at, "Europe/Paris") == budget.Periods(day="d20261201", month="m202612")
    assert budget.periods(_ms("2026-12-01T04:59:59+00:00"), "America/New_York").day == "d20261130"
    assert budget.periods(_ms("2026-12-01T05:00:00+00:00"), "America/New_York") == budget.Periods(
        day="d20261201", month="m202612")


def test_periods_on_a_daylight_saving_day() -> None:
    # Paris leaves summer time on 25 October 2026: a 25-hour day, still one period.
    assert budget.periods(_ms("2026-10-24T22:00:00+00:00"), "Europe/Paris").day == "d20261025"
    assert budget.periods(_ms("2026-10-25T22:59:59+00:00"), "Europe/Paris").day == "d20261025"
    assert budget.periods(_ms("2026-10-25T23:00:00+00:00"), "Europe/Paris").day == "d20261026"


def test_reservation_is_the_prompt_and_max_tokens_at_the_dearest_target() -> None:
    cfg = _cfg()
    chain = [Target(pool="p", model="cheap"), Target(pool="p", model="dear")]
    # 1,000 in + 500 out: cheap $0.002, dear $0.03.
    assert budget.reservation(cfg, _req(max_tokens=500), chain, 1_000) == 30_000
    # Without max_tokens, the model's output limit bounds the answer.
    assert budget.reservation(cfg, _req(), chain[1:], 1_000) == (1_000 * 10 + 8_000 * 40)
    # ...and a model with none, the documented default.
    assert budget.reservation(cfg, _req(), chain[:1], 0) == budget.DEFAULT_OUTPUT_TOKENS * 2


def test_a_free_chain_reserves_nothing() -> None:
    cfg = _cfg()
    assert budget.reservation(cfg, _req(max_tokens=100), [Target(pool="free", model="whatever")], 10) == 0


def test_an_unpriced_target_in_the_chain_is_named() -> None:
    cfg = _cfg()
    chain = [Target(pool="p", model="cheap"), Target(pool="p", model="homebrew-7b")]
    with pytest.raises(budget.UnpricedTargets) as caught:
        budget.reservation(cfg, _req(max_tokens=10), chain, 10)
    assert caught.value.targets == ["p:homebrew-7b"]
    assert "no price is known for p:homebrew-7b" in str(caught.value)
    assert "input_usd_per_mtok" in str(caught.value) and "free" in str(caught.value)


def test_limits_accounts_then_tiers_then_default_and_the_account_table_first() -> None:
    cfg = _cfg(limits={
        "default": {"budget": {"daily_usd": 10, "monthly_usd": 100}},
        "tiers": {"pro": {"budget": {"daily_usd": 20, "monthly_usd": 200, "alert_at": 0.5}}},
        "accounts": {"big": {"budget": {"daily_usd": 30, "monthly_usd": 300}}},
    })

    def daily(account: str, tier: str, own: AccountLimits | None = None) -> float | None:
        got = budget.limits_for(cfg, account, tier, own)
        assert got is not None
        return got.daily_usd

    assert daily("acme", "default") == 10
    assert daily("acme", "pro") == 20
    assert daily("big", "pro") == 30
    got = budget.limits_for(cfg, "acme", "pro", AccountLimits(daily_usd=1.5))
    assert got is not None and (got.daily_usd, got.monthly_usd, got.alert_at) == (1.5, 200, 0.5)
    assert budget.cap(got, "day") == 1_500_000 and budget.cap(got, "month") == 200_000_000


def test_refusal_message_names_period_limit_spend_and_reservation() -> None:
    text = budget.over_limit_message("acme", "day", 1_000_000, 990_000, 30_000)
    assert text.startswith("daily budget of $1.00 for account acme would be exceeded")
    assert "$0.9900 is spent or reserved" in text and "reserves up to $0.0300" in text
    assert budget.over_limit_message("acme", "month", 5_000_000, 0, 1).startswith("monthly budget of $5.00")


def test_thresholds_are_crossed_once_upwards() -> None:
    assert budget.crossed(700_000, 800_000, 1_000_000, 0.8) == [80]
    assert budget.crossed(800_000, 850_000, 1_000_000, 0.8) == []
    assert budget.crossed(790_000, 1_000_000, 1_000_000, 0.8) == [80, 100]
    assert budget.crossed(0, 10, 0, 0.8) == []


def test_micros_round_up() -> None:
    assert budget.to_micros(0.0000001) == 1
    assert budget.to_micros(1.0) == 1_000_000
    assert budget.to_micros(0.0) == 0


def test_a_catalogue_price_is_read_for_rounded_up_tokens_never_below_the_exact_one() -> None:
    from router.pricing import cost_usd

    cfg = config_mod.from_mapping({
        "providers": {"openai": {"format": "openai", "base_url": "http://127.0.0.1:1/v1"}},
        "pools": {"openai": {"provider": "openai"}}, "routes": {"draft": {"default": ["openai:gpt-4o-mini"]}},
    })
    chain = [Target(pool="openai", model="gpt-4o-mini")]
    for prompt, out in ((7, 100), (1_000, 4_096), (12_345, 777), (33, 65_537)):
        req = msgspec.convert({"id": "r", "account": "a", "use_case": "draft", "reply_to": "_INBOX.x",
                               "max_tokens": out, "messages": [{"role": "user", "content": "hi"}]}, Request)
        exact = cost_usd(Usage(input_tokens=prompt, output_tokens=out), "gpt-4o-mini", provider_id="openai",
                         fmt="openai")
        assert exact is not None
        got = budget.reservation(cfg, req, chain, prompt)
        assert budget.to_micros(exact) <= got <= budget.to_micros(exact * 1.125) + 1
