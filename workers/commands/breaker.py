"""`switchyard breaker status|reset`: each pool's circuit breaker, which its workers share in `llm_breakers`.

A pool's breaker opens after consecutive provider-side failures, refuses calls for its cool-down
(the dispatcher skips the pool, a worker holding one of its work items passes it on), then lets
probes through and closes after enough of them succeed (router/breaker.py). `reset` closes it at once;
on a secure fleet only the admin credential may (a worker writes its own pool's breaker only, the
dispatcher none: router/natsperms.py).
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from router.breaker import CLOSED, BreakerState

from ..health import breaker_status, now_ms, reset_breaker
from .fleet import OK, REFUSED, connected, fleet_prefix, say


class PoolBreaker(msgspec.Struct, kw_only=True):
    """One pool's breaker, as `status --json` prints it."""

    pool: str
    state: str
    failures: int
    since: datetime | None
    """When it entered `state`; None: it never left closed."""
    until: datetime | None = None
    """Open: when the cool-down ends."""
    probes: int = 0
    """Half-open: probe calls in flight."""
    probe_limit: int | None = None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--data-dir", type=Path, default=None, help="find the fleet `switchyard up` started here")
    br = sub.add_parser("breaker", help="each pool's circuit breaker: status, or reset one")
    actions = br.add_subparsers(dest="action", required=True)
    status = actions.add_parser("status", parents=[where], help="per pool: state, failures, since, probes")
    status.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    reset = actions.add_parser("reset", parents=[where], help="close a pool's breaker now")
    reset.add_argument("pool")
    br.set_defaults(run=breaker_command)


async def breaker_command(args: argparse.Namespace) -> int:
    """Raises NoFleet when NATS is unreachable or holds no fleet."""
    async with connected(args.data_dir) as (nc, url):  # a refused credential: CredentialRefused, exit 1
        return await _breaker(args, nc, url)


async def _breaker(args: argparse.Namespace, nc: NATS, url: str) -> int:
    js = nc.jetstream()
    await fleet_prefix(js, url)
    stored = await breaker_status(js)
    pools = sorted(set(await _configured_pools(js)) | set(stored))
    if args.action == "reset":
        if args.pool not in pools:
            say(f"no pool {args.pool!r} in this fleet (pools: {', '.join(pools) or 'none'})")
            return REFUSED
        await reset_breaker(js, args.pool)
        was = stored.get(args.pool, CLOSED).state
        print(f"breaker of pool {args.pool} reset: closed (was {was})")
        return OK
    rows = [_row(pool, stored.get(pool, CLOSED), now_ms()) for pool in pools]
    if args.json:
        print(msgspec.json.encode(rows).decode())
    else:
        _print(rows)
    return OK


async def _configured_pools(js: JetStreamContext) -> list[str]:
    """The pools the fleet has a work consumer for (`pool-<name>` on LLM_WORK)."""
    try:
        consumers = await js.consumers_info("LLM_WORK")
    except NotFoundError:
        return []
    return [c.name.removeprefix("pool-") for c in consumers if c.name.startswith("pool-")]


def _when(ms: int) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, UTC) if ms else None


def _row(pool: str, s: BreakerState, now: int) -> PoolBreaker:
    half_open = s.state == "half_open"
    return PoolBreaker(
        pool=pool, state=s.state, failures=s.failures, since=_when(s.since_ms),
        until=_when(s.until_ms) if s.state == "open" else None,
        probes=len(s.live_probes(now)) if half_open else 0,
        probe_limit=s.probe_limit if half_open else None,
    )


def _print(rows: list[PoolBreaker]) -> None:
    if not rows:
        print("no pools: no worker has started on this fleet yet")
        return
    table = [("pool", "state", "failures", "since (UTC)", "probes", ""), *(_cells(r) for r in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        cells = [row[i].rjust(w) if i == 2 else row[i].ljust(w) for i, w in enumerate(widths)]
        print("  ".join([*cells, row[-1]]).rstrip())


def _cells(r: PoolBreaker) -> tuple[str, ...]:
    since = f"{r.since:%Y-%m-%d %H:%M:%S}" if r.since else "-"
    probes = f"{r.probes}/{r.probe_limit}" if r.probe_limit is not None else "-"
    note = ""
    if r.until is not None:
        ended = r.until <= datetime.now(UTC)
        note = "cool-down over: the next call probes" if ended else f"refuses calls until {r.until:%H:%M:%S}"
    return r.pool, r.state, str(r.failures), since, probes, note
