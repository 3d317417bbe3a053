"""`switchyard status`'s judgement of the fleet, from what it gathered: the live processes' own stats, the
consumers' lag, the breakers, the routes and the audit's backlog. Pure: the CLI gathers, this decides.

A fleet is unhealthy (status exits 1) when a routed pool has no live worker, a pool's breaker is open, no
dispatcher or no auditor answers, a process says it is unhealthy, the auditor is behind by more than
`max_audit_lag_s`, or the oldest unwritten event is older than half the events' retention. A provider
whose periodic check fails, or a breaker half-open, is a warning.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import msgspec

from .vitals import ProcessStats, ProviderHealth

RETENTION_WARN_FRACTION = 0.5
"""The oldest unwritten event may reach this fraction of the events' retention before status complains."""


class Lag(msgspec.Struct, kw_only=True, frozen=True):
    """A durable consumer's backlog: not yet delivered (`pending`) and delivered but not acked."""

    pending: int = 0
    ack_pending: int = 0

    @property
    def total(self) -> int:
        return self.pending + self.ack_pending


class PoolStatus(msgspec.Struct, kw_only=True):
    name: str
    routed: bool
    """A route names the pool (every pool counts as routed when no config was pushed)."""
    replicas: int
    hosts: list[str]
    in_flight: int
    breaker: str
    """`closed`, `open` or `half_open`."""
    lag: Lag
    """The pool's consumer: work items waiting, and in flight (pending + ack pending)."""
    requests: int
    """Outcomes in its replicas' recent windows."""
    success_rate: float | None
    p50_ms: float | None
    """The slowest replica's median latency per attempt."""
    p95_ms: float | None
    """The slowest replica's 95th percentile."""
    provider: ProviderHealth | None
    """The most recent check of the pool's provider among its replicas."""


class AuditStatus(msgspec.Struct, kw_only=True):
    lag: Lag
    oldest_unwritten_s: float | None
    """Age of the oldest event the auditors have not written; None when none waits."""
    retention_s: float | None
    """The events stream's max age; None when unknown."""


class FleetStatus(msgspec.Struct, kw_only=True):
    healthy: bool
    problems: list[str]
    warnings: list[str]
    pools: list[PoolStatus]
    dispatchers: list[ProcessStats]
    workers: list[ProcessStats]
    auditors: list[ProcessStats]
    dispatch_lag: Lag
    audit: AuditStatus
    routes_known: bool


class Observed(msgspec.Struct, kw_only=True):
    """What the CLI gathered."""

    processes: list[ProcessStats]
    pools: list[str]
    """Every pool known: the config's, else those with a consumer."""
    routed: set[str] | None
    """The pools some route names; None when no config was pushed."""
    consumers: dict[str, Lag]
    """By consumer name: `dispatch`, `audit`, `pool-<pool>`."""
    breakers: dict[str, str]
    """By pool: its breaker's state; a pool missing here never left closed."""
    oldest_unwritten_s: float | None
    events_retention_s: float | None


def _slowest(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _pool(name: str, routed: bool, workers: list[ProcessStats], seen: Observed) -> PoolStatus:
    count = sum(w.recent.count for w in workers)
    ok = sum(w.recent.ok for w in workers)
    checks = [w.provider_health for w in workers if w.provider_health is not None]
    return PoolStatus(
        name=name, routed=routed, replicas=len(workers), hosts=sorted(w.host for w in workers),
        in_flight=sum(w.in_flight for w in workers), breaker=seen.breakers.get(name, "closed"),
        lag=seen.consumers.get(f"pool-{name}", Lag()), requests=count,
        success_rate=round(ok / count, 4) if count else None,
        p50_ms=_slowest(w.recent.p50_ms for w in workers), p95_ms=_slowest(w.recent.p95_ms for w in workers),
        provider=max(checks, key=lambda c: c.checked_ms) if checks else None,
    )


def judge(seen: Observed, *, max_audit_lag_s: float) -> FleetStatus:
    """The fleet's status and everything wrong with it, in the order an operator should look."""
    by_role: dict[str, list[ProcessStats]] = {"dispatcher": [], "worker": [], "auditor": []}
    for p in sorted(seen.processes, key=lambda p: (p.role, p.pool or "", p.host, p.id)):
        by_role[p.role].append(p)
    workers_of: dict[str, list[ProcessStats]] = {}
    for w in by_role["worker"]:
        workers_of.setdefault(w.pool or "", []).append(w)
    names = sorted(set(seen.pools) | {p for p in workers_of if p})
    routed = seen.routed if seen.routed is not None else set(names)
    pools = [_pool(n, n in routed, workers_of.get(n, []), seen) for n in names]

    problems: list[str] = []
    warnings: list[str] = []
    if seen.routed is None:
        warnings.append("no config was pushed to this fleet: every pool with a consumer counts as routed")
    for pool in pools:
        if pool.routed and pool.replicas == 0:
            queued = f" ({pool.lag.total} work items wait for one)" if pool.lag.total else ""
            problems.append(f"pool {pool.name} is routed but no live worker serves it{queued}")
        if pool.breaker == "open":
            problems.append(f"pool {pool.name}'s breaker is open: its targets are skipped")
        elif pool.breaker == "half_open":
            warnings.append(f"pool {pool.name}'s breaker is half-open: probing its provider")
        if pool.provider is not None and not pool.provider.healthy:
            warnings.append(f"pool {pool.name}'s provider check fails: {pool.provider.error or pool.provider.code}")
    if not by_role["dispatcher"]:
        waiting = seen.consumers.get("dispatch", Lag()).total
        problems.append("no dispatcher answers: requests wait in LLM_REQ" + (f" ({waiting} now)" if waiting else ""))
    if not by_role["auditor"]:
        problems.append("no auditor answers: completion events are not written to the audit ledger")
    for p in by_role["dispatcher"] + by_role["worker"] + by_role["auditor"]:
        if not p.healthy:
            where = f"{p.role} {p.pool}" if p.pool else p.role
            why = p.problem or "no reason given"
            problems.append(f"{where} on {p.host or '?'} ({p.id or '?'}) is unhealthy: {why}")
    age = seen.oldest_unwritten_s
    if age is not None and age > max_audit_lag_s:
        problems.append(f"the auditor is behind: the oldest unwritten event is {age:.0f} s old"
                        f" (more than --max-audit-lag {max_audit_lag_s:g} s)")
    retention = seen.events_retention_s
    if age is not None and retention and age > retention * RETENTION_WARN_FRACTION:
        problems.append(f"completion events age out unwritten soon: the oldest is {age / 3600:.1f} h old, and"
                        f" LLM_EVENTS keeps them {retention / 3600:.1f} h (audit.events_retention_days)")
    return FleetStatus(
        healthy=not problems, problems=problems, warnings=warnings, pools=pools,
        dispatchers=by_role["dispatcher"], workers=by_role["worker"], auditors=by_role["auditor"],
        dispatch_lag=seen.consumers.get("dispatch", Lag()),
        audit=AuditStatus(lag=seen.consumers.get("audit", Lag()), oldest_unwritten_s=age, retention_s=retention),
        routes_known=seen.routed is not None,
    )


def routed_pools(routes: Mapping[str, Mapping[str, list[str]]]) -> set[str]:
    """The pools that the config's routes name (`pool:model` targets)."""
    return {t.partition(":")[0] for tiers in routes.values() for targets in tiers.values() for t in targets}
