"""Discovery and health: every fleet process is a NATS micro service that says what it knows about itself.

- dispatcher: service `switchyard-dispatcher`, health on `<prefix>.admin.health.dispatcher`;
- provider worker: service `switchyard-worker` (which also serves `providers-test`), metadata `pool`,
  health on `<prefix>.admin.health.worker.<pool>`;
- auditor: service `switchyard-auditor`, health on `<prefix>.admin.health.auditor`.

Each service's metadata says its role, host and Switchyard's version; health endpoints are in the queue
group `q` (one replica answers).

The health endpoint answers a ProcessStats (router/vitals.py): role, pool, in-flight count, the recent
window's success rate and p50/p95 latency, the provider's last check, uptime, version, and whether the
process is healthy. The same object is the endpoint's `data` in `$SRV.STATS.<service>`, which every
replica answers: that is how `switchyard status` and `switchyard health` find every live process
(`gather`). A process is healthy while it serves (not stopping) and its own work does not fail (an
auditor whose batches cannot be written is not).

A worker also checks its provider every PROVIDER_CHECK_EVERY_S with the format's models list (the call
of `providers test`, counted toward no breaker or credit) and keeps the result in its stats.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from importlib import metadata as importlib_metadata
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.micro import add_service
from nats.micro.request import Request as MicroRequest
from nats.micro.service import EndpointStats, Service

from router.vitals import ProcessStats, ProviderHealth, Role, Vitals

from .publish import now_ms

if TYPE_CHECKING:
    from .provider import PoolWorker

log = structlog.get_logger("discovery")

SERVICES: dict[Role, str] = {
    "dispatcher": "switchyard-dispatcher",
    "worker": "switchyard-worker",
    "auditor": "switchyard-auditor",
}
SERVICE_VERSION = "1.0.0"
"""The micro services' own version (semver, as the micro protocol wants)."""
HEALTH = "health"
"""The endpoint's name."""
PROVIDER_CHECK_EVERY_S = 30.0
"""How often each worker checks its provider (the first check at start)."""


def switchyard_version() -> str:
    try:
        return importlib_metadata.version("switchyard")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def health_subject(prefix: str, role: Role, pool: str | None = None) -> str:
    """Where one live replica of `role` (of `pool`, for a worker) answers its health."""
    base = f"{prefix}.admin.health.{role}"
    return f"{base}.{pool}" if pool else base


class Reporter:
    """What one process's health endpoint and stats answer, read from its Vitals at each call."""

    def __init__(
        self,
        role: Role,
        vitals: Vitals,
        *,
        pool: str | None = None,
        provider: Callable[[], str | None] | None = None,
        in_flight: Callable[[], int] | None = None,
    ) -> None:
        """`provider` and `in_flight` are read at each call (a worker's provider may change with a pushed
        config; its in-flight count is its heartbeat's); by default the Vitals' own count is used."""
        self.role: Role = role
        self.vitals = vitals
        self.pool = pool
        self._provider = provider
        self._in_flight = in_flight
        self.stop: asyncio.Event | None = None
        """The process's stop event, once it serves: set, the process answers unhealthy (stopping)."""
        self.service_id = ""
        self.host = socket.gethostname()
        self.version = switchyard_version()

    def metadata(self) -> dict[str, str]:
        meta = {"role": self.role, "host": self.host, "version": self.version}
        if self.pool is not None:
            meta["pool"] = self.pool
        return meta

    def _problem(self) -> str | None:
        if self.stop is not None and self.stop.is_set():
            return "stopping"
        since = self.vitals.failing_since_ms
        if since is not None:
            return f"failing for {(now_ms() - since) / 1000:.0f} s: {self.vitals.last_error or 'unknown error'}"
        return None

    def snapshot(self) -> ProcessStats:
        v = self.vitals
        problem = self._problem()
        return ProcessStats(
            role=self.role, id=self.service_id, host=self.host, pool=self.pool,
            provider=self._provider() if self._provider else None, version=self.version,
            started_ms=v.started_ms, uptime_s=round((now_ms() - v.started_ms) / 1000, 1),
            healthy=problem is None, problem=problem,
            in_flight=self._in_flight() if self._in_flight else v.in_flight,
            recent=v.summary(), provider_health=v.provider,
        )

    def stats_handler(self, endpoint: EndpointStats) -> Any:
        """nats-py's micro stats hook: the health endpoint's `data` in `$SRV.STATS`."""
        if endpoint.name != HEALTH:
            return None
        return msgspec.to_builtins(self.snapshot())

    async def answer(self, request: MicroRequest) -> None:
        """The health endpoint: one error boundary, so a failure is an error reply, never a dead handler."""
        try:
            body = msgspec.json.encode(self.snapshot())
        except Exception:
            log.exception("health_failed")
            await request.respond_error("500", "the process failed to describe itself; see its log")
            return
        await request.respond(body)


