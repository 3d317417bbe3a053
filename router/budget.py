"""Budget policy: which day and month a request counts in, what it reserves, what limits it meets.

Pure: no I/O and no clock of its own (times are passed in, Unix ms). Amounts are integer
micro-dollars (1 USD = 1,000,000) so that shared counters add them exactly; `usd()` turns
them back for messages and replies.

A request reserves its worst case before it is forwarded: its estimated prompt tokens plus
its `max_tokens` (else the model's output limit, else `DEFAULT_OUTPUT_TOKENS`) priced at
the dearest target of its chain. When it ends, the reservation is settled to the real cost.
A price from genai-prices is read for token counts rounded up (at most 1/8 more) and cached;
the config's own prices are exact.
"""

from __future__ import annotations

import datetime as dt
import math
import zoneinfo
from functools import lru_cache
from typing import Literal

import msgspec

from schemas import BudgetLimits, Request, Target, Usage

from .config import Config
from .limits import AccountLimits, budget_limit
from .models import model_info
from .pricing import cost_usd, target_cost_usd

MICROS = 1_000_000
DEFAULT_OUTPUT_TOKENS = 4_096
"""Answer tokens reserved when neither the request (`max_tokens`) nor the model's entry bounds them."""

PeriodKind = Literal["day", "month"]


class Periods(msgspec.Struct, frozen=True, kw_only=True):
    """The budget periods a moment falls in, as counter keys: `d20261130`, `m202611`."""

    day: str
    month: str

    def of(self, kind: PeriodKind) -> str:
        return self.day if kind == "day" else self.month


class UnpricedTargets(ValueError):
    """The chain has targets nothing prices; under a budget their cost could not be counted."""

    def __init__(self, targets: list[str]) -> None:
        super().__init__(
            f"no price is known for {', '.join(targets)}, so this request's cost could not be counted against the"
            " account's budget; the operator must price the model ([models.\"<model>\"] input_usd_per_mtok and"
            " output_usd_per_mtok) or mark it free"
        )
        self.targets = targets


@lru_cache(maxsize=16)
def _zone(name: str) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(name)


