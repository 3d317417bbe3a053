"""OpenTelemetry traces across the hops: producer → dispatcher → attempt(s) → provider call, and the audit row's
trace id. The fleet's spans go to an in-memory exporter; the producer has a tracer provider of its own, as an
application using the client library would."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import msgspec
import pytest
from aiohttp import web
from nats.aio.client import Client as NATS
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.span import NonRecordingSpan

from router import config as config_mod
from router.client import Client, Message, SwitchyardError
from router.config import ConfigError
from router.providers.fakes import FakeOpenAI, Scenario
from schemas import Done, decode_event, decode_work
from schemas import decode_reply as decode_reply_data
from workers.runtime import ensure_topology
from workers.tracing import ATTEMPT_SPAN, DISPATCH_SPAN, PROVIDER_CALL_SPAN, Tracing, from_env, valid_traceparent

from .conftest import fleet_config, free_port, running_fleet
from .helpers import audit_row


@pytest.fixture
async def two_fakes() -> AsyncIterator[tuple[FakeOpenAI, FakeOpenAI]]:
    first, second = FakeOpenAI(), FakeOpenAI()
    await first.start()
    await second.start()
    first.scenarios["down"] = Scenario(status=500)  # only the first target fails: the second serves
    yield first, second
    await first.stop()
    await second.stop()


def _config(fakes: tuple[FakeOpenAI, FakeOpenAI]) -> Any:
    cfg = fleet_config({"openai": fakes[0].url + "/v1", "backup": fakes[1].url + "/v1"})
    cfg.routes["draft"]["default"] = ["openai:gpt-4o-mini", "backup:gpt-4o-mini"]
    return cfg


def _hex(n: int, width: int) -> str:
    return format(n, f"0{width}x")


async def _spans_until(
    exporter: InMemorySpanExporter, ready: Callable[[list[ReadableSpan]], bool]
) -> list[ReadableSpan]:
    """The finished spans once `ready` says all are there (a span ends just after the reply and the event)."""
    end = asyncio.get_running_loop().time() + 20
    while True:
        spans = list(exporter.get_finished_spans())
        if ready(spans) or asyncio.get_running_loop().time() > end:
            return spans
        await asyncio.sleep(0.05)


def _by_trace(spans: list[ReadableSpan], trace_id: int) -> list[ReadableSpan]:
    assert all(s.context is not None for s in spans)
    return sorted((s for s in spans if s.context and s.context.trace_id == trace_id), key=lambda s: s.start_time or 0)


def _named(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def _parent_of(span: ReadableSpan) -> int | None:
    return int(span.parent.span_id) if span.parent is not None else None


def _id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


async def test_one_trace_per_request_across_dispatcher_attempts_and_provider_calls(
    nats_url: str, two_fakes: tuple[FakeOpenAI, FakeOpenAI], db: asyncpg.Pool, nc: NATS
) -> None:
    fleet_spans = InMemorySpanExporter()
    fleet_provider = TracerProvider()
    fleet_provider.add_span_processor(SimpleSpanProcessor(fleet_spans))
    producer_spans = InMemorySpanExporter()
    producer = TracerProvider()
    producer.add_span_processor(SimpleSpanProcessor(producer_spans))
    tracer = producer.get_tracer("a-producer")
    ids = {k: uuid.uuid4().hex for k in ("plain", "fallback", "untraced", "refused")}
    hi = [Message(role="user", content="hello")]
    async with running_fleet(nats_url, _config(two_fakes), db, tracing=Tracing(fleet_provider)):
        client = await Client.connect(nc)
        with tracer.start_as_current_span("producer", kind=SpanKind.PRODUCER) as plain:
            done = await client.complete("draft", "acme", hi, id=ids["plain"])
        with tracer.start_as_current_span("producer", kind=SpanKind.PRODUCER) as fallback:
            fell = await client.complete("draft", "acme", [Message(role="user", content="[[fake:down]]")],
                                         id=ids["fallback"])
        untraced = await client.complete("draft", "acme", hi, id=ids["untraced"])  # no current span: no header
        with tracer.start_as_current_span("producer", kind=SpanKind.PRODUCER) as refused:
            with pytest.raises(SwitchyardError) as no_route:
                await client.complete("nowhere", "acme", hi, id=ids["refused"])
        rows = {k: await audit_row(db, rid) for k, rid in ids.items()}
        # plain 3 spans, fallback 1 + (1 + 2 calls) + (1 + 1 call), untraced 3, refused 1: 13
        spans = await _spans_until(fleet_spans, lambda s: len(s) >= 13)
        await client.close()
    assert isinstance(done, Done) and done.provider == "openai"
    assert isinstance(fell, Done) and [(a.pool, a.error) for a in fell.attempts] == [
        ("openai", "PROVIDER_ERROR"), ("backup", None)]
    assert isinstance(untraced, Done)
    assert no_route.value.code.value == "NO_ROUTE"
    assert len(spans) == 13

    # The producer's request: its span is the parent of the dispatcher's, then attempt, then provider call.
    trace_id = plain.get_span_context().trace_id
    hops = _by_trace(spans, trace_id)
    assert [s.name for s in hops] == [DISPATCH_SPAN, ATTEMPT_SPAN, PROVIDER_CALL_SPAN]  # in order of start
    dispatch, attempt, call = hops
    assert _parent_of(dispatch) == plain.get_span_context().span_id
    assert _parent_of(attempt) == _id(dispatch)
    assert _parent_of(call) == _id(attempt)
    assert dispatch.kind is SpanKind.CONSUMER and call.kind is SpanKind.CLIENT
    assert dispatch.attributes is not None and attempt.attributes is not None and call.attributes is not None
    assert dispatch.attributes["switchyard.request_id"] == ids["plain"]
    assert tuple(dispatch.attributes["switchyard.route"]) == ("openai:gpt-4o-mini", "backup:gpt-4o-mini")  # type: ignore[arg-type]
    assert (attempt.attributes["switchyard.pool"], attempt.attributes["gen_ai.request.model"]) == (
        "openai", "gpt-4o-mini")
    assert attempt.attributes["switchyard.attempt"] == 1 and attempt.attributes["switchyard.retries"] == 0
    assert "switchyard.fallback_reason" not in attempt.attributes
    assert call.attributes["server.address"] == "127.0.0.1" and call.attributes["gen_ai.usage.output_tokens"] != 0
    assert rows["plain"]["trace_id"] == _hex(trace_id, 32)

    # A fallback: two attempt spans under the dispatcher's, the first failed after a retry (two calls).
    trace_id = fallback.get_span_context().trace_id
    hops = _by_trace(spans, trace_id)
    [dispatch] = _named(hops, DISPATCH_SPAN)
    first, second = _named(hops, ATTEMPT_SPAN)
    assert _parent_of(dispatch) == fallback.get_span_context().span_id
    assert _parent_of(first) == _parent_of(second) == _id(dispatch)
    assert first.attributes is not None and second.attributes is not None
    assert (first.attributes["switchyard.pool"], second.attributes["switchyard.pool"]) == ("openai", "backup")
    assert first.status.status_code is StatusCode.ERROR and first.attributes["error.type"] == "PROVIDER_ERROR"
    assert first.attributes["switchyard.retries"] == 1
    assert first.attributes["switchyard.fell_back_to"] == "backup:gpt-4o-mini"
    assert second.status.status_code is not StatusCode.ERROR
    assert (second.attributes["switchyard.attempt"], second.attributes["switchyard.fallback_reason"]) == (
        2, "PROVIDER_ERROR")
    calls = _named(hops, PROVIDER_CALL_SPAN)
    assert [_parent_of(c) for c in calls] == [_id(first), _id(first), _id(second)]
    assert [c.attributes["http.response.status_code"] for c in calls[:2] if c.attributes] == [500, 500]
    assert [c.attributes["error.type"] for c in calls[:2] if c.attributes] == ["PROVIDER_ERROR"] * 2
    assert calls[2].status.status_code is not StatusCode.ERROR
    assert dispatch.start_time is not None and first.start_time is not None and second.start_time is not None
    assert dispatch.start_time <= first.start_time <= second.start_time
    assert rows["fallback"]["trace_id"] == _hex(trace_id, 32)

    # No producer context: the dispatcher's span starts the trace, and the audit row names it.
    roots = [s for s in spans if s.name == DISPATCH_SPAN and s.parent is None]
    [root] = roots
    assert root.attributes is not None and root.attributes["switchyard.request_id"] == ids["untraced"]
    assert root.context is not None
    assert [s.name for s in _by_trace(spans, root.context.trace_id)] == [DISPATCH_SPAN, ATTEMPT_SPAN,
                                                                         PROVIDER_CALL_SPAN]
    assert rows["untraced"]["trace_id"] == _hex(root.context.trace_id, 32)

    # A refusal: the dispatcher's span says why, the refusal's audit row keeps the producer's trace.
    trace_id = refused.get_span_context().trace_id
    [dispatch] = _by_trace(spans, trace_id)
    assert dispatch.status.status_code is StatusCode.ERROR and dispatch.attributes is not None
    assert dispatch.attributes["error.type"] == "NO_ROUTE"
    assert rows["refused"]["trace_id"] == _hex(trace_id, 32)

    # One trace per request, and nothing else.
    assert len({s.context.trace_id for s in spans if s.context}) == 4
    assert len(producer_spans.get_finished_spans()) == 3


async def _publish(nc: NATS, body: dict[str, Any], headers: dict[str, str]) -> None:
    await nc.jetstream().publish(f"llm.req.draft.{body['account']}", msgspec.json.encode(body),
                                 headers={"Nats-Msg-Id": f"{body['account']}:{body['id']}", **headers})


def _body(inbox: str) -> dict[str, Any]:
    rid = uuid.uuid4().hex
    return {"id": rid, "account": "acme", "messages": [{"role": "user", "content": "hi"}], "reply_to": f"{inbox}.{rid}"}


async def test_tracing_off_makes_no_span_and_passes_the_producer_context_on(
    nats_url: str, fake_openai: FakeOpenAI, db: asyncpg.Pool, nc: NATS, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[object] = []
    for cls in (SdkSpan, NonRecordingSpan):
        init = cls.__init__

        def counting(self: Any, *args: Any, _init: Any = init, **kwargs: Any) -> None:
            made.append(self)
            _init(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", counting)
    parent = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"
    cfg = fleet_config({"openai": fake_openai.url + "/v1"})
    inbox = f"_INBOX.{uuid.uuid4().hex}"  # nobody listens: the audit rows say how each request ended
    # A dispatcher alone: the work item it forwards carries the producer's traceparent and tracestate unchanged.
    async with running_fleet(nats_url, cfg, None, pools=[]):
        traced, bare = _body(inbox), _body(inbox)
        await _publish(nc, traced, {"traceparent": parent, "tracestate": "vendor=opaque"})
        await _publish(nc, bare, {})
        work = await nc.jetstream().pull_subscribe_bind("pool-openai", "LLM_WORK")
        items: list[Any] = []
        while len(items) < 2:
            items += await work.fetch(2 - len(items), timeout=10)
        headers = {decode_work(m.data).request.id: m.headers or {} for m in items}
        for m in items:
            await m.nak()
        await work.unsubscribe()
    assert headers[traced["id"]].get("traceparent") == parent
    assert headers[traced["id"]].get("tracestate") == "vendor=opaque"
    assert "traceparent" not in headers[bare["id"]]

    # The whole fleet, tracing off: served as ever, the audit row keeps the producer's trace id.
    async with running_fleet(nats_url, cfg, db):
        rows = [await audit_row(db, traced["id"]), await audit_row(db, bare["id"])]
    assert rows[0]["status"] == "ok" and rows[0]["trace_id"] == parent.split("-")[1]
    assert rows[1]["status"] == "ok" and rows[1]["trace_id"] is None
    assert made == []  # no span object, recording or not, anywhere on the way

    # The counting above can see a span: tracing on makes them.
    on = TracerProvider()
    with Tracing(on).consume(DISPATCH_SPAN, {"traceparent": parent}, {}):
        pass
    assert made


def test_traceparent_is_checked_before_it_is_passed_on() -> None:
    good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert valid_traceparent(good) == "4bf92f3577b34da6a3ce929d0e0e4736"
    for bad in (None, "", good.upper(), good[:-1], good + "-x", "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01", "ff" + good[2:]):
        assert valid_traceparent(bad) is None, bad
    assert valid_traceparent("01" + good[2:] + "-later") == "4bf92f3577b34da6a3ce929d0e0e4736"  # a later version
    out: dict[str, str] = {}
    Tracing.off().pass_on(out, {"traceparent": "garbage", "tracestate": "a=b"})
    assert out == {}
    Tracing.off().pass_on(out, {"traceparent": good, "tracestate": "a=" + "b" * 600})  # too long: dropped
    assert out == {"traceparent": good}
    assert Tracing.off().trace_id({"traceparent": good}) == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_completion_events_without_a_trace_id_still_decode() -> None:
    old = {"v": 1, "id": "r1", "account": "acme", "use_case": "draft", "status": "ok", "started_ms": 1,
           "finished_ms": 2}
    assert decode_event(msgspec.json.encode(old)).trace_id is None
    assert decode_event(msgspec.json.encode({**old, "trace_id": "ab" * 16})).trace_id == "ab" * 16
    with pytest.raises(msgspec.ValidationError):
        decode_event(msgspec.json.encode({**old, "trace_id": "not-a-trace-id"}))


def test_the_otel_variables_turn_tracing_on_or_say_what_is_wrong() -> None:
    assert not from_env({}, "switchyard-dispatcher").on
    assert not from_env({"OTEL_TRACES_EXPORTER": "none"}, "x").on
    assert not from_env({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"}, "x").on
    on = from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, "switchyard-worker", pool="p")
    assert on.on and on.provider is not None
    assert on.provider.resource.attributes["service.name"] == "switchyard-worker"
    on.shutdown()
    named = from_env({"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "mine"}, "switchyard-worker")
    assert named.on and named.provider is not None
    named.shutdown()
    for env, word in (({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
                      ({"OTEL_TRACES_EXPORTER": "none,otlp"}, "OTEL_TRACES_EXPORTER"),
                      ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
                       "OTEL_EXPORTER_OTLP_PROTOCOL")):
        with pytest.raises(ConfigError, match=word):
            from_env(env, "x")


async def test_otlp_export_reaches_the_configured_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    bodies: list[bytes] = []

    async def collect(request: web.Request) -> web.Response:
        bodies.append(await request.read())
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/v1/traces", collect)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        # The exporter reads its own variables from the process's environment.
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
        traced = from_env(dict(os.environ), "switchyard-dispatcher")
        parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        with traced.consume(DISPATCH_SPAN, {"traceparent": parent}, {"switchyard.request_id": "r1"}):
            pass
        await asyncio.to_thread(traced.shutdown)  # flushes; the exporter's HTTP call blocks its thread
    finally:
        await runner.cleanup()
    assert bodies
    sent = ExportTraceServiceRequest.FromString(bodies[0])
    [span] = [s for r in sent.resource_spans for ss in r.scope_spans for s in ss.spans]
    assert span.name == DISPATCH_SPAN and span.trace_id.hex() == "4bf92f3577b34da6a3ce929d0e0e4736"
    service = {a.key: a.value.string_value for a in sent.resource_spans[0].resource.attributes}["service.name"]
    assert service == "switchyard-dispatcher"


class _OtlpSink:
    """A local OTLP/HTTP traces endpoint that keeps every span it is sent, with its service's name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Any, Any]] = []  # (service.name, resource attributes, span)
        self.port = free_port()

    async def _collect(self, request: web.Request) -> web.Response:
        sent = ExportTraceServiceRequest.FromString(await request.read())
        for rs in sent.resource_spans:
            attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
            self.spans += [(attrs.get("service.name", ""), attrs, s) for ss in rs.scope_spans for s in ss.spans]
        return web.Response(status=200)

    async def __aenter__(self) -> _OtlpSink:
        app = web.Application()
        app.router.add_post("/v1/traces", self._collect)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


