"""`switchyard status`: what each queue holds, every live process and each pool's health, for operators.

It reads the streams and consumers (what waits, what is in flight), finds every live dispatcher, worker
and auditor through their micro services (`$SRV.STATS`, workers/discovery.py), reads the breakers and
the pushed config's routes, and the age of the oldest completion event the auditors have not written.
router/fleetstatus.py judges the whole.

Exit codes: 0 healthy; 1 unhealthy (the problems are listed); 2 NATS cannot be reached, holds no fleet,
or an option is wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime
from pathlib import Path

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError

from router import config as config_mod
from router.config import ConfigError
from router.fleetstatus import FleetStatus, Lag, Observed, judge, routed_pools
from router.vitals import ROLES, ProcessStats, ProviderHealth

from .. import configstore, discovery
from ..health import breaker_status
from .fleet import OK, connected, fleet_prefix, say

STREAMS = ("LLM_REQ", "LLM_WORK", "LLM_EVENTS", "LLM_DLQ", "LLM_RES")
UNHEALTHY = 1
USAGE = 2
DEFAULT_MAX_AUDIT_LAG_S = 60.0
DEFAULT_WAIT_S = 1.0
DEFAULT_WATCH_S = 2.0


class StreamRow(msgspec.Struct, kw_only=True):
    name: str
    messages: int | None
    """None: the stream is missing."""
    bytes: int | None


class ConsumerRow(msgspec.Struct, kw_only=True):
    stream: str
    name: str
    pending: int
    """Not yet delivered."""
    ack_pending: int
    """Delivered, not acked (in flight)."""
    max_ack_pending: int
    redelivered: int
    waiting: int
    """Open pull requests (about one per live replica)."""


class Queues(msgspec.Struct, kw_only=True):
    streams: list[StreamRow]
    consumers: list[ConsumerRow]


class Status(msgspec.Struct, kw_only=True):
    """What `status --json` prints: the queues, then the fleet's judgement."""

    nats: str
    streams: list[StreamRow]
    consumers: list[ConsumerRow]
    fleet: FleetStatus


async def queues(js: JetStreamContext) -> Queues:
    """The streams and their consumers. Raises nothing for a stream that is missing."""
    streams: list[StreamRow] = []
    consumers: list[ConsumerRow] = []
    for name in STREAMS:
        try:
            info = await js.stream_info(name)
        except NotFoundError:
            streams.append(StreamRow(name=name, messages=None, bytes=None))
            continue
        streams.append(StreamRow(name=name, messages=info.state.messages, bytes=info.state.bytes))
        for c in await js.consumers_info(name):
            consumers.append(ConsumerRow(
                stream=name, name=c.name, pending=c.num_pending or 0, ack_pending=c.num_ack_pending or 0,
                max_ack_pending=c.config.max_ack_pending or 0, redelivered=c.num_redelivered or 0,
                waiting=c.num_waiting or 0,
            ))
    return Queues(streams=streams, consumers=consumers)


def queues_text(q: Queues) -> str:
    """The plain-text tables of streams and consumers."""
    lines = ["stream       messages  bytes", "------------ --------- ----------"]
    for s in q.streams:
        if s.messages is None:
            lines.append(f"{s.name:<12} (missing: no fleet process has started on this server yet)")
        else:
            lines.append(f"{s.name:<12} {s.messages:>9} {s.bytes:>10}")
    lines += [
        "",
        "consumer            stream      waiting  in flight (max)  redelivered  pull requests",
        "------------------- ---------- -------- ---------------- ------------ --------------",
    ]
    for c in q.consumers:
        lines.append(
            f"{c.name:<19} {c.stream:<10} {c.pending:>8} {c.ack_pending:>7} ({c.max_ack_pending:>6})"
            f" {c.redelivered:>12} {c.waiting:>14}"
        )
    lines += [
        "",
        "waiting: not yet delivered; in flight: delivered, not acked (capped by max_ack_pending);",
        "pull requests: open requests from the consumer's replicas (about one per live replica).",
    ]
    return "\n".join(lines)


async def report(js: JetStreamContext) -> str:
    """The plain-text tables of streams and consumers (the queues part of `status`)."""
    return queues_text(await queues(js))


