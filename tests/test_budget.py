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


def test_a_slice_is_a_few_per_cent_of_the_limit_and_shrinks_to_the_reservation_near_it() -> None:
    limit = 100_000_000  # $100
    assert budget.slice_size(limit, 0, 10_000) == 2_000_000  # 2 % while the headroom is large
    assert budget.slice_size(limit, 90_000_000, 10_000) == 1_250_000  # 1/8 of the $10 left
    assert budget.slice_size(limit, limit - 40_000, 10_000) == 10_000  # near the limit: exactly the reservation
    assert budget.slice_size(limit, limit + 5, 10_000) == 10_000  # past it (a stale view): never below it
    assert budget.slice_size(1_000_000, 0, 110_000) == 110_000  # a reservation above 2 % of the limit
    assert budget.slice_size(None, 0, 10_000) == budget.UNCAPPED_SLICE
    assert budget.slice_size(None, 0, 3_000_000) == 3_000_000


def test_what_an_increment_keeps_never_takes_the_counter_past_the_limit() -> None:
    limit = 1_000_000
    assert budget.kept(limit, 900_000, 200_000, 50_000) == 200_000  # within the limit: all of it
    assert budget.kept(limit, 1_050_000, 200_000, 50_000) == 150_000  # what fitted before it, enough for the request
    assert budget.kept(limit, 1_180_000, 200_000, 50_000) is None  # 20,000 fitted: less than the request needs
    assert budget.kept(limit, 1_000_000, 200_000, 200_000) == 200_000  # exactly at the limit
    assert budget.kept(None, 10**12, 5, 5) == 5  # no limit
    # Increments racing on one counter, in the server's order: the kept ones sum to at most the limit.
    total, kept = 0, []
    for size in (400_000, 300_000, 500_000, 200_000, 100_000):
        total += size
        keep = budget.kept(limit, total, size, 100_000) or 0
        total -= size - keep
        kept.append(keep)
    assert kept == [400_000, 300_000, 300_000, 0, 0] and sum(kept) == total == limit
    # A request that needs nothing more than what its slice had left: checked, and refused past the limit.
    assert budget.kept(limit, 900_000, 0, 0) == 0 and budget.kept(limit, 1_000_001, 0, 0) is None


def test_slices_take_locally_and_are_given_back_when_idle_or_their_period_ends() -> None:
    slices = budget.Slices()
    day, month, old = "llm.budget.acme.d20261130.used", "llm.budget.acme.m202611.used", "llm.budget.b.d20261129.used"
    assert not slices.take(day, 1, 0, None)  # nothing held yet
    slices.get(day).add(1_000, 0)
    slices.get(month).add(500, 0)
    slices.get(old).add(70, 0)
    assert slices.take(day, 600, 100, None) and not slices.take(day, 600, 100, None)
    assert slices.take(day, 400, 900, None) and slices.take(month, 500, 200, None)
    assert slices.holding() == 70
    current = {"d20261130", "m202611"}
    assert slices.due(1_000, 1_500, current) == [("llm.budget.b.d20261129.used", 70)]  # its day ended
    slices.get(day).add(250, 1_200)  # a reservation given back by its request
    assert slices.due(1_800, 1_500, current) == []  # the month's is idle, but empty: dropped, nothing to give
    assert set(slices.held) == {day}
    assert slices.due(2_700, 1_500, current) == [(day, 250)]
    assert slices.held == {} and slices.drain() == []


def test_a_slice_checked_against_a_higher_limit_is_not_reserved_from_under_a_lower_one() -> None:
    held = budget.Slice()
    held.add(5_000, 0)
    assert not held.take(1_000, 0, 100_000)  # never checked against a limit: the counter is asked first
    held.cap = 100_000
    assert held.take(1_000, 0, 100_000) and held.take(1_000, 0, 200_000)  # the same limit, or a raised one
    assert not held.take(1_000, 0, 50_000)  # lowered: the counter is asked first
    assert held.take(1_000, 0, None) and held.remaining == 2_000  # no limit now
