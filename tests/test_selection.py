"""router/routing.py's select(): each rule on its own, with a Health whose answers the test sets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest

from router import config as config_mod
from router.errors import ErrorCode
from router.routing import (
    CHARS_PER_TOKEN,
    DEFAULT_OUTPUT_TOKENS,
    IMAGE_TOKENS,
    AccountRoute,
    AlwaysHealthy,
    Selection,
    Skip,
    Source,
    needs,
    select,
)
from schemas import ImagePart, Message, Request, Target, TextPart, Tool, ToolCall

NOW = 1_700_000_000_000

CFG = config_mod.from_mapping({
    "providers": {
        "openai": {"format": "openai", "base_url": "https://api.openai.com/v1"},
        "anthropic": {"format": "anthropic", "base_url": "https://api.anthropic.com"},
        "gemini": {"format": "gemini", "base_url": "https://generativelanguage.googleapis.com"},
        "local": {"format": "openai", "base_url": "http://127.0.0.1:8000/v1"},
    },
    "pools": {
        "openai": {"provider": "openai"},
        "openai-batch": {"provider": "openai"},
        "anthropic": {"provider": "anthropic"},
        "gemini": {"provider": "gemini"},
        "local": {"provider": "local"},
    },
    "routes": {
        "draft": {
            "default": ["anthropic:claude-haiku-4-5", "openai:gpt-4o-mini"],
            "pro": ["openai:gpt-4o", "anthropic:claude-sonnet-4-5"],
        },
        "vision": {"default": ["openai:gpt-3.5-turbo", "gemini:gemini-2.5-flash"]},
        "agent": {"default": ["local:plain-7b", "openai:gpt-4o-mini"]},
        "long": {"default": ["openai:gpt-4", "anthropic:claude-haiku-4-5"]},
        "small": {"default": ["openai:gpt-4", "openai:gpt-3.5-turbo"]},
        "proonly": {"pro": ["openai:gpt-4o"]},
        "mystery": {"default": ["local:house-model"]},
    },
    "tiers": {"admin": {"force_any_model": True}},
    "models": {"plain-7b": {"context_window": 32_000, "vision": False, "tools": False}},
})


@dataclass
class FakeHealth:
    """Breakers open, providers out of credit and pools without a key, as each test says."""

    open: dict[str, int] = field(default_factory=dict)
    """pool -> until when (ms) its breaker refuses calls"""
    exhausted: set[str] = field(default_factory=set)
    keys: dict[str, bool] = field(default_factory=dict)
    asked_at: list[int] = field(default_factory=list)

    def pool_open(self, pool: str, now_ms: int) -> bool:
        self.asked_at.append(now_ms)
        return now_ms < self.open.get(pool, 0)

    def provider_exhausted(self, provider: str, now_ms: int) -> bool:
        return provider in self.exhausted

    def pool_has_key(self, pool: str) -> bool | None:
        return self.keys.get(pool)


def req(use_case: str = "draft", tier: str = "default", *, text: str = "hi", **fields: Any) -> Request:
    messages = fields.pop("messages", None) or [Message(role="user", content=text)]
    return Request(id="r", use_case=use_case, account="acme", tier=tier, reply_to="_INBOX.x", messages=messages,
                   **fields)


def pick(r: Request, health: Any = None, account_route: AccountRoute | None = None) -> Selection:
    return select(CFG, r, health or AlwaysHealthy(), account_route=account_route, now_ms=NOW)


def chain(s: Selection) -> list[str]:
    return [str(t) for t in s.chain]


def skips(s: Selection) -> list[tuple[str, Skip]]:
    return [(f"{x.pool}:{x.model}", x.reason) for x in s.skipped]


def own(*targets: str, tier: str = "*") -> AccountRoute:
    return AccountRoute(account="acme", use_case="draft", tier=tier,
                        targets=[config_mod.parse_target(t) for t in targets])


# --- where the chain comes from -------------------------------------------------------------


def test_the_route_for_use_case_and_tier() -> None:
    s = pick(req("draft", "pro"))
    assert chain(s) == ["openai:gpt-4o", "anthropic:claude-sonnet-4-5"]
    assert s.source is Source.TIER_ROUTE and s.code is None and s.skipped == []


def test_a_tier_without_its_own_route_takes_the_use_cases_default() -> None:
    s = pick(req("draft", "free"))
    assert chain(s) == ["anthropic:claude-haiku-4-5", "openai:gpt-4o-mini"]
    assert s.source is Source.DEFAULT_ROUTE
    assert pick(req("draft", "default")).source is Source.DEFAULT_ROUTE


@pytest.mark.parametrize(("use_case", "tier", "said"), [
    ("poetry", "default", "no route for use case 'poetry' (configured: agent, draft, long"),
    ("proonly", "default", "no route for use case 'proonly'"),
])
def test_no_route_when_neither_the_tier_nor_default_has_one(use_case: str, tier: str, said: str) -> None:
    s = pick(req(use_case, tier))
    assert s.chain == [] and s.code is ErrorCode.NO_ROUTE and s.source is Source.NONE
    assert said in s.message


def test_the_accounts_own_route_comes_before_the_config() -> None:
    s = pick(req("draft", "pro"), account_route=own("gemini:gemini-2.5-pro", "openai:gpt-4o-mini"))
    assert chain(s) == ["gemini:gemini-2.5-pro", "openai:gpt-4o-mini"]
    assert s.source is Source.ACCOUNT_ROUTE


def test_an_account_route_naming_a_pool_the_config_lost_skips_that_target() -> None:
    s = pick(req("draft"), account_route=own("retired:gpt-4o", "openai:gpt-4o"))
    assert chain(s) == ["openai:gpt-4o"]
    assert skips(s) == [("retired:gpt-4o", Skip.UNKNOWN_POOL)]


# --- a forced model -----------------------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt-4o-mini", "openai:gpt-4o-mini"])
def test_a_forced_model_narrows_the_route_by_any_of_its_names(model: str) -> None:
    s = pick(req("draft", model=model))
    assert chain(s) == ["openai:gpt-4o-mini"] and s.source is Source.MODEL_OVERRIDE


def test_a_forced_provider_model_matches_every_pool_of_the_provider() -> None:
    route = own("openai-batch:gpt-4o", "openai:gpt-4o", "anthropic:claude-sonnet-4-5")
    assert chain(pick(req("draft", model="openai:gpt-4o"), account_route=route)) == [
        "openai-batch:gpt-4o", "openai:gpt-4o"]
    assert chain(pick(req("draft", model="openai-batch:gpt-4o"), account_route=route)) == ["openai-batch:gpt-4o"]


def test_a_forced_model_is_limited_to_the_models_of_the_requests_tier() -> None:
    # gpt-4o serves draft only on the pro tier: a default-tier request may not have it.
    s = pick(req("draft", "default", model="gpt-4o"))
    assert s.chain == [] and s.code is ErrorCode.NO_ROUTE
    assert "may not be forced by tier 'default'" in s.message
    assert skips(s) == [("openai:gpt-4o", Skip.NOT_ALLOWED_FOR_TIER)]
    assert "anthropic:claude-haiku-4-5, openai:gpt-4o-mini" in s.skipped[0].detail


def test_a_tier_with_force_any_model_may_force_any_target_of_the_config() -> None:
    s = pick(req("draft", "admin", model="gpt-4o"))
    assert chain(s) == ["openai:gpt-4o"] and s.source is Source.MODEL_OVERRIDE
    s = pick(req("poetry", "admin", model="claude-sonnet-4-5"))
    assert chain(s) == ["anthropic:claude-sonnet-4-5"]


def test_an_account_with_force_any_model_may_force_any_target_whatever_its_tier() -> None:
    cfg = config_mod.from_mapping({**msgspec.to_builtins(CFG), "accounts": {"ops": {"force_any_model": True}}})
    r = req("draft", "default", model="gpt-4o")
    assert select(cfg, r, AlwaysHealthy(), now_ms=NOW).code is ErrorCode.NO_ROUTE  # acme may not
    r.account = "ops"
    assert chain(select(cfg, r, AlwaysHealthy(), now_ms=NOW)) == ["openai:gpt-4o"]


def test_a_forced_model_may_be_one_of_the_accounts_own_route() -> None:
    s = pick(req("draft", model="gemini-2.5-pro"), account_route=own("gemini:gemini-2.5-pro"))
    assert chain(s) == ["gemini:gemini-2.5-pro"] and s.source is Source.MODEL_OVERRIDE


def test_a_forced_model_nobody_serves_is_no_route() -> None:
    s = pick(req("draft", "admin", model="gpt-9"))
    assert s.code is ErrorCode.NO_ROUTE and "model 'gpt-9' is not served by any configured target" in s.message


# --- what the request needs ------------------------------------------------------------------


def image_request(use_case: str) -> Request:
    parts: list[TextPart | ImagePart] = [TextPart(text="what is this?"), ImagePart(url="https://example.com/a.png")]
    return req(use_case, messages=[Message(role="user", content=parts)])


def test_an_image_skips_a_text_only_model() -> None:
    s = pick(image_request("vision"))
    assert chain(s) == ["gemini:gemini-2.5-flash"]
    assert skips(s) == [("openai:gpt-3.5-turbo", Skip.NO_VISION)]
    assert "does not accept images" in s.skipped[0].detail
    assert chain(pick(req("vision"))) == ["openai:gpt-3.5-turbo", "gemini:gemini-2.5-flash"]


def test_tools_skip_a_model_without_tools() -> None:
    tool = Tool(name="get_weather")
    s = pick(req("agent", tools=[tool]))
    assert chain(s) == ["openai:gpt-4o-mini"]
    assert skips(s) == [("local:plain-7b", Skip.NO_TOOLS)]
    assert chain(pick(req("agent"))) == ["local:plain-7b", "openai:gpt-4o-mini"]


def test_a_long_prompt_skips_a_small_window() -> None:
    text = "word " * 8_000  # 40,000 characters: about 10,000 tokens, more than gpt-4's 8,192
    s = pick(req("long", text=text))
    assert chain(s) == ["anthropic:claude-haiku-4-5"]
    assert skips(s) == [("openai:gpt-4", Skip.CONTEXT_TOO_SMALL)]
    assert "about 10,000 prompt tokens" in s.skipped[0].detail and "8,192" in s.skipped[0].detail


def test_max_tokens_counts_against_the_window() -> None:
    text = "x" * 4 * 6_000  # 6,000 tokens: fits gpt-4 with the default answer reserve ...
    assert chain(pick(req("long", text=text))) == ["openai:gpt-4", "anthropic:claude-haiku-4-5"]
    # ... not with 4,000 tokens of answer.
    s = pick(req("long", text=text, max_tokens=4_000))
    assert chain(s) == ["anthropic:claude-haiku-4-5"]
    assert "+ 4,000 for the answer" in s.skipped[0].detail


def test_max_tokens_past_what_a_model_can_write_skips_it() -> None:
    s = pick(req("long", max_tokens=20_000))  # gpt-4 writes at most 8,192; claude-haiku-4-5 64,000
    assert chain(s) == ["anthropic:claude-haiku-4-5"]
    assert skips(s) == [("openai:gpt-4", Skip.MAX_TOKENS_TOO_LARGE)]
    assert s.skipped[0].detail == "max_tokens 20,000 is more than model gpt-4 can write (8,192)"
    assert chain(pick(req("long", max_tokens=4_096))) == ["openai:gpt-4", "anthropic:claude-haiku-4-5"]


def test_max_tokens_no_target_can_write_is_an_invalid_request() -> None:
    s = pick(req("small", max_tokens=10_000))  # gpt-4: 8,192; gpt-3.5-turbo: 4,096
    assert s.chain == [] and s.code is ErrorCode.INVALID_REQUEST
    too_large = Skip.MAX_TOKENS_TOO_LARGE
    assert skips(s) == [("openai:gpt-4", too_large), ("openai:gpt-3.5-turbo", too_large)]
    assert s.message.startswith("max_tokens 10,000 is more than every target can write: openai:gpt-4 (")


def test_context_too_long_when_every_window_is_too_small() -> None:
    s = pick(req("small", text="x" * 4 * 20_000))
    assert s.chain == [] and s.code is ErrorCode.CONTEXT_TOO_LONG
    assert skips(s) == [("openai:gpt-4", Skip.CONTEXT_TOO_SMALL), ("openai:gpt-3.5-turbo", Skip.CONTEXT_TOO_SMALL)]
    assert "openai:gpt-4 (context_too_small" in s.message and "openai:gpt-3.5-turbo (context_too_small" in s.message


def test_a_model_the_table_does_not_know_is_used_as_configured() -> None:
    huge = req("mystery", text="x" * 4 * 500_000, tools=[Tool(name="t")],
               messages=[Message(role="user", content=[ImagePart(url="https://example.com/a.png")])])
    s = pick(huge)
    assert chain(s) == ["local:house-model"] and s.unknown_models == [Target(pool="local", model="house-model")]


def test_the_prompt_estimate() -> None:
    call = ToolCall(id="c1", name="lookup", arguments={"q": "paris"})
    r = req(messages=[
        Message(role="system", content="s" * 40),
        Message(role="user", content=[TextPart(text="t" * 20), ImagePart(url="https://example.com/a.png"),
                                      ImagePart(data="aGk=", media_type="image/png")]),
        Message(role="assistant", tool_calls=[call]),
        Message(role="tool", tool_call_id="c1", content="r" * 12),
    ], tools=[Tool(name="lookup", description="d" * 10)], max_tokens=77)
    n = needs(r)
    text = 40 + 20 + len("lookup") + len('{"q":"paris"}') + 12 + len("lookup") + 10 + len(
        '{"type":"object","properties":{}}')
    assert n.prompt_tokens == -(-text // CHARS_PER_TOKEN) + 2 * IMAGE_TOKENS
    assert (n.image, n.tools, n.max_tokens) == (True, True, 77)


def test_without_max_tokens_the_reserve_is_the_default_or_less() -> None:
    window = 8_192  # gpt-4, whose max_output_tokens (8,192) is more than the default reserve
    fits = window - DEFAULT_OUTPUT_TOKENS
    assert chain(pick(req("long", text="x" * 4 * fits)))[0] == "openai:gpt-4"
    assert chain(pick(req("long", text="x" * 4 * (fits + 1))))[0] == "anthropic:claude-haiku-4-5"


# --- what can be called now ----------------------------------------------------------------


def test_an_open_breaker_skips_its_pool_until_it_closes() -> None:
    health = FakeHealth(open={"anthropic": NOW + 1})
    s = pick(req("draft"), health)
    assert chain(s) == ["openai:gpt-4o-mini"]
    assert skips(s) == [("anthropic:claude-haiku-4-5", Skip.BREAKER_OPEN)]
    assert NOW in health.asked_at
    assert chain(select(CFG, req("draft"), health, now_ms=NOW + 1)) == [
        "anthropic:claude-haiku-4-5", "openai:gpt-4o-mini"]


def test_a_provider_out_of_credit_skips_every_pool_of_it() -> None:
    route = own("openai-batch:gpt-4o", "openai:gpt-4o", "anthropic:claude-sonnet-4-5")
    s = pick(req("draft"), FakeHealth(exhausted={"openai"}), account_route=route)
    assert chain(s) == ["anthropic:claude-sonnet-4-5"]
    assert skips(s) == [("openai-batch:gpt-4o", Skip.CREDIT_EXHAUSTED), ("openai:gpt-4o", Skip.CREDIT_EXHAUSTED)]


def test_a_pool_without_its_key_is_skipped_and_an_unknown_key_is_not() -> None:
    s = pick(req("draft"), FakeHealth(keys={"anthropic": False}))
    assert chain(s) == ["openai:gpt-4o-mini"] and skips(s) == [("anthropic:claude-haiku-4-5", Skip.NO_KEY)]
    assert chain(pick(req("draft"), FakeHealth(keys={"openai": True}))) == [
        "anthropic:claude-haiku-4-5", "openai:gpt-4o-mini"]


def test_provider_unavailable_when_every_target_is_down_for_now() -> None:
    s = pick(req("draft"), FakeHealth(open={"anthropic": NOW + 60_000}, exhausted={"openai"}))
    assert s.chain == [] and s.code is ErrorCode.PROVIDER_UNAVAILABLE
    assert skips(s) == [
        ("anthropic:claude-haiku-4-5", Skip.BREAKER_OPEN), ("openai:gpt-4o-mini", Skip.CREDIT_EXHAUSTED)]
    assert "anthropic:claude-haiku-4-5 (breaker_open" in s.message and "openai is out of credit" in s.message


def test_a_target_down_for_now_beside_one_too_small_is_provider_unavailable() -> None:
    # claude-haiku would take this prompt once its breaker closes: worth retrying.
    s = pick(req("long", text="x" * 4 * 20_000), FakeHealth(open={"anthropic": NOW + 1}))
    assert s.code is ErrorCode.PROVIDER_UNAVAILABLE
    assert skips(s) == [("openai:gpt-4", Skip.CONTEXT_TOO_SMALL), ("anthropic:claude-haiku-4-5", Skip.BREAKER_OPEN)]


def test_unauthorized_naming_the_variable_when_the_only_targets_that_fit_have_no_key() -> None:
    s = pick(req("long", text="x" * 4 * 20_000), FakeHealth(keys={"anthropic": False}))
    assert s.code is ErrorCode.UNAUTHORIZED and "have no API key" in s.message


def test_no_route_when_capabilities_rule_every_target_out() -> None:
    s = pick(image_request("vision"), FakeHealth(open={"gemini": NOW + 1}))
    assert s.code is ErrorCode.PROVIDER_UNAVAILABLE  # gemini can see images; it is only down for now
    parts: list[TextPart | ImagePart] = [ImagePart(url="https://example.com/a.png")]
    s = pick(req("small", messages=[Message(role="user", content=parts)]))
    assert s.code is ErrorCode.NO_ROUTE and "does not accept images" in s.message


def test_skipped_targets_become_attempts_that_say_so() -> None:
    s = pick(req("draft"), FakeHealth(open={"anthropic": NOW + 1}))
    [attempt] = s.attempts()
    assert (attempt.pool, attempt.model, attempt.error, attempt.latency_ms) == (
        "anthropic", "claude-haiku-4-5", "SKIPPED_BREAKER_OPEN", None)
    assert {r.attempt_error for r in Skip} >= {"SKIPPED_NO_KEY", "SKIPPED_CONTEXT_TOO_SMALL", "SKIPPED_NO_VISION"}
