"""`switchyard accounts limits set|show|delete`: an account's own rate limit and budget, in PostgreSQL.

A row of `llm_account_limits` wins over the config's `[limits]` field by field (router/limits.py);
a field it leaves unset keeps the config's. Every dispatcher follows the table within about two
seconds (workers/accounts.py), without a restart. `unlimited` lifts a limit whatever the config says.
"""

from __future__ import annotations

import argparse
import math
from datetime import datetime

import msgspec

from router import limits as policy
from router.config import UNLIMITED, ConfigError, LimitsConfig

from .. import accounts as store
from .fleet import OK, REFUSED, say


def _positive(text: str, *, whole: bool = False, zero: bool = False) -> float:
    if text == UNLIMITED:
        return math.inf
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:50]!r} is not a number (or `unlimited`)") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero) or (whole and value != int(value)):
        kind = "a whole number" if whole else "a number"
        low = "at least 0" if zero else "above 0"
        raise argparse.ArgumentTypeError(f"{text[:50]!r}: give {kind} {low}, or `unlimited`")
    return value


def rate(text: str) -> float:
    return _positive(text)


def tokens(text: str) -> float:
    return _positive(text, whole=True)


def usd(text: str) -> float:
    return _positive(text, zero=True)


def burst(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:50]!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text[:50]!r}: a burst is at least 1")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:50]!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text[:50]!r}: alert_at is a fraction of the budget, above 0 and at most 1")
    return value


def add_amounts(parser: argparse.ArgumentParser) -> None:
    """--daily, --monthly, --alert-at: the budget part of an account's own limits."""
    parser.add_argument("--daily", type=usd, help="USD per day, or `unlimited`")
    parser.add_argument("--monthly", type=usd, help="USD per month, or `unlimited`")
    parser.add_argument("--alert-at", type=fraction, help="the fraction of a budget that raises an alert (e.g. 0.8)")


def register(nouns: argparse._SubParsersAction[argparse.ArgumentParser], where: argparse.ArgumentParser,
             checked: argparse.ArgumentParser) -> None:
    limits = nouns.add_parser("limits", help="set, show or delete an account's own rate limit and budget")
    actions = limits.add_subparsers(dest="action", required=True)
    put = actions.add_parser("set", parents=[where, checked],
                             help="set some of an account's own limits (the others keep their value)")
    put.add_argument("--account", required=True, type=_name)
    put.add_argument("--per-second", type=rate, help="requests per second, or `unlimited`")
    put.add_argument("--burst", type=burst, help="requests at once after a quiet spell")
    put.add_argument("--tokens-per-minute", type=tokens, help="input + output tokens per minute, or `unlimited`")
    add_amounts(put)
    show = actions.add_parser("show", parents=[where, checked], help="accounts' own limits and what applies")
    show.add_argument("--account", type=_name)
    show.add_argument("--json", action="store_true", help="a JSON array instead of lines")
    rm = actions.add_parser("delete", parents=[where], help="forget an account's own limits (the config's apply)")
    rm.add_argument("--account", required=True, type=_name)


def _name(text: str) -> str:
    from .accounts import name

    return name(text)


def given(args: argparse.Namespace) -> policy.AccountLimits:
    """The limits a `set` command gives (None for what it leaves alone)."""
    return policy.AccountLimits(
        per_second=getattr(args, "per_second", None), burst=getattr(args, "burst", None),
        tokens_per_minute=getattr(args, "tokens_per_minute", None), daily_usd=args.daily,
        monthly_usd=args.monthly, alert_at=args.alert_at,
    )


