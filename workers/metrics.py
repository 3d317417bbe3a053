"""Prometheus metrics: what each process counts, and the small HTTP server that serves them on `/metrics`.

Each process builds one of DispatcherMetrics, WorkerMetrics or AuditorMetrics, each with a registry of its
own (never prometheus_client's global one, so that several in one test process do not collide), and serves
it with `serving` on `--metrics-port`. Counting is a counter or histogram update where the thing happens, no
I/O and no await; what the process already holds in memory (breakers, credit, in-flight items, the
auditor's lag) is read when Prometheus scrapes.

Label values stay bounded: `use_case` is one of the routed use cases of the config in force, else `other`;
`model` is one the config names (in a route or under [models]), else `other`; `pool` and `provider` are
the config's; `code` is `OK` or an error code. An account, a request id or a key is never a label.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from typing import Any, TypeVar, cast

import structlog
from aiohttp import web
from nats.aio.msg import Msg
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric

from router.config import Config, ConfigError
from router.vitals import ProviderHealth
from schemas import Usage, WorkItem

from .health import HealthView
from .publish import now_ms

log = structlog.get_logger("metrics")

M = TypeVar("M", Counter, Histogram)

OK = "OK"
"""The `code` of a request or attempt that succeeded."""
OTHER = "other"
"""The label value of a use case or model the config does not name."""

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000)

BREAKER_STATES = ("closed", "open", "half_open")
TOKEN_KINDS = ("input", "output", "cache_read", "cache_write", "reasoning")
_USE_CASE = ("use_case", "pool", "provider", "model")


def new_registry() -> CollectorRegistry:
    """A registry of its own for one process, with the process's CPU, memory and file descriptors."""
    # The `_created` series would double every counter's and histogram's series for a start time that
    # Prometheus does not need (process_start_time_seconds says it once).
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    return registry


class _Known:
    """The label values the config in force allows, worked out once per config (a push replaces the object)."""

    def __init__(self) -> None:
        self._cfg: Config | None = None
        self._use_cases: frozenset[str] = frozenset()
        self._models: frozenset[str] = frozenset()
        self._pools: frozenset[str] = frozenset()

    def _load(self, cfg: Config) -> None:
        if cfg is self._cfg:
            return
        models = set(cfg.models)
        for tiers in cfg.routes.values():
            for targets in tiers.values():
                models.update(t.partition(":")[2] for t in targets)
        self._use_cases, self._models, self._pools = frozenset(cfg.routes), frozenset(models), frozenset(cfg.pools)
        self._cfg = cfg

    def use_case(self, cfg: Config, name: str | None) -> str:
        self._load(cfg)
        return name if name in self._use_cases else OTHER

    def model(self, cfg: Config, name: str) -> str:
        self._load(cfg)
        return name if name in self._models else OTHER

    def pool(self, cfg: Config, name: str) -> str:
        self._load(cfg)
        return name if name in self._pools else OTHER


def _requests(registry: CollectorRegistry) -> Counter:
    return Counter(
        "switchyard_requests",
        "Requests that ended, counted by the process that ended them (each request once across the fleet):"
        " code OK or the error code of the terminal reply; pool, provider and model are empty for a refusal"
        " by the dispatcher",
        ["use_case", "pool", "provider", "model", "code"],
        registry=registry,
    )


class _HealthCollector:
    """Breakers, provider credit and live replicas as this process's HealthView holds them, read at scrape."""

    def __init__(
        self, view: HealthView, pools: Callable[[], Iterable[str]], providers: Callable[[], Iterable[str]],
        *, replicas: bool,
    ) -> None:
        self.view = view
        self.pools = pools
        self.providers = providers
        self.replicas = replicas

    def collect(self) -> Iterator[Metric]:
        now = now_ms()
        state = GaugeMetricFamily(
            "switchyard_breaker_state", "1 for the state the pool's breaker is in (closed, open, half_open), else 0",
            labels=["pool", "state"])
        refusing = GaugeMetricFamily(
            "switchyard_breaker_open",
            "1 while the pool's breaker refuses calls (open and cooling down, or half-open with every probe taken)",
            labels=["pool"])
        credit = GaugeMetricFamily(
            "switchyard_provider_credit_exhausted",
            "1 while the provider counts as out of credit (its targets are skipped), else 0", labels=["provider"])
        live = GaugeMetricFamily(
            "switchyard_pool_replicas", "Workers of the pool that reported themselves live (their key reports)",
            labels=["pool"])
        # list() copies in one step: a scrape runs on a thread while the event loop changes the mirrors.
        held = list(self.view.pools.values.values()) if self.replicas else []
        reports = [r for r, _ in held if r.until_ms > now]
        for pool in self.pools():
            current = self.view.breaker(pool)[0].state
            for name in BREAKER_STATES:
                state.add_metric([pool, name], 1.0 if name == current else 0.0)
            refusing.add_metric([pool], 1.0 if self.view.pool_open(pool, now) else 0.0)
            if self.replicas:
                live.add_metric([pool], float(sum(1 for r in reports if r.pool == pool)))
        for provider in self.providers():
            credit.add_metric([provider], 1.0 if self.view.provider_exhausted(provider, now) else 0.0)
        yield from (state, refusing, credit, live) if self.replicas else (state, refusing, credit)


