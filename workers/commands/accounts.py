"""`switchyard accounts route set|list|delete`: accounts' own routes, in PostgreSQL (and
`switchyard accounts limits set|show|delete`, their own rate limits and budgets: account_limits.py).

A route set here is used by every dispatcher within about two seconds (workers/accounts.py) for
the account's requests of that use case, and that tier (or every tier: `*`, the default), before
the config's route. Targets are `pool:model` of pools the routing config has. The config they are
checked against is `--config`, else the running fleet's `config.json` in the data directory, else
the shipped example; every command says which.

The database is DATABASE_URL, else the one `switchyard up` wrote to the data directory's
state.json.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import msgspec

from router.config import Config, ConfigError, parse_target
from router.models import model_info

from .. import accounts as store
from ..db import migrate
from . import account_limits
from .fleet import OK, REFUSED, NoFleet, say
from .preflight import database_problem

_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")


def name(text: str) -> str:
    """An account, use case or tier name, as argparse checks it."""
    if not _NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text[:200]!r} is not a name (1-128 characters from A-Z a-z 0-9 _ -)")
    return text


def tier_name(text: str) -> str:
    return text if text == store.ALL_TIERS else name(text)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--data-dir", type=Path, default=None,
                       help="the fleet `switchyard up` started here: its database and config.json")
    checked = argparse.ArgumentParser(add_help=False)
    checked.add_argument("--config", help="check targets against this routing config (default: the fleet's"
                                          " config.json, else the shipped example)")
    accounts = sub.add_parser("accounts", help="accounts' own routes and limits, in PostgreSQL")
    nouns = accounts.add_subparsers(dest="noun", required=True)
    route = nouns.add_parser("route", help="set, list or delete an account's own route for a use case")
    actions = route.add_subparsers(dest="action", required=True)

    put = actions.add_parser("set", parents=[where, checked], help="set an account's route for a use case")
    put.add_argument("account", type=name)
    put.add_argument("--use-case", required=True, type=name)
    put.add_argument("--tier", type=tier_name, default=store.ALL_TIERS, help="one tier (default: * for every tier)")
    put.add_argument("targets", nargs="+", metavar="TARGET", help="pool:model, the first preferred")

    ls = actions.add_parser("list", parents=[where], help="every account route, or one account's")
    ls.add_argument("--account", type=name)
    ls.add_argument("--json", action="store_true", help="a JSON array instead of lines")

    rm = actions.add_parser("delete", parents=[where], help="delete an account's route for a use case")
    rm.add_argument("account", type=name)
    rm.add_argument("--use-case", required=True, type=name)
    rm.add_argument("--tier", type=tier_name, default=store.ALL_TIERS, help="one tier (default: *)")
    account_limits.register(nouns, where, checked)
    accounts.set_defaults(run=accounts_command)


def routing_config(path: str | None, data_dir: Path | None) -> tuple[Config, str]:
    """The routing config and where it came from: `path`, else the fleet's config.json, else the
    shipped example (or SWITCHYARD_CONFIG). Raises ConfigError naming the file."""
    from ..processes import DEFAULT_CONFIG, load_config
    from ..up import default_data_dir

    if path:
        return load_config(path), f"--config {path}"
    effective = (data_dir or default_data_dir()) / "config.json"
    if effective.is_file():
        return load_config(str(effective)), f"the fleet's {effective}"
    env = os.environ.get("SWITCHYARD_CONFIG")
    if env:
        return load_config(None), f"SWITCHYARD_CONFIG {env}"
    return load_config(None), f"the shipped example {DEFAULT_CONFIG.name}"


def database_url(data_dir: Path | None) -> str | None:
    """DATABASE_URL, else the database of the fleet `switchyard up` runs in the data directory."""
    from ..up import default_data_dir, read_state

    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"]
    state = read_state(data_dir or default_data_dir())
    return state.database_url if state else None


@asynccontextmanager
async def database(data_dir: Path | None) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the fleet's database, migrated. Raises NoFleet (one line) when there is none
    or it cannot be reached."""
    url = database_url(data_dir)
    if url is None:
        raise NoFleet("no database: set DATABASE_URL, or start the fleet with `switchyard up` (or give its --data-dir)")
    problem = await database_problem(url)
    if problem:
        raise NoFleet(problem)
    conn = await asyncpg.connect(url, timeout=5)
    try:
        await migrate(conn)
        yield conn
    finally:
        await conn.close()


