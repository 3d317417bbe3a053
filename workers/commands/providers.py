"""`switchyard providers [test POOL]`: each provider of the running config and how its pools are doing.

The listing reads what the fleet shares (workers/health.py): the key reports each worker writes (so a
key is `unknown` when no live worker of the provider's pools reported), the provider's credit and each
pool's breaker, against the config the fleet runs (workers/configstore.py). It exits 1 when something
needs a look (a breaker not closed, a provider out of credit, a routed pool with no key or no live
worker), so a script can alert on it.

`test` asks one of the pool's workers, which alone hold the key, to make one models-list call to its
provider (workers/provider.py, `<prefix>.admin.providers.test.<pool>`); it exits 0 when the provider
answered, 1 when it failed, 2 when no worker of the pool answers.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from router.config import Config, ConfigError, Name, parse_target
from router.redact import scrub

from .. import configstore
from ..health import HealthView, KeyReport, now_ms
from ..provider import TEST_TIMEOUT_S, ProviderTest, provider_test_subject
from .fleet import NO_FLEET, OK, REFUSED, connected, fleet_prefix, say

KeyState = Literal["yes", "no", "unknown", "not_needed"]

WAIT_S = TEST_TIMEOUT_S + 5
"""How long `test` waits for the worker's answer: the worker's own limit on its call, and some."""


class PoolRow(msgspec.Struct, kw_only=True):
    pool: str
    provider: str
    routed: bool
    """A route of the config names the pool."""
    breaker: str
    failures: int
    breaker_until: datetime | None
    """Open: when its cool-down ends (the next call then probes)."""
    workers: int
    """Live workers: those whose key report is still believed."""
    key: KeyState


class ProviderRow(msgspec.Struct, kw_only=True):
    provider: str
    format: str
    base_url: str
    key_env: str | None
    key: KeyState
    """From the live workers' key reports of the provider's pools: `yes` when any has the key."""
    credit: Literal["ok", "exhausted"]
    credit_until: datetime | None
    pools: list[PoolRow]


class Listing(msgspec.Struct, kw_only=True):
    """What `switchyard providers --json` prints."""

    config_revision: int
    providers: list[ProviderRow]
    problems: list[str]
    """Why the command exits 1; empty when it exits 0."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("providers", help="each provider: key, credit, and its pools' breakers and workers")
    _options(p, argparse.SUPPRESS)
    actions = p.add_subparsers(dest="action", metavar="{test}")
    test = actions.add_parser("test", help="one cheap real call to a pool's provider, made by one of its workers")
    test.add_argument("pool")
    _options(test, argparse.SUPPRESS)
    p.set_defaults(run=providers_command, json=False, data_dir=None)


def _options(p: argparse.ArgumentParser, default: object) -> None:
    # SUPPRESS: an option given before `test` is not reset by the subcommand's own default.
    p.add_argument("--json", action="store_true", default=default, help="JSON instead of text")
    p.add_argument("--data-dir", type=Path, default=default, help="find the fleet `switchyard up` started here")


async def providers_command(args: argparse.Namespace) -> int:
    """Raises NoFleet when NATS is unreachable or holds no fleet."""
    async with connected(args.data_dir) as (nc, url):
        js = nc.jetstream()
        prefix = await fleet_prefix(js, url)
        try:
            pushed = await configstore.current(js)
        except ConfigError as exc:
            say(f"the fleet's pushed config is not one: {exc}")
            return REFUSED
        if args.action == "test":
            return await _test(nc, prefix, pushed[0] if pushed else None, args.pool, as_json=args.json)
        if pushed is None:
            say("no config was pushed to this fleet, so it has no providers to list"
                " (`switchyard up` pushes its own; else `switchyard config push FILE`)")
            return REFUSED
        listing = await _listing(js, *pushed)
    if args.json:
        print(msgspec.json.encode(listing).decode())
    else:
        _print(listing)
    return REFUSED if listing.problems else OK


# --- the listing -----------------------------------------------------------------------------------


async def _listing(js: JetStreamContext, cfg: Config, revision: int) -> Listing:
    """Raises what NATS raises."""
    health = HealthView(js)
    await health.start()
    try:
        now = now_ms()
        live = [r for r, _ in health.pools.values.values() if r.until_ms > now]
        routed = {parse_target(t).pool for tiers in cfg.routes.values() for chain in tiers.values() for t in chain}
        rows = []
        for name, provider in cfg.providers.items():
            pools = [_pool(health, cfg, pool, now, live, pool in routed) for pool, pc in cfg.pools.items()
                     if pc.provider == name]
            until = health.credit_until(name, now)
            rows.append(ProviderRow(
                provider=name, format=provider.format, base_url=scrub(provider.base_url),
                key_env=provider.api_key_env,
                key=_key(provider.api_key_env, [r for r in live if r.provider == name]),
                credit="exhausted" if until else "ok", credit_until=_when(until), pools=pools,
            ))
    finally:
        await health.stop()
    return Listing(config_revision=revision, providers=rows, problems=_problems(rows))


