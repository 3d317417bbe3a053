"""`switchyard budget status|set|reset`: each account's spend against its daily and monthly budgets.

Spend and reservations are the fleet's counters in `LLM_BUDGET` (workers/budget.py); limits are
the config the fleet runs, with the accounts' own limits from `budget set` (the KV bucket
`llm_budget_limits`, which every dispatcher follows within milliseconds) taking precedence.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NoKeysError, NotFoundError

from router import budget as policy
from router.config import Config, ConfigError

from .. import configstore
from ..budget import STREAM, alerts_bucket, counter, limits_bucket, subject
from ..publish import now_ms
from .accounts import routing_config
from .fleet import OK, REFUSED, connected, fleet_prefix, say

_PERIODS: tuple[policy.PeriodKind, policy.PeriodKind] = ("day", "month")


class PeriodSpend(msgspec.Struct, kw_only=True):
    period: str
    """`day` or `month`."""
    key: str
    """Which one: `d20261130`, `m202611`."""
    spent_usd: float
    reserved_usd: float
    limit_usd: float
    percent: float | None
    """(spent + reserved) / limit × 100; None for a zero limit."""


class AccountSpend(msgspec.Struct, kw_only=True):
    account: str
    limit_source: str
    """`budget set`, `config` (limits.accounts), or `default` (a tier's own limits apply per request)."""
    periods: list[PeriodSpend]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--data-dir", type=Path, default=None, help="find the fleet `switchyard up` started here")
    where.add_argument("--config", default=None, help="the config for limits and time zone (default: the fleet's)")
    b = sub.add_parser("budget", help="accounts' spend against their budgets: status, set, reset")
    actions = b.add_subparsers(dest="action", required=True)
    status = actions.add_parser("status", parents=[where], help="spent, reserved, limit and % for day and month")
    status.add_argument("--account", help="one account (default: every account with spend or its own limits)")
    status.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    put = actions.add_parser("set", parents=[where], help="an account's own daily and/or monthly limit")
    put.add_argument("--account", required=True)
    put.add_argument("--daily", type=_usd, help="USD per day")
    put.add_argument("--monthly", type=_usd, help="USD per month")
    reset = actions.add_parser("reset", parents=[where], help="forget an account's spend of this day or month")
    reset.add_argument("--account", required=True)
    reset.add_argument("--period", choices=["day", "month"], help="default: both")
    b.set_defaults(run=budget_command)


def _usd(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an amount in USD") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: a budget is a finite amount of at least 0")
    return value


async def budget_command(args: argparse.Namespace) -> int:
    """Raises NoFleet when NATS is unreachable or holds no fleet."""
    async with connected(args.data_dir) as (nc, url):
        js = nc.jetstream()
        prefix = await fleet_prefix(js, url)
        try:
            cfg = await _config(js, args.config, args.data_dir)
        except ConfigError as exc:
            say(str(exc))
            return REFUSED
        if args.action == "set":
            return await _set(js, args.account, args.daily, args.monthly)
        if args.action == "reset":
            return await _reset(js, prefix, cfg, args.account, args.period)
        rows = await status(js, prefix, cfg, args.account)
    if args.json:
        print(msgspec.json.encode(rows).decode())
    else:
        _print(rows)
    return OK


async def _config(js: JetStreamContext, path: str | None, data_dir: Path | None) -> Config:
    if path is None:  # what the fleet runs now beats any file
        pushed = await configstore.current(js)
        if pushed is not None:
            return pushed[0]
    return routing_config(path, data_dir)[0]


async def _overrides(js: JetStreamContext) -> dict[str, policy.Override]:
    kv = await limits_bucket(js)
    out: dict[str, policy.Override] = {}
    try:
        keys = await kv.keys()
    except NoKeysError:
        return out
    for key in keys:
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            continue
        if entry.value:
            out[key] = msgspec.json.decode(entry.value, type=policy.Override)
    return out


async def _set(js: JetStreamContext, account: str, daily: float | None, monthly: float | None) -> int:
    if daily is None and monthly is None:
        say("budget set: give --daily and/or --monthly (USD)")
        return REFUSED
    kv = await limits_bucket(js)
    own = (await _overrides(js)).get(account, policy.Override())
    own = policy.Override(daily_usd=own.daily_usd if daily is None else daily,
                          monthly_usd=own.monthly_usd if monthly is None else monthly)
    try:
        await kv.put(account, msgspec.json.encode(own))
    except Exception as exc:  # nats-py's InvalidKeyError for a name KV cannot hold
        say(f"budget set: cannot store limits for account {account!r}: {type(exc).__name__}")
        return REFUSED
    parts = [f"daily ${own.daily_usd:.2f}" if own.daily_usd is not None else "",
             f"monthly ${own.monthly_usd:.2f}" if own.monthly_usd is not None else ""]
    print(f"budget of account {account}: {', '.join(p for p in parts if p)}; every dispatcher applies it within"
          " a second")
    return OK


async def _reset(js: JetStreamContext, prefix: str, cfg: Config, account: str, period: str | None) -> int:
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
        for pct in _thresholds(cfg):
            try:
                await alerts.delete(f"{account}.{key}.{pct}")
            except Exception:  # nats-py raises when there is nothing to delete
                continue
        print(f"budget of account {account}: {k} {key} reset (${policy.usd(spent):.4f} spent forgotten)")
    return OK


def _thresholds(cfg: Config) -> set[int]:
    lim = cfg.limits
    every = [lim.default, *lim.tiers.values(), *lim.accounts.values()]
    return {round(x.budget.alert_at * 100) for x in every} | {100}


async def status(js: JetStreamContext, prefix: str, cfg: Config, account: str | None) -> list[AccountSpend]:
    """Each account's spend in the current day and month (one account, or every one with spend or own limits)."""
    per = policy.periods(now_ms(), cfg.limits.timezone)
    overrides = await _overrides(js)
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
        lim = policy.limits_for(cfg, acct, "default", overrides)
        source = "budget set" if acct in overrides else "config" if acct in cfg.limits.accounts else "default"
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
                          f"${p.limit_usd:,.2f}", "-" if p.percent is None else f"{p.percent:.1f}%", r.limit_source))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        cells = [c.rjust(w) if 2 <= i <= 5 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        print("  ".join(cells).rstrip())

