"""`switchyard keys set|list|rotate|delete`: provider keys stored encrypted in PostgreSQL.

A key's NAME is the environment variable its provider's `api_key_env` names (`OPENAI_API_KEY`);
with `--account A` it is that account's own key, used for that account's calls only. The key is
read from stdin when piped, else from a prompt that does not echo; never from the command line,
where shell history and the process list would keep it. It is encrypted here, under the newest
master key of SWITCHYARD_MASTER_KEYS (router/secrets.py), and every worker that reads the table
uses it within seconds (workers/keys.py).

The database is DATABASE_URL, else the one `switchyard up` wrote to the data directory's state.json.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

import msgspec

from router.config import ConfigError
from router.secrets import (
    MAX_SECRET_CHARS,
    MasterKeys,
    SecretsError,
    check_account,
    check_name,
    check_secret,
    mask,
    master_keys_from_env,
)

from .. import keys as store
from .accounts import database, routing_config
from .fleet import OK, REFUSED, Refused, say


def _name(text: str) -> str:
    try:
        return check_name(text)
    except SecretsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _account(text: str) -> str:
    try:
        return check_account(text)
    except SecretsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--data-dir", type=Path, default=None,
                       help="the fleet `switchyard up` started here: its database")
    keys = sub.add_parser("keys", help="provider keys stored encrypted in PostgreSQL: set, list, rotate, delete")
    actions = keys.add_subparsers(dest="action", required=True)

    put = actions.add_parser("set", parents=[where], help="store a key (read from stdin, or a prompt; never argv)")
    put.add_argument("name", type=_name, metavar="NAME",
                     help="the environment variable the provider's api_key_env names, e.g. OPENAI_API_KEY")
    put.add_argument("--account", type=_account, help="this account's own key (default: the key for every account)")

    ls = actions.add_parser("list", parents=[where], help="every stored key, masked, with its version and dates")
    ls.add_argument("--json", action="store_true", help="a JSON array instead of a table")

    rot = actions.add_parser("rotate", parents=[where],
                             help="re-encrypt every key under the newest master key, in one transaction")
    rot.add_argument("--json", action="store_true", help="the counts as a JSON object")

    rm = actions.add_parser("delete", parents=[where], help="delete a stored key")
    rm.add_argument("name", type=_name, metavar="NAME")
    rm.add_argument("--account", type=_account, help="that account's own key (default: the global key)")
    keys.set_defaults(run=keys_command)


class _Refused(Exception):
    """The operator's master keys cannot do what was asked (one line, exit code 1); the message says why."""


def _master() -> MasterKeys:
    """Raises _Refused when SWITCHYARD_MASTER_KEYS is missing or malformed."""
    try:
        return master_keys_from_env()
    except SecretsError as exc:
        raise _Refused(str(exc)) from None


def _read_secret(name: str, account: str | None) -> str:
    """The key from stdin when piped, else a prompt that does not echo. Raises Refused (one line, exit 1)."""
    try:
        if sys.stdin is not None and not sys.stdin.isatty():
            text = sys.stdin.read(MAX_SECRET_CHARS + 3)
        else:
            whose = f" of account {account}" if account else ""
            text = getpass.getpass(f"key {name}{whose} (not echoed): ")
        return check_secret(text)
    except SecretsError as exc:
        raise Refused(str(exc)) from None
    except (EOFError, OSError, UnicodeDecodeError):
        raise Refused("could not read the key: pipe it on stdin, or run the command in a terminal") from None


def _whose(name: str, account: str | None) -> str:
    return f"key {name} of account {account}" if account else f"key {name} (every account)"


async def keys_command(args: argparse.Namespace) -> int:
    """Exit code 1 (one line) when the master keys are missing, malformed or do not open a stored row.
    Raises NoFleet (from the database helper; exit code 2) when the database is not there or cannot be reached."""
    try:
        match args.action:
            case "set":
                return await _set(args)
            case "list":
                return await _list(args)
            case "rotate":
                return await _rotate(args)
            case _:
                return await _delete(args)
    except _Refused as exc:
        say(str(exc))
        return REFUSED


async def _delete(args: argparse.Namespace) -> int:
    async with database(args.data_dir) as conn:
        if not await store.delete(conn, args.name, args.account):
            say(f"no stored {_whose(args.name, args.account)}; `switchyard keys list` shows what is stored")
            return REFUSED
    print(f"deleted the stored {_whose(args.name, args.account)}; workers stop using it within seconds")
    return OK


async def _set(args: argparse.Namespace) -> int:
    master = _master()  # before the key is asked for: a missing master key is said first
    secret = _read_secret(args.name, args.account)
    async with database(args.data_dir) as conn:
        replaced = await store.put(conn, master, args.name, args.account, secret)
    verb = "replaced" if replaced else "stored"
    print(f"{verb} {_whose(args.name, args.account)} ({mask(secret)}), encrypted under master key version"
          f" {master.newest}; workers use it within seconds")
    note = _unused(args.name, args.data_dir)
    if note:
        print(note)
    return OK


def _unused(name: str, data_dir: Path | None) -> str | None:
    """A note when no provider of the fleet's config reads a key of that name."""
    try:
        cfg, where = routing_config(None, data_dir)
    except ConfigError:
        return None
    users = [p for p, prov in cfg.providers.items() if prov.api_key_env == name]
    if users:
        return None
    named = sorted({p.api_key_env for p in cfg.providers.values() if p.api_key_env})
    return (f"note: no provider in {where} has api_key_env = {name!r}, so no call uses this key yet"
            f" (names read: {', '.join(named) or 'none'})")


async def _list(args: argparse.Namespace) -> int:
    master = _master()
    async with database(args.data_dir) as conn:
        rows = await store.listing(conn, master)
    if args.json:
        print(msgspec.json.encode(rows).decode())
    elif rows:
        table = [("name", "account", "key", "version", "created (UTC)", "rotated (UTC)")]
        table += [(r.name, r.account or "(every account)", r.key or "(unreadable)", str(r.version),
                   f"{r.created_at:%Y-%m-%d %H:%M:%S}", f"{r.rotated_at:%Y-%m-%d %H:%M:%S}" if r.rotated_at else "-")
                  for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        for row in table:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        print(f"{len(rows)} stored key{'' if len(rows) == 1 else 's'}")
    else:
        print("no stored keys")
    problems = [r.problem for r in rows if r.problem]
    for problem in problems:
        say(problem)
    return REFUSED if problems else OK


async def _rotate(args: argparse.Namespace) -> int:
    master = _master()
    async with database(args.data_dir) as conn:
        try:
            done = await store.rotate(conn, master)
        except SecretsError as exc:
            raise _Refused(f"{exc}; nothing was rotated") from None
    if args.json:
        print(msgspec.json.encode(done).decode())
        return OK
    sources = ", ".join(f"{n} from version {v}" for v, n in sorted(done.from_versions.items()))
    print(f"re-encrypted {done.rotated} key{'' if done.rotated == 1 else 's'} under master key version {done.version}"
          + (f" ({sources})" if sources else "") + f"; {done.already} already under it")
    return OK
