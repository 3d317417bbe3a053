"""The long-running processes, each built from explicit dependencies (NATS, HTTP, PostgreSQL)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import asyncpg
import httpx
import msgspec
import structlog
from httpx_aiohttp import AiohttpTransport
from nats.js import JetStreamContext

from router import config as config_mod
from router.config import Config, ConfigError

from . import admin, configstore, discovery
from .accounts import AccountRoutes
from .auditor import Auditor
from .budget import Budgets
from .configstore import LiveConfig
from .db import database_url, migrate
from .dispatcher import Dispatcher
from .health import HealthView
from .keys import keyring_for_worker
from .metrics import AuditorMetrics, DispatcherMetrics, WorkerMetrics
from .progress import Progress, ensure_bucket
from .provider import PoolWorker
from .publish import Publisher
from .ratelimits import RateLimiter
from .retention import Retention
from .runtime import connect, ensure_topology, settle_heap
from .tracing import Tracing
from .tracing import from_env as tracing_from_env

log = structlog.get_logger()

DEFAULT_CONFIG = Path(__file__).with_name("example.toml")


def load_config(path: str | None) -> Config:
    """The config from a TOML file (or the JSON that `switchyard up` writes).

    Raises ConfigError with a message that starts with where the file came from and its path
    (`--config F: no such file`, `--config F: routes.draft.default[0]: unknown pool 'x'`).
    """
    import tomllib

    env = os.environ.get("SWITCHYARD_CONFIG")
    p = Path(path or env or DEFAULT_CONFIG)
    where = f"--config {p}" if path else f"SWITCHYARD_CONFIG {p}" if env else str(p)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise config_mod.ConfigError(f"{where}: no such file") from None
    except OSError as exc:  # a directory, no permission
        raise config_mod.ConfigError(f"{where}: {(exc.strerror or str(exc)).lower()}") from None
    try:
        if p.suffix == ".json":
            return config_mod.from_mapping(msgspec.json.decode(data))
        return config_mod.from_mapping(tomllib.loads(data.decode()))
    except UnicodeDecodeError:
        raise config_mod.ConfigError(f"{where}: not UTF-8 text") from None
    except msgspec.DecodeError as exc:
        raise config_mod.ConfigError(f"{where}: not valid JSON: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise config_mod.ConfigError(f"{where}: not valid TOML: {exc}") from None
    except config_mod.ConfigError as exc:
        raise config_mod.ConfigError(f"{where}: {exc}") from None


def api_keys(cfg: Config) -> dict[str, str | None]:
    """Each provider's key from the environment variable its config names (read here, at the edge)."""
    return {name: os.environ.get(p.api_key_env) if p.api_key_env else None for name, p in cfg.providers.items()}


def http_client() -> httpx.AsyncClient:
    # The aiohttp transport keeps the httpx API at a fraction of httpcore's CPU per request
    # under concurrency (bench/RESULTS.md).
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    return httpx.AsyncClient(transport=AiohttpTransport(limits=limits), follow_redirects=False)


async def prepare(nats_url: str, database_url: str, cfg: Config, *, seed_file: str | None = None) -> None:
    """Streams, consumers and tables, before any fleet process starts (every process also does its part).
    `seed_file` holds the credential to connect with, for a secure fleet's server."""
    nc = await connect(nats_url, "switchyard-prepare", seed_file=seed_file)
    try:
        js = nc.jetstream()
        await ensure_topology(js, cfg)
        revision = await configstore.push(js, cfg)  # what every process follows from now on
        log.info("config_pushed", revision=revision)
    finally:
        await nc.close()
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn)
    finally:
        await conn.close()


async def run_dispatcher(
    stop: asyncio.Event, cfg: Config, nats_url: str, metrics: DispatcherMetrics | None = None
) -> None:
    """The dispatcher, with the admin service (workers/admin.py) on its connection. Account routes
    are followed in PostgreSQL when DATABASE_URL is set, and off (said once in the log) when not."""
    tracing = tracing_from_env(os.environ, "switchyard-dispatcher")  # raises ConfigError naming the variable
    try:
        await _run_dispatcher(stop, cfg, nats_url, tracing, metrics)
    finally:
        tracing.shutdown()