def _tiers(tier: str) -> str:
    return "every tier" if tier == store.ALL_TIERS else f"tier {tier}"


async def accounts_command(args: argparse.Namespace) -> int:
    """Raises NoFleet when the database is not there or cannot be reached."""
    if args.noun == "limits":
        return await account_limits.command(args)
    match args.action:
        case "set":
            return await _set(args)
        case "list":
            async with database(args.data_dir) as conn:
                return _list(await store.rows(conn, args.account), as_json=args.json)
        case _:
            async with database(args.data_dir) as conn:
                return await _delete(conn, args.account, args.use_case, args.tier)


def check_targets(cfg: Config, where: str, targets: list[str]) -> tuple[str | None, list[str]]:
    """(the first mistake in one line, or None; notes on models the model table does not know)."""
    seen: set[str] = set()
    notes: list[str] = []
    for text in targets:
        try:
            t = parse_target(text)
        except ValueError:
            return f"target {text[:200]!r} is not pool:model (e.g. openai:gpt-4o)", notes
        pool = cfg.pools.get(t.pool)
        if pool is None:
            return (f"target {text[:200]!r}: no pool {t.pool!r} in {where}"
                    f" (pools: {', '.join(cfg.pools) or 'none'})"), notes
        if text in seen:
            return f"target {text[:200]!r} is given twice", notes
        seen.add(text)
        if not model_info(cfg, cfg.providers[pool.provider].format, t.model).known:
            notes.append(f"note: model {t.model!r} is not in the model table; it is used as configured")
    return None, notes


async def _set(args: argparse.Namespace) -> int:
    try:
        cfg, where = routing_config(args.config, args.data_dir)
    except ConfigError as exc:
        say(str(exc))
        return REFUSED
    mistake, notes = check_targets(cfg, where, args.targets)
    if mistake:
        say(mistake)
        return REFUSED
    async with database(args.data_dir) as conn:
        replaced = await store.put(conn, args.account, args.use_case, args.tier, args.targets)
    verb = "replaced" if replaced else "set"
    print(f"{verb} the route of account {args.account} for use case {args.use_case}, {_tiers(args.tier)}:"
          f" {', '.join(args.targets)}")
    print(f"pools checked against {where}")
    for note in notes:
        print(note)
    return OK


def _list(routes: list[store.RouteRow], *, as_json: bool) -> int:
    if as_json:
        print(msgspec.json.encode(routes).decode())
        return OK
    if routes:
        table = [("account", "use case", "tier", "active", "updated (UTC)", "targets")]
        table += [(r.account, r.use_case, r.tier, "yes" if r.active else "no", f"{r.updated_at:%Y-%m-%d %H:%M:%S}",
                   ", ".join(r.targets)) for r in routes]
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
        for row in table:
            print("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]]))
    print(f"{len(routes)} account route{'' if len(routes) == 1 else 's'}" if routes else "no account routes")
    return OK


async def _delete(conn: asyncpg.Connection, account: str, use_case: str, tier: str) -> int:
    if not await store.delete(conn, account, use_case, tier):
        say(f"account {account} has no route for use case {use_case}, {_tiers(tier)};"
            f" `switchyard accounts route list --account {account}` shows what it has")
        return REFUSED
    print(f"deleted the route of account {account} for use case {use_case}, {_tiers(tier)}")
    return OK
