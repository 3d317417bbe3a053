"""The shipped config: every use case and tier routes, to models the table knows and that have a price."""

from __future__ import annotations

import tomllib

import pytest

from router.config import UNLIMITED, from_mapping, load, parse_target
from router.models import model_info
from router.pricing import unpriced_targets
from workers.processes import DEFAULT_CONFIG

CFG = load(DEFAULT_CONFIG)
USE_CASES = ["draft", "summary", "complex", "general", "vision", "voice"]
TIERS = ["free", "pro", "admin", "default"]


def chain(use_case: str, tier: str) -> list[str]:
    return [str(t) for t in CFG.route(use_case, tier) or []]


def providers(use_case: str, tier: str) -> list[str]:
    return [CFG.pools[t.pool].provider for t in CFG.route(use_case, tier) or []]


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("use_case", USE_CASES)
def test_every_use_case_and_tier_has_its_own_route(use_case: str, tier: str) -> None:
    assert tier in CFG.routes[use_case]
    assert len(chain(use_case, tier)) == 3
    # One target per provider, so a provider out of credit leaves two others.
    assert sorted(providers(use_case, tier)) == ["anthropic", "gemini", "openai"]


def test_every_routed_model_is_known_and_priced() -> None:
    for tiers in CFG.routes.values():
        for targets in tiers.values():
            for name in targets:
                target = parse_target(name)
                fmt = CFG.providers[CFG.pools[target.pool].provider].format
                assert model_info(CFG, fmt, target.model).known, name
    assert unpriced_targets(CFG) == []


@pytest.mark.parametrize(("use_case", "first"), [
    ("draft", "anthropic:claude-haiku-4-5"),
    ("summary", "anthropic:claude-haiku-4-5"),
    ("complex", "anthropic:claude-sonnet-4-5"),
    ("vision", "openai:gpt-4o"),
    ("voice", "openai:gpt-4o-mini"),
])
def test_each_use_case_prefers_its_model_class(use_case: str, first: str) -> None:
    assert chain(use_case, "default")[0] == first


@pytest.mark.parametrize("use_case", USE_CASES)
def test_tiers_prefer_their_models(use_case: str) -> None:
    assert chain(use_case, "free") == ["gemini:gemini-2.5-flash", "openai:gpt-4o-mini", "anthropic:claude-haiku-4-5"]
    strong = {"anthropic:claude-sonnet-4-5", "gemini:gemini-2.5-pro", "openai:gpt-4o"}
    assert set(chain(use_case, "pro")) == strong
    assert chain(use_case, "admin") == chain(use_case, "pro")


@pytest.mark.parametrize("tier", ["default", "pro", "admin"])
@pytest.mark.parametrize("use_case", USE_CASES)
def test_fallbacks_go_claude_then_gemini_then_openai(use_case: str, tier: str) -> None:
    order = ["anthropic", "gemini", "openai"]
    first, *fallbacks = providers(use_case, tier)
    assert fallbacks == [p for p in order if p != first]


def test_every_vision_target_reads_images() -> None:
    for tier in TIERS:
        for target in CFG.route("vision", tier) or []:
            fmt = CFG.providers[CFG.pools[target.pool].provider].format
            assert model_info(CFG, fmt, target.model).vision is True, target


def test_admins_may_force_any_model() -> None:
    assert CFG.tiers["admin"].force_any_model
    assert not CFG.tiers.get("pro") or not CFG.tiers["pro"].force_any_model


def test_the_commented_limits_are_spellings_the_config_accepts() -> None:
    # The [limits] lines shown commented out, put in place of the ones they stand for, load as described.
    text = DEFAULT_CONFIG.read_text()
    head, shown = text.split("\n[limits.default]\n")
    uncommented = "\n".join(
        line.removeprefix("# ") for line in shown.splitlines()
        if line.startswith(("# rate =", "# budget =", "# [limits."))
    )
    cfg = from_mapping(tomllib.loads(f"{head}\n[limits.default]\n{uncommented}"))
    assert cfg.limits.default.rate.per_second == UNLIMITED
    assert (cfg.limits.default.budget.daily_usd, cfg.limits.default.budget.monthly_usd) == (UNLIMITED, UNLIMITED)
    assert cfg.limits.tiers["free"].budget.monthly_usd == UNLIMITED
    assert cfg.limits.tiers["free"].rate.per_second == 2
