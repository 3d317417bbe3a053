"""How an operator's command finds the fleet: the NATS URL, one connection attempt, the streams.

The URL is NATS_URL, else the one `switchyard up` wrote to the data directory's state.json.
A server that answers is not yet a fleet: it may lack JetStream, or be some other team's
server with no Switchyard streams, so commands look for theirs before doing anything.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError, ServiceUnavailableError
from nats.protocol.parser import AUTHORIZATION_VIOLATION, PERMISSIONS_ERR

OK = 0
REFUSED = 1
"""What was asked for is not there, or was refused (a user's mistake, said in one line)."""
NO_FLEET = 2
"""NATS cannot be reached, or no Switchyard fleet runs there."""

Command = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]


class NoFleet(Exception):
    """NATS cannot be reached or holds no fleet; the message says which and what to do."""


class Refused(Exception):
    """What the user asked for is refused, e.g. a bad value read after the arguments: one line, exit 1."""


class CredentialRefused(Refused):
    """The server refused what the command sent with this credential (exit 1); the message says so."""


def say(text: str) -> None:
    """One line for the user, on stderr."""
    print(f"switchyard: {text}", file=sys.stderr)


def nats_url(data_dir: Path | None) -> str:
    from ..up import default_data_dir, read_state

    if os.environ.get("NATS_URL"):
        return os.environ["NATS_URL"]
    state = read_state(data_dir or default_data_dir())
    return state.nats_url if state else "nats://127.0.0.1:4222"


def credentials(data_dir: Path | None, account: str | None = None) -> tuple[str | None, str | None]:
    """The nkey seed file to connect with, and the inbox prefix: NATS_NKEY_SEED_FILE when set; else, for
    the secure fleet `switchyard up --secure` runs in the data directory, its admin's credential, or with
    `account` that account's producer credential. A producer's inboxes are `_INBOX.<account>.…`, the
    only ones its credential may read. Raises NoFleet when the secure fleet has no credential for `account`."""
    from router.natsperms import inbox_prefix

    from ..natsauth import AuthDir
    from ..up import default_data_dir, read_state

    inbox = inbox_prefix(account) if account else None
    if os.environ.get("NATS_NKEY_SEED_FILE"):
        return os.environ["NATS_NKEY_SEED_FILE"], inbox
    state = None if os.environ.get("NATS_URL") else read_state(data_dir or default_data_dir())
    if state is None or state.auth_dir is None:
        return None, inbox
    auth = AuthDir(Path(state.auth_dir))
    seed = auth.seed_file("producer", account) if account else auth.seed_file("admin")
    if not seed.exists():
        raise NoFleet(f"the secure fleet at {state.nats_url} has no credential for account {account}: make one with"
                      f" `switchyard creds new-producer {account}`, or set NATS_NKEY_SEED_FILE")
    return str(seed), inbox


async def connect_once(url: str, seed_file: str | None = None, inbox_prefix: str | None = None) -> NATS:
    """One attempt, no reconnect loop and no traceback: a CLI reports an unreachable fleet and exits.
    Authenticates with the nkey seed in `seed_file` when given."""

    async def quiet(_exc: Exception) -> None:
        return None

    # max_reconnect_attempts=0 would mean "forever" to nats-py; 1 is one retry, then NoServersError.
    extra: dict[str, Any] = {"inbox_prefix": inbox_prefix} if inbox_prefix else {}
    return await nats.connect(
        url, connect_timeout=3, allow_reconnect=False, max_reconnect_attempts=1, reconnect_time_wait=0.1,
        error_cb=quiet, nkeys_seed=seed_file, **extra,
    )


@asynccontextmanager
async def connected(data_dir: Path | None, account: str | None = None) -> AsyncIterator[tuple[NATS, str]]:
    """A connection to the fleet's NATS and its URL, with the credential `credentials` finds (a producer's
    of `account` when given). Raises NoFleet when it cannot be reached or is lost, refuses the credential,
    or a request to it goes unanswered."""
    url = nats_url(data_dir)
    seed_file, inbox = credentials(data_dir, account)
    if seed_file is not None and not os.access(seed_file, os.R_OK):
        raise NoFleet(f"NATS_NKEY_SEED_FILE {seed_file}: no such file, or not readable")
    try:
        nc = await connect_once(url, seed_file, inbox)
    except Exception as exc:  # nats-py raises OSError, TimeoutError or its own errors, depending on the URL
        # A refused credential is a plain nats Error carrying the server's words.
        if isinstance(exc, nats.errors.Error) and AUTHORIZATION_VIOLATION in str(exc).lower():
            raise NoFleet(
                f"NATS at {url} refused the credential {'in ' + seed_file if seed_file else '(none given)'};"
                " set NATS_NKEY_SEED_FILE to the seed file of a user it knows (`switchyard creds list`)"
            ) from None
        raise NoFleet(
            f"cannot reach NATS at {url} ({type(exc).__name__}); is the fleet up? (`switchyard up`, or set NATS_URL)"
        ) from None
    try:
        yield nc, url
    except nats.errors.TimeoutError:
        refused = nc.last_error
        if refused is not None and PERMISSIONS_ERR in str(refused):
            # The server drops what this credential may not send, and the request then times out.
            raise CredentialRefused(
                f"NATS refused this credential ({str(refused).removeprefix('nats: ').strip()}): this command"
                " takes the admin credential (NATS_NKEY_SEED_FILE=<auth dir>/admin.nk)"
            ) from None
        raise NoFleet(f"NATS at {url} did not answer in time; try again, or check the server") from None
    except nats.errors.ConnectionClosedError:
        raise NoFleet(f"lost the connection to NATS at {url}") from None
    finally:
        await nc.close()


async def fleet_prefix(js: JetStreamContext, url: str, stream: str = "LLM_REQ") -> str:
    """The fleet's subject prefix, read from one of its streams (`LLM_REQ` takes `<prefix>.req.>`).

    Raises NoFleet when the server has no JetStream, no such stream, or a stream of that name
    that is not Switchyard's.
    """
    kind = stream.removeprefix("LLM_").lower()
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        raise NoFleet(
            f"NATS at {url} has no Switchyard streams ({stream} missing): no fleet runs there;"
            " start one with `switchyard up`, or point NATS_URL at the fleet's server"
        ) from None
    except ServiceUnavailableError:
        raise NoFleet(
            f"NATS at {url} has no JetStream, so no Switchyard fleet runs there;"
            " point NATS_URL at the fleet's server (nats-server -js)"
        ) from None
    for subject in info.config.subjects or []:
        if subject.endswith(f".{kind}.>"):
            return subject.removesuffix(f".{kind}.>")
    raise NoFleet(
        f"stream {stream} at {url} is not Switchyard's (it takes {info.config.subjects}, not <prefix>.{kind}.>)"
    )


def run(command: Command, args: argparse.Namespace) -> int:
    """Run an operator's command on uvloop; NoFleet becomes its one line and exit code 2."""
    import uvloop

    try:
        return uvloop.run(command(args))
    except NoFleet as exc:
        say(str(exc))
        return NO_FLEET
    except Refused as exc:
        say(str(exc))
        return REFUSED
    except KeyboardInterrupt:
        return 130
