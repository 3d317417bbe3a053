"""NATS credentials per role: a real nats-server started with the generated config refuses what a
credential's role does not allow, and a secure `switchyard up` serves end to end with them."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import KeyNotFoundError

from router import breaker
from router import budget as policy
from router import config as config_mod
from router.breaker import CLOSED, BreakerState, Ticket, Verdict
from router.config import BreakerPolicy, Config, RateLimit
from router.natsperms import inbox_prefix
from router.routing import Selection, Source
from schemas import Done, Error, Request, Target, WorkItem, decode_reply
from workers.budget import Budgets, counter
from workers.budget import subject as budget_subject
from workers.health import HealthView, PoolHealth, reset_breaker
from workers.natsauth import AuthDir, ensure_fleet_users
from workers.progress import Progress
from workers.progress import ensure_bucket as progress_bucket
from workers.publish import now_ms
from workers.ratelimits import RateLimiter, now_us
from workers.runtime import ensure_topology

from .conftest import fleet_config, free_port, nats_server_binary, wait_port
from .helpers import request, switchyard
from .test_up import _clean_env, _wait_for

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent


class Server(NamedTuple):
    url: str
    auth: AuthDir


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A nats-server with JetStream started from the shipped deploy/nats/switchyard.conf, whose generated
    users are the fleet's (with pools openai and anthropic) and two producers, acme and bravo."""
    tmp = tmp_path_factory.mktemp("natsauth")
    auth = AuthDir(tmp / "auth")
    ensure_fleet_users(auth, ["openai", "anthropic"], "acme")
    auth.add("producer", "bravo")
    auth.write_server_config("llm")
    conf = tmp / "switchyard.conf"  # beside auth/, which it includes; listen and store are given below
    shutil.copy(REPO / "deploy" / "nats" / "switchyard.conf", conf)
    port = free_port()
    proc = subprocess.Popen(
        [nats_server_binary(), "-c", str(conf), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp / "js")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        yield Server(f"nats://127.0.0.1:{port}", auth)
    finally:
        proc.terminate()
        proc.wait(10)


class Conn:
    """A connection with one role's credential that records the permission errors the server sends."""

    def __init__(self) -> None:
        self.nc: NATS | None = None
        self.errors: list[str] = []
        self._new = asyncio.Event()

    async def open(self, server: Server, role: Any, name: str = "") -> NATS:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))
            self._new.set()

        extra = {"inbox_prefix": inbox_prefix(name)} if role == "producer" else {}
        self.nc = await nats.connect(server.url, nkeys_seed=str(server.auth.seed_file(role, name)),
                                     error_cb=on_error, allow_reconnect=False, **extra)
        return self.nc

    async def refused(self, what: str, subject: str, timeout: float = 10.0) -> None:
        """Wait for the server's `permissions violation for <what> to "<subject>"`."""
        wanted = f'permissions violation for {what} to "{subject}"'
        async with asyncio.timeout(timeout):
            while not any(wanted.lower() in e.lower() for e in self.errors):
                self._new.clear()
                await self._new.wait()


@pytest.fixture
async def conns() -> AsyncIterator[list[Conn]]:
    made: list[Conn] = []
    yield made
    for c in made:
        if c.nc is not None:
            await c.nc.close()


async def _conn(conns: list[Conn], server: Server, role: Any, name: str = "") -> tuple[NATS, Conn]:
    c = Conn()
    conns.append(c)
    return await c.open(server, role, name), c


async def _seen_before_marker(watcher: NATS, publisher: NATS, subjects: list[str], marker: str) -> list[str]:
    """Publish on `subjects`, then on `marker`, from one connection; return which of `subjects` the
    watcher (subscribed to everything they could reach) received before the marker. NATS keeps one
    publisher's order, so anything delivered arrives before the marker does. Each publish is flushed on
    its own: nats-server sometimes drops a publish that comes in the same read as a refused one."""
    got: list[str] = []
    done = asyncio.Event()

    async def on_msg(msg: Msg) -> None:
        if msg.subject == marker:
            done.set()
        else:
            got.append(msg.subject)

    subs = [await watcher.subscribe(s, cb=on_msg) for s in [*subjects, marker]]
    await watcher.flush()
    for s in subjects:
        await publisher.publish(s, b"{}")
        await publisher.flush()
    await publisher.publish(marker, b"{}")
    await publisher.flush()
    await asyncio.wait_for(done.wait(), 10)
    for sub in subs:
        await sub.unsubscribe()
    return got


