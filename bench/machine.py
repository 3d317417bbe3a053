"""What the benches report about the machine and the packages they ran on."""

from __future__ import annotations

import importlib.metadata
import platform


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe(*dists: str) -> str:
    """The CPU, Python and the versions of `dists`: `Intel(R) Xeon(R) ..., Python 3.11.7, nats-py 2.16.0`."""
    return ", ".join([cpu_model(), f"Python {platform.python_version()}", *(f"{d} {version(d)}" for d in dists)])
