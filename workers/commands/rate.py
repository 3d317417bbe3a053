"""`switchyard rate status`: each account's rate limit and what its bucket holds right now.

The buckets are the shared state every dispatcher decides on (`llm_rates` keys `a.<account>`,
workers/ratelimits.py); the limits are the config the fleet runs, with the accounts' own limits in
PostgreSQL's `llm_account_limits` over it (router/limits.py). Tokens a dispatcher holds in a lease count as
taken: they left the bucket when it took them.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError

from router import ratelimit
from router.config import UNLIMITED, LimitsConfig
from router.limits import AccountLimits
from router.limits import source as limits_source
from router.ratelimit import RateState

from ..ratelimits import BUCKET, now_us
from .accounts import name
from .budget import own_limits, running_config
from .fleet import OK, REFUSED, connected, fleet_prefix, say

US = 1_000_000


class AccountRate(msgspec.Struct, kw_only=True):
    account: str
    per_second: float | str
    """Requests per second, or "unlimited"."""
    burst: int | None
    tokens_per_minute: int | str
    """Or "unlimited"."""
    limit_source: str
    """Where the limit comes from, as `budget status` says it (for tier `default`)."""
    requests_available: int | None
    """Requests the bucket would admit at once now (None: no request rate)."""
    full_in_ms: int
    """Until the bucket is full again (0: it is)."""
    next_in_ms: int
    """Until one more request (of no estimated tokens) would be admitted (0: now)."""
    tokens_available: int | None
    """Estimated tokens the minute's bucket would take now (None: no tokens_per_minute)."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    r = sub.add_parser("rate", help="accounts' rate limits and what their buckets hold now: status")
    actions = r.add_subparsers(dest="action", required=True)
    status = actions.add_parser("status", help="per account: its limit, requests available now, until the"
                                " bucket is full, until the next request is admitted")
    status.add_argument("--account", type=name, help="one account (default: every account with a bucket in use)")
    status.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    status.add_argument("--data-dir", type=Path, default=None, help="find the fleet `switchyard up` started here")
    status.add_argument("--config", default=None, help="the config for limits (default: the fleet's)")
    r.set_defaults(run=rate_command)


async def rate_command(args: argparse.Namespace) -> int:
    """Raises NoFleet when NATS is unreachable or holds no fleet."""
    from router.config import ConfigError

    async with connected(args.data_dir) as (nc, url):
        js = nc.jetstream()
        await fleet_prefix(js, url)
        try:
            cfg = await running_config(js, args.config, args.data_dir)
        except ConfigError as exc:
            say(str(exc))
            return REFUSED
        table = await own_limits(args.data_dir)
        accounts = [args.account] if args.account else sorted(await _accounts_in_use(js) | set(table))
        now = now_us()
        rows = [_row(acct, await _state(js, acct), cfg.limits, table.get(acct), now) for acct in accounts]
    if args.json:
        print(msgspec.json.encode(rows).decode())
    else:
        _print(rows)
    return OK


async def _accounts_in_use(js: JetStreamContext) -> set[str]:
    """Accounts whose bucket is not full (a full one leaves no key: its state expires when it drains)."""
    try:
        info = await js.stream_info(f"KV_{BUCKET}", subjects_filter=f"$KV.{BUCKET}.a.>")
    except NotFoundError:
        return set()
    return {s.removeprefix(f"$KV.{BUCKET}.a.") for s in (info.state.subjects or {})}


async def _state(js: JetStreamContext, account: str) -> RateState:
    try:
        kv = await js.key_value(BUCKET)
        entry = await kv.get(f"a.{account}")
    except (BucketNotFoundError, KeyNotFoundError):
        return RateState()  # no state: a full bucket
    return msgspec.json.decode(entry.value or b"[0,0]", type=RateState)


def _row(account: str, state: RateState, limits: LimitsConfig, own: AccountLimits | None,
         now: int) -> AccountRate:
    limit = ratelimit.limits_for(limits, account, "default", own)
    source = limits_source(limits, account, "default", own)
    if limit is None:
        return AccountRate(account=account, per_second=UNLIMITED, burst=None, tokens_per_minute=UNLIMITED,
                           limit_source=source, requests_available=None, full_in_ms=0, next_in_ms=0,
                           tokens_available=None)
    rps = ratelimit.per_second(limit)
    tpm = limit.tokens_per_minute
    full_us = max(0, state.requests_us - now) if not math.isinf(rps) else 0
    tokens_available = None
    if tpm:
        tok_t = 60 * US / tpm
        full_us = max(full_us, state.tokens_us - now)
        tokens_available = max(0, math.floor((tpm * tok_t - max(state.tokens_us - now, 0)) / tok_t))
    decision = ratelimit.decide(state, limit, now)
    return AccountRate(
        account=account, per_second=UNLIMITED if math.isinf(rps) else rps,
        burst=None if math.isinf(rps) else limit.burst, tokens_per_minute=tpm or UNLIMITED, limit_source=source,
        requests_available=None if math.isinf(rps) else ratelimit.available(state, limit, now),
        full_in_ms=-(-full_us // 1000), next_in_ms=0 if decision.admitted else decision.retry_after_ms or 0,
        tokens_available=tokens_available,
    )


def _print(rows: list[AccountRate]) -> None:
    if not rows:
        print("no account's bucket is in use (every one is full) and no account has limits of its own")
        return
    table = [("account", "limit", "available now", "full in", "next in", "limits from")]
    for r in rows:
        if r.burst is None and r.tokens_per_minute == UNLIMITED:
            limit, available = "unlimited", "-"
        else:
            parts = [] if r.burst is None else [f"{r.per_second:g}/s burst {r.burst}"]
            parts += [] if r.tokens_per_minute == UNLIMITED else [f"{r.tokens_per_minute:,} tokens/min"]
            limit = ", ".join(parts)
            have = [] if r.requests_available is None else [f"{r.requests_available} of {r.burst} requests"]
            have += [] if r.tokens_available is None else [f"{r.tokens_available:,} tokens"]
            available = ", ".join(have)
        table.append((r.account, limit, available, _seconds(r.full_in_ms), _seconds(r.next_in_ms), r.limit_source))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        cells = [c.rjust(w) if i in (3, 4) else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        print("  ".join(cells).rstrip())


def _seconds(ms: int) -> str:
    return "now" if ms <= 0 else f"{ms / 1000:.1f} s"