async def test_a_producer_publishes_only_its_own_accounts_requests(server: Server, conns: list[Conn]) -> None:
    admin, _ = await _conn(conns, server, "admin")
    acme, c = await _conn(conns, server, "producer", "acme")
    got = await _seen_before_marker(admin, acme, ["llm.req.draft.bravo", "llm.req.draft.acme"], "llm.req.chat.acme")
    assert got == ["llm.req.draft.acme"]
    await c.refused("publish", "llm.req.draft.bravo")


@pytest.mark.parametrize("subject", [
    "llm.work.>", "llm.work.openai", "llm.events.>", "llm.res.bravo.>", "llm.res.>", "_INBOX.>", "_INBOX.bravo.>",
    "llm.req.>", "llm.dlq.>", "llm.admin.>", "$SRV.>", "$KV.llm_config.>",
])
async def test_a_producer_cannot_read_what_is_not_its_own(server: Server, conns: list[Conn], subject: str) -> None:
    acme, c = await _conn(conns, server, "producer", "acme")
    await acme.subscribe(subject)
    await c.refused("subscription", subject)


@pytest.mark.parametrize("subject", [
    "llm.admin.explain", "llm.admin.providers.test.openai", "$SRV.PING", "$SRV.INFO.switchyard",
    "$KV.llm_breakers.openai", "$KV.llm_config.config", "llm.budget.acme.2026-11.used",
    "llm.work.openai", "llm.events.completed", "llm.dlq.dispatch", "llm.res.bravo.job.1",
    # JetStream: an unfiltered consumer would read any account's results; no stream changes, no reads
    "$JS.API.CONSUMER.CREATE.LLM_RES", "$JS.API.CONSUMER.CREATE.LLM_RES.x.llm.res.bravo.>",
    "$JS.API.CONSUMER.CREATE.LLM_WORK", "$JS.API.CONSUMER.MSG.NEXT.LLM_REQ.dispatch",
    "$JS.API.DIRECT.GET.LLM_RES", "$JS.API.STREAM.MSG.GET.LLM_REQ", "$JS.API.STREAM.PURGE.LLM_REQ",
    "$JS.API.STREAM.DELETE.LLM_REQ", "$JS.API.CONSUMER.DELETE.LLM_REQ.dispatch",
])
async def test_a_producer_cannot_reach_admin_or_fleet_subjects(server: Server, conns: list[Conn], subject: str) -> None:
    acme, c = await _conn(conns, server, "producer", "acme")
    await acme.publish(subject, b"{}")
    await c.refused("publish", subject)


async def test_a_producer_sends_and_reads_its_own_through_jetstream(server: Server, conns: list[Conn]) -> None:
    admin, _ = await _conn(conns, server, "admin")
    await ensure_topology(admin.jetstream(), fleet_config({"openai": "http://127.0.0.1:9/v1"}))
    acme, c = await _conn(conns, server, "producer", "acme")
    # the PubAck comes back on the producer's own inbox
    ack = await acme.jetstream().publish("llm.req.draft.acme", b"{}", headers={"Nats-Msg-Id": "acme:p1"})
    assert ack.stream == "LLM_REQ"
    # its durable results: a consumer filtered on its own subject, delivered to its own inbox
    await admin.jetstream().publish("llm.res.acme.job.r1", b'{"n": 1}')
    sub = await acme.jetstream().subscribe(
        "llm.res.acme.job.r1", stream="LLM_RES",
        config=api.ConsumerConfig(name=f"c{uuid.uuid4().hex}", ack_policy=api.AckPolicy.NONE),
    )
    msg = await sub.next_msg(timeout=10)
    assert msg.data == b'{"n": 1}'
    assert not [e for e in c.errors if "CONSUMER.CREATE" in e]
    # The filter in the subject is what the permission checks; the server refuses a body that asks for
    # another one (here bravo's results), so the permission cannot be talked around.
    sneaky = {"stream_name": "LLM_RES", "config": {
        "name": "sneaky", "filter_subject": "llm.res.bravo.>", "deliver_subject": "_INBOX.acme.sneaky",
        "ack_policy": "none"}}
    answer = await acme.request("$JS.API.CONSUMER.CREATE.LLM_RES.sneaky.llm.res.acme.job.r1",
                                msgspec.json.encode(sneaky), timeout=10)
    error = msgspec.json.decode(answer.data).get("error")
    assert error is not None and "filter" in error["description"], answer.data