async def _pushed_config(js: JetStreamContext) -> config_mod.Config | None:
    """The config the fleet follows; None when none was pushed or it does not decode. Creates nothing."""
    try:
        kv = await js.key_value(configstore.BUCKET)
        entry = await kv.get(configstore.KEY)
    except (BucketNotFoundError, KeyNotFoundError):
        return None
    if entry.value is None:
        return None
    try:
        return config_mod.decode(entry.value)
    except (ConfigError, ValueError):
        return None


async def _oldest_unwritten_s(js: JetStreamContext, prefix: str) -> tuple[float | None, float | None]:
    """The age of the oldest event the auditors have not acked (None: none waits) and the events' retention
    (the stream's max age; None: unknown). The oldest unacked event is the one after the consumer's ack floor."""
    try:
        stream = await js.stream_info("LLM_EVENTS")
        audit = await js.consumer_info("LLM_EVENTS", "audit")
    except NotFoundError:
        return None, None
    retention = stream.config.max_age or None
    if (audit.num_pending or 0) + (audit.num_ack_pending or 0) == 0:
        return None, retention
    floor = audit.ack_floor.stream_seq if audit.ack_floor else 0
    seq = max(floor + 1, stream.state.first_seq or 1)
    try:
        msg = await js.get_msg("LLM_EVENTS", seq, subject=f"{prefix}.>", next=True)
    except NotFoundError:
        return None, retention
    if msg.time is None:
        return None, retention
    return max(0.0, (datetime.now(UTC) - msg.time).total_seconds()), retention


async def observe(nc: NATS, js: JetStreamContext, prefix: str, q: Queues, wait_s: float) -> Observed:
    """Everything `judge` needs, gathered at once: the processes answer while the rest is read."""
    found = asyncio.gather(*(discovery.gather(nc, role, wait_s) for role in ROLES))
    cfg = await _pushed_config(js)
    breakers: dict[str, str] = {pool: state.state for pool, state in (await breaker_status(js)).items()}
    oldest, retention = await _oldest_unwritten_s(js, prefix)
    processes = [p for role in await found for p in role]
    consumers = {c.name: Lag(pending=c.pending, ack_pending=c.ack_pending) for c in q.consumers}
    pools = list(cfg.pools) if cfg else [c.name.removeprefix("pool-") for c in q.consumers
                                         if c.stream == "LLM_WORK" and c.name.startswith("pool-")]
    return Observed(
        processes=processes, pools=pools, routed=routed_pools(cfg.routes) if cfg else None, consumers=consumers,
        breakers=breakers, oldest_unwritten_s=oldest, events_retention_s=retention,
    )


def _pct(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.1f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _provider(h: ProviderHealth | None) -> str:
    if h is None:
        return "unchecked"
    if h.healthy:
        return f"ok ({h.latency_ms} ms)" if h.latency_ms is not None else "ok"
    return f"FAILING {h.code or ''}: {h.error or ''}".strip()


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86_400:.1f} days"


def fleet_text(f: FleetStatus, max_audit_lag_s: float) -> str:
    lines = [
        "pool                 routed replicas in flight breaker      lag  success  p50 ms  p95 ms  provider",
        "-------------------- ------ -------- --------- --------- ------ -------- ------- ------- --------",
    ]
    for p in f.pools:
        lines.append(
            f"{p.name:<20} {'yes' if p.routed else 'no':<6} {p.replicas:>8} {p.in_flight:>9} {p.breaker:<9}"
            f" {p.lag.total:>6} {_pct(p.success_rate):>8} {_ms(p.p50_ms):>7} {_ms(p.p95_ms):>7}"
            f"  {_provider(p.provider)}"
        )
    lines += [
        "",
        "process      pool                 host                 id                       uptime in flight"
        "  recent  success  p50 ms  p95 ms  health",
        "------------ -------------------- -------------------- ---------------------- -------- ---------"
        " ------- -------- ------- -------  ------",
    ]
    for proc in f.dispatchers + f.workers + f.auditors:
        lines.append(_process_line(proc))
    if not (f.dispatchers or f.workers or f.auditors):
        lines.append("(no live process answered)")
    audit = f.audit
    oldest = "none" if audit.oldest_unwritten_s is None else _age(audit.oldest_unwritten_s)
    retention = "unknown" if audit.retention_s is None else _age(audit.retention_s)
    lines += [
        "",
        f"dispatch lag: {f.dispatch_lag.total} requests ({f.dispatch_lag.pending} waiting,"
        f" {f.dispatch_lag.ack_pending} in flight)",
        f"audit lag: {audit.lag.total} events ({audit.lag.pending} waiting, {audit.lag.ack_pending} in flight);"
        f" oldest unwritten: {oldest}; events kept {retention} (limit {max_audit_lag_s:g} s behind,"
        " or half the retention)",
        "",
        "lag: the consumer's waiting + in flight; success and p50/p95: the replicas' last 5 minutes (a pool's",
        "p50/p95 are its slowest replica's); provider: the pool's last periodic check of its provider.",
    ]
    if f.warnings:
        lines += ["", *(f"warning: {w}" for w in f.warnings)]
    if f.problems:
        lines += ["", *(f"problem: {p}" for p in f.problems)]
    count = f"{len(f.problems)} problem" + ("s" if len(f.problems) > 1 else "")
    lines += ["", "fleet: healthy" if f.healthy else f"fleet: UNHEALTHY ({count})"]
    return "\n".join(lines)


