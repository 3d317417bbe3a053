"""The mistakes a user meets first each get one line on stderr that says what is wrong, never a traceback.

Each test runs the installed `switchyard` entry point, as a user would.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from nats.aio.client import Client as NATS

from .process_fleet import nats_server

SWITCHYARD = str(Path(sys.executable).parent / "switchyard")


def switchyard(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SWITCHYARD, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


def one_line(out: subprocess.CompletedProcess[str]) -> str:
    """The one line on stderr, after checking that there is exactly one and no traceback anywhere."""
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, out.stderr + out.stdout
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- 1. PostgreSQL that cannot be used ---------------------------------------------------------


def test_auditor_names_an_unreachable_postgres_without_its_password() -> None:
    port = closed_port()
    out = switchyard("auditor", DATABASE_URL=f"postgresql://bob:s3cret@127.0.0.1:{port}/ledger",
                     NATS_URL=f"nats://127.0.0.1:{closed_port()}")
    line = one_line(out)
    assert out.returncode != 0
    assert line == (f"switchyard: cannot connect to PostgreSQL at postgresql://bob@127.0.0.1:{port}/ledger:"
                    " connection refused; check that PostgreSQL runs there and that DATABASE_URL names it")
    assert "s3cret" not in out.stderr + out.stdout


def test_auditor_names_a_unix_socket_that_is_gone(tmp_path: Path) -> None:
    url = f"postgresql://bob@/ledger?host={tmp_path}&password=s3cret"
    out = switchyard("auditor", DATABASE_URL=url, NATS_URL=f"nats://127.0.0.1:{closed_port()}")
    line = one_line(out)
    assert out.returncode != 0
    assert f"postgresql://bob@/ledger?host={tmp_path}: no server socket in that directory" in line
    assert "s3cret" not in line


def test_auditor_names_a_database_that_does_not_exist(pg_url: str) -> None:
    url = urlunsplit(urlsplit(pg_url)._replace(path="/sy_no_such_db"))
    out = switchyard("auditor", DATABASE_URL=url, NATS_URL=f"nats://127.0.0.1:{closed_port()}")
    line = one_line(out)
    assert out.returncode != 0
    assert 'database "sy_no_such_db" does not exist' in line and "check the user, password and database" in line


def test_up_checks_a_given_database_before_starting_anything(tmp_path: Path) -> None:
    port = closed_port()
    out = switchyard("up", "--data-dir", str(tmp_path), DATABASE_URL=f"postgresql://bob@127.0.0.1:{port}/x")
    line = one_line(out)
    assert out.returncode != 0 and "connection refused" in line
    assert not (tmp_path / "nats").exists() and not (tmp_path / "state.json").exists()


def test_up_checks_the_otel_variables_before_starting_anything(tmp_path: Path) -> None:
    out = switchyard("up", "--data-dir", str(tmp_path), OTEL_TRACES_EXPORTER="zipkin")
    line = one_line(out)
    assert out.returncode == 1
    assert line == ("switchyard: OTEL_TRACES_EXPORTER: 'zipkin' is not an exporter of this build"
                    " (use otlp, console, none)")
    assert not (tmp_path / "nats").exists() and not (tmp_path / "state.json").exists()


# --- 2. NATS that holds no fleet -----------------------------------------------------------------


@pytest.fixture
def nats_without_jetstream() -> Iterator[str]:
    with nats_server(None) as url:
        yield url


@pytest.mark.parametrize("command", [["status"], ["ask", "hello"], ["dlq", "list"]])
async def test_a_server_without_switchyard_streams_is_no_fleet(command: list[str], nats_url: str, nc: NATS) -> None:
    # Another team's stream on the same server is not a fleet, and not shown.
    await nc.jetstream().add_stream(name="ORDERS", subjects=["orders.>"])
    out = await asyncio.to_thread(switchyard, *command, NATS_URL=nats_url)
    line = one_line(out)
    assert out.returncode == 2
    stream = "LLM_DLQ" if command[0] == "dlq" else "LLM_REQ"
    assert line.startswith(f"switchyard: NATS at {nats_url} has no Switchyard streams ({stream} missing)"), line
    assert out.stdout == ""


async def test_a_foreign_stream_named_like_ours_is_no_fleet(nats_url: str, nc: NATS) -> None:
    await nc.jetstream().add_stream(name="LLM_REQ", subjects=["orders.>"])
    out = await asyncio.to_thread(switchyard, "status", NATS_URL=nats_url)
    assert out.returncode == 2
    assert "stream LLM_REQ at" in one_line(out) and "is not Switchyard's" in out.stderr
    assert out.stdout == ""


@pytest.mark.parametrize("command", [["status"], ["ask", "hello"], ["dlq", "list"]])
def test_a_server_without_jetstream_is_no_fleet(command: list[str], nats_without_jetstream: str) -> None:
    out = switchyard(*command, NATS_URL=nats_without_jetstream)
    line = one_line(out)
    assert out.returncode == 2
    assert line.startswith(f"switchyard: NATS at {nats_without_jetstream} has no JetStream"), line
    assert out.stdout == ""


# --- 3. A config file that is not there --------------------------------------------------------


@pytest.mark.parametrize("command", [["up"], ["dispatcher"], ["worker", "--pool", "openai"], ["auditor"]])
def test_a_missing_config_file_is_one_line(command: list[str], tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    env = {"NATS_URL": f"nats://127.0.0.1:{closed_port()}", "DATABASE_URL": "postgresql://bob@127.0.0.1:1/x"}
    extra = ["--data-dir", str(tmp_path / "data")] if command == ["up"] else []
    out = switchyard(*command, *extra, "--config", str(missing), **env)
    assert one_line(out) == f"switchyard: --config {missing}: no such file"
    assert out.returncode != 0


def test_a_config_that_is_not_toml_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[routes\n")
    out = switchyard("dispatcher", "--config", str(bad), NATS_URL=f"nats://127.0.0.1:{closed_port()}")
    assert one_line(out).startswith(f"switchyard: --config {bad}: not valid TOML")
    assert out.returncode != 0


# --- 4. Names that cannot be subject tokens ---------------------------------------------------


@pytest.mark.parametrize(("flag", "value"), [("--account", "a b"), ("--account", "acme.eu"), ("--use-case", "a.b"),
                                             ("--use-case", ""), ("--tier", "pro*")])
def test_ask_refuses_a_name_that_is_not_a_subject_token(flag: str, value: str) -> None:
    # Refused before connecting at all: NATS here is a closed port, which would be exit code 2.
    out = switchyard("ask", "hello", flag, value, NATS_URL=f"nats://127.0.0.1:{closed_port()}")
    assert one_line(out) == (f"switchyard: {flag} {value!r}: names are 1-128 characters of A-Z a-z 0-9 _ -"
                             " (no spaces, dots or other characters)")
    assert out.returncode == 1


def test_every_command_and_subcommand_has_a_help_text() -> None:
    """`--help` of every noun and action renders (a stray `%` in a help string makes argparse raise)."""
    import argparse

    from workers.cli import _parser

    def walk(p: argparse.ArgumentParser, path: str) -> list[str]:
        p.format_help()
        seen = [path]
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    seen += walk(sub, f"{path} {name}")
        return seen

    seen = walk(_parser(), "switchyard")
    assert {"switchyard budget status", "switchyard accounts limits set", "switchyard keys rotate"} <= set(seen)
