"""Cost of a call: the config's price, else genai-prices by provider, by wire format, by model name."""

from __future__ import annotations

from typing import Any

import pytest

from router.config import Config, ModelConfig, from_mapping
from router.pricing import cost_usd, target_cost_usd, unpriced_targets
from schemas import Usage

USAGE = Usage(input_tokens=10_000, output_tokens=2_000)
# gpt-4o-mini: $0.15 in, $0.60 out per million tokens.
GPT_4O_MINI = (10_000 * 0.15 + 2_000 * 0.60) / 1e6


def config(providers: dict[str, Any], routes: dict[str, Any], models: dict[str, Any] | None = None) -> Config:
    pools = {name: {"provider": name} for name in providers}
    return from_mapping({"providers": providers, "pools": pools, "routes": routes, "models": models or {}})


def openai_at(base_url: str, **kw: Any) -> dict[str, Any]:
    return {"format": "openai", "base_url": base_url, **kw}


def test_a_provider_named_oai_at_openais_url_reports_a_cost() -> None:
    cfg = config({"oai": openai_at("https://api.openai.com/v1", api_key_env="OPENAI_API_KEY")},
                 {"chat": {"default": ["oai:gpt-4o-mini"]}})
    assert target_cost_usd(cfg, "oai", "gpt-4o-mini", USAGE) == pytest.approx(GPT_4O_MINI)
    assert unpriced_targets(cfg) == []


def test_the_wire_formats_provider_prices_a_name_genai_prices_does_not_know() -> None:
    # The format's provider: Anthropic's price for a Claude model behind a provider called `corp`.
    by_format = cost_usd(USAGE, "claude-haiku-4-5", provider_id="corp", fmt="anthropic")
    assert by_format == pytest.approx((10_000 * 1.0 + 2_000 * 5.0) / 1e6)
    # And by model name alone, when even the format is not given.
    assert cost_usd(USAGE, "gpt-4o-mini", provider_id="corp") == pytest.approx(GPT_4O_MINI)


def test_the_providers_own_id_comes_first() -> None:
    # Z.ai speaks the OpenAI format but has its own prices.
    assert cost_usd(USAGE, "glm-4.6", provider_id="zai", fmt="openai") == pytest.approx(
        (10_000 * 0.60 + 2_000 * 2.20) / 1e6
    )


def test_dated_names_are_priced() -> None:
    assert cost_usd(USAGE, "gpt-4o-mini-2024-07-18", provider_id="openai") == pytest.approx(GPT_4O_MINI)
    assert cost_usd(USAGE, "claude-haiku-4-5-20251001", provider_id="anthropic") is not None


def test_the_configs_price_wins() -> None:
    own = ModelConfig(input_usd_per_mtok=1.0, output_usd_per_mtok=3.0)
    assert cost_usd(USAGE, "gpt-4o-mini", provider_id="openai", model_cfg=own) == pytest.approx(
        (10_000 * 1.0 + 2_000 * 3.0) / 1e6
    )
    assert cost_usd(USAGE, "gpt-4o-mini", provider_id="openai", model_cfg=ModelConfig(free=True)) == 0.0


def test_a_model_nothing_knows_has_no_cost_and_is_named_at_start() -> None:
    providers = {"local": openai_at("http://127.0.0.1:8000/v1")}
    routes = {"chat": {"default": ["local:llama3", "local:gpt-4o-mini"], "pro": ["local:llama3"]}}
    cfg = config(providers, routes)
    assert cost_usd(USAGE, "llama3", provider_id="local", fmt="openai") is None
    assert target_cost_usd(cfg, "local", "llama3", USAGE) is None
    assert unpriced_targets(cfg) == ["local:llama3"]  # once, however many routes name it

    priced = config(providers, routes, {"llama3": {"input_usd_per_mtok": 0.1, "output_usd_per_mtok": 0.2}})
    assert target_cost_usd(priced, "local", "llama3", USAGE) == pytest.approx((10_000 * 0.1 + 2_000 * 0.2) / 1e6)
    assert unpriced_targets(priced) == []
    assert unpriced_targets(config(providers, routes, {"llama3": {"free": True}})) == []


def test_a_free_provider_costs_nothing() -> None:
    cfg = config({"local": openai_at("http://127.0.0.1:8000/v1", free=True)}, {"chat": {"default": ["local:llama3"]}})
    assert target_cost_usd(cfg, "local", "llama3", USAGE) == 0.0
    assert unpriced_targets(cfg) == []


def test_the_existing_call_still_works() -> None:
    assert cost_usd(USAGE, "gpt-4o-mini", provider_id="openai") == pytest.approx(GPT_4O_MINI)
    assert cost_usd(USAGE, "no-such-model-anywhere", provider_id="openai") is None