def _process_line(p: ProcessStats) -> str:
    r = p.recent
    health = "ok" if p.healthy else f"UNHEALTHY: {p.problem}"
    return (
        f"{p.role:<12} {p.pool or '-':<20} {p.host[:20]:<20} {p.id[:22]:<22} {_age(p.uptime_s):>8} {p.in_flight:>9}"
        f" {r.count:>7} {_pct(r.success_rate):>8} {_ms(r.p50_ms):>7} {_ms(r.p95_ms):>7}  {health}"
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    st = sub.add_parser(
        "status", help="queues, live processes and each pool's health; exits 1 when the fleet is unhealthy",
        description="Exit codes: 0 healthy, 1 unhealthy (the problems are listed), 2 no fleet or a wrong option.",
    )
    st.add_argument("--data-dir", type=Path, default=None, help="find the fleet `switchyard up` started here")
    st.add_argument("--json", action="store_true", help="one JSON object (one per refresh with --watch)")
    st.add_argument("--watch", nargs="?", const=str(DEFAULT_WATCH_S), default=None, metavar="SECONDS",
                    help=f"refresh every SECONDS (default {DEFAULT_WATCH_S:g}) until Ctrl-C")
    st.add_argument("--max-audit-lag", default=str(DEFAULT_MAX_AUDIT_LAG_S), metavar="SECONDS",
                    help="unhealthy when the oldest unwritten completion event is older than this"
                         f" (default {DEFAULT_MAX_AUDIT_LAG_S:g})")
    st.add_argument("--wait", default=str(DEFAULT_WAIT_S), metavar="SECONDS",
                    help=f"how long to wait for the live processes to answer (default {DEFAULT_WAIT_S:g})")
    st.set_defaults(run=status)


def seconds(option: str, text: str | None) -> float | None:
    """A positive number of seconds from an option's text; None (after saying so in one line) when not one."""
    try:
        value = float(text or "")
    except ValueError:
        value = -1.0
    if not (0 < value < 1e9):
        say(f"{option} {str(text)[:50]!r} is not a number of seconds above 0 (e.g. {option} 5)")
        return None
    return value


async def status(args: argparse.Namespace) -> int:
    """Print the status (again every --watch seconds). Raises NoFleet when NATS is unreachable or holds no
    fleet: another team's streams on the same server are none of this command's business."""
    max_lag = seconds("--max-audit-lag", args.max_audit_lag)
    wait = seconds("--wait", args.wait)
    every = seconds("--watch", args.watch) if args.watch is not None else None
    if max_lag is None or wait is None or (args.watch is not None and every is None):
        return USAGE
    async with connected(args.data_dir) as (nc, url):
        js = nc.jetstream()
        prefix = await fleet_prefix(js, url)
        while True:
            q = await queues(js)
            fleet = judge(await observe(nc, js, prefix, q, wait), max_audit_lag_s=max_lag)
            if args.json:
                out = Status(nats=url, streams=q.streams, consumers=q.consumers, fleet=fleet)
                print(msgspec.json.encode(out).decode(), flush=True)
            else:
                if every is not None and sys.stdout.isatty():
                    print("\x1b[H\x1b[2J", end="")  # the terminal cleared: each refresh replaces the last
                print(f"NATS: {url}\n\n{queues_text(q)}\n\n{fleet_text(fleet, max_lag)}", flush=True)
            if every is None:
                return OK if fleet.healthy else UNHEALTHY
            await asyncio.sleep(every)
            if not args.json:
                print()