def periods(at_ms: int, timezone: str) -> Periods:
    """The day and month `at_ms` falls in, in `timezone` (an IANA name the config validated)."""
    return _periods_of_second(at_ms // 1000, timezone)


@lru_cache(maxsize=64)
def _periods_of_second(at_s: int, timezone: str) -> Periods:
    """Per whole second (days and months begin on one), kept: requests of the same second share it."""
    local = dt.datetime.fromtimestamp(at_s, tz=_zone(timezone))
    return Periods(day=f"d{local:%Y%m%d}", month=f"m{local:%Y%m}")


def limits_for(cfg: Config, account: str, tier: str, own: AccountLimits | None = None) -> BudgetLimits | None:
    """The budget a request meets (router/limits.py: the account table's row field by field, then the
    config's `limits.accounts.<account>`, `limits.tiers.<tier>`, `limits.default`); None: no budget at all."""
    return budget_limit(cfg.limits, account, tier, own)


@lru_cache(maxsize=1024)
def cap(limits: BudgetLimits, kind: PeriodKind) -> int | None:
    """A period's limit in micro-dollars; None when that period has no budget. (Kept: asked per request.)"""
    amount = limits.daily_usd if kind == "day" else limits.monthly_usd
    return None if amount is None else to_micros(amount)


@lru_cache(maxsize=1024)
def caps(limits: BudgetLimits) -> tuple[int | None, int | None]:
    """`cap` of the day and of the month. (Kept: asked per request.)"""
    return cap(limits, "day"), cap(limits, "month")


def to_micros(usd: float) -> int:
    """USD to micro-dollars, rounded up: a reservation or cost is never counted short."""
    return max(0, math.ceil(usd * MICROS - 1e-6))


def usd(micros: int) -> float:
    return micros / MICROS


def reservation(cfg: Config, req: Request, chain: list[Target], prompt_tokens: int) -> int:
    """The worst-case cost of `req` in micro-dollars: `prompt_tokens` in and the most it may answer, at the
    dearest target of `chain`. Raises UnpricedTargets when a target of the chain has no price (and is not
    free): a fallback to it would spend without being counted."""
    worst = 0
    unpriced: list[str] = []
    for t in chain:
        provider = cfg.pools[t.pool].provider
        prov = cfg.providers[provider]
        out = (req.max_tokens or model_info(cfg, prov.format, t.model).max_output_tokens) or DEFAULT_OUTPUT_TOKENS
        own = cfg.models.get(t.model)
        if prov.free or (own is not None and (own.free or own.input_usd_per_mtok is not None)):
            cost = target_cost_usd(cfg, provider, t.model, Usage(input_tokens=prompt_tokens, output_tokens=out))
            micros = None if cost is None else to_micros(cost)
        else:
            micros = _catalogue_micros(prov.genai_prices_id or provider, prov.format, t.model,
                                       _rounded_up(prompt_tokens), _rounded_up(out))
        if micros is None:
            unpriced.append(f"{t.pool}:{t.model}")
        elif micros > worst:
            worst = micros
    if unpriced:
        raise UnpricedTargets(unpriced)
    return worst  # (rounding each cost up, then the dearest: the same as rounding the dearest up)


def _rounded_up(tokens: int) -> int:
    """`tokens` rounded up to one of 8 steps per power of two (at most 1/8 more), so that a few catalogue
    prices, cached, cover every request: an upper bound stays an upper bound."""
    if tokens <= 16:
        return tokens
    step = 1 << (tokens.bit_length() - 4)
    return -(-tokens // step) * step


@lru_cache(maxsize=4096)
def _catalogue_micros(provider_id: str, fmt: str, model: str, input_tokens: int, output_tokens: int) -> int | None:
    """`_catalogue_cost` in micro-dollars, rounded up (kept: asked per request)."""
    cost = _catalogue_cost(provider_id, fmt, model, input_tokens, output_tokens)
    return None if cost is None else to_micros(cost)


@lru_cache(maxsize=4096)
def _catalogue_cost(provider_id: str, fmt: str, model: str, input_tokens: int, output_tokens: int) -> float | None:
    """genai-prices' price of a call (a few hundred µs of CPU each time, hence the cache)."""
    return cost_usd(Usage(input_tokens=input_tokens, output_tokens=output_tokens), model, provider_id=provider_id,
                    fmt=fmt)


def over_limit_message(
    account: str, kind: PeriodKind, limit: int, committed: int, reserve: int
) -> str:
    """The BUDGET_EXCEEDED message: the period, the limit, what is spent or reserved, this request's reservation."""
    period = "daily" if kind == "day" else "monthly"
    return (
        f"{period} budget of ${usd(limit):.2f} for account {account} would be exceeded: ${usd(committed):.4f} is"
        f" spent or reserved (by requests in flight, or held for them by dispatchers), and this request reserves up"
        f" to ${usd(reserve):.4f} (its prompt"
        " and max_tokens at the dearest target of its route); lower max_tokens, or wait for the next period"
    )


def crossed(before: int, after: int, limit: int, alert_at: float) -> list[int]:
    """The alert thresholds (percent of `limit`: `alert_at`, then 100) that spend moving from `before` to
    `after` crossed upwards. A zero limit has none: nothing can be spent under it."""
    if limit <= 0 or after <= before:
        return []
    out: list[int] = []
    for pct in sorted({round(alert_at * 100), 100}):
        mark = limit * pct / 100
        if before < mark <= after:
            out.append(pct)
    return out


# Leases: a dispatcher reserves from a slice of the shared counter it holds, not from the counter itself.

SLICE_SHARE = 0.02
"""A slice is at most this share of the period's limit..."""
SLICE_HEADROOM_DIVISOR = 8
"""...and at most this fraction (1/8) of the headroom the dispatcher last saw, so slices shrink near the limit."""
UNCAPPED_SLICE = 1_000_000
"""The slice of a period without a limit (it is counted for `budget status` only): $1, or one reservation."""


def slice_size(limit: int | None, seen: int, need: int) -> int:
    """How much a dispatcher takes from a period's counter in one increment when its own slice is short of
    `need` micro-dollars, having last seen the counter at `seen`: a few per cent of the limit while the
    headroom is large, shrinking to exactly `need` near the limit (where it then behaves as one increment
    per request). Never less than `need`."""
    if limit is None:
        return max(need, UNCAPPED_SLICE)
    return max(need, min(int(limit * SLICE_SHARE), (limit - seen) // SLICE_HEADROOM_DIVISOR))


def kept(limit: int | None, total: int, size: int, need: int) -> int | None:
    """Of an increment of `size` whose answer was `total`, how much the dispatcher may keep: all of it when
    the total is within the limit; else what still fitted under the limit before it (`limit - (total -
    size)`) when that covers `need`; else None (all of it is given back, and the request is refused).
    Whatever is kept fitted under the limit when it was added, so kept slices never take the counter past it."""
    if limit is None or total <= limit:
        return size
    room = limit - (total - size)
    return room if room >= need else None


class Slice:
    """What one dispatcher holds of one account's period: micro-dollars counted on the shared counter that no
    request of its own has reserved yet."""

    __slots__ = ("cap", "last_ms", "remaining", "seen")

    def __init__(self) -> None:
        self.remaining = 0
        self.last_ms = 0
        """When a request last reserved from it (or it grew): idle slices are given back."""
        self.seen = 0
        """The counter's total the dispatcher last saw (for the next slice's size)."""
        self.cap: int | None = None
        """The limit it was last checked against (None: none)."""

    def covers(self, cap: int | None) -> bool:
        """Whether it may be reserved from under the limit `cap`: one at least as high as the limit it was
        checked against. A lowered limit is checked against the counter again first."""
        return cap is None or (self.cap is not None and self.cap <= cap)

    def take(self, amount: int, at_ms: int, cap: int | None) -> bool:
        """Reserve `amount` locally under the limit `cap`; False (nothing taken) when the slice is short of it,
        or was checked against a higher limit than `cap`."""
        if amount > self.remaining or not self.covers(cap):
            return False
        self.remaining -= amount
        self.last_ms = at_ms
        return True

    def add(self, amount: int, at_ms: int) -> None:
        """`amount` more is held: a new increment kept, or a reservation given back by its request."""
        self.remaining += amount
        self.last_ms = at_ms


class Slices:
    """A dispatcher's slices, by counter subject (one per account and period)."""

    def __init__(self) -> None:
        self.held: dict[str, Slice] = {}

    def get(self, key: str) -> Slice:
        got = self.held.get(key)
        if got is None:
            got = self.held[key] = Slice()
        return got

    def take(self, key: str, amount: int, at_ms: int, cap: int | None) -> bool:
        got = self.held.get(key)
        return got is not None and got.take(amount, at_ms, cap)

    def covers(self, key: str, amount: int, cap: int | None) -> bool:
        """Whether `take` would reserve `amount` from `key`'s slice under `cap` (nothing taken)."""
        got = self.held.get(key)
        return got is not None and amount <= got.remaining and got.covers(cap)

    def due(self, at_ms: int, idle_ms: int, current: set[str]) -> list[tuple[str, int]]:
        """Remove and return (key, remaining) of each slice idle for `idle_ms` or whose period has ended
        (`current`: the period keys of now, e.g. `{"d20261130", "m202611"}`; a key ends in `.<period>.used`)."""
        out: list[tuple[str, int]] = []
        for key, s in list(self.held.items()):
            ended = key.rsplit(".", 2)[-2] not in current
            if ended or at_ms - s.last_ms >= idle_ms:
                del self.held[key]
                if s.remaining:
                    out.append((key, s.remaining))
        return out

    def drain(self) -> list[tuple[str, int]]:
        """Remove and return every slice's remainder (at shutdown)."""
        out = [(k, s.remaining) for k, s in self.held.items() if s.remaining]
        self.held.clear()
        return out

    def holding(self) -> int:
        """Micro-dollars held, over all slices."""
        return sum(s.remaining for s in self.held.values())