async def test_a_worker_cannot_publish_requests_nor_read_other_pools(server: Server, conns: list[Conn]) -> None:
    admin, _ = await _conn(conns, server, "admin")
    worker, c = await _conn(conns, server, "worker", "openai")
    got = await _seen_before_marker(admin, worker, ["llm.req.draft.acme"], "llm.events.completed")
    assert got == []
    await c.refused("publish", "llm.req.draft.acme")
    await worker.publish("$JS.API.CONSUMER.MSG.NEXT.LLM_WORK.pool-anthropic", b"{}")
    await c.refused("publish", "$JS.API.CONSUMER.MSG.NEXT.LLM_WORK.pool-anthropic")
    await worker.subscribe("llm.admin.explain")
    await c.refused("subscription", "llm.admin.explain")


async def test_the_fleets_processes_cannot_publish_requests_nor_push_a_config(server: Server,
                                                                              conns: list[Conn]) -> None:
    for role, name in (("auditor", ""), ("dispatcher", ""), ("worker", "openai")):
        nc, c = await _conn(conns, server, role, name)
        for subject in ("llm.req.draft.acme", "$KV.llm_config.config"):
            await nc.publish(subject, b"{}")
            await c.refused("publish", subject)


def test_seeds_and_the_server_config_are_private_files(server: Server) -> None:
    files = [server.auth.seed_file(u.role, u.name) for u in server.auth.users()]
    files += [server.auth.server_config, server.auth.path / "users.json"]
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert stat.S_IMODE(server.auth.path.stat().st_mode) == 0o700
    conf = server.auth.server_config.read_text()
    for u in server.auth.users():  # public keys in the config, never a seed
        assert u.public_key in conf
        assert server.auth.seed_file(u.role, u.name).read_text().strip() not in conf


# --- the fleet's own credentials: each writes its own part of the shared state, no more -----------------


def _metered_config() -> Config:
    """Pools openai and anthropic, a priced model, and a daily budget of $1 on every account (alert at 80 %)."""
    raw = msgspec.to_builtins(fleet_config({"openai": "http://127.0.0.1:9/v1", "anthropic": "http://127.0.0.1:9"}))
    raw["models"] = {"metered": {"input_usd_per_mtok": 1000.0, "output_usd_per_mtok": 1000.0}}
    raw["routes"]["draft"] = {"default": ["openai:metered"]}
    raw["limits"] = {"default": {"rate": {"per_second": 1000, "burst": 1000},
                                 "budget": {"daily_usd": 1.0, "monthly_usd": 1000.0, "alert_at": 0.8}}}
    return config_mod.from_mapping(raw)


def _request(request_id: str) -> Request:
    return msgspec.convert({"id": request_id, "account": "acme", "use_case": "draft", "reply_to": "_INBOX.acme.x",
                            "messages": [{"role": "user", "content": "Tell me about budgets."}],
                            "max_tokens": 100}, Request)


async def _pool_health(nc: NATS, pool: str, timeout: float = 5.0) -> PoolHealth:
    health = PoolHealth(HealthView(nc.jetstream(timeout=timeout)), pool=pool, policy=BreakerPolicy(failures=2),
                        provider=pool, credit_cooldown_ms=60_000, has_key=True)
    await health.start()
    return health


