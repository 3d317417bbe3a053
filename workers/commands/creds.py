"""`switchyard creds init|new-producer|list`: the nkey credentials of a secure fleet's NATS server.

`switchyard up --secure` keeps them in `<data dir>/auth`; a fleet on a server of your own keeps them
wherever `--auth-dir` says (deploy/nats/README.md). Each user has a role and a permission table
(router/natsperms.py); a seed (the secret) is written once to its own file, mode 0600, and never
printed: commands show the file's path and the public key.

`new-producer` adds the user to the generated server config and makes the running nats-server read it
again (SIGHUP to the pid it wrote), then checks that the new credential is accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from pathlib import Path

import msgspec

from router.natsperms import User, inbox_prefix

from ..natsauth import AuthDir, AuthError, ensure_fleet_users
from .fleet import OK, REFUSED, connect_once, say

VERIFY_S = 10.0
"""How long `new-producer` waits for the reloaded server to accept the new credential."""


class ProducerCredential(msgspec.Struct, kw_only=True):
    """What `new-producer --json` prints: where the seed is, never the seed."""

    account: str
    seed_file: str
    public_key: str
    inbox_prefix: str
    new: bool
    """False: the account already had a credential, which is kept."""
    active: bool | None
    """True: the running server accepts it; False: it does not yet; None: no running fleet to ask."""


class Credential(msgspec.Struct, kw_only=True):
    role: str
    name: str
    public_key: str
    seed_file: str


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--data-dir", type=Path, default=None,
                       help="the fleet `switchyard up --secure` runs here (its credentials are in <data dir>/auth)")
    where.add_argument("--auth-dir", type=Path, default=None,
                       help="the credentials directory of a server of your own (deploy/nats/)")
    where.add_argument("--json", action="store_true", help="JSON instead of text")
    cr = sub.add_parser("creds", help="NATS credentials of a secure fleet: init, new-producer, list")
    actions = cr.add_subparsers(dest="action", required=True)
    init = actions.add_parser("init", parents=[where],
                              help="the fleet's own credentials (admin, dispatcher, auditor, one per pool)")
    init.add_argument("--pools", required=True, help="the config's pools, comma-separated")
    init.add_argument("--prefix", default="llm", help="the config's subject_prefix (default llm)")
    new = actions.add_parser("new-producer", parents=[where],
                             help="a producer credential that may publish only llm.req.*.ACCOUNT")
    new.add_argument("account")
    actions.add_parser("list", parents=[where], help="every credential: role, name, public key, seed file")
    cr.set_defaults(run=creds_command)


def _auth_dir(args: argparse.Namespace, *, create: bool = False) -> AuthDir | None:
    """The credentials directory the command works on; None (said in one line) when there is none."""
    from ..up import default_data_dir, read_state

    if args.auth_dir is not None:
        auth = AuthDir(args.auth_dir)
    else:
        data_dir = args.data_dir or default_data_dir()
        state = read_state(data_dir)
        auth = AuthDir(Path(state.auth_dir) if state and state.auth_dir else data_dir / "auth")
    if create or auth.exists():
        return auth
    say(f"no credentials in {auth.path}: start the fleet with `switchyard up --secure`, or make them for a server"
        " of your own with `switchyard creds init --auth-dir DIR --pools ...`")
    return None


async def creds_command(args: argparse.Namespace) -> int:
    auth = _auth_dir(args, create=args.action == "init")
    if auth is None:
        return REFUSED
    try:
        if args.action == "init":
            return _init(auth, args)
        if args.action == "new-producer":
            return await _new_producer(auth, args)
        return _list(auth, args.json)
    except AuthError as exc:
        say(str(exc))
        return REFUSED


def _init(auth: AuthDir, args: argparse.Namespace) -> int:
    pools = [p.strip() for p in args.pools.split(",") if p.strip()]
    if not pools:
        say("--pools: give the config's pools, comma-separated (e.g. --pools openai,anthropic)")
        return REFUSED
    ensure_fleet_users(auth, pools)
    conf = auth.write_server_config(args.prefix)
    if not args.json:
        print(f"credentials in {auth.path}; server authorization in {conf} (include it in nats-server's config)")
    return _list(auth, args.json)


async def _new_producer(auth: AuthDir, args: argparse.Namespace) -> int:
    user, new = auth.add("producer", args.account)
    auth.write_server_config()
    reloaded = auth.reload_server()
    active = await _accepted(auth, user, args) if reloaded else None
    seed = auth.seed_file("producer", args.account)
    out = ProducerCredential(account=args.account, seed_file=str(seed), public_key=user.public_key,
                             inbox_prefix=inbox_prefix(args.account), new=new, active=active)
    if args.json:
        print(msgspec.json.encode(out).decode())
    else:
        first = "new producer credential" if new else "existing producer credential (kept)"
        print(f"{first} for account {args.account}: {seed}")
        print(f"  public key {user.public_key}; connect with NATS_NKEY_SEED_FILE={seed} and inbox prefix"
              f" {out.inbox_prefix}")
        if active:
            print("  the running nats-server reloaded its config and accepts it")
        elif active is None:
            print(f"  no running nats-server of {auth.path}: it takes the credential when it starts (nats.conf is"
                  " written), or at once on `nats-server --signal reload`")
    if active is False:
        say(f"the nats-server was asked to reload {auth.server_config} but does not accept the credential yet;"
            " see its log")
        return REFUSED
    return OK


async def _accepted(auth: AuthDir, user: User, args: argparse.Namespace) -> bool:
    """Whether the running server takes the user's credential, tried until it reloaded or VERIFY_S passed."""
    from .fleet import nats_url

    url = nats_url(args.data_dir)
    seed = str(auth.seed_file(user.role, user.name))
    end = asyncio.get_running_loop().time() + VERIFY_S
    while True:
        with contextlib.suppress(Exception):
            nc = await connect_once(url, seed)
            await nc.close()
            return True
        if asyncio.get_running_loop().time() > end:
            return False
        await asyncio.sleep(0.2)


def _list(auth: AuthDir, as_json: bool) -> int:
    rows = [Credential(role=u.role, name=u.name, public_key=u.public_key,
                       seed_file=str(auth.seed_file(u.role, u.name))) for u in auth.users()]
    if as_json:
        print(msgspec.json.encode(rows).decode())
        return OK
    print(f"{'ROLE':<11} {'NAME':<24} {'PUBLIC KEY':<57} SEED FILE")
    for r in rows:
        print(f"{r.role:<11} {r.name or '-':<24} {r.public_key:<57} {r.seed_file}")
    return OK
