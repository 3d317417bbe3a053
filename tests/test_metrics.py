"""Prometheus metrics: every process's /metrics after traffic through a real fleet (one for the module), and
the Grafana dashboard and alert rules checked against the series the fleet really exposes.

The fleet is the real process code (`processes.run_dispatcher`, `run_worker`, `run_auditor`, each served by
`metrics.serving` as `switchyard dispatcher --metrics-port` does), in this process on one event loop, each
with a registry of its own. Traffic: streamed requests that succeed, one held in flight while it is
scraped, a rate limit refusal, a budget refusal after a budget alert, a use case with no route, a provider
error that opens its pool's breaker and a provider out of credit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
import pytest_asyncio
import yaml
from nats.aio.msg import Msg
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from router import config as config_mod
from router.config import Config
from router.providers.fakes import FakeOpenAI, Scenario
from schemas import Done, Error, Reply
from workers import metrics as metrics_mod
from workers import processes
from workers.metrics import AuditorMetrics, DispatcherMetrics, WorkerMetrics

from .conftest import free_port
from .helpers import ask_raw, request
from .process_fleet import nats_server

pytestmark = pytest.mark.asyncio(loop_scope="module")

REPO = Path(__file__).resolve().parent.parent
ANSWER = " ".join(["word"] * 50)  # 249 characters: 62 output tokens from the fake
PROMPT = "Tell me about budgets, briefly please."  # 38 characters: 9 input tokens, 10 estimated
PRICE = {"input_usd_per_mtok": 1000.0, "output_usd_per_mtok": 1000.0}  # a request costs about $0.07
POOLS = ("openai", "flaky", "broke")
ROLES = ("dispatcher", *(f"worker-{p}" for p in POOLS), "auditor")
WAIT_S = 60.0


def _config(url: str) -> Config:
    providers = {p: {"format": "openai", "base_url": url} for p in POOLS}
    pools: dict[str, Any] = {p: {"provider": p, "concurrency": 8, "timeout_ms": 20_000, "retry": {"attempts": 1}}
                             for p in POOLS}
    pools["flaky"]["breaker"] = {"failures": 1, "cooldown_ms": 600_000}
    return config_mod.from_mapping({
        "providers": providers,
        "pools": pools,
        "routes": {"draft": {"default": ["openai:metered"]}, "flaky": {"default": ["flaky:metered"]},
                   "broke": {"default": ["broke:metered"]}},
        "models": {"metered": PRICE},
        "limits": {
            "default": {"rate": {"per_second": 1000, "burst": 1000}},
            "accounts": {
                "limited": {"rate": {"per_second": 0.001, "burst": 1}},
                # One request reserves $0.07 (10 + 60 tokens) and costs about $0.07: past the 80 % alert, and
                # the next reservation does not fit.
                "spender": {"rate": {"per_second": 1000, "burst": 1000},
                            "budget": {"daily_usd": 0.08, "monthly_usd": 1000.0, "alert_at": 0.8}},
            },
        },
    })


@dataclass
class Traffic:
    urls: dict[str, str]
    replies: list[Reply] = field(default_factory=list)
    inflight_seen: float = 0.0
    """The openai worker's switchyard_pool_inflight while a held request was in flight."""
    scrapes: dict[str, str] = field(default_factory=dict)
    """Each role's /metrics text once the auditor has written every event."""

    def families(self, role: str) -> dict[str, Any]:
        return {f.name: f for f in text_string_to_metric_families(self.scrapes[role])}

    def value(self, role: str, sample: str, **labels: str) -> float:
        """The sum of `sample`'s values whose labels include `labels` (0 when there is none)."""
        return _value(self.scrapes[role], sample, **labels)


def _value(text: str, sample: str, **labels: str) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


@pytest.fixture(scope="module")
def module_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with nats_server(tmp_path_factory.mktemp("metrics-js")) as url:
        yield url


