"""Cost of a call, from the genai-prices package and the full usage (cache and reasoning tokens)."""

from __future__ import annotations

import warnings

import genai_prices

from schemas import Usage


def cost_usd(usage: Usage, model: str, *, provider_id: str | None) -> float | None:
    """USD cost of `usage` on `model`, or None when genai-prices does not know the model.

    `usage.input_tokens` counts every input token, cached ones included, and
    `usage.output_tokens` includes reasoning tokens: the convention genai-prices prices by.
    """
    prices_usage = genai_prices.Usage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_read_tokens=usage.cache_read_tokens or None,
        cache_write_tokens=usage.cache_write_tokens or None,
    )
    try:
        with warnings.catch_warnings():
            # genai-prices warns when its bundled price snapshot is old; a price is still a price.
            warnings.simplefilter("ignore")
            calc = genai_prices.calc_price(prices_usage, model, provider_id=provider_id)
    except LookupError:
        return None
    return float(calc.total_price)
