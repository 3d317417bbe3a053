"""`switchyard explain`: the chain a request would get, and why each other target would be skipped.

It works the answer out itself with router/routing.py, as the dispatcher does: the routing config
(`--config`, else the config pushed to the fleet, else its config.json, else the shipped example),
the fleet's live breakers, credit and key reports (JetStream KV, workers/health.py) and the
account's own route (PostgreSQL: DATABASE_URL, else the fleet's). Other languages ask a dispatcher
the same on `llm.admin.explain` (workers/admin.py). Exits 0 when the request would be sent, 1 when
it would be refused (or the config is wrong), 2 when NATS cannot be reached or holds no fleet.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

import asyncpg
import msgspec

from router.config import ConfigError
from router.routing import AccountRoute

from .. import accounts as store
from .. import configstore
from ..admin import ExplainRequest, Explanation, explain
from ..health import HealthView
from .accounts import database_url, name, routing_config
from .fleet import OK, REFUSED, connected, fleet_prefix, say
from .preflight import database_problem


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("explain", help="the chain a request would get, and why each other target is skipped")
    p.add_argument("--use-case", required=True, type=name)
    p.add_argument("--tier", type=name, default="default")
    p.add_argument("--account", type=name, help="look up the account's own route too")
    p.add_argument("--model", help="the request forces this model (provider:model, pool:model or a name)")
    p.add_argument("--image", action="store_true", help="the request carries an image")
    p.add_argument("--tools", action="store_true", help="the request offers tools")
    p.add_argument("--prompt-tokens", type=_count, default=0, metavar="N", help="the prompt's size in tokens")
    p.add_argument("--max-tokens", type=_positive, default=None, metavar="N", help="the request's max_tokens")
    p.add_argument("--json", action="store_true", help="the answer as JSON (the shape of llm.admin.explain)")
    p.add_argument("--config", help="routing config (default: the fleet's pushed config, else its config.json,"
                   " else the shipped example)")
    p.add_argument("--data-dir", type=Path, default=None, help="find the fleet `switchyard up` started here")
    p.set_defaults(run=explain_command)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (0, 1, 2, …)")
    return int(text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return int(text)


async def explain_command(args: argparse.Namespace) -> int:
    """Raises NoFleet when NATS is unreachable or holds no fleet."""
    try:
        cfg, where = routing_config(args.config, args.data_dir)
    except ConfigError as exc:
        say(str(exc))
        return REFUSED
    ask = ExplainRequest(use_case=args.use_case, tier=args.tier, account=args.account, model=args.model,
                         image=args.image, tools=args.tools, prompt_tokens=args.prompt_tokens,
                         max_tokens=args.max_tokens)
    own, routes, why = await _account_route(args.data_dir, ask)
    async with connected(args.data_dir) as (nc, url):
        js = nc.jetstream()
        await fleet_prefix(js, url)
        if args.config is None:  # what the fleet runs now beats any file
            try:
                pushed = await configstore.current(js)
            except ConfigError:
                pushed = None
            if pushed is not None:
                cfg, where = pushed[0], f"the fleet's pushed config (revision {pushed[1]})"
        health = HealthView(js)
        await health.start()
        try:
            answer = explain(cfg, ask, health, account_route=own, account_routes=routes, live_health=True)
        finally:
            await health.stop()
    if args.json:
        print(msgspec.json.encode(answer).decode())
    else:
        _print(answer, where, why)
    return OK if answer.code is None else REFUSED


async def _account_route(
    data_dir: Path | None, ask: ExplainRequest
) -> tuple[AccountRoute | None, Literal["on", "off", "unavailable"], str]:
    """The account's route, whether it was looked up, and a note saying why not."""
    if ask.account is None:
        return None, "off", ""
    url = database_url(data_dir)
    if url is None:
        return None, "off", "no database (DATABASE_URL, or a fleet's state.json), so no account route was looked up"
    problem = await database_problem(url)
    if problem:
        return None, "unavailable", f"{problem}; no account route was looked up"
    conn = await asyncpg.connect(url, timeout=5)
    try:
        return await store.find(conn, ask.account, ask.use_case, ask.tier), "on", ""
    except asyncpg.UndefinedTableError:  # a database no fleet of this version has migrated yet
        return None, "on", ""
    finally:
        await conn.close()


def _source(a: Explanation) -> str:
    match a.source:
        case "model_override":
            return f"the forced model {a.model}"
        case "account_route":
            assert a.account_route is not None
            tiers = "every tier" if a.account_route.tier == store.ALL_TIERS else f"tier {a.account_route.tier}"
            return f"account {a.account}'s own route for {a.use_case}, {tiers}"
        case "tier_route":
            return f"the route of {a.use_case}, tier {a.tier}"
        case "default_route":
            return f"the default route of {a.use_case}"
    return "no route"


def _print(a: Explanation, where: str, why: str) -> None:
    who = f", account {a.account}" if a.account else ""
    print(f"use case {a.use_case}, tier {a.tier}{who}; config: {where}")
    if a.code is None:
        print(f"chain, from {_source(a)}:")
        for i, c in enumerate(a.chain, 1):
            note = "" if c.known else "  (unknown model: used as configured)"
            print(f"  {i}. {c.pool}:{c.model}{note}")
    else:
        print(f"refused with {a.code}: {a.message}")
    if a.skipped:
        print("skipped:")
        for s in a.skipped:
            note = "" if s.known else " (unknown model: used as configured)"
            print(f"  - {s.pool}:{s.model}{note}: {s.reason}: {s.detail}")
    print(f"prompt estimate: {a.prompt_tokens:,} tokens")
    if why:
        print(f"note: {why}")
