"""`switchyard budget status|set|reset`: each account's spend against its daily and monthly budgets.

Spend and reservations are the fleet's counters in `LLM_BUDGET` (workers/budget.py); limits are
the config the fleet runs, with the accounts' own limits in PostgreSQL's `llm_account_limits`
taking precedence (router/limits.py). `budget set` writes the budget fields of that row, the same
row `switchyard accounts limits set` writes; every dispatcher follows it within about two seconds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from router import budget as policy
from router.config import Config, ConfigError
from router.limits import AccountLimits
from router.limits import source as limits_source
from schemas import BudgetLimits

from .. import accounts as store
from .. import configstore
from ..budget import STREAM, alerts_bucket, counter, subject
from ..publish import now_ms
from . import account_limits
from .accounts import database, database_url, name, routing_config
from .fleet import OK, REFUSED, connected, fleet_prefix, say

_PERIODS: tuple[policy.PeriodKind, policy.PeriodKind] = ("day", "month")


class PeriodSpend(msgspec.Struct, kw_only=True):
    period: str
    """`day` or `month`."""
    key: str
    """Which one: `d20261130`, `m202611`."""
    spent_usd: float
    reserved_usd: float
    """Reserved by requests in flight, plus the slices dispatchers hold for the account and have not reserved
    yet (given back within about 2 s of the last request; a dead dispatcher's stay until the period ends)."""
    limit_usd: float | None
    """None: no budget for this period (`unlimited`)."""
    percent: float | None
    """(spent + reserved) / limit × 100; None for a zero limit or none."""


class AccountSpend(msgspec.Struct, kw_only=True):
    account: str
    limit_source: str
    """Where the limits come from: `limits.default`, `limits.accounts.<a>`, or `account table over ...`
    (shown for tier `default`: a tier's own limits apply per request)."""
    periods: list[PeriodSpend]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--data-dir", type=Path, default=None, help="find the fleet `switchyard up` started here")
    where.add_argument("--config", default=None, help="the config for limits and time zone (default: the fleet's)")
    b = sub.add_parser("budget", help="accounts' spend against their budgets: status, set, reset")
    actions = b.add_subparsers(dest="action", required=True)
    status = actions.add_parser("status", parents=[where], help="spent, reserved (slices held by dispatchers"
                                    " included), limit and %% for day and month")
    status.add_argument("--account", help="one account (default: every account with spend or its own limits)")
    status.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    put = actions.add_parser("set", parents=[where], help="an account's own daily and/or monthly limit (the budget"
                             " part of `switchyard accounts limits set`)")
    put.add_argument("--account", required=True, type=name)
    account_limits.add_amounts(put)
    reset = actions.add_parser("reset", parents=[where], help="forget an account's spend of this day or month")
    reset.add_argument("--account", required=True)
    reset.add_argument("--period", choices=["day", "month"], help="default: both")
    b.set_defaults(run=budget_command)


async def budget_command(args: argparse.Namespace) -> int:
    """Raises NoFleet when NATS is unreachable or holds no fleet."""
    async with connected(args.data_dir) as (nc, url):
        js = nc.jetstream()
        prefix = await fleet_prefix(js, url)
        try:
            cfg = await running_config(js, args.config, args.data_dir)
        except ConfigError as exc:
            say(str(exc))
            return REFUSED
        if args.action == "set":
            amounts = account_limits.given(args)
            if amounts.is_empty():
                say("budget set: give --daily and/or --monthly (USD, or `unlimited`), or --alert-at")
                return REFUSED
            return await account_limits.set_limits(args, amounts, cfg.limits, "the fleet's")
        table = await own_limits(args.data_dir)
        if args.action == "reset":
            return await _reset(js, prefix, cfg, args.account, args.period, table)
        rows = await status(js, prefix, cfg, args.account, table)
    if args.json:
        print(msgspec.json.encode(rows).decode())
    else:
        _print(rows)
    return OK


async def running_config(js: JetStreamContext, path: str | None, data_dir: Path | None) -> Config:
    """The config the fleet runs (pushed), else `path` or the one `switchyard up` left under `data_dir`."""
    if path is None:  # what the fleet runs now beats any file
        pushed = await configstore.current(js)
        if pushed is not None:
            return pushed[0]
    return routing_config(path, data_dir)[0]


async def own_limits(data_dir: Path | None) -> dict[str, AccountLimits]:
    """The accounts' own limits; none when the fleet has no database (its limits are then the config's).
    Raises NoFleet when there is a database and it cannot be reached."""
    if database_url(data_dir) is None:
        return {}
    async with database(data_dir) as conn:
        return {r.account: r.limits for r in await store.limit_rows(conn)}


async def _reset(
    js: JetStreamContext, prefix: str, cfg: Config, account: str, period: str | None, own: dict[str, AccountLimits]
) -> int:
    """Take the account's settled spend of the current day and/or month back to 0. Reservations of requests in
    flight stay (they settle as usual), and the period's alerts may fire again."""
    per = policy.periods(now_ms(), cfg.limits.timezone)
    kinds = [k for k in _PERIODS if period in (None, k)]
    alerts = await alerts_bucket(js)
    for k in kinds:
        key = per.of(k)
        spent = await counter(js, subject(prefix, account, key, "spent"))
        if spent:
            for kind in ("used", "spent"):
                await js.publish(subject(prefix, account, key, kind), b"", headers={"Nats-Incr": str(-spent)})
        for pct in _thresholds(cfg, own):
            try:
                await alerts.delete(f"{account}.{key}.{pct}")
            except Exception:  # nats-py raises when there is nothing to delete
                continue
        print(f"budget of account {account}: {k} {key} reset (${policy.usd(spent):.4f} spent forgotten)")
    return OK


def _thresholds(cfg: Config, own: dict[str, AccountLimits]) -> set[int]:
    lim = cfg.limits
    every = [x.budget.alert_at for x in (lim.default, *lim.tiers.values(), *lim.accounts.values())]
    every += [o.alert_at for o in own.values() if o.alert_at is not None]
    return {round(a * 100) for a in every} | {100}


async def status(
    js: JetStreamContext, prefix: str, cfg: Config, account: str | None, overrides: dict[str, AccountLimits]
) -> list[AccountSpend]:
    """Each account's spend in the current day and month (one account, or every one with spend or own limits)."""
    per = policy.periods(now_ms(), cfg.limits.timezone)
    if account is not None:
        accounts = [account]
    else:
        try:
            info = await js.stream_info(STREAM, subjects_filter=f"{prefix}.budget.*.{per.month}.used")
            seen = {s.split(".")[-3] for s in (info.state.subjects or {})}
        except NotFoundError:
            seen = set()
        accounts = sorted(seen | set(overrides) | set(cfg.limits.accounts))
    rows: list[AccountSpend] = []
    for acct in accounts:
        own = overrides.get(acct)
        lim = policy.limits_for(cfg, acct, "default", own) or BudgetLimits(daily_usd=None, monthly_usd=None)
        source = limits_source(cfg.limits, acct, "default", own)
        periods: list[PeriodSpend] = []
        for k in _PERIODS:
            key = per.of(k)
            used = await counter(js, subject(prefix, acct, key, "used"))
            spent = await counter(js, subject(prefix, acct, key, "spent"))
            limit = lim.daily_usd if k == "day" else lim.monthly_usd
            pct = round(policy.usd(used) / limit * 100, 1) if limit else None
            periods.append(PeriodSpend(period=k, key=key, spent_usd=policy.usd(spent),
                                       reserved_usd=policy.usd(max(0, used - spent)), limit_usd=limit, percent=pct))
        rows.append(AccountSpend(account=acct, limit_source=source, periods=periods))
    return rows


def _print(rows: list[AccountSpend]) -> None:
    if not rows:
        print("no spend recorded and no account limits set")
        return
    table = [("account", "period", "spent", "reserved", "limit", "used", "limits from")]
    for r in rows:
        for p in r.periods:
            table.append((r.account, f"{p.period} {p.key[1:]}", f"${p.spent_usd:,.4f}", f"${p.reserved_usd:,.4f}",
                          "unlimited" if p.limit_usd is None else f"${p.limit_usd:,.2f}",
                          "-" if p.percent is None else f"{p.percent:.1f}%", r.limit_source))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        cells = [c.rjust(w) if 2 <= i <= 5 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        print("  ".join(cells).rstrip())

