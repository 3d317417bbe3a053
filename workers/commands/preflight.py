"""Checks a long-running process makes before it starts, so that a user's mistake is one line.

A process that started and then failed on its first connection would log a traceback and
be restarted by whatever runs it; the same mistake found here is a sentence and exit code 1.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit, urlunsplit

import asyncpg


def redact_url(url: str) -> str:
    """The URL without its password (after `user:` or in a `password=` parameter)."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    netloc = f"{userinfo.partition(':')[0]}@{hosts}" if at else hosts
    query = "&".join(p for p in parts.query.split("&") if not p.startswith("password="))
    return urlunsplit(parts._replace(netloc=netloc, query=query))


async def database_problem(url: str, timeout_s: float = 5.0) -> str | None:
    """Why PostgreSQL at `url` cannot be used, in one line naming the URL without its password;
    None when a connection succeeds."""
    try:
        conn = await asyncpg.connect(url, timeout=timeout_s)
    except asyncpg.PostgresError as exc:  # the server answered, and said no
        why, check = str(exc), "check the user, password and database in DATABASE_URL"
    except asyncpg.ClientConfigurationError as exc:
        why, check = str(exc), "DATABASE_URL should read postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
    except (OSError, TimeoutError, asyncpg.InterfaceError) as exc:
        why, check = _unreachable(exc, timeout_s), "check that PostgreSQL runs there and that DATABASE_URL names it"
    else:
        await conn.close()
        return None
    password = urlsplit(url).password
    if password:  # a driver message may quote the URL it was given
        why = why.replace(password, "***")
    return f"cannot connect to PostgreSQL at {redact_url(url)}: {why}; {check}"


def _unreachable(exc: Exception, timeout_s: float) -> str:
    match exc:
        case ConnectionRefusedError():
            return "connection refused"
        case FileNotFoundError():
            return "no server socket in that directory"
        case socket.gaierror():
            return f"unknown host ({exc.strerror})"
        case TimeoutError():
            return f"no answer within {timeout_s:g} s"
        case OSError() if exc.strerror:
            return exc.strerror[0].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__