class DispatcherMetrics:
    """The dispatcher's: requests handed to pools, refusals by code (rate limits, budgets, no route, ...),
    and every pool's breaker and provider's credit as its health view sees them."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else new_registry()
        r = self.registry
        self.requests = _requests(r)
        self.refusals = Counter(
            "switchyard_dispatcher_refusals",
            "Requests the dispatcher answered with an error instead of handing them to a pool, by code"
            " (RATE_LIMITED and BUDGET_EXCEEDED among them)", ["use_case", "code"], registry=r)
        self.dispatched = Counter(
            "switchyard_dispatched", "Requests handed to the first pool of their route", ["use_case", "pool"],
            registry=r)
        self._known = _Known()

    def follow_health(self, view: HealthView, cfg: Callable[[], Config]) -> None:
        """Export every configured pool's breaker and live replicas and every provider's credit from `view`
        (started), for the config in force at each scrape."""
        self.registry.register(_HealthCollector(
            view, lambda: list(cfg().pools), lambda: list(cfg().providers), replicas=True))

    def handed(self, cfg: Config, use_case: str | None, pool: str) -> None:
        self.dispatched.labels(self._known.use_case(cfg, use_case), self._known.pool(cfg, pool)).inc()

    def refused(self, cfg: Config, use_case: str | None, code: str) -> None:
        uc = self._known.use_case(cfg, use_case)
        self.refusals.labels(uc, code).inc()
        self.requests.labels(uc, "", "", "", code).inc()


class WorkerMetrics:
    """A pool worker's: requests ended here by code, attempts, fallbacks, retries and waits, latency and time
    to first token, tokens and cost, items in flight, and its pool's breaker and provider's credit."""

    def __init__(self, pool: str, registry: CollectorRegistry | None = None) -> None:
        self.pool = pool
        self.registry = registry if registry is not None else new_registry()
        r = self.registry
        self.requests = _requests(r)
        self.attempts = Counter(
            "switchyard_attempts",
            "Targets tried in this pool, one per work item served here: OK or the error code it failed with"
            " (a failure may still fall back to the request's next target)", ["pool", "provider", "model", "code"],
            registry=r)
        self.fallbacks = Counter(
            "switchyard_fallbacks", "Work items handed to the request's next target after this pool failed them",
            ["pool", "provider", "code"], registry=r)
        self.retries = Counter(
            "switchyard_retries", "Calls to the provider tried again within the pool, by the failure before",
            ["pool", "provider", "code"], registry=r)
        self.waits = Counter(
            "switchyard_pool_waits",
            "Work items put back in the queue to wait: for the pool's own rate limit (pool_limit), or because the"
            " provider asked for a wait (provider_wait)", ["pool", "reason"], registry=r)
        self.latency = Histogram(
            "switchyard_request_duration_seconds",
            "Successful requests: from the request's publish to its done reply", list(_USE_CASE),
            buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(
            "switchyard_time_to_first_token_seconds",
            "Successful requests: from the request's publish to the provider's first token", list(_USE_CASE),
            buckets=TTFT_BUCKETS, registry=r)
        self.tokens = Counter(
            "switchyard_tokens",
            "Tokens of the requests that ended here, as the provider reported them, by kind (input, output,"
            " cache_read, cache_write, reasoning)", [*_USE_CASE, "kind"], registry=r)
        self.cost = Counter(
            "switchyard_cost_usd", "Cost in USD of the successful requests, as their done reply priced them",
            list(_USE_CASE), registry=r)
        self._known = _Known()
        self._following = False
        self._children: dict[tuple[int, tuple[str, ...]], Counter | Histogram] = {}

    def follow(
        self, view: HealthView, cfg: Callable[[], Config], inflight: Callable[[], int],
        checked: Callable[[], ProviderHealth | None] = lambda: None,
    ) -> None:
        """Export the pool's in-flight items, concurrency, breaker, its provider's credit (`view` started) and the
        last periodic check of its provider (`checked`). Once: a second call (the worker served again) changes
        nothing."""
        if self._following:
            return
        self._following = True
        pool = self.pool
        self.registry.register(_Gauges(
            ("switchyard_pool_inflight", "Work items this worker holds now (being called, streamed or retried)",
             pool, lambda: float(inflight())),
            ("switchyard_pool_concurrency",
             "The pool's configured concurrency: work items in flight at once across all its replicas",
             pool, lambda: float(cfg().pools[pool].concurrency) if pool in cfg().pools else math.nan),
        ))
        self.registry.register(_HealthCollector(
            view, lambda: [pool], lambda: [p] if (p := _provider(cfg(), pool)) else [], replicas=False))
        self.registry.register(_ProviderCheck(pool, lambda: _provider(cfg(), pool), checked))

    def ended(
        self, cfg: Config, work: WorkItem, provider: str, code: str, usage: Usage, cost_usd: float | None,
        first_token_ms: int | None,
    ) -> None:
        """A request whose terminal reply this worker sent."""
        k = self._known
        labels = (k.use_case(cfg, work.request.use_case), self.pool, provider, k.model(cfg, work.route[0].model))
        child = self._child
        child(self.requests, (*labels, code)).inc()
        for kind, n in (("input", usage.input_tokens), ("output", usage.output_tokens),
                        ("cache_read", usage.cache_read_tokens), ("cache_write", usage.cache_write_tokens),
                        ("reasoning", usage.reasoning_tokens)):
            if n:
                child(self.tokens, (*labels, kind)).inc(n)
        if code != OK:
            return
        child(self.latency, labels).observe(max(0, now_ms() - work.accepted_ms) / 1000)
        if first_token_ms is not None:
            child(self.ttft, labels).observe(max(0, first_token_ms - work.accepted_ms) / 1000)
        if cost_usd:
            child(self.cost, labels).inc(cost_usd)

    def _child(self, metric: M, labels: tuple[str, ...]) -> M:
        """`metric.labels(*labels)`, remembered: the label sets are bounded, and the library's own lookup
        (validation, a lock) costs several times a dict's."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return cast(M, found)

    def attempted(self, cfg: Config, provider: str, model: str, code: str) -> None:
        self.attempts.labels(self.pool, provider, self._known.model(cfg, model), code).inc()

    def fell_back(self, provider: str, code: str) -> None:
        self.fallbacks.labels(self.pool, provider, code).inc()

    def retried(self, provider: str, code: str) -> None:
        self.retries.labels(self.pool, provider, code).inc()

    def waited(self, reason: str) -> None:
        self.waits.labels(self.pool, reason).inc()


