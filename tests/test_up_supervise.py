"""`switchyard up` restarts a child that dies while the rest keep serving; a replica on its own exits
non-zero when it cannot go on, so that whatever runs it restarts it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import nats
import psutil
import pytest

from router.providers.fakes import FakeOpenAI, Scenario
from schemas import Chunk, Done, Error, Reply, decode_reply
from workers.supervise import RestartPolicy, describe_exit
from workers.up import _Child, _supervise

from .conftest import free_port, nats_server_binary, wait_port
from .helpers import ask_raw, audit_row, request
from .test_up import _clean_env, _wait_for

SWITCHYARD = str(Path(sys.executable).parent / "switchyard")


# --- the policy, on a fake clock ---------------------------------------------------------------


def test_the_delay_doubles_to_its_cap_and_starts_over_after_a_stable_run() -> None:
    policy = RestartPolicy(initial_s=0.5, max_s=4.0, stable_after_s=30.0, loop_exits=100)
    now = 0.0
    policy.started(now)
    delays = []
    for _ in range(6):
        now += 1.0  # up for a second, then gone again
        restart = policy.exited(now)
        delays.append(restart.delay_s)
        now += restart.delay_s
        policy.started(now)
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    now += 30.0  # this run lasted: the child had recovered
    assert policy.exited(now).delay_s == 0.5
    policy.started(now)
    assert policy.exited(now + 1.0).delay_s == 1.0


def test_a_crash_loop_is_reported_once_until_the_child_has_been_stable() -> None:
    policy = RestartPolicy(initial_s=0.5, max_s=30.0, stable_after_s=30.0, loop_exits=5, loop_window_s=60.0)
    now = 0.0
    reports = []
    for _ in range(8):
        policy.started(now)
        now += 1.0
        restart = policy.exited(now)
        reports.append((restart.recent_exits, restart.crash_loop))
        now += min(restart.delay_s, 2.0)
    assert [n for n, _ in reports] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [looping for _, looping in reports] == [False] * 4 + [True] + [False] * 3
    policy.started(now)
    now += 40.0  # stable: a later loop is news again
    assert not policy.exited(now).crash_loop
    for _ in range(4):
        policy.started(now)
        now += 1.0
        last = policy.exited(now)
    assert last.crash_loop and last.recent_exits >= 5


def test_exits_further_apart_than_the_window_are_not_a_crash_loop() -> None:
    policy = RestartPolicy(stable_after_s=1000.0, loop_exits=3, loop_window_s=60.0)
    now = 0.0
    for _ in range(10):
        policy.started(now)
        now += 31.0
        restart = policy.exited(now)
        assert restart.recent_exits <= 2 and not restart.crash_loop


def test_an_exit_is_described_by_its_code_or_its_signal() -> None:
    assert describe_exit(0) == "exit code 0"
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(-signal.SIGSEGV) == "killed by SIGSEGV"


# --- the loop, with real short-lived processes -------------------------------------------------


async def test_the_loop_restarts_a_crashing_child_beside_a_steady_one_and_stops_restarting_on_stop(
    capsys: pytest.CaptureFixture[str],
) -> None:
    flaky = _Child("flaky", [sys.executable, "-c", "raise SystemExit(3)"])
    flaky.policy = RestartPolicy(initial_s=0.01, max_s=0.05, loop_exits=3, loop_window_s=60.0)
    steady = _Child("steady", [sys.executable, "-c", "import time; time.sleep(60)"])
    steady_pid = steady.start(time.monotonic()).pid
    flaky.start(time.monotonic())
    stop = asyncio.Event()
    task = asyncio.create_task(_supervise([flaky, steady], stop))
    out = ""
    try:
        async with asyncio.timeout(30):
            while out.count("flaky exited (exit code 3)") < 5:
                await asyncio.sleep(0.1)
                out += capsys.readouterr().out
        stop.set()
        await task
        last = flaky.proc
        assert last is not None
        await asyncio.to_thread(last.wait, 10)
        await asyncio.sleep(0.5)
        out += capsys.readouterr().out
        assert flaky.proc is last, "restarted after stop was set"
        assert out.count("flaky keeps crashing (3 exits in 60 s, last: exit code 3); still restarting it") == 1, out
        assert "flaky restarted" in out and "steady" not in out
        assert steady.running is not None and steady.running.pid == steady_pid
    finally:
        stop.set()
        await task
        if steady.proc is not None:
            steady.proc.kill()
            steady.proc.wait()


# --- `switchyard up`, killed children ----------------------------------------------------------


class _Up:
    """`switchyard up` as a subprocess; its output is read with test_up's `_wait_for`, off the loop."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []

    async def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        return await asyncio.to_thread(_wait_for, self.proc, pattern, self.lines, timeout)

    def child(self, *words: str) -> psutil.Process:
        """The one child of `up` whose command line holds all of `words`."""
        found = []
        for p in psutil.Process(self.proc.pid).children():
            with contextlib.suppress(psutil.Error):  # one that just died
                if p.status() != psutil.STATUS_ZOMBIE and all(w in p.cmdline() for w in words):
                    found.append(p)
        assert len(found) == 1, found
        return found[0]

    async def kill_and_see_it_back(self, name: str, *words: str) -> None:
        """SIGKILL a child; `up` reports the exit and starts the same command again."""
        old = self.child(*words)
        command = old.cmdline()
        old.send_signal(signal.SIGKILL)
        await self.wait_for(re.escape(f"{name} exited (killed by SIGKILL); restarting it in") + r" [\d.]+ s")
        pid = int((await self.wait_for(re.escape(f"{name} restarted") + r" \(pid (\d+)\)")).group(1))
        new = self.child(*words)
        assert new.pid == pid != old.pid and new.cmdline() == command

    async def stop_cleanly(self) -> None:
        """SIGTERM: exit 0, nothing restarted after stopping began, no process left behind."""
        children = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(self.proc.wait, 60) == 0, "".join(self.lines)
        assert self.proc.stdout is not None
        self.lines.extend(await asyncio.to_thread(self.proc.stdout.readlines))
        text = "".join(self.lines)
        assert "switchyard: stopped" in text
        assert "restarted" not in text.split("switchyard: stopping")[-1]
        await asyncio.sleep(0.3)
        left = [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, f"processes left behind: {left}"


def _start_up(env: dict[str, str], args: tuple[str, ...]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [SWITCHYARD, "up", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )


@contextlib.asynccontextmanager
async def _switchyard_up(env: dict[str, str], *args: str) -> AsyncIterator[_Up]:
    proc = _start_up(env, args)
    up = _Up(proc)
    try:
        await up.wait_for(r"ready\.")
        yield up
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


async def _ask(env: dict[str, str], prompt: str = "hi") -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [SWITCHYARD, "ask", prompt, "--timeout-ms", "30000"], env=env, capture_output=True,
        text=True, timeout=60,
    )


async def test_up_restarts_a_killed_dispatcher_worker_and_auditor_and_serves_again(
    tmp_path: Path, nats_url: str, pg_url: str, db: asyncpg.Pool
) -> None:
    env = _clean_env(tmp_path / "data") | {"NATS_URL": nats_url, "DATABASE_URL": pg_url}
    async with _switchyard_up(env) as up:
        for name, words in (("dispatcher", ("dispatcher",)), ("worker demo", ("worker", "demo")),
                            ("auditor", ("auditor",))):
            await up.kill_and_see_it_back(name, "workers.cli", *words)
            ask = await _ask(env)
            assert ask.returncode == 0, (name, ask.stderr)
            assert "provider: demo" in ask.stderr
        # The restarted auditor writes the ledger.
        nc = await nats.connect(nats_url)
        try:
            body = request("hi after the auditor came back")
            assert isinstance((await ask_raw(nc, body, timeout=30))[-1], Done)
        finally:
            await nc.close()
        row = await audit_row(db, body["id"], timeout=30)
        assert row["status"] == "ok"
        await up.stop_cleanly()


def _keyed_config(tmp_path: Path, base_url: str, ack_wait_ms: int) -> Path:
    """One keyed OpenAI-format pool on a fake: `up` runs it as configured (the demo pool would not keep
    `ack_wait_ms`, which decides how soon a killed worker's work item is handed out again)."""
    path = tmp_path / "config.toml"
    path.write_text(
        f'[providers.openai]\nformat = "openai"\nbase_url = "{base_url}"\napi_key_env = "SY_TEST_OPENAI_KEY"\n\n'
        f'[pools.openai]\nprovider = "openai"\nconcurrency = 8\nack_wait_ms = {ack_wait_ms}\n\n'
        '[routes.draft]\ndefault = ["openai:gpt-4o-mini"]\n'
    )
    return path


async def test_a_stream_whose_worker_is_killed_ends_with_one_error_and_one_audit_row(
    tmp_path: Path, nats_url: str, pg_url: str, db: asyncpg.Pool, fake_openai: FakeOpenAI
) -> None:
    fake_openai.scenarios["long"] = Scenario(text=" ".join(f"w{i}" for i in range(120)), words_per_chunk=1,
                                             chunk_ms=50)
    config = _keyed_config(tmp_path, fake_openai.url + "/v1", ack_wait_ms=1500)
    env = _clean_env(tmp_path / "data") | {"NATS_URL": nats_url, "DATABASE_URL": pg_url,
                                           "SY_TEST_OPENAI_KEY": "test-key"}
    replies: list[Reply] = []
    ended = asyncio.Event()

    async def on_reply(msg: Any) -> None:
        reply = decode_reply(msg.data)
        replies.append(reply)
        if isinstance(reply, Done | Error):
            ended.set()

    async with _switchyard_up(env, "--config", str(config)) as up:
        nc = await nats.connect(nats_url)
        try:
            body = request("[[fake:long]]", stream=True)
            inbox = f"_INBOX.supervise.{body['id']}"
            await nc.subscribe(inbox, cb=on_reply)
            await nc.jetstream().publish("llm.req.draft.acme", msgspec.json.encode({**body, "reply_to": inbox}))
            async with asyncio.timeout(30):
                while sum(isinstance(r, Chunk) for r in replies) < 5:
                    await asyncio.sleep(0.02)
            await up.kill_and_see_it_back("worker openai", "workers.cli", "worker", "openai")
            await asyncio.wait_for(ended.wait(), 30)
            await asyncio.sleep(0.5)  # a second terminal reply would arrive by now
        finally:
            await nc.close()

        terminal = [r for r in replies if isinstance(r, Done | Error)]
        assert len(terminal) == 1, replies
        err = terminal[0]
        assert isinstance(err, Error) and err.code == "PROVIDER_ERROR" and "lost" in err.message
        chunks = [r for r in replies if isinstance(r, Chunk)]
        assert [c.seq for c in chunks] == list(range(len(chunks)))
        row = await audit_row(db, body["id"], timeout=30)
        assert row["status"] == "error" and row["code"] == "PROVIDER_ERROR"
        await asyncio.sleep(0.5)
        assert await db.fetchval("SELECT count(*) FROM llm_audit WHERE request_id = $1", body["id"]) == 1

        ask = await _ask(env)
        assert ask.returncode == 0, ask.stderr
        await up.stop_cleanly()


async def test_up_restarts_its_nats_server_on_the_same_port(tmp_path: Path, pg_url: str) -> None:
    env = _clean_env(tmp_path / "data") | {"DATABASE_URL": pg_url}
    async with _switchyard_up(env) as up:
        url = re.search(r"NATS:\s+(nats://\S+)", "".join(up.lines))
        assert url is not None
        await up.kill_and_see_it_back("nats-server", "-sd", str((tmp_path / "data" / "nats").resolve()))
        assert f"-p {url.group(1).rsplit(':', 1)[1]}" in " ".join(up.child("-js").cmdline())
        # The fleet reconnects on its own; the first asks may come before the server listens again.
        async with asyncio.timeout(45):
            while (ask := await _ask(env)).returncode != 0:
                await asyncio.sleep(0.5)
        assert "provider: demo" in ask.stderr
        await up.stop_cleanly()


# --- one replica on its own --------------------------------------------------------------------

ROLES = pytest.mark.parametrize(("role", "started"), [
    (["dispatcher"], "dispatcher_started"),
    (["worker", "--pool", "openai"], "worker_started"),
    (["auditor"], "auditor_started"),
], ids=["dispatcher", "worker", "auditor"])


@contextlib.contextmanager
def _nats_from_conf(tmp_path: Path) -> Iterator[tuple[str, Path, subprocess.Popen[bytes]]]:
    """A nats-server run from a config file, so that a test can change its config and reload it."""
    port = free_port()
    conf = tmp_path / "nats.conf"
    _nats_conf(conf, port, auth=False)
    server = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield f"nats://127.0.0.1:{port}", conf, server
    finally:
        server.terminate()
        server.wait(10)


def _nats_conf(path: Path, port: int, *, auth: bool) -> None:
    text = f'listen: "127.0.0.1:{port}"\njetstream {{ store_dir: "{path.parent / "js"}" }}\n'
    if auth:
        text += "authorization { user: someone, password: else }\n"
    path.write_text(text)


@contextlib.contextmanager
def _replica(env: dict[str, str], role: list[str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([SWITCHYARD, *role], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def _ended_with_one_failure_line(proc: subprocess.Popen[str], lines: list[str], timeout: float) -> dict[str, Any]:
    """Wait for the replica to exit 1 with one `process_failed` line and no bare traceback; return the line."""
    assert proc.stdout is not None
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        tail = "".join((lines + proc.stdout.readlines())[-5:])
        raise AssertionError(f"still running {timeout:g} s after a fatal error:\n{tail}") from None
    lines.extend(proc.stdout.readlines())
    assert code == 1, "".join(lines)
    failed = [json.loads(line) for line in lines if '"process_failed"' in line]
    assert len(failed) == 1, "".join(lines)
    assert all(line.startswith("{") for line in lines), "".join(lines)  # log lines, no bare traceback
    assert failed[0]["level"] == "critical"
    return dict(failed[0])


@ROLES
def test_a_replica_exits_0_on_sigterm(tmp_path: Path, pg_url: str, role: list[str], started: str) -> None:
    with _nats_from_conf(tmp_path) as (url, _, _):
        env = _clean_env(tmp_path / "data") | {"NATS_URL": url, "DATABASE_URL": pg_url}
        with _replica(env, role) as proc:
            _wait_for(proc, f'"{started}"', [])
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0


_FAILING_MAIN = """
import asyncio

from workers.runtime import configure_logging, run


async def main(stop: asyncio.Event) -> None:
    async def fail() -> None:
        raise ConnectionRefusedError("PostgreSQL said no")

    async with asyncio.TaskGroup() as tg:
        tg.create_task(fail())
        await stop.wait()


configure_logging()
run(main)
"""


def test_a_process_whose_main_coroutine_raises_exits_1_with_one_line_naming_the_failure() -> None:
    out = subprocess.run([sys.executable, "-c", _FAILING_MAIN], capture_output=True, text=True, timeout=30)
    assert out.stderr == ""  # no bare traceback
    lines = out.stdout.splitlines(keepends=True)
    assert out.returncode == 1 and len(lines) == 1, out.stdout
    line = json.loads(lines[0])
    assert line["event"] == "process_failed" and line["level"] == "critical"
    assert line["error"] == "ConnectionRefusedError: PostgreSQL said no"  # the failure, not its TaskGroup wrapper
    assert "Traceback" in line["exception"]  # kept, inside the line, for a bug


@pytest.mark.parametrize(("role", "started"), [(["dispatcher"], "dispatcher_started"),
                                               (["auditor"], "auditor_started")], ids=["dispatcher", "auditor"])
def test_a_replica_whose_nats_connection_is_closed_for_good_exits_1_with_one_line(
    tmp_path: Path, pg_url: str, role: list[str], started: str
) -> None:
    with _nats_from_conf(tmp_path) as (url, conf, server):
        env = _clean_env(tmp_path / "data") | {"NATS_URL": url, "DATABASE_URL": pg_url}
        with _replica(env, role) as proc:
            lines: list[str] = []
            _wait_for(proc, f'"{started}"', lines)
            # A reload that demands credentials makes the server drop the connection for good.
            _nats_conf(conf, int(url.rsplit(":", 1)[1]), auth=True)
            server.send_signal(signal.SIGHUP)
            failed = _ended_with_one_failure_line(proc, lines, timeout=15)
    assert "ConnectionClosedError" in failed["error"]
