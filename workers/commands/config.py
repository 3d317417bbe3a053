"""`switchyard config push|show`: the routing config every running process follows.

`push` validates a file exactly as a process does at start (the same messages) and publishes it
to the `llm_config` bucket; every dispatcher and worker swaps to it without a restart. A file that
does not validate is refused and the running config stays.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import msgspec

from router.config import Config, ConfigError

from .. import configstore
from ..processes import load_config
from ..runtime import ensure_topology
from .fleet import OK, REFUSED, connected, fleet_prefix, say


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--data-dir", type=Path, default=None, help="find the fleet `switchyard up` started here")
    config = sub.add_parser("config", help="the routing config the running fleet follows: push or show it")
    actions = config.add_subparsers(dest="action", required=True)
    push = actions.add_parser("push", parents=[where], help="validate a config file and apply it to the fleet")
    push.add_argument("file", help="the routing config (TOML, or the JSON `switchyard up` writes)")
    show = actions.add_parser("show", parents=[where], help="the config the fleet runs now")
    show.add_argument("--revision", type=int, default=None, help="an earlier pushed revision")
    show.add_argument("--json", action="store_true", help="the whole config as JSON")
    config.set_defaults(run=config_command)


async def config_command(args: argparse.Namespace) -> int:
    """Raises NoFleet when NATS is unreachable or holds no fleet."""
    if args.action == "push":
        try:
            cfg = load_config(args.file)
        except ConfigError as exc:
            say(f"{exc}; nothing was pushed, the running config stays")
            return REFUSED
    async with connected(args.data_dir) as (nc, url):
        js = nc.jetstream()
        prefix = await fleet_prefix(js, url)
        if args.action == "push":
            if cfg.subject_prefix != prefix:
                say(f"{args.file}: subject_prefix is {cfg.subject_prefix!r} but the fleet at {url} uses {prefix!r};"
                    " nothing was pushed")
                return REFUSED
            await ensure_topology(js, cfg)  # a new pool's consumer, a new concurrency: before anything routes there
            revision = await configstore.push(js, cfg)
            print(f"pushed revision {revision}: {_summary(cfg)}")
            return OK
        try:
            found = await configstore.current(js, args.revision)
        except ConfigError as exc:
            say(f"the stored config does not validate: {exc}")
            return REFUSED
        if found is None:
            what = f"revision {args.revision}" if args.revision else "config"
            say(f"no {what} has been pushed to this fleet (`switchyard up` and `switchyard config push` push one)")
            return REFUSED
        cfg, revision = found
        if args.json:
            print(msgspec.json.format(msgspec.json.encode({"revision": revision, "config": cfg}), indent=2).decode())
        else:
            print(_readable(cfg, revision))
        return OK


def _summary(cfg: Config) -> str:
    return f"{len(cfg.providers)} providers, pools {', '.join(cfg.pools)}; use cases {', '.join(cfg.routes)}"


def _readable(cfg: Config, revision: int) -> str:
    lines = [f"revision {revision}", "", "providers:"]
    for name, p in cfg.providers.items():
        key = f"key from ${p.api_key_env}" if p.api_key_env else "no key"
        lines.append(f"  {name:<12} {p.format:<9} {p.base_url}  ({key}{', free' if p.free else ''})")
    lines += ["", "pools:"]
    for name, pool in cfg.pools.items():
        lines.append(f"  {name:<12} provider {pool.provider}, concurrency {pool.concurrency},"
                     f" timeout {pool.timeout_ms} ms")
    lines += ["", "routes:"]
    for use_case, tiers in cfg.routes.items():
        for tier, targets in tiers.items():
            lines.append(f"  {use_case + '.' + tier:<20} {' > '.join(targets)}")
    return "\n".join(lines)