async def _scrape(http: httpx.AsyncClient, url: str) -> str:
    r = await http.get(url, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return r.text


async def _until(what: str, check: Any, timeout: float = WAIT_S) -> Any:
    """Poll `check()` (an awaitable's factory) until it returns something true; fail naming `what`."""
    end = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < end:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what}: not seen within {timeout:g} s (last: {last!r})")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def traffic(module_nats: str, pg_url: str) -> AsyncIterator[Traffic]:
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("DATABASE_URL", raising=False)  # account routes off: the config's routes only
        fake = FakeOpenAI(default=Scenario(text=ANSWER))
        fake.scenarios["hold"] = Scenario(text=ANSWER, ttft_ms=3000)
        url = await fake.start()
        cfg = _config(url + "/v1")
        await processes.prepare(module_nats, pg_url, cfg)
        ports = {role: free_port() for role in ROLES}
        urls = {role: f"http://127.0.0.1:{port}/metrics" for role, port in ports.items()}
        stop = asyncio.Event()

        def served(role: str, registry: Any, main: Any) -> asyncio.Task[None]:
            return asyncio.create_task(metrics_mod.serving(registry, ports[role], "127.0.0.1", main), name=role)

        dm, am = DispatcherMetrics(), AuditorMetrics()
        tasks = [served("dispatcher", dm.registry, processes.run_dispatcher(stop, cfg, module_nats, dm)),
                 served("auditor", am.registry, processes.run_auditor(stop, cfg, module_nats, pg_url, am))]
        for pool in POOLS:
            wm = WorkerMetrics(pool)
            tasks.append(served(f"worker-{pool}", wm.registry, processes.run_worker(stop, cfg, module_nats, pool, wm)))
        nc = await nats.connect(module_nats)
        try:
            async with httpx.AsyncClient() as http:
                t = Traffic(urls)
                for role in ROLES:  # every process serves its metrics (and has started)
                    await _until(f"{role} serving", lambda role=role: _answers(http, urls[role], tasks))
                await _send(nc, http, t)
                await _until("every event written and the breaker and credit seen", lambda: _settled(http, t))
                for role in ROLES:
                    t.scrapes[role] = await _scrape(http, urls[role])
                yield t
        finally:
            await nc.close()
            stop.set()
            done, pending = await asyncio.wait(tasks, timeout=30)
            for task in pending:
                task.cancel()
            await fake.stop()
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise AssertionError(f"{task.get_name()} failed") from task.exception()


async def _answers(http: httpx.AsyncClient, url: str, tasks: list[asyncio.Task[None]]) -> bool:
    for task in tasks:
        if task.done():
            task.result()  # a process that ended at start: its error, not a timeout
    with contextlib.suppress(httpx.HTTPError):
        return (await http.get(url, timeout=5)).status_code == 200
    return False


async def _ask(nc: Any, t: Traffic, text: str = PROMPT, *, use_case: str = "draft", account: str = "acme",
               **fields: Any) -> Reply:
    replies = await ask_raw(nc, request(text, account=account, **fields), subject=f"llm.req.{use_case}.{account}",
                            timeout=WAIT_S)
    t.replies.append(replies[-1])
    return replies[-1]


async def _send(nc: Any, http: httpx.AsyncClient, t: Traffic) -> None:
    for _ in range(3):
        assert isinstance(await _ask(nc, t, stream=True), Done)
    # One held by the provider for 3 s: the openai worker counts it in flight meanwhile.
    held = asyncio.create_task(_ask(nc, t, f"{PROMPT} [[fake:hold]]", stream=True))

    async def inflight() -> float:
        return _value(await _scrape(http, t.urls["worker-openai"]), "switchyard_pool_inflight", pool="openai")

    t.inflight_seen = await _until("the held request in flight", inflight)
    assert isinstance(await held, Done)
    assert isinstance(await _ask(nc, t, account="limited"), Done)
    assert (await _ask(nc, t, account="limited")).code == "RATE_LIMITED"  # type: ignore[union-attr]
    assert isinstance(await _ask(nc, t, account="spender", max_tokens=60), Done)
    assert (await _ask(nc, t, account="spender", max_tokens=60)).code == "BUDGET_EXCEEDED"  # type: ignore[union-attr]
    assert (await _ask(nc, t, use_case="nosuch")).code == "NO_ROUTE"  # type: ignore[union-attr]
    assert (await _ask(nc, t, f"{PROMPT} [[fake:server_error]]", use_case="flaky")).code == "PROVIDER_ERROR"  # type: ignore[union-attr]
    assert isinstance(await _ask(nc, t, f"{PROMPT} [[fake:insufficient_quota]]", use_case="broke"), Error)


