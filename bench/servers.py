"""The servers a bench starts for itself: a nats-server with JetStream on a free port."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_nats() -> tuple[str, subprocess.Popen[bytes]]:
    """A fresh nats-server (the binary beside sys.executable) with JetStream in a temporary store; its URL
    and process, which the caller terminates."""
    port = free_port()
    server = Path(sys.executable).parent / "nats-server"
    proc = subprocess.Popen([str(server), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", tempfile.mkdtemp()],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.4)
    return f"nats://127.0.0.1:{port}", proc


@contextmanager
def nats_server() -> Iterator[str]:
    """`start_nats` for the `with` block: its URL, and the server stopped when the block ends."""
    url, proc = start_nats()
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