def _provider(cfg: Config, pool: str) -> str | None:
    p = cfg.pools.get(pool)
    return p.provider if p is not None else None


class _ProviderCheck:
    """The worker's last periodic check of its provider (workers/discovery.py), read at scrape; nothing
    before the first check."""

    def __init__(self, pool: str, provider: Callable[[], str | None], checked: Callable[[], ProviderHealth | None]):
        self.pool = pool
        self.provider = provider
        self.checked = checked

    def collect(self) -> Iterator[Metric]:
        health, provider = self.checked(), self.provider()
        if health is None or provider is None:
            return
        labels = [self.pool, provider]
        for name, text, value in (
            ("switchyard_provider_check_healthy",
             "1 when the worker's last periodic check of its provider (a models list) succeeded, else 0",
             1.0 if health.healthy else 0.0),
            ("switchyard_provider_check_latency_seconds", "How long the last periodic check of the provider took",
             health.latency_ms / 1000 if health.latency_ms is not None else math.nan),
            ("switchyard_provider_check_timestamp_seconds", "When the last periodic check of the provider ended",
             health.checked_ms / 1000),
        ):
            g = GaugeMetricFamily(name, text, labels=["pool", "provider"])
            g.add_metric(labels, value)
            yield g


class _Gauges:
    """Gauges of one label (`pool`) whose values are read at scrape."""

    def __init__(self, *gauges: tuple[str, str, str, Callable[[], float]]) -> None:
        self.gauges = gauges

    def collect(self) -> Iterator[Metric]:
        for name, text, pool, value in self.gauges:
            g = GaugeMetricFamily(name, text, labels=["pool"])
            g.add_metric([pool], value())
            yield g


