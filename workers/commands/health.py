"""`switchyard health --role dispatcher|worker|auditor [--pool P] [--local]`: a liveness/readiness probe.

Exit codes: 0 when a live process of that role (of that pool; on this host with `--local`) answers healthy
within `--timeout`; 1 otherwise (none answers, none is healthy, NATS cannot be reached); 2 for a wrong
option. One line on stdout says which process answered, or on stderr why not. Usable as a Kubernetes exec
probe: `--local` keeps the answer to the processes whose host name is this machine's (a pod's name), so a
pod's probe judges its own process, not a sibling replica.
"""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

from router.vitals import ROLES, ProcessStats, Role

from .. import discovery
from .fleet import connect_once, credentials, nats_url, say
from .status import seconds

HEALTHY = 0
UNHEALTHY = 1
USAGE = 2
DEFAULT_TIMEOUT_S = 5.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    h = sub.add_parser(
        "health", help="probe: exit 0 when a live process of --role answers healthy, 1 when none does",
        description="Exit codes: 0 healthy, 1 not (none answers, none healthy, NATS unreachable), 2 wrong option.",
    )
    h.add_argument("--role", default=None, help="dispatcher, worker or auditor")
    h.add_argument("--pool", default=None, help="with --role worker: a worker of this pool")
    h.add_argument("--local", action="store_true", help="only a process on this host (this pod)")
    h.add_argument("--timeout", default=str(DEFAULT_TIMEOUT_S), metavar="SECONDS",
                   help=f"how long to wait for a healthy answer (default {DEFAULT_TIMEOUT_S:g})")
    h.add_argument("--data-dir", type=Path, default=None, help="find the fleet `switchyard up` started here")
    h.set_defaults(run=health)


def _role(text: str | None) -> Role | None:
    for role in ROLES:
        if text == role:
            return role
    return None


async def health(args: argparse.Namespace) -> int:
    role = _role(args.role)
    if role is None:
        given = "no --role" if args.role is None else f"--role {str(args.role)[:50]!r}"
        say(f"health: {given}; give --role dispatcher, --role worker or --role auditor")
        return USAGE
    if args.pool is not None and role != "worker":
        say(f"health: --pool goes with --role worker only (a {role} serves every pool)")
        return USAGE
    timeout = seconds("--timeout", args.timeout)
    if timeout is None:
        return USAGE
    host = socket.gethostname() if args.local else None

    def fits(p: ProcessStats) -> bool:
        return (args.pool is None or p.pool == args.pool) and (host is None or p.host == host)

    def enough(p: ProcessStats) -> bool:
        return fits(p) and p.healthy

    url = nats_url(args.data_dir)
    what = f"{role} of pool {args.pool}" if args.pool else role
    try:
        seed_file, _ = credentials(args.data_dir)  # NATS_NKEY_SEED_FILE, else a secure fleet's admin credential
        nc = await connect_once(url, seed_file)
    except Exception as exc:
        say(f"health: unhealthy: cannot reach NATS at {url} ({type(exc).__name__})")
        return UNHEALTHY
    try:
        found = [p for p in await discovery.gather(nc, role, timeout, enough=enough) if fits(p)]
    except Exception as exc:  # the connection lost under the request: as unhealthy as no answer
        say(f"health: unhealthy: asking NATS at {url} failed ({type(exc).__name__})")
        return UNHEALTHY
    finally:
        await nc.close()
    good = next((p for p in found if p.healthy), None)
    if good is not None:
        print(f"healthy: {what}: {good.id} on {good.host}, up {good.uptime_s:.0f} s")
        return HEALTHY
    if found:
        p = found[0]
        say(f"health: unhealthy: {what}: {p.id} on {p.host}: {p.problem}")
    else:
        where = f" on {host}" if host else ""
        say(f"health: unhealthy: no live {what}{where} answered within {timeout:g} s")
    return UNHEALTHY
