"""Cost of a call: the config's own price, else genai-prices, from the full usage (cache and reasoning tokens)."""

from __future__ import annotations

import warnings

import genai_prices

from schemas import Usage

from .config import Config, ModelConfig, parse_target
from .models import PRICES_PROVIDER

_PER_MTOK = 1_000_000


def cost_usd(
    usage: Usage,
    model: str,
    *,
    provider_id: str | None,
    fmt: str | None = None,
    model_cfg: ModelConfig | None = None,
) -> float | None:
    """USD cost of `usage` on `model`, or None when nothing knows its price.

    In order: the config's `[models."<model>"]` entry (`model_cfg`: `free`, or its prices per million
    tokens); genai-prices under `provider_id` (the provider's `genai_prices_id`, else its config name);
    under the provider of its wire format `fmt` (a provider named `oai` at OpenAI's API is OpenAI);
    under the model's name alone.

    `usage.input_tokens` counts every input token, cached ones included, and
    `usage.output_tokens` includes reasoning tokens: the convention genai-prices prices by.
    """
    if model_cfg is not None:
        if model_cfg.free:
            return 0.0
        if model_cfg.input_usd_per_mtok is not None and model_cfg.output_usd_per_mtok is not None:
            return (
                usage.input_tokens * model_cfg.input_usd_per_mtok + usage.output_tokens * model_cfg.output_usd_per_mtok
            ) / _PER_MTOK
    prices_usage = genai_prices.Usage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_read_tokens=usage.cache_read_tokens or None,
        cache_write_tokens=usage.cache_write_tokens or None,
    )
    for pid in _lookup_order(provider_id, fmt):
        try:
            with warnings.catch_warnings():
                # genai-prices warns when its bundled price snapshot is old; a price is still a price.
                warnings.simplefilter("ignore")
                calc = genai_prices.calc_price(prices_usage, model, provider_id=pid)
        except LookupError:
            continue
        return float(calc.total_price)
    return None


def _lookup_order(provider_id: str | None, fmt: str | None) -> list[str | None]:
    ids = [provider_id, PRICES_PROVIDER.get(fmt or "")]
    # None last: genai-prices then finds the provider from the model's name.
    return [*dict.fromkeys(i for i in ids if i), None]


def target_cost_usd(cfg: Config, provider: str, model: str, usage: Usage) -> float | None:
    """USD cost of `usage` on `model` served by the config's `provider`: 0 for a free provider, else
    `cost_usd` with the provider's ids and the config's entry for the model."""
    prov = cfg.providers[provider]
    if prov.free:
        return 0.0
    return cost_usd(
        usage, model, provider_id=prov.genai_prices_id or provider, fmt=prov.format, model_cfg=cfg.models.get(model)
    )


def unpriced_targets(cfg: Config) -> list[str]:
    """Every routed `pool:model` whose cost would be unknown: no price anywhere and not free."""
    probe = Usage(input_tokens=1_000, output_tokens=1_000)
    routed = dict.fromkeys(name for tiers in cfg.routes.values() for names in tiers.values() for name in names)
    out: list[str] = []
    for name in routed:
        target = parse_target(name)
        if target_cost_usd(cfg, cfg.pools[target.pool].provider, target.model, probe) is None:
            out.append(name)
    return out
