"""`make run` as a new user tries it: the fleet starts, answers `switchyard ask`, and stops cleanly."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent


Sample = tuple[str, tuple[tuple[str, str], ...]]


def _scrape(url: str, until: Sample | None = None, timeout: float = 30) -> dict[Sample, float]:
    """A process's /metrics as {(sample, labels): value}, once it answers (a child may still be starting) and
    has the sample `until` (the process counts a request just after its reply went out)."""
    end = time.monotonic() + timeout
    while True:
        samples: dict[Sample, float] = {}
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as r:
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for f in text_string_to_metric_families(r.read().decode()) for s in f.samples}
        if (samples and (until is None or until in samples)) or time.monotonic() > end:
            return samples
        time.sleep(0.2)


def _clean_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NATS_URL", "DATABASE_URL") and not k.endswith("_API_KEY")}
    env["SWITCHYARD_DATA_DIR"] = str(data_dir)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def _wait_for(proc: subprocess.Popen[str], pattern: str, lines: list[str], timeout: float = 60) -> re.Match[str]:
    end = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise AssertionError("exited early:\n" + "".join(lines))
            continue
        lines.append(line)
        m = re.search(pattern, line)
        if m:
            return m
    raise AssertionError(f"no line matching {pattern!r}:\n" + "".join(lines))


def test_make_run_serves_a_first_request_and_stops_cleanly(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = _clean_env(data_dir)
    proc = subprocess.Popen(
        ["make", "-s", "run"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )
    lines: list[str] = []
    try:
        _wait_for(proc, r"demo provider", lines)
        nats_url = _wait_for(proc, r"NATS:\s+(nats://\S+)", lines).group(1)
        _wait_for(proc, r"ready\.", lines)
        fleet = psutil.Process(proc.pid).children(recursive=True)
        assert any("nats-server" in p.name() for p in fleet)

        ask = subprocess.run(
            [str(Path(sys.executable).parent / "switchyard"), "ask", "Write a haiku about queues", "--stream"],
            env=env, capture_output=True, text=True, timeout=60,
        )
        assert ask.returncode == 0, ask.stderr
        assert "demo provider" in ask.stdout
        assert re.search(r"provider: demo\s+model: switchyard-demo\s+tokens: \d+ in / \d+ out\s+cost: \$0", ask.stderr)

        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)
        assert proc.stdout is not None
        lines.extend(proc.stdout.readlines())
        # make itself reports the Ctrl-C (-SIGINT) after `switchyard up` stopped cleanly.
        assert proc.returncode in (0, -signal.SIGINT), "".join(lines)
        assert any("stopped" in line for line in lines)
        time.sleep(0.5)
        left = [p for p in fleet if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, f"processes left behind: {left}"
        assert nats_url and not (data_dir / "state.json").exists()
        pg = [p for p in psutil.process_iter(["name", "cmdline"])
              if p.info["name"] == "postgres" and str(data_dir) in " ".join(p.info["cmdline"] or [])]
        assert not pg, f"postgres left running: {pg}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_up_uses_the_servers_named_by_nats_url_and_database_url(tmp_path: Path, nats_url: str, pg_url: str) -> None:
    data_dir = tmp_path / "data"
    env = _clean_env(data_dir) | {"NATS_URL": nats_url, "DATABASE_URL": pg_url}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "switchyard"), "up", "--data-dir", str(data_dir)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    lines: list[str] = []
    try:
        _wait_for(proc, re.escape(f"using NATS at {nats_url}"), lines)
        _wait_for(proc, r"using PostgreSQL from DATABASE_URL", lines)
        _wait_for(proc, r"ready\.", lines)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert not any("nats-server" in p.name() for p in children)
        assert not (data_dir / "pg").exists() and not (data_dir / "nats").exists()
        ask = subprocess.run(
            [str(Path(sys.executable).parent / "switchyard"), "ask", "hello"],
            env=env, capture_output=True, text=True, timeout=60,
        )
        assert ask.returncode == 0, ask.stderr
        assert "provider: demo" in ask.stderr
        # Each process's metrics URL, printed beside the NATS and PostgreSQL ones, serves what it counted.
        urls = dict(re.findall(r"metrics:\s+(http://127\.0\.0\.1:\d+/metrics)\s+(\S.*)$", "".join(lines), re.M))
        assert sorted(urls.values()) == ["auditor", "dispatcher", "worker demo"], lines
        by_url = {role: url for url, role in urls.items()}
        ok = ("switchyard_requests_total", (("code", "OK"), ("model", "switchyard-demo"), ("pool", "demo"),
                                            ("provider", "demo"), ("use_case", "draft")))
        assert _scrape(by_url["worker demo"], until=ok)[ok] == 1
        handed = ("switchyard_dispatched_total", (("pool", "demo"), ("use_case", "draft")))
        assert _scrape(by_url["dispatcher"], until=handed)[handed] == 1
        assert any(name == "switchyard_audit_lag_seconds" for name, _ in _scrape(by_url["auditor"]))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        time.sleep(0.3)
        assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
