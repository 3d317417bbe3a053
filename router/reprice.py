"""Repricing the audit ledger: each row's cost again from its token counts at today's prices, and the sums.

Pure arithmetic: `workers/commands/reprice.py` reads the rows and writes the new costs. A cost is
compared and summed as the ledger stores it (`numeric(18, 10)`), so a row whose price did not change
is never counted as changed by a rounding difference.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

import msgspec

from schemas import Usage

from .config import Config
from .pricing import cost_usd, target_cost_usd

_PLACES = Decimal("1e-10")
_ZERO = Decimal(0)
_CACHED = 100_000
"""Distinct (provider, model, tokens) prices remembered: most rows repeat a few, a long window holds many."""


def ledger_usd(cost: float) -> Decimal:
    """`cost` as the ledger's `numeric(18, 10)` column holds it: asyncpg sends the float's exact binary
    value and PostgreSQL rounds it to 10 places, halves away from zero."""
    return Decimal(cost).quantize(_PLACES, rounding=ROUND_HALF_UP)


class Row(msgspec.Struct, frozen=True, kw_only=True):
    """What repricing needs of one audit row."""

    provider: str
    """The provider's name in the config that served it."""
    model: str
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: Decimal | None = None
    """The cost the ledger holds now; None when the row was written without a price."""


class ModelTotals(msgspec.Struct, kw_only=True):
    provider: str
    model: str
    rows: int = 0
    changed: int = 0
    """Rows whose new cost differs from the one the ledger holds."""
    unpriced: int = 0
    """Rows whose model has no price now: their cost is kept as it is, never zeroed."""
    old_usd: Decimal = _ZERO
    new_usd: Decimal = _ZERO
    """The sum after repricing: the new cost of each priced row, the old one of each unpriced row."""


class Summary(msgspec.Struct, kw_only=True):
    rows: int
    changed: int
    unpriced: int
    old_total_usd: Decimal
    new_total_usd: Decimal
    models: list[ModelTotals]
    """Sorted by provider, then model."""

    @property
    def difference_usd(self) -> Decimal:
        return self.new_total_usd - self.old_total_usd


def price_of(cfg: Config, row: Row) -> Decimal | None:
    """The row's cost at the prices `cfg` and genai-prices give today, as the ledger would store it; None
    when nothing prices its model. A provider the config no longer has is looked up in genai-prices by
    its name (and the config's `[models]` entry still applies)."""
    usage = Usage(
        input_tokens=row.input_tokens, output_tokens=row.output_tokens, cache_read_tokens=row.cache_read_tokens,
        cache_write_tokens=row.cache_write_tokens, reasoning_tokens=row.reasoning_tokens,
    )
    if row.provider in cfg.providers:
        cost = target_cost_usd(cfg, row.provider, row.model, usage)
    else:
        cost = cost_usd(usage, row.model, provider_id=row.provider, model_cfg=cfg.models.get(row.model))
    return None if cost is None else ledger_usd(cost)


class Repricing:
    """Rows in, one at a time; the sums so far out. Holds the sums per model and up to `_CACHED` prices,
    never the rows."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._prices: dict[tuple[str, str, int, int, int, int, int], Decimal | None] = {}
        self._models: dict[tuple[str, str], ModelTotals] = {}

    def add(self, row: Row) -> Decimal | None:
        """Count `row`; return its new cost when that differs from the one it holds (a change to write),
        else None (unchanged, or unpriced)."""
        key = (row.provider, row.model, row.input_tokens, row.output_tokens, row.cache_read_tokens,
               row.cache_write_tokens, row.reasoning_tokens)
        if key not in self._prices:
            if len(self._prices) >= _CACHED:
                self._prices.clear()
            self._prices[key] = price_of(self.cfg, row)
        new = self._prices[key]
        totals = self._models.get((row.provider, row.model))
        if totals is None:
            totals = self._models[(row.provider, row.model)] = ModelTotals(provider=row.provider, model=row.model)
        old = row.cost_usd
        totals.rows += 1
        totals.old_usd += old or _ZERO
        if new is None:
            totals.unpriced += 1
            totals.new_usd += old or _ZERO
            return None
        totals.new_usd += new
        if new == old:
            return None
        totals.changed += 1
        return new

    def summary(self) -> Summary:
        models = [self._models[k] for k in sorted(self._models)]
        return Summary(
            rows=sum(m.rows for m in models), changed=sum(m.changed for m in models),
            unpriced=sum(m.unpriced for m in models), old_total_usd=sum((m.old_usd for m in models), _ZERO),
            new_total_usd=sum((m.new_usd for m in models), _ZERO), models=models,
        )
