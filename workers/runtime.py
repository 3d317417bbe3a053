"""What every process shares: logging, the NATS connection, the streams and consumers."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import nats
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from router.config import Config
from router.redact import redact_secrets, scrub

DAY = 86_400.0
MAX_DELIVER = 5
"""Deliveries of one request or work item before it is dead-lettered. The pull loop counts them
(workers/pull.py), not the consumer: a consumer's own limit would leave a message whose last
delivery was never acked (its process killed) in the work queue for good."""


def configure_logging(level: str = "info") -> None:
    """JSON lines on stdout, secrets masked. Call once, from main()."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_secrets,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )


def settle_heap() -> None:
    """Collect what starting up left behind, then move every object alive now (modules, config, connections,
    caches: tens of thousands) out of the collector's reach for good (`gc.freeze`). A process calls it once
    it is set up, before it serves: each full collection then walks only what serving made, instead of a
    pause of tens of milliseconds every few hundred milliseconds under load (bench/RESULTS.md "Full
    collections")."""
    gc.collect()
    gc.freeze()


def run(main: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
    """Run a process's main coroutine on uvloop.

    The first SIGINT/SIGTERM sets the stop event: loops stop fetching and finish what
    they hold. A second one cancels everything at once. Either way the process exits 0.
    When `main` raises instead (its NATS connection closed for good, PostgreSQL refusing,
    a bug), that is one `process_failed` log line and exit code 1, so that whatever runs
    the replica (`switchyard up`, an orchestrator) restarts it. A ConfigError is left to
    the caller, which reports a bad config in a sentence.
    """
    import uvloop

    from router.config import ConfigError

    async def guarded() -> None:
        task = asyncio.current_task()
        assert task is not None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if stop.is_set():
                task.cancel()
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        try:
            await main(stop)
        except asyncio.CancelledError:
            pass

    def leaves(exc: BaseException) -> list[BaseException]:
        # A TaskGroup wraps what failed in an ExceptionGroup; the line should name what failed.
        if isinstance(exc, BaseExceptionGroup):
            return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
        return [exc]

    try:
        uvloop.run(guarded())
    except ConfigError:
        raise
    except Exception as exc:
        error = "; ".join(f"{type(e).__name__}: {e}" for e in leaves(exc))
        structlog.get_logger().critical("process_failed", error=error, exc_info=exc)
        sys.exit(1)


def nats_url() -> str:
    return os.environ.get("NATS_URL", "nats://127.0.0.1:4222")


FIRST_CONNECT_S = 30.0
"""How long a process tries to reach NATS at start before it fails (exit 1) and is started again."""


def nats_seed_file() -> str | None:
    """The file holding this process's nkey seed (NATS_NKEY_SEED_FILE), for a server that wants
    credentials (`switchyard up --secure`, deploy/nats/); None connects without any."""
    return os.environ.get("NATS_NKEY_SEED_FILE") or None


async def connect(url: str, name: str, stop: asyncio.Event | None = None, *, seed_file: str | None = None) -> NATS:
    """A connection that reconnects for ever once made. Making it is bounded: raises ConnectionError
    after FIRST_CONNECT_S, and CancelledError when `stop` is set first (a SIGTERM while connecting).
    It authenticates with the nkey seed in `seed_file` (default: NATS_NKEY_SEED_FILE) when there is one;
    raises ConnectionError when that file cannot be read."""
    log = structlog.get_logger()
    seed_file = seed_file or nats_seed_file()
    if seed_file is not None and not os.access(seed_file, os.R_OK):
        raise ConnectionError(f"NATS_NKEY_SEED_FILE {seed_file}: no such file, or not readable")
    conn: list[NATS] = []

    async def on_error(exc: Exception) -> None:
        log.warning("nats_error", error=str(exc))

    async def on_disconnect() -> None:
        if conn and (conn[0].is_closed or conn[0].is_draining):
            return  # our own drain at shutdown, not news
        log.warning("nats_disconnected")

    async def on_reconnect() -> None:
        log.info("nats_reconnected")

    connecting = asyncio.ensure_future(nats.connect(
        url,
        name=name,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        nkeys_seed=seed_file,
    ))
    stopping = asyncio.ensure_future((stop or asyncio.Event()).wait())
    try:
        done, _ = await asyncio.wait({connecting, stopping}, timeout=FIRST_CONNECT_S,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if connecting not in done:
        connecting.cancel()
        with contextlib.suppress(BaseException):
            await connecting
        if stopping in done:
            raise asyncio.CancelledError("asked to stop while connecting to NATS")
        raise ConnectionError(f"cannot reach NATS at {scrub(url)} within {FIRST_CONNECT_S:.0f} s; is it running?")
    nc = connecting.result()
    conn.append(nc)
    return nc


def _streams(prefix: str, events_days: float = 7.0) -> list[js_api.StreamConfig]:
    work = js_api.RetentionPolicy.WORK_QUEUE
    limits = js_api.RetentionPolicy.LIMITS
    file = js_api.StorageType.FILE
    return [
        js_api.StreamConfig(name="LLM_REQ", subjects=[f"{prefix}.req.>"], retention=work, storage=file,
                            duplicate_window=120.0),
        # Per-message TTLs for the dispatcher's hand-over probes (workers/dispatcher.py `_handed_over`).
        js_api.StreamConfig(name="LLM_WORK", subjects=[f"{prefix}.work.>"], retention=work, storage=file,
                            duplicate_window=120.0, allow_msg_ttl=True),
        # Budget alerts (`<prefix>.alerts.budget`) travel with the events, to the same auditor.
        js_api.StreamConfig(name="LLM_EVENTS", subjects=[f"{prefix}.events.>", f"{prefix}.alerts.>"],
                            retention=limits, storage=file, max_age=events_days * DAY, duplicate_window=120.0),
        js_api.StreamConfig(name="LLM_DLQ", subjects=[f"{prefix}.dlq.>"], retention=limits, storage=file,
                            max_age=30 * DAY),
        js_api.StreamConfig(name="LLM_RES", subjects=[f"{prefix}.res.>"], retention=limits, storage=file,
                            max_age=DAY, duplicate_window=120.0),
        # Budget spend as nats-server counters (workers/budget.py): a month's outlive the month.
        js_api.StreamConfig(name="LLM_BUDGET", subjects=[f"{prefix}.budget.>"], retention=limits, storage=file,
                            max_age=40 * DAY, duplicate_window=120.0, allow_msg_counter=True, allow_direct=True),
    ]


def pool_consumer(prefix: str, pool: str, concurrency: int, ack_wait_s: float = 30.0) -> js_api.ConsumerConfig:
    return js_api.ConsumerConfig(
        durable_name=f"pool-{pool}",
        filter_subject=f"{prefix}.work.{pool}",
        ack_policy=js_api.AckPolicy.EXPLICIT,
        ack_wait=ack_wait_s,
        max_deliver=-1,
        max_ack_pending=concurrency,
        max_waiting=512,
    )


def dispatch_consumer(prefix: str) -> js_api.ConsumerConfig:
    return js_api.ConsumerConfig(
        durable_name="dispatch",
        filter_subject=f"{prefix}.req.>",
        ack_policy=js_api.AckPolicy.EXPLICIT,
        ack_wait=30.0,
        max_deliver=-1,
        # Requests in flight across every dispatcher replica, held ones (`queue_ms`, up to 256 a replica)
        # included: room for a few dozen replicas, so holds never stop fresh requests from being taken.
        max_ack_pending=10_000,
        max_waiting=512,
    )


def audit_consumer(prefix: str) -> js_api.ConsumerConfig:
    # No max_deliver: an event waits for PostgreSQL as long as it takes, never dropped.
    return js_api.ConsumerConfig(
        durable_name="audit",
        filter_subjects=[f"{prefix}.events.>", f"{prefix}.alerts.>"],
        ack_policy=js_api.AckPolicy.EXPLICIT,
        ack_wait=60.0,
        max_ack_pending=20_000,
        max_waiting=512,
    )


async def ensure_topology(js: JetStreamContext, cfg: Config) -> None:
    """Create or update every stream and durable consumer; safe to run from every replica."""
    prefix = cfg.subject_prefix
    for stream in _streams(prefix, cfg.audit.events_retention_days):
        assert stream.name is not None
        try:
            await js.stream_info(stream.name)
        except NotFoundError:
            await js.add_stream(stream)
        else:
            await js.update_stream(stream)
    consumers = [("LLM_REQ", dispatch_consumer(prefix)), ("LLM_EVENTS", audit_consumer(prefix))]
    consumers += [
        ("LLM_WORK", pool_consumer(prefix, name, p.concurrency, p.ack_wait_ms / 1000)) for name, p in cfg.pools.items()
    ]
    for stream_name, consumer in consumers:
        await js.add_consumer(stream_name, consumer)