async def _settled(http: httpx.AsyncClient, t: Traffic) -> bool:
    """Every completion event and the budget alert written, and the dispatcher's health view caught up."""
    auditor = await _scrape(http, t.urls["auditor"])
    dispatcher = await _scrape(http, t.urls["dispatcher"])
    return (_value(auditor, "switchyard_audit_rows_written_total") >= len(t.replies)
            and _value(auditor, "switchyard_budget_alerts_total") >= 1
            and _value(dispatcher, "switchyard_breaker_open", pool="flaky") == 1
            and _value(dispatcher, "switchyard_provider_credit_exhausted", provider="broke") == 1
            and "switchyard_provider_check_healthy{" in await _scrape(http, t.urls["worker-openai"]))


# --- the series after traffic ----------------------------------------------------------------------------


async def test_requests_by_code_add_up_to_the_requests_sent_across_the_fleet(traffic: Traffic) -> None:
    sent = Counter("OK" if isinstance(r, Done) else r.code for r in traffic.replies)  # type: ignore[union-attr]
    assert sent == {"OK": 6, "RATE_LIMITED": 1, "BUDGET_EXCEEDED": 1, "NO_ROUTE": 1, "PROVIDER_ERROR": 1,
                    "PROVIDER_UNAVAILABLE": 1}, sent
    counted: Counter[str] = Counter()
    for role in ROLES[:-1]:
        for fam in text_string_to_metric_families(traffic.scrapes[role]):
            for s in fam.samples:
                if s.name == "switchyard_requests_total":
                    counted[s.labels["code"]] += int(s.value)
    assert counted == sent
    # Who ended which: refusals at the dispatcher (no pool), the rest at the pool that served them.
    v = traffic.value
    assert v("dispatcher", "switchyard_requests_total", pool="") == 3
    assert v("worker-openai", "switchyard_requests_total", use_case="draft", pool="openai", provider="openai",
             model="metered", code="OK") == 6
    assert v("worker-flaky", "switchyard_requests_total", use_case="flaky", code="PROVIDER_ERROR") == 1
    assert v("worker-broke", "switchyard_requests_total", use_case="broke", code="PROVIDER_UNAVAILABLE") == 1


async def test_the_dispatcher_counts_rate_and_budget_refusals_and_hand_overs(traffic: Traffic) -> None:
    v = traffic.value
    assert v("dispatcher", "switchyard_dispatcher_refusals_total", use_case="draft", code="RATE_LIMITED") == 1
    assert v("dispatcher", "switchyard_dispatcher_refusals_total", use_case="draft", code="BUDGET_EXCEEDED") == 1
    # A use case the config does not route is labelled `other`, so a producer cannot grow the label set.
    assert v("dispatcher", "switchyard_dispatcher_refusals_total", use_case="other", code="NO_ROUTE") == 1
    assert v("dispatcher", "switchyard_dispatched_total", use_case="draft", pool="openai") == 6
    assert v("dispatcher", "switchyard_dispatched_total", use_case="flaky", pool="flaky") == 1
    assert v("dispatcher", "switchyard_dispatched_total", use_case="broke", pool="broke") == 1


async def test_breakers_credit_replicas_and_provider_checks_as_the_processes_see_them(traffic: Traffic) -> None:
    v = traffic.value
    assert v("dispatcher", "switchyard_breaker_state", pool="flaky", state="open") == 1
    assert v("dispatcher", "switchyard_breaker_state", pool="flaky", state="closed") == 0
    assert v("dispatcher", "switchyard_breaker_state", pool="openai", state="closed") == 1
    assert v("dispatcher", "switchyard_breaker_open", pool="openai") == 0
    assert v("dispatcher", "switchyard_provider_credit_exhausted", provider="broke") == 1
    assert v("dispatcher", "switchyard_provider_credit_exhausted", provider="openai") == 0
    for pool in POOLS:
        assert v("dispatcher", "switchyard_pool_replicas", pool=pool) == 1
    # Each worker exports its own pool's breaker and its provider's credit.
    assert v("worker-flaky", "switchyard_breaker_open", pool="flaky") == 1
    assert v("worker-broke", "switchyard_provider_credit_exhausted", provider="broke") == 1
    assert v("worker-openai", "switchyard_breaker_state", pool="openai", state="closed") == 1
    assert "flaky" not in traffic.scrapes["worker-openai"]
    # The worker's periodic check of its provider (a models list, made at start).
    assert v("worker-openai", "switchyard_provider_check_healthy", pool="openai", provider="openai") == 1
    assert v("worker-openai", "switchyard_provider_check_latency_seconds", pool="openai") >= 0
    assert v("worker-openai", "switchyard_provider_check_timestamp_seconds", pool="openai") > 1.7e9