async def _run_dispatcher(
    stop: asyncio.Event, cfg: Config, nats_url: str, tracing: Tracing, metrics: DispatcherMetrics | None
) -> None:
    nc = await connect(nats_url, "switchyard-dispatcher", stop)
    try:
        js = nc.jetstream()
        live = await live_config(js, cfg)
        cfg = live.current
        await ensure_topology(js, cfg)
        health = HealthView(js)  # breakers, credit and keys, followed while it serves
        await health.start()
        dispatcher = Dispatcher(js, Publisher(nc, js, cfg.subject_prefix), cfg, accounts=account_routes(),
                                metrics=metrics,
                                tracing=tracing, health=health, rates=await RateLimiter.open(js),
                                budgets=await Budgets.open(js, cfg.subject_prefix),
                                progress=Progress(nc, await ensure_bucket(js)))
        live.on_change(lambda new: setattr(dispatcher, "cfg", new))  # one assignment: a whole config at once
        dispatcher.metrics.follow_health(health, lambda: dispatcher.cfg)
        service = await admin.start(nc, dispatcher, cfg.subject_prefix)
        found = await discovery.start(nc, discovery.Reporter("dispatcher", dispatcher.vitals), cfg.subject_prefix, stop)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(live.follow(js, stop))
                settle_heap()
                await dispatcher.serve(stop)
        finally:
            if dispatcher.budgets is not None:
                await dispatcher.budgets.stop()  # gives back the unused slices of the accounts' budgets
            await discovery.stop_quietly(found)
            await service.stop()
            await health.stop()
    finally:
        await nc.drain()


async def live_config(js: JetStreamContext, cfg: Config) -> LiveConfig:
    """The config to start on: the pushed one when there is one (it wins over `--config`), else `cfg`."""
    live = LiveConfig(cfg)
    try:
        found = await configstore.current(js)
    except ConfigError as exc:
        log.error("pushed_config_refused", error=str(exc), effect="running on the --config file until the next push")
        found = None
    if found is not None:
        live.apply(*found)
    else:
        log.info("config_from_file", effect="a `switchyard config push` will replace it")
    return live


def account_routes() -> AccountRoutes | None:
    url = database_url()
    if not url:
        log.warning("account_routes_off", reason="DATABASE_URL is not set",
                    effect="every request follows the config's routes")
        return None
    return AccountRoutes(url)


async def run_worker(
    stop: asyncio.Event, cfg: Config, nats_url: str, pool: str, metrics: WorkerMetrics | None = None
) -> None:
    tracing = tracing_from_env(os.environ, "switchyard-worker", **{"switchyard.pool": pool})
    try:
        await _run_worker(stop, cfg, nats_url, pool, tracing, metrics)
    finally:
        tracing.shutdown()


async def _run_worker(
    stop: asyncio.Event, cfg: Config, nats_url: str, pool: str, tracing: Tracing, metrics: WorkerMetrics | None
) -> None:
    nc = await connect(nats_url, f"switchyard-worker-{pool}", stop)
    try:
        js = nc.jetstream()
        live = await live_config(js, cfg)
        cfg = live.current
        if pool not in cfg.pools:
            raise config_mod.ConfigError(f"--pool: unknown pool {pool!r} (configured: {', '.join(cfg.pools)})")
        await ensure_topology(js, cfg)
        async with http_client() as http:
            progress = Progress(nc, await ensure_bucket(js))
            keyring = keyring_for_worker(database_url())  # keys stored in PostgreSQL, when it can read them
            budgets = await Budgets.open(js, cfg.subject_prefix)
            worker = PoolWorker(js, Publisher(nc, js, cfg.subject_prefix), http, cfg, pool, api_keys(cfg), progress,
                                metrics=metrics, tracing=tracing, budgets=budgets, keyring=keyring)
            live.on_change(lambda new: worker.reconfigure(new, api_keys(new)))
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(live.follow(js, stop))
                    if keyring is not None:
                        tg.create_task(keyring.run(stop))
                        await keyring.first_load()
                    tg.create_task(discovery.watch_provider(stop, worker))  # its provider's health, in its stats
                    settle_heap()
                    await worker.serve(stop)
            finally:
                await budgets.stop()  # sends the settlements not sent yet, before the connection drains
    finally:
        await nc.drain()


async def run_auditor(
    stop: asyncio.Event, cfg: Config, nats_url: str, database_url: str, metrics: AuditorMetrics | None = None
) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    try:
        async with pool.acquire() as conn:
            applied = await migrate(conn)
        if applied:
            log.info("migrated", applied=applied)
        nc = await connect(nats_url, "switchyard-auditor", stop)
        try:
            js = nc.jetstream()
            await ensure_topology(js, cfg)
            auditor = Auditor(js, Publisher(nc, js, cfg.subject_prefix), pool, metrics=metrics)
            found = await discovery.start(nc, discovery.Reporter("auditor", auditor.vitals), cfg.subject_prefix, stop)
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(Retention(pool, cfg.audit.retention_days).run(stop))  # audit.retention_days
                    settle_heap()
                    await auditor.serve(stop)
            finally:
                await discovery.stop_quietly(found)
        finally:
            await nc.drain()
    finally:
        await pool.close()