async def _breaker(nc: NATS, pool: str) -> BreakerState:
    """The pool's stored breaker, read by key (a watch's end of replay may come before its entries)."""
    try:
        entry = await (await nc.jetstream().key_value("llm_breakers")).get(pool)
    except KeyNotFoundError:
        return CLOSED
    return breaker.decode(entry.value or b"")


async def test_each_fleet_role_does_its_own_work_on_the_shared_state_unrefused(server: Server,
                                                                               conns: list[Conn]) -> None:
    """The code paths of workers/ that write KV keys and budget counters, each under its role's credential:
    none is refused, and what they wrote is there (read back with the admin's)."""
    cfg = _metered_config()
    admin, _ = await _conn(conns, server, "admin")
    await ensure_topology(admin.jetstream(), cfg)
    dispatcher, d = await _conn(conns, server, "dispatcher")
    worker, w = await _conn(conns, server, "worker", "openai")
    auditor, a = await _conn(conns, server, "auditor")
    for nc in (dispatcher, worker, auditor):  # every process checks the topology at start
        await ensure_topology(nc.jetstream(), cfg)

    # The dispatcher: the health view, an account's rate state, a held request, a reservation and a release.
    djs = dispatcher.jetstream()
    view = HealthView(djs)
    await view.start()
    decision = await (await RateLimiter.open(djs)).decide("acme", RateLimit(per_second=10, burst=5), now_us())
    assert decision.admitted
    await djs.publish("$KV.llm_rates.h.1", b"[1,0]")  # what RateLimiter._hold writes for stream sequence 1
    req = _request(f"r{uuid.uuid4().hex}")
    chain = [Target(pool="openai", model="metered")]
    selection = Selection(chain=chain, skipped=[], source=Source.DEFAULT_ROUTE, prompt_tokens=10)
    published = now_ms()
    reserving = await Budgets.open(djs, "llm")
    reserved = await reserving.reserve(cfg, req, selection, published)
    assert reserved > 0
    refused = msgspec.structs.replace(req, id=f"r{uuid.uuid4().hex}")
    await reserving.release(cfg, refused, published, await reserving.reserve(cfg, refused, selection, published))
    await reserving.stop()  # gives back what its slices of the counters did not reserve

    # The worker of pool openai: its key report, its breaker opened by compare-and-set, its provider's
    # credit, its pool's rate state, a stream's progress and a held item, a settlement crossing 80 %.
    health = await _pool_health(worker, "openai")
    for _ in range(2):
        await health.record(Ticket(None, 0), Verdict.FAILURE)
    await health.out_of_credit()
    wjs = worker.jetstream()
    assert (await (await RateLimiter.open(wjs)).decide_pool("openai", RateLimit(per_second=10, burst=5))).admitted
    progress = Progress(worker, await progress_bucket(wjs))
    await progress.started("acme", req.id)
    await progress.count_hold(1)
    await progress.finished("acme", req.id)
    await progress.keep_event("acme", req.id, b"{}")
    settling = await Budgets.open(wjs, "llm")
    settling.settle(cfg, WorkItem(request=req, route=chain, accepted_ms=published, reserved_usd=reserved), 0.9,
                    failed=False)
    await settling.stop()  # sends the settlement (and raises its alert) now rather than at the next flush
    await health.stop()  # its key report is deleted
    await view.stop()

    for nc in (dispatcher, worker, auditor):
        await nc.flush()  # the server's refusals come before the answer to the flush
    assert not d.errors and not w.errors and not a.errors, (d.errors, w.errors, a.errors)
    ajs = admin.jetstream()
    day = policy.periods(published, cfg.limits.timezone).of("day")
    assert await counter(ajs, budget_subject("llm", "acme", day, "spent")) == 900_000
    assert await counter(ajs, budget_subject("llm", "acme", day, "used")) == 900_000  # the release gave all back
    await (await ajs.key_value("llm_budget_alerts")).get(f"acme.{day}.80")  # the alert was raised, once
    assert (await _breaker(admin, "openai")).state == "open"
    assert await progress.lookup("acme", req.id) is not None
    await reset_breaker(ajs, "openai")  # for the tests after this one