async def test_latency_ttft_tokens_cost_and_in_flight_of_a_pool(traffic: Traffic) -> None:
    done = [r for r in traffic.replies if isinstance(r, Done)]
    labels = {"use_case": "draft", "pool": "openai", "provider": "openai", "model": "metered"}
    v = traffic.value
    assert v("worker-openai", "switchyard_request_duration_seconds_count", **labels) == len(done)
    assert v("worker-openai", "switchyard_time_to_first_token_seconds_count", **labels) == len(done)
    # The held request alone waited 3 s for its first token.
    assert v("worker-openai", "switchyard_time_to_first_token_seconds_sum", **labels) >= 3.0
    assert v("worker-openai", "switchyard_request_duration_seconds_bucket", le="+Inf", **labels) == len(done)
    assert v("worker-openai", "switchyard_tokens_total", kind="input", **labels) == sum(
        d.usage.input_tokens for d in done)
    assert v("worker-openai", "switchyard_tokens_total", kind="output", **labels) == sum(
        d.usage.output_tokens for d in done)
    cost = sum(d.cost_usd or 0.0 for d in done)
    assert cost > 0.3 and v("worker-openai", "switchyard_cost_usd_total", **labels) == pytest.approx(cost)
    assert v("worker-openai", "switchyard_attempts_total", pool="openai", model="metered", code="OK") == len(done)
    assert v("worker-flaky", "switchyard_attempts_total", pool="flaky", code="PROVIDER_ERROR") == 1
    assert traffic.inflight_seen == 1
    assert v("worker-openai", "switchyard_pool_inflight", pool="openai") == 0
    assert v("worker-openai", "switchyard_pool_concurrency", pool="openai") == 8


async def test_the_auditor_counts_batches_rows_alerts_and_is_not_behind(traffic: Traffic) -> None:
    v = traffic.value
    assert v("auditor", "switchyard_audit_rows_written_total") == len(traffic.replies)
    assert v("auditor", "switchyard_budget_alerts_total", period="day") == 1
    # Every event and the alert came in some batch.
    assert v("auditor", "switchyard_audit_batch_size_sum") >= len(traffic.replies) + 1
    assert v("auditor", "switchyard_audit_batch_size_count") >= 1
    assert v("auditor", "switchyard_audit_dead_letters_total") == 0
    assert v("auditor", "switchyard_audit_lag_seconds") == 0
    assert v("auditor", "switchyard_audit_pending_events") == 0
    assert "switchyard_audit_batch_failures" in traffic.families("auditor")


async def test_no_label_carries_an_account_or_a_request_id(traffic: Traffic) -> None:
    ids = {r.id for r in traffic.replies}
    for role in ROLES:
        for fam in text_string_to_metric_families(traffic.scrapes[role]):
            for s in fam.samples:
                assert not {"account", "request_id", "id"} & set(s.labels), (role, s)
                assert not {"acme", "limited", "spender"} & set(s.labels.values()), (role, s)
                assert not ids & set(s.labels.values()), (role, s)


async def test_a_bad_http_request_is_answered_and_the_endpoint_serves_on(traffic: Traffic) -> None:
    url = httpx.URL(traffic.urls["dispatcher"])
    reader, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(b"\x16\x03\x01 not http at all\r\n\r\n")
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert status.startswith(b"HTTP/1.") and b" 400 " in status, status
    async with httpx.AsyncClient() as http:
        assert (await http.get(str(url.copy_with(path="/nope")), timeout=10)).status_code == 404
        assert "switchyard_requests_total" in await _scrape(http, str(url))