class AuditorMetrics:
    """The auditor's: batch sizes, rows written, dead letters, failed batches, budget alerts, and how far
    behind it is (the age of the oldest event it holds unwritten, and its consumer's pending count)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else new_registry()
        r = self.registry
        self.batch = Histogram(
            "switchyard_audit_batch_size", "Events (completion events and budget alerts) per batch fetched",
            buckets=BATCH_BUCKETS, registry=r)
        self.rows = Counter(
            "switchyard_audit_rows_written", "Completion events written to llm_audit (committed, then acked)",
            registry=r)
        self.dead_letters = Counter(
            "switchyard_audit_dead_letters", "Events that cannot become a row, copied to the DLQ and dropped",
            registry=r)
        self.failures = Counter(
            "switchyard_audit_batch_failures",
            "Batches put back to be tried again: PostgreSQL unavailable (ledger_unavailable), or anything else"
            " (error)", ["reason"], registry=r)
        self.alerts = Counter(
            "switchyard_budget_alerts", "Budget alerts recorded in llm_budget_alerts, by period (day, month)",
            ["period"], registry=r)
        self.pending = Gauge(
            "switchyard_audit_pending_events",
            "Events in LLM_EVENTS not yet delivered to the auditors (the `audit` consumer's pending count, as of"
            " the last fetch)", registry=r)
        self._oldest_s: float | None = None
        r.register(self)  # collect() below: the lag, read at scrape

    def collect(self) -> Iterator[Metric]:
        oldest = self._oldest_s
        g = GaugeMetricFamily(
            "switchyard_audit_lag_seconds",
            "Age of the oldest event this auditor holds and has not written yet (its time in LLM_EVENTS); 0 when"
            " it holds none")
        g.add_metric([], max(0.0, time.time() - oldest) if oldest is not None else 0.0)
        yield g

    def fetched(self, msgs: list[Msg]) -> None:
        self.batch.observe(len(msgs))
        if not msgs:
            return
        oldest = min(m.metadata.timestamp.timestamp() for m in msgs)
        self._oldest_s = oldest if self._oldest_s is None else min(self._oldest_s, oldest)
        self.pending.set(msgs[-1].metadata.num_pending)

    def failed(self, *, outage: bool) -> None:
        """A batch was put back: PostgreSQL unavailable (`outage`), or anything else."""
        self.failures.labels("ledger_unavailable" if outage else "error").inc()

    def alerted(self, period: str) -> None:
        self.alerts.labels(period if period in ("day", "month") else OTHER).inc()

    def idle(self) -> None:
        """A fetch found nothing to deliver."""
        self.pending.set(0)

    def settled(self) -> None:
        """Every event of the batches fetched so far is written or dead-lettered."""
        self._oldest_s = None


@contextlib.asynccontextmanager
async def serve_metrics(registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> AsyncIterator[str | None]:
    """Serve `registry` on http://host:port/metrics while the block runs; nothing when `port` is 0. Yields the
    URL. Raises ConfigError when the port cannot be listened on. A scrape runs on the event loop (no thread
    reads what the loop changes); aiohttp answers a malformed HTTP request with an error and serves on."""
    if not port:
        yield None
        return

    async def scrape(_request: web.Request) -> web.Response:
        # On a thread: a scrape of many series takes milliseconds that the event loop's requests need.
        # The metrics are thread-safe; the collectors read the loop's state in single atomic steps.
        body = await asyncio.to_thread(generate_latest, registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        # asyncio's own text repeats the address; a host that does not resolve has a negative errno
        reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror or str(exc)
        raise ConfigError(f"--metrics-port {port}: cannot listen on {host}:{port} ({reason.lower()})") from None
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}/metrics"
    log.info("metrics_serving", url=url)
    try:
        yield url
    finally:
        await runner.cleanup()


async def serving(registry: CollectorRegistry, port: int, host: str, main: Coroutine[Any, Any, None]) -> None:
    """Run a process's `main` with its metrics served (see serve_metrics) from before it starts to after it ends.
    Raises ConfigError when the port cannot be listened on (`main` is then closed, never started)."""
    try:
        async with serve_metrics(registry, port, host):
            await main
    finally:
        main.close()  # nothing for a coroutine that ran; no "never awaited" warning for one that did not


def port_number(text: str) -> int:
    """argparse's type for --metrics-port: 0 (off) to 65535."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535, or 0 for no metrics)")
    return port


def add_options(parser: argparse.ArgumentParser) -> None:
    """--metrics-port and --metrics-host of a fleet process's command."""
    parser.add_argument("--metrics-port", type=port_number, default=0, metavar="PORT",
                        help="serve Prometheus metrics on http://HOST:PORT/metrics (default 0: not served)")
    parser.add_argument("--metrics-host", default="0.0.0.0", metavar="HOST",
                        help="the address the metrics are served on (default 0.0.0.0: every interface)")