@pytest.mark.parametrize(("role", "name", "subject"), [
    # a worker: another pool's breaker, key reports and rate state; the dispatcher's part; a bucket's config
    ("worker", "openai", "$KV.llm_breakers.anthropic"),
    ("worker", "openai", "$KV.llm_pools.anthropic.w1"),
    ("worker", "openai", "$KV.llm_rates.pool.anthropic"),
    ("worker", "openai", "$KV.llm_rates.a.acme"),
    ("worker", "openai", "$KV.llm_rates.h.1"),
    ("worker", "openai", "$JS.API.STREAM.UPDATE.KV_llm_breakers"),
    ("worker", "openai", "$JS.API.STREAM.PURGE.KV_llm_breakers"),
    # the dispatcher: no breaker, credit, key report, pool rate, stream progress, alert or settled spend
    ("dispatcher", "", "$KV.llm_breakers.openai"),
    ("dispatcher", "", "$KV.llm_credit.openai"),
    ("dispatcher", "", "$KV.llm_pools.openai.w1"),
    ("dispatcher", "", "$KV.llm_rates.pool.openai"),
    ("dispatcher", "", "$KV.llm_streams.0123abcd"),
    ("dispatcher", "", "$KV.llm_budget_alerts.acme.d20261130.80"),
    ("dispatcher", "", "llm.budget.acme.d20261130.spent"),
    ("dispatcher", "", "$JS.API.STREAM.UPDATE.KV_llm_rates"),
    # the auditor: no shared state at all
    ("auditor", "", "$KV.llm_breakers.openai"),
    ("auditor", "", "$KV.llm_credit.openai"),
    ("auditor", "", "$KV.llm_rates.a.acme"),
    ("auditor", "", "$KV.llm_streams.0123abcd"),
    ("auditor", "", "$KV.llm_budget_alerts.acme.d20261130.80"),
    ("auditor", "", "llm.budget.acme.d20261130.used"),
    # admin subjects: the fleet's processes serve them, only the admin calls them
    ("dispatcher", "", "llm.admin.explain"),
    ("worker", "openai", "llm.admin.providers.test.anthropic"),
    ("worker", "openai", "llm.admin.health.dispatcher"),
    ("auditor", "", "$SRV.PING"),
])
async def test_the_fleets_credentials_write_nothing_of_another_role_or_pool(
    server: Server, conns: list[Conn], role: str, name: str, subject: str
) -> None:
    admin, _ = await _conn(conns, server, "admin")
    nc, c = await _conn(conns, server, role, name)
    got = await _seen_before_marker(admin, nc, [subject], "llm.events.marker")
    assert got == []
    await c.refused("publish", subject)


async def test_a_worker_cannot_open_or_close_another_pools_breaker(server: Server, conns: list[Conn]) -> None:
    await ensure_topology((await _conn(conns, server, "admin"))[0].jetstream(), _metered_config())
    anthropic_nc, _ = await _conn(conns, server, "worker", "anthropic")
    anthropic = await _pool_health(anthropic_nc, "anthropic")
    await anthropic.record(Ticket(None, 0), Verdict.FAILURE)  # one of the two that open it
    # The worker of pool openai, running the code a worker of pool anthropic runs: it can neither open
    # anthropic's breaker (a failure), nor clear its count (a success), nor close it (a reset).
    openai_nc, c = await _conn(conns, server, "worker", "openai")
    intruder = await _pool_health(openai_nc, "anthropic", timeout=0.5)
    for verdict in (Verdict.FAILURE, Verdict.SUCCESS):
        with pytest.raises(nats.errors.TimeoutError):
            await intruder.record(Ticket(None, 0), verdict)
    with pytest.raises(nats.errors.TimeoutError):
        await reset_breaker(openai_nc.jetstream(timeout=0.5), "anthropic")
    await c.refused("publish", "$KV.llm_breakers.anthropic")
    stored = await _breaker(anthropic_nc, "anthropic")
    assert stored.state == "closed" and stored.failures == 1
    await anthropic.record(Ticket(None, 0), Verdict.FAILURE)  # its own workers still count into it
    assert (await _breaker(anthropic_nc, "anthropic")).state == "open"
    await intruder.stop()
    await anthropic.stop()