async def test_a_taken_port_is_one_config_error_naming_it() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]

        async def never() -> None:
            raise AssertionError("started although the port is taken")

        with pytest.raises(config_mod.ConfigError, match=rf"--metrics-port {port}: cannot listen on 127.0.0.1:{port}"):
            await metrics_mod.serving(DispatcherMetrics().registry, port, "127.0.0.1", never())


async def test_the_auditor_lag_is_the_age_of_the_oldest_event_it_holds_unwritten() -> None:
    m = AuditorMetrics()

    def event(age_s: float, pending: int) -> Msg:
        ns = int((time.time() - age_s) * 1e9)
        return Msg(_client=None, subject="llm.events.completed",  # type: ignore[arg-type]
                   reply=f"$JS.ACK.LLM_EVENTS.audit.1.{pending + 10}.{pending + 10}.{ns}.{pending}")

    def lag() -> float:
        return _value(generate_latest(m.registry).decode(), "switchyard_audit_lag_seconds")

    assert lag() == 0
    m.fetched([event(120, 7), event(30, 6)])
    assert lag() >= 120
    assert _value(generate_latest(m.registry).decode(), "switchyard_audit_pending_events") == 6
    m.failed(outage=True)  # PostgreSQL away: the events come back later, still unwritten
    m.idle()
    m.fetched([event(10, 0)])
    assert lag() >= 120
    m.settled()
    assert lag() == 0


# --- the dashboard and the alert rules -------------------------------------------------------------------

_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "inf", "nan", "le",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (label matchers, groupings, ranges and strings left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', " ", expr)  # strings
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word = m.group(0)
        rest = expr[m.end():].lstrip()
        if word.lower() in _PROMQL_WORDS or rest.startswith("("):  # a keyword or a function
            continue
        if re.fullmatch(r"\d+[smhdwy]", word) or (m.start() > 0 and expr[m.start() - 1].isdigit()):
            continue
        names.add(word)
    return names


def _exposed(traffic: Traffic) -> set[str]:
    """Every sample name some process exposes, or would once counted (a declared counter with no labels yet)."""
    names: set[str] = set()
    for role in ROLES:
        for fam in text_string_to_metric_families(traffic.scrapes[role]):
            names.update(s.name for s in fam.samples)
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(fam.type, [""])
            names.update(fam.name + suffix for suffix in suffixes)
    return names


async def test_metric_names_are_read_out_of_promql() -> None:
    assert metric_names('sum by (pool) (rate(switchyard_requests_total{code!="OK"}[5m])) / ignoring(x) '
                        "histogram_quantile(0.95, sum by (le) (rate(a_bucket[1h]))) > 2") == {
        "switchyard_requests_total", "a_bucket"}


async def test_every_series_the_dashboard_queries_is_exposed(traffic: Traffic) -> None:
    board = json.loads((REPO / "deploy/grafana/switchyard.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    titles = " ".join(p.get("title", "") for p in board["panels"]).lower()
    for topic in ("throughput", "errors", "latency", "cost per hour", "saturation", "lag"):
        assert topic in titles, topic
    assert len(exprs) >= 6
    exposed = _exposed(traffic)
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        assert names <= exposed, (expr, names - exposed)


async def test_every_alert_rule_parses_and_names_exposed_series(traffic: Traffic) -> None:
    rules = yaml.safe_load((REPO / "deploy/prometheus/alerts.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert {"SwitchyardPoolBreakerOpen", "SwitchyardAuditLagGrowing", "SwitchyardBudgetAlert",
            "SwitchyardAuditorBehind"} <= set(alerts)
    exposed = _exposed(traffic) | {"up"}  # `up` is Prometheus's own, one per scraped target
    for name, rule in alerts.items():
        names = metric_names(rule["expr"])
        assert names and names <= exposed, (name, names - exposed)
        assert rule["annotations"]["summary"], name
    scrape = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    assert "alerts.yml" in scrape["rule_files"]
    jobs = {c["job_name"] for c in scrape["scrape_configs"]}
    assert {"switchyard-dispatcher", "switchyard-worker", "switchyard-auditor"} <= jobs
