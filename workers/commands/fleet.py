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

OK = 0
REFUSED = 1
"""What was asked for is not there, or was refused (a user's mistake, said in one line)."""
NO_FLEET = 2
"""NATS cannot be reached, or no Switchyard fleet runs there."""

Command = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]


class NoFleet(Exception):
    """NATS cannot be reached or holds no fleet; the message says which and what to do."""


def say(text: str) -> None:
    """One line for the user, on stderr."""
    print(f"switchyard: {text}", file=sys.stderr)


def nats_url(data_dir: Path | None) -> str:
    from ..up import default_data_dir, read_state

    if os.environ.get("NATS_URL"):
        return os.environ["NATS_URL"]
    state = read_state(data_dir or default_data_dir())
    return state.nats_url if state else "nats://127.0.0.1:4222"


async def connect_once(url: str) -> NATS:
    """One attempt, no reconnect loop and no traceback: a CLI reports an unreachable fleet and exits."""

    async def quiet(_exc: Exception) -> None:
        return None

    # max_reconnect_attempts=0 would mean "forever" to nats-py; 1 is one retry, then NoServersError.
    return await nats.connect(
        url, connect_timeout=3, allow_reconnect=False, max_reconnect_attempts=1, reconnect_time_wait=0.1,
        error_cb=quiet,
    )


@asynccontextmanager
async def connected(data_dir: Path | None) -> AsyncIterator[tuple[NATS, str]]:
    """A connection to the fleet's NATS and its URL. Raises NoFleet when it cannot be reached or is
    lost, or a request to it goes unanswered."""
    url = nats_url(data_dir)
    try:
        nc = await connect_once(url)
    except Exception as exc:  # nats-py raises OSError, TimeoutError or its own errors, depending on the URL
        raise NoFleet(
            f"cannot reach NATS at {url} ({type(exc).__name__}); is the fleet up? (`switchyard up`, or set NATS_URL)"
        ) from None
    try:
        yield nc, url
    except nats.errors.TimeoutError:
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
    except KeyboardInterrupt:
        return 130