def _start(roles: list[list[str]], cfg_file: Any, env: dict[str, str]) -> list[subprocess.Popen[bytes]]:
    cmd = [sys.executable, "-m", "workers.cli"]
    return [subprocess.Popen([*cmd, *role, "--config", str(cfg_file)], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for role in roles]


async def test_fleet_processes_export_one_trace_over_otlp(
    nats_url: str, fake_openai: FakeOpenAI, nc: NATS, tmp_path: Any
) -> None:
    """`switchyard dispatcher` and `switchyard worker` as processes, configured by the OTEL_* variables alone."""

    cfg = fleet_config({"openai": fake_openai.url + "/v1"})
    await ensure_topology(nc.jetstream(), cfg)
    cfg_file = tmp_path / "config.json"
    cfg_file.write_bytes(config_mod.encode(cfg))
    async with _OtlpSink() as sink:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_") and k != "DATABASE_URL"}
        env.update({"NATS_URL": nats_url, "SWITCHYARD_LOG_LEVEL": "warning", "SY_TEST_OPENAI_KEY": "sk-test",
                    "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.port}", "OTEL_BSP_SCHEDULE_DELAY": "100"})
        procs = _start([["dispatcher"], ["worker", "--pool", "openai"]], cfg_file, env)
        try:
            trace_id, parent_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
            inbox = f"_INBOX.{uuid.uuid4().hex}"
            got: asyncio.Queue[Any] = asyncio.Queue()
            sub = await nc.subscribe(f"{inbox}.*", cb=got.put)
            body = _body(inbox)
            await _publish(nc, body, {"traceparent": f"00-{trace_id}-{parent_span}-01"})
            reply = decode_reply_data((await asyncio.wait_for(got.get(), 60)).data)
            await sub.unsubscribe()
            end = asyncio.get_running_loop().time() + 30
            while len([s for s in sink.spans if s[2].trace_id.hex() == trace_id]) < 3:
                assert asyncio.get_running_loop().time() < end, f"spans received: {sink.spans}"
                await asyncio.sleep(0.1)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                await asyncio.to_thread(p.wait, 10)
    assert isinstance(reply, Done)
    ours = {s.name: (service, attrs, s) for service, attrs, s in sink.spans if s.trace_id.hex() == trace_id}
    assert set(ours) == {DISPATCH_SPAN, ATTEMPT_SPAN, PROVIDER_CALL_SPAN}
    d_service, _, dispatch = ours[DISPATCH_SPAN]
    w_service, w_attrs, attempt = ours[ATTEMPT_SPAN]
    c_service, _, call = ours[PROVIDER_CALL_SPAN]
    assert (d_service, w_service, c_service) == ("switchyard-dispatcher", "switchyard-worker", "switchyard-worker")
    assert w_attrs["switchyard.pool"] == "openai"
    assert dispatch.parent_span_id.hex() == parent_span
    assert attempt.parent_span_id == dispatch.span_id and call.parent_span_id == attempt.span_id