async def add_health(service: Service, reporter: Reporter, prefix: str) -> None:
    """Add the health endpoint to a service whose config has `reporter.stats_handler` as its stats hook."""
    reporter.service_id = service.id
    await service.add_endpoint(name=HEALTH, subject=health_subject(prefix, reporter.role, reporter.pool),
                               handler=reporter.answer)


async def start(nc: NATS, reporter: Reporter, prefix: str, stop: asyncio.Event) -> Service:
    """Register a dispatcher's or an auditor's service on `nc`; the caller stops it (`await service.stop()`)."""
    reporter.stop = stop
    service = await add_service(
        nc, name=SERVICES[reporter.role], version=SERVICE_VERSION, queue_group="q", metadata=reporter.metadata(),
        description=f"Switchyard's {reporter.role}: health and stats", stats_handler=reporter.stats_handler,
    )
    await add_health(service, reporter, prefix)
    return service


async def stop_quietly(service: Service) -> None:
    with contextlib.suppress(Exception):  # a closed connection took its subscriptions with it
        await service.stop()


async def watch_provider(
    stop: asyncio.Event, worker: PoolWorker, *, every_s: float = PROVIDER_CHECK_EVERY_S
) -> None:
    """Check the worker's provider at once, then every `every_s` until `stop` is set, keeping each result in
    its Vitals. A check that fails is a result (unhealthy, with its masked error), never the loop's end."""
    while not stop.is_set():
        try:
            result = await worker.test_provider()
            worker.vitals.check_provider(ProviderHealth(
                healthy=result.ok, checked_ms=now_ms(), latency_ms=result.latency_ms, status=result.status,
                code=result.code, error=result.error,
            ))
            if not result.ok:
                worker.log.warning("provider_check_failed", code=result.code, error=result.error)
        except Exception:  # a bug: logged, and the next period tries again
            worker.log.exception("provider_check_crashed")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(every_s):
                await stop.wait()


# --- for the CLI ---------------------------------------------------------------------------------


class _Endpoint(msgspec.Struct):
    name: str
    data: ProcessStats | None = None


class _StatsReply(msgspec.Struct):
    """The parts of a `$SRV.STATS` answer read here; other fields are ignored."""

    id: str
    endpoints: list[_Endpoint] = []


_stats_decoder = msgspec.json.Decoder(_StatsReply)


def _stats_of(data: bytes) -> ProcessStats | None:
    """The health data of one `$SRV.STATS` answer; None for one without it (another version's process)."""
    try:
        reply = _stats_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    for ep in reply.endpoints:
        if ep.name == HEALTH and ep.data is not None:
            ep.data.id = reply.id
            return ep.data
    return None


async def gather(
    nc: NATS, role: Role, timeout_s: float, *, enough: Callable[[ProcessStats], bool] | None = None
) -> list[ProcessStats]:
    """Every live process of `role` that answers `$SRV.STATS` within `timeout_s`: the whole time is waited
    (replicas answer independently), unless `enough` says an answer suffices. Raises what NATS raises when
    the request cannot be published."""
    found: list[ProcessStats] = []
    done = asyncio.Event()

    async def on_reply(msg: Msg) -> None:
        if msg.headers and msg.headers.get("Status"):
            return  # no responders: nothing of this role runs
        stats = _stats_of(msg.data)
        if stats is None:
            return
        found.append(stats)
        if enough is not None and enough(stats):
            done.set()

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_reply)
    try:
        await nc.publish(f"$SRV.STATS.{SERVICES[role]}", b"", reply=inbox)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await done.wait()
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return found