def _text(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return UNLIMITED
    return f"{value:g}{unit}"


def describe(own: policy.AccountLimits) -> str:
    """The fields a row sets, in words."""
    parts = [
        f"{label} {_text(getattr(own, f))}" for f, label in (
            ("per_second", "per_second"), ("burst", "burst"), ("tokens_per_minute", "tokens_per_minute"),
            ("daily_usd", "daily_usd"), ("monthly_usd", "monthly_usd"), ("alert_at", "alert_at"))
        if getattr(own, f) is not None
    ]
    return ", ".join(parts) or "nothing"


class Amount(msgspec.Struct, kw_only=True):
    per_second: float | str | None = None
    burst: int | None = None
    tokens_per_minute: float | str | None = None
    daily_usd: float | str | None = None
    monthly_usd: float | str | None = None
    alert_at: float | None = None


def _json_value(value: float | None) -> float | str | None:
    return UNLIMITED if value is not None and math.isinf(value) else value


def _amount(own: policy.AccountLimits) -> Amount:
    return Amount(per_second=_json_value(own.per_second), burst=own.burst,
                  tokens_per_minute=_json_value(own.tokens_per_minute), daily_usd=_json_value(own.daily_usd),
                  monthly_usd=_json_value(own.monthly_usd), alert_at=own.alert_at)


class Shown(msgspec.Struct, kw_only=True):
    account: str
    own: Amount
    """The row's fields: null where the config's value applies, "unlimited" where the row lifts the limit."""
    applies: Amount
    """What a request of tier `default` meets: the row over the config ("unlimited": no such limit)."""
    source: str
    updated_at: datetime


def effective(limits: LimitsConfig, account: str, own: policy.AccountLimits | None) -> Amount:
    """What applies to a request of the account at tier `default` (tiers of their own may differ)."""
    r = policy.rate_limit(limits, account, "default", own)
    b = policy.budget_limit(limits, account, "default", own)
    return Amount(
        per_second=UNLIMITED if r is None or r.per_second == math.inf else r.per_second,
        burst=None if r is None or r.per_second == math.inf else r.burst,
        tokens_per_minute=UNLIMITED if r is None or r.tokens_per_minute is None else float(r.tokens_per_minute),
        daily_usd=UNLIMITED if b is None or b.daily_usd is None else b.daily_usd,
        monthly_usd=UNLIMITED if b is None or b.monthly_usd is None else b.monthly_usd,
        alert_at=None if b is None else b.alert_at,
    )


async def command(args: argparse.Namespace) -> int:
    """Raises NoFleet when the database is not there or cannot be reached."""
    from .accounts import database, routing_config

    if args.action == "delete":
        async with database(args.data_dir) as conn:
            if not await store.delete_limits(conn, args.account):
                say(f"account {args.account} has no limits of its own; the config's apply")
                return REFUSED
        print(f"deleted the own limits of account {args.account}: the config's apply within two seconds")
        return OK
    try:
        cfg, where = routing_config(args.config, args.data_dir)
    except ConfigError as exc:
        say(str(exc))
        return REFUSED
    if args.action == "set":
        return await set_limits(args, given(args), cfg.limits, where)
    async with database(args.data_dir) as conn:
        rows = await store.limit_rows(conn, args.account)
    shown = [Shown(account=r.account, own=_amount(r.limits), applies=effective(cfg.limits, r.account, r.limits),
                   source=policy.source(cfg.limits, r.account, "default", r.limits), updated_at=r.updated_at)
             for r in rows]
    if args.json:
        print(msgspec.json.encode(shown).decode())
        return OK
    for row, s in zip(rows, shown, strict=True):
        a = s.applies
        print(f"{s.account}: own {describe(row.limits)}; applies per_second {a.per_second},"
              f" burst {a.burst if a.burst is not None else '-'}, tokens_per_minute {a.tokens_per_minute},"
              f" daily_usd {a.daily_usd}, monthly_usd {a.monthly_usd}, alert_at {a.alert_at or '-'}")
    if not shown:
        print(f"account {args.account} has no limits of its own" if args.account
              else "no account has limits of its own")
    else:
        print(f"config: {where}")
    return OK


async def set_limits(args: argparse.Namespace, own: policy.AccountLimits, limits: LimitsConfig, where: str) -> int:
    """Write the fields `own` sets into the account's row (shared with `switchyard budget set`)."""
    from .accounts import database

    if own.is_empty():
        say("give at least one limit to set (--per-second, --burst, --tokens-per-minute, --daily, --monthly,"
            " --alert-at)")
        return REFUSED
    async with database(args.data_dir) as conn:
        row = await store.put_limits(conn, args.account, own)
    a = effective(limits, args.account, row)
    print(f"limits of account {args.account}: own {describe(row)}; every dispatcher applies them within two seconds")
    print(f"applies at tier default (config {where}): per_second {a.per_second}, daily_usd {a.daily_usd},"
          f" monthly_usd {a.monthly_usd}")
    return OK
