"""Which rate limit and which budget an account's request meets.

Precedence, highest first:

1. the account's row in PostgreSQL's `llm_account_limits` (`switchyard accounts limits set`), field by
   field: a field the row leaves NULL keeps what the config says;
2. the config's `[limits.accounts.<account>]`;
3. the config's `[limits.tiers.<tier>]` of the request's tier;
4. the config's `[limits.default]`.

(2)–(4) pick one section, which replaces the ones below it whole, as router/config.py says.

"No limit" is spelled `"unlimited"` in the config and infinity in the table. A request whose account
has no rate limit in any dimension gets `None` from `rate_limit` and the dispatcher does not touch the
rate state; one with neither a daily nor a monthly budget gets `None` from `budget_limit` and nothing
is reserved.

Pure: the table's rows are passed in; workers/accounts.py reads them.
"""

from __future__ import annotations

import math

import msgspec

from schemas import BudgetLimits

from .config import UNLIMITED, Budget, Limits, LimitsConfig, RateLimit


class AccountLimits(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """An account's own limits (one row of `llm_account_limits`). None: the config's value applies;
    `math.inf` (for the rate, the tokens per minute and the amounts): no limit, whatever the config says."""

    per_second: float | None = None
    burst: int | None = None
    tokens_per_minute: float | None = None
    daily_usd: float | None = None
    monthly_usd: float | None = None
    alert_at: float | None = None

    def is_empty(self) -> bool:
        return all(getattr(self, f) is None for f in self.__struct_fields__)


def config_section(limits: LimitsConfig, account: str, tier: str) -> tuple[Limits, str]:
    """The config's section for an account's request, and its name for messages (`limits.accounts.acme`)."""
    if account in limits.accounts:
        return limits.accounts[account], f"limits.accounts.{account}"
    if tier in limits.tiers:
        return limits.tiers[tier], f"limits.tiers.{tier}"
    return limits.default, "limits.default"


def _section(limits: LimitsConfig, account: str, tier: str) -> Limits:
    """`config_section` without its name (asked per request)."""
    got = limits.accounts.get(account) or limits.tiers.get(tier)
    return got if got is not None else limits.default


def _finite(value: float) -> float | None:
    return None if math.isinf(value) else value


def rate_limit(limits: LimitsConfig, account: str, tier: str, own: AccountLimits | None = None) -> RateLimit | None:
    """The account's rate limit, or None when it has none (no requests per second, no tokens per minute).
    A returned limit's `per_second` is a number (`math.inf` when only the tokens per minute count)."""
    base = _section(limits, account, tier).rate
    per_second = math.inf if base.per_second == UNLIMITED else float(base.per_second)
    burst, tpm = base.burst, base.tokens_per_minute
    if own is not None:
        per_second = per_second if own.per_second is None else own.per_second
        burst = burst if own.burst is None else own.burst
        if own.tokens_per_minute is not None:
            tpm = None if math.isinf(own.tokens_per_minute) else int(own.tokens_per_minute)
    if math.isinf(per_second) and tpm is None:
        return None
    return RateLimit(per_second=per_second, burst=burst, tokens_per_minute=tpm)


def _amount(value: float | str) -> float | None:
    return None if value == UNLIMITED else float(value)


def budget_limit(
    limits: LimitsConfig, account: str, tier: str, own: AccountLimits | None = None
) -> BudgetLimits | None:
    """The account's budget, or None when it has neither a daily nor a monthly one (nothing to reserve)."""
    base: Budget = _section(limits, account, tier).budget
    daily, monthly, alert_at = _amount(base.daily_usd), _amount(base.monthly_usd), base.alert_at
    if own is not None:
        daily = daily if own.daily_usd is None else _finite(own.daily_usd)
        monthly = monthly if own.monthly_usd is None else _finite(own.monthly_usd)
        alert_at = alert_at if own.alert_at is None else own.alert_at
    if daily is None and monthly is None:
        return None
    return BudgetLimits(daily_usd=daily, monthly_usd=monthly, alert_at=alert_at)



class Resolved(msgspec.Struct, frozen=True):
    """What a request's account meets: its `rate_limit` and its `budget_limit`."""

    rate: RateLimit | None
    budget: BudgetLimits | None


class ResolvedLimits:
    """`rate_limit` and `budget_limit` per account and tier, kept while the config's limits and the account's
    row are the same objects (a config push builds a new config; a row read again that changed is a new
    object), so that a request asks one dictionary rather than resolving both (asked per request)."""

    def __init__(self, size: int = 8192) -> None:
        self._size = size
        self._kept: dict[tuple[str, str], tuple[LimitsConfig, AccountLimits | None, Resolved]] = {}

    def of(self, limits: LimitsConfig, account: str, tier: str, own: AccountLimits | None = None) -> Resolved:
        key = (account, tier)
        hit = self._kept.get(key)
        if hit is not None and hit[0] is limits and hit[1] is own:
            return hit[2]
        got = Resolved(rate_limit(limits, account, tier, own), budget_limit(limits, account, tier, own))
        if len(self._kept) >= self._size:
            self._kept.clear()  # (rebuilt by the accounts that come next)
        self._kept[key] = (limits, own, got)
        return got

def source(limits: LimitsConfig, account: str, tier: str, own: AccountLimits | None) -> str:
    """Where an account's limits come from, for `budget status` and `accounts limits show`."""
    section = config_section(limits, account, tier)[1]
    return f"account table over {section}" if own is not None and not own.is_empty() else section