async def test_only_the_admin_resets_a_breaker(server: Server, conns: list[Conn], capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    admin, _ = await _conn(conns, server, "admin")
    await ensure_topology(admin.jetstream(), _metered_config())
    worker, _ = await _conn(conns, server, "worker", "openai")
    health = await _pool_health(worker, "openai")
    for _ in range(2):
        await health.record(Ticket(None, 0), Verdict.FAILURE)
    dispatcher, c = await _conn(conns, server, "dispatcher")
    with pytest.raises(nats.errors.TimeoutError):
        await reset_breaker(dispatcher.jetstream(timeout=0.5), "openai")
    await c.refused("publish", "$KV.llm_breakers.openai")
    assert (await _breaker(admin, "openai")).state == "open"

    monkeypatch.setenv("NATS_URL", server.url)
    monkeypatch.setenv("NATS_NKEY_SEED_FILE", str(server.auth.seed_file("dispatcher")))
    r = await switchyard(capsys, "breaker", "reset", "openai")
    assert r.code == 1 and r.err.count("\n") == 1, r.err
    assert "NATS refused this credential" in r.err and "takes the admin credential" in r.err
    assert (await _breaker(admin, "openai")).state == "open"

    monkeypatch.setenv("NATS_NKEY_SEED_FILE", str(server.auth.seed_file("admin")))
    r = await switchyard(capsys, "breaker", "reset", "openai")
    assert r.code == 0 and "breaker of pool openai reset: closed (was open)" in r.out, r.err
    assert (await _breaker(admin, "openai")).state == "closed"
    await health.stop()


async def test_an_admin_command_with_another_credential_is_one_line_saying_so(
    server: Server, conns: list[Conn], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    admin, _ = await _conn(conns, server, "admin")
    await ensure_topology(admin.jetstream(), _metered_config())
    pushed = tmp_path / "config.json"
    pushed.write_bytes(msgspec.json.encode(_metered_config()))
    monkeypatch.setenv("NATS_URL", server.url)
    monkeypatch.setenv("NATS_NKEY_SEED_FILE", str(server.auth.seed_file("dispatcher")))
    r = await switchyard(capsys, "config", "push", str(pushed))
    assert r.code == 1 and r.err.count("\n") == 1 and "Traceback" not in r.err, r.err
    assert r.err.startswith("switchyard: NATS refused this credential (permissions violation for publish to")
    assert "takes the admin credential" in r.err


# --- a secure `switchyard up`, end to end ------------------------------------------------------------


class Up(NamedTuple):
    proc: subprocess.Popen[str]
    data_dir: Path
    url: str
    lines: list[str]
    env: dict[str, str]


@pytest.fixture(scope="module")
def secure_up() -> Iterator[Up]:
    # Not under pytest's own temporary root: the embedded PostgreSQL runs as another user, which must be
    # able to traverse every parent, and pytest makes that root private again whenever a run starts.
    base = Path(tempfile.mkdtemp(prefix="sy-secure-"))
    data_dir = base / "data"
    env = _clean_env(data_dir)
    env.pop("NATS_NKEY_SEED_FILE", None)
    proc = subprocess.Popen([str(BIN / "switchyard"), "up", "--secure"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        url = _wait_for(proc, r"NATS:\s+(nats://\S+)", lines, timeout=90).group(1)
        _wait_for(proc, r"ready\.", lines, timeout=90)
        yield Up(proc, data_dir, url, lines, env)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
        shutil.rmtree(base, ignore_errors=True)


def _switchyard(up: Up, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "switchyard"), *args], env=up.env | env, capture_output=True, text=True,
                          timeout=90)


def test_up_secure_prints_the_demo_producers_seed_file_and_never_a_seed(secure_up: Up) -> None:
    auth = AuthDir(secure_up.data_dir / "auth")
    seed_file = auth.seed_file("producer", "demo")
    assert any(str(seed_file) in line for line in secure_up.lines)
    out = "".join(secure_up.lines)
    for u in auth.users():
        assert auth.seed_file(u.role, u.name).read_text().strip() not in out
    assert {(u.role, u.name) for u in auth.users()} >= {("admin", ""), ("dispatcher", ""), ("auditor", ""),
                                                         ("worker", "demo"), ("producer", "demo")}


def test_ask_with_the_producer_credential_is_answered(secure_up: Up) -> None:
    seed = str(secure_up.data_dir / "auth" / "producer-demo.nk")
    ask = _switchyard(secure_up, "ask", "Write a haiku about queues", "--stream", NATS_NKEY_SEED_FILE=seed)
    assert ask.returncode == 0, ask.stderr
    assert "provider: demo" in ask.stderr
    # The same credential cannot ask for another account: the server refuses its publish, and
    # `ask` says there is no such credential in the fleet's directory.
    other = _switchyard(secure_up, "ask", "hello", "--account", "zeta")
    assert other.returncode == 2 and "creds new-producer zeta" in other.stderr


def test_health_finds_the_secure_fleets_processes_with_its_admin_credential(secure_up: Up) -> None:
    for _ in range(6):  # as a probe would: the worker may still be starting right after `ready`
        health = _switchyard(secure_up, "health", "--role", "worker", "--pool", "demo")
        if health.returncode == 0:
            break
    assert health.returncode == 0 and health.stdout.startswith("healthy: worker of pool demo"), health.stderr
    # Another role's credential may not ask the processes how they are.
    seed = str(secure_up.data_dir / "auth" / "producer-demo.nk")
    refused = _switchyard(secure_up, "health", "--role", "dispatcher", "--timeout", "1", NATS_NKEY_SEED_FILE=seed)
    assert refused.returncode == 1 and refused.stderr.startswith("switchyard: health: unhealthy"), refused.stderr


def test_without_a_credential_the_cli_gets_one_line(secure_up: Up) -> None:
    # Another directory's state is not consulted: NATS_URL names the server, no credential is given.
    status = _switchyard(secure_up, "status", NATS_URL=secure_up.url)
    assert status.returncode == 2
    assert status.stderr.count("\n") == 1 and "refused the credential" in status.stderr, status.stderr


async def test_new_producer_is_accepted_at_once_and_bound_to_its_account(secure_up: Up) -> None:
    made = _switchyard(secure_up, "creds", "new-producer", "globex", "--json")
    assert made.returncode == 0, made.stderr
    cred = msgspec.json.decode(made.stdout)
    assert cred["active"] is True and cred["new"] is True and cred["inbox_prefix"] == "_INBOX.globex"
    seed = cred["seed_file"]
    assert stat.S_IMODE(Path(seed).stat().st_mode) == 0o600
    assert Path(seed).read_text().strip() not in made.stdout
    ask = _switchyard(secure_up, "ask", "hello", "--account", "globex", NATS_NKEY_SEED_FILE=seed)
    assert ask.returncode == 0, ask.stderr

    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(secure_up.url, nkeys_seed=seed, inbox_prefix="_INBOX.globex", error_cb=on_error)
    try:
        # The dispatcher's own refusals: another account in the body, results under another account.
        inbox = f"_INBOX.globex.{uuid.uuid4().hex}"
        sub = await nc.subscribe(inbox)
        body = request(account="demo", reply_to=inbox)
        await nc.jetstream().publish("llm.req.draft.globex", msgspec.json.encode(body))
        reply = decode_reply((await sub.next_msg(timeout=30)).data)
        assert isinstance(reply, Error) and reply.code == "INVALID_REQUEST"
        assert "`account` is 'demo' but the subject is for account 'globex'" in reply.message
        stolen = request(account="globex", reply_to="llm.res.demo.job.x1")
        await nc.jetstream().publish("llm.req.draft.globex", msgspec.json.encode(stolen))
        ok = request(account="globex", reply_to=f"llm.res.globex.job.{uuid.uuid4().hex}")
        res = await nc.subscribe(ok["reply_to"])
        await nc.jetstream().publish("llm.req.draft.globex", msgspec.json.encode(ok))
        while not isinstance(done := decode_reply((await res.next_msg(timeout=30)).data), Done | Error):
            pass
        assert isinstance(done, Done)
    finally:
        await nc.close()
    assert not errors, errors

    admin = await nats.connect(secure_up.url, nkeys_seed=str(secure_up.data_dir / "auth" / "admin.nk"))
    try:
        js = admin.jetstream()
        copies = await js.subscribe("llm.dlq.dispatch", ordered_consumer=True)
        seen: dict[str, str] = {}
        while stolen["id"] not in seen or body["id"] not in seen:
            msg = await copies.next_msg(timeout=30)
            assert msg.headers is not None
            seen[msgspec.json.decode(msg.data)["id"]] = msg.headers["Switchyard-Error"]
        assert "`reply_to` under `llm.res.` must be the request's own account's" in seen[stolen["id"]]
        # the refusal was not written into account demo's results
        info = await js.stream_info("LLM_RES", subjects_filter="llm.res.demo.>")
        assert not info.state.subjects
    finally:
        await admin.close()


def test_the_fleets_own_processes_need_nothing_they_are_not_allowed(secure_up: Up) -> None:
    # Runs after the requests above: every refusal the server logged was for a producer's attempt.
    auth = AuthDir(secure_up.data_dir / "auth")
    ask = _switchyard(secure_up, "ask", "one more", NATS_NKEY_SEED_FILE=str(auth.seed_file("producer", "demo")))
    assert ask.returncode == 0, ask.stderr
    services = {u.public_key: f"{u.role} {u.name}" for u in auth.users() if u.role != "producer"}
    log = (secure_up.data_dir / "nats.log").read_text()
    violations = [line for line in log.splitlines() if "Violation" in line]
    assert not [v for v in violations if any(k in v for k in services)], violations
    assert "Using configuration file" in log


# --- `switchyard creds` for a server of one's own ------------------------------------------------------


async def test_creds_init_and_new_producer_make_a_config_nats_server_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    auth_dir = tmp_path / "auth"
    made = await switchyard(capsys, "creds", "init", "--auth-dir", str(auth_dir), "--pools", "openai,gemini", "--json")
    assert made.code == 0, made.err
    roles = {(c["role"], c["name"]) for c in msgspec.json.decode(made.out)}
    assert roles == {("admin", ""), ("dispatcher", ""), ("auditor", ""), ("worker", "openai"), ("worker", "gemini")}
    new = await switchyard(capsys, "creds", "new-producer", "acme", "--auth-dir", str(auth_dir), "--json")
    assert new.code == 0, new.err
    cred = msgspec.json.decode(new.out)
    assert cred["active"] is None and cred["inbox_prefix"] == "_INBOX.acme"  # no server of its own runs
    assert Path(cred["seed_file"]).read_text().strip() not in new.out
    again = await switchyard(capsys, "creds", "new-producer", "acme", "--auth-dir", str(auth_dir), "--json")
    assert msgspec.json.decode(again.out)["new"] is False
    assert msgspec.json.decode(again.out)["seed_file"] == cred["seed_file"]
    checked = await asyncio.create_subprocess_exec(nats_server_binary(), "-t", "-c", str(auth_dir / "nats.conf"),
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await checked.communicate()
    assert checked.returncode == 0, out
    conf = (auth_dir / "nats.conf").read_text()
    assert '"llm.req.*.acme"' in conf and cred["public_key"] in conf


async def test_creds_mistakes_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = await switchyard(capsys, "creds", "list", "--auth-dir", str(tmp_path / "none"))
    assert missing.code == 1 and missing.err.count("\n") == 1 and "switchyard up --secure" in missing.err
    await switchyard(capsys, "creds", "init", "--auth-dir", str(tmp_path / "auth"), "--pools", "openai")
    bad = await switchyard(capsys, "creds", "new-producer", "acme.eu", "--auth-dir", str(tmp_path / "auth"))
    assert bad.code == 1 and bad.err.count("\n") == 1 and "account 'acme.eu'" in bad.err