def _pool(health: HealthView, cfg: Config, pool: str, now: int, live: list[KeyReport], routed: bool) -> PoolRow:
    state, _ = health.breaker(pool)
    reports = [r for r in live if r.pool == pool]
    provider = cfg.pools[pool].provider
    return PoolRow(
        pool=pool, provider=provider, routed=routed, breaker=state.state, failures=state.failures,
        breaker_until=_when(state.until_ms) if state.state == "open" else None, workers=len(reports),
        key=_key(cfg.providers[provider].api_key_env, reports),
    )


def _key(env: str | None, reports: list[KeyReport]) -> KeyState:
    if not env:
        return "not_needed"
    if not reports:
        return "unknown"
    return "yes" if any(r.has_key for r in reports) else "no"


def _when(ms: int | None) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, UTC) if ms else None


def _clock(when: datetime | None) -> str:
    return f"{when:%H:%M:%S} UTC" if when else ""


def _problems(rows: list[ProviderRow]) -> list[str]:
    out: list[str] = []
    for p in rows:
        if p.credit == "exhausted":
            out.append(f"provider {p.provider} is out of credit until {_clock(p.credit_until)}")
        for pool in p.pools:
            if pool.breaker != "closed":
                until = f" until {_clock(pool.breaker_until)}" if pool.breaker_until else ""
                out.append(f"pool {pool.pool}'s breaker is {pool.breaker.replace('_', '-')}{until}")
            if pool.routed and pool.key == "no":
                out.append(f"pool {pool.pool} is routed, but its workers have no API key (set {p.key_env})")
            if pool.routed and pool.workers == 0:
                out.append(f"pool {pool.pool} is routed, but no live worker serves it")
    return out


def _print(listing: Listing) -> None:
    print(f"the fleet's config, revision {listing.config_revision}")
    _table([("provider", "format", "base URL", "key variable", "key", "credit"), *(
        (p.provider, p.format, p.base_url, p.key_env or "-", p.key.replace("_", " "),
         f"exhausted until {_clock(p.credit_until)}" if p.credit == "exhausted" else "ok")
        for p in listing.providers
    )])
    print()
    _table([("pool", "provider", "routed", "breaker", "workers", "key"), *(
        (pool.pool, pool.provider, "yes" if pool.routed else "no", _breaker(pool), str(pool.workers),
         pool.key.replace("_", " "))
        for p in listing.providers for pool in p.pools
    )])
    if listing.problems:
        print("\nneeds a look:")
        for line in listing.problems:
            print(f"  - {line}")


def _breaker(pool: PoolRow) -> str:
    failures = f"{pool.failures} failure{'' if pool.failures == 1 else 's'}"
    match pool.breaker:
        case "closed":
            return f"closed ({failures} in a row)" if pool.failures else "closed"
        case "open" if pool.breaker_until is not None and pool.breaker_until > datetime.now(UTC):
            return f"open until {_clock(pool.breaker_until)} (after {failures})"
        case "open":
            return f"open (after {failures}; cool-down over: the next call probes)"
    return "half-open: probing"


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


# --- test ------------------------------------------------------------------------------------------


async def _test(nc: NATS, prefix: str, cfg: Config | None, pool: str, *, as_json: bool) -> int:
    """Raises NoFleet when NATS fails under the request."""
    try:
        msgspec.convert(pool, Name)  # a dot or a wildcard in a subject would ask other pools' workers
    except msgspec.ValidationError:
        say(f"{pool!r} is not a pool name (letters, digits, _ and - only)")
        return REFUSED
    if cfg is not None and pool not in cfg.pools:
        say(f"no pool {pool!r} in the fleet's config (pools: {', '.join(cfg.pools) or 'none'})")
        return REFUSED
    try:
        msg = await nc.request(provider_test_subject(prefix, pool), b"{}", timeout=WAIT_S)
    except nats.errors.NoRespondersError:
        say(f"no live worker for pool {pool}")
        return NO_FLEET
    except nats.errors.TimeoutError:
        say(f"no live worker for pool {pool} answered within {WAIT_S:g} s")
        return NO_FLEET
    failed = (msg.headers or {}).get("Nats-Service-Error")
    if failed is not None:
        say(f"pool {pool}'s worker could not test its provider: {failed}")
        return REFUSED
    try:
        answer = msgspec.json.decode(msg.data, type=ProviderTest)
    except (msgspec.DecodeError, msgspec.ValidationError):
        say(f"pool {pool}'s worker answered something else than a test result (another version?)")
        return REFUSED
    if as_json:
        print(msgspec.json.encode(answer).decode())
    else:
        print(_sentence(answer))
    return OK if answer.ok else REFUSED


def _sentence(t: ProviderTest) -> str:
    took = f" in {t.latency_ms} ms" if t.latency_ms is not None else ""
    http = f": HTTP {t.status}" if t.status is not None else ""
    called = f" (GET {t.url}{http})" if t.latency_ms is not None else ""
    if t.ok:
        return f"pool {t.pool}, provider {t.provider}: ok{took}{called}"
    return f"pool {t.pool}, provider {t.provider}: failed{took}{called}: {t.code}: {t.error}"
