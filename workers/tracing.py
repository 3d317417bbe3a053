"""OpenTelemetry traces across the hops: producer → dispatcher → worker (one span per attempt) → provider call.

Off unless the standard `OTEL_*` variables name an exporter (see `from_env`): then every method here is a
check of one attribute and hands out `trace.INVALID_SPAN`, a shared no-op; no span object is made. The
producer's W3C `traceparent`/`tracestate` headers are passed along the hops either way, so that the
completion event (and the audit row) keeps the producer's trace id even with the fleet's tracing off.

The trace context travels in NATS headers, never in a body: the dispatcher reads the request's headers and
puts its own span's context on the work item it forwards; a worker starts its attempt span from the work
item's headers and hands the same headers on to the next target on a fallback, so that every attempt is
a child of the dispatcher's span. The provider call is a child of its attempt.

The tracer provider is built per process and passed in (dependency injection), never installed as the
OpenTelemetry global: a process embedding the fleet keeps its own.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from router.config import ConfigError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

DISPATCH_SPAN = "switchyard.dispatch"
ATTEMPT_SPAN = "switchyard.attempt"
PROVIDER_CALL_SPAN = "switchyard.provider_call"

_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_MAX_TRACESTATE = 512
"""W3C trace context: a vendor may drop a longer tracestate; we do not pass one on."""

_EXPORTERS = ("otlp", "console", "none")
_PROTOCOLS = ("http/protobuf",)

_propagator = TraceContextTextMapPropagator()
_off_span: contextlib.nullcontext[Span] = contextlib.nullcontext(INVALID_SPAN)
"""What every span method hands out when tracing is off: one shared object, nothing made per call."""


def valid_traceparent(value: str | None) -> str | None:
    """The trace id of a well-formed W3C `traceparent` value (version 00 and later), else None."""
    if value is None or len(value) < 55:
        return None
    m = _TRACEPARENT.match(value)
    if m is None or value[:2] == "ff" or (len(value) > 55 and (value[:2] == "00" or value[55] != "-")):
        return None
    trace_id, span_id = m.group(1), m.group(2)
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return trace_id


def _incoming(headers: Mapping[str, str] | None) -> tuple[str | None, str | None]:
    """The valid `traceparent` of a message's headers and its `tracestate` (None when absent, invalid or too long)."""
    if not headers:
        return None, None
    parent = headers.get(TRACEPARENT)
    if valid_traceparent(parent) is None:
        return None, None
    state = headers.get(TRACESTATE)
    return parent, state if state is not None and len(state) <= _MAX_TRACESTATE else None


class Tracing:
    """One process's tracer, or none (`Tracing.off()`)."""

    def __init__(self, provider: TracerProvider | None, *, flush_timeout_ms: int = 5000) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("switchyard") if provider is not None else None
        self.on = self.tracer is not None
        self._flush_timeout_ms = flush_timeout_ms

    @classmethod
    def off(cls) -> Tracing:
        return cls(None)

    def shutdown(self) -> None:
        """Export what is buffered and stop the exporter (at process end). Never raises."""
        if self.provider is not None:
            with contextlib.suppress(Exception):
                self.provider.force_flush(self._flush_timeout_ms)
                self.provider.shutdown()

    @contextlib.contextmanager
    def _span(
        self, name: str, kind: SpanKind, context: Context | None, attributes: Mapping[str, AttributeValue]
    ) -> Iterator[Span]:
        assert self.tracer is not None
        # Exceptions are recorded by their type only: a message could quote a provider's answer.
        with self.tracer.start_as_current_span(name, context=context, kind=kind, attributes=attributes,
                                               record_exception=False, set_status_on_exception=False) as span:
            try:
                yield span
            except BaseException as exc:
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                span.set_attribute("error.type", type(exc).__name__)
                raise

    def consume(
        self, name: str, headers: Mapping[str, str] | None, attributes: Mapping[str, AttributeValue]
    ) -> contextlib.AbstractContextManager[Span]:
        """A span for one message taken from a stream, the current span inside the `with`: a child of the
        message's `traceparent` when it has a valid one, else the root of a new trace (never a child of
        whatever span happens to be current)."""
        if self.tracer is None:
            return _off_span
        parent, state = _incoming(headers)
        ctx = Context()
        if parent is not None:
            carrier = {TRACEPARENT: parent, TRACESTATE: state} if state else {TRACEPARENT: parent}
            ctx = _propagator.extract(carrier, context=ctx)
        return self._span(name, SpanKind.CONSUMER, ctx, attributes)

    def child(
        self, name: str, attributes: Mapping[str, AttributeValue], *, kind: SpanKind = SpanKind.INTERNAL
    ) -> contextlib.AbstractContextManager[Span]:
        """A child of the current span (the one `consume` made)."""
        if self.tracer is None:
            return _off_span
        return self._span(name, kind, None, attributes)

    def call(self, name: str, attributes: Mapping[str, AttributeValue]) -> contextlib.AbstractContextManager[Span]:
        """A child of the current span for a call to another service (a provider's HTTP API)."""
        if self.tracer is None:
            return _off_span
        return self._span(name, SpanKind.CLIENT, None, attributes)

    def current(self) -> Span:
        """The span `consume` made for the message this task handles (a no-op span when tracing is off)."""
        return trace.get_current_span() if self.tracer is not None else INVALID_SPAN

    def failed(self, code: str) -> None:
        """Mark the current span as ended in an error with our error `code` (a no-op when tracing is off)."""
        span = self.current()
        if span.is_recording():
            span.set_attribute("error.type", code)
            span.set_status(Status(StatusCode.ERROR, code))

    def inject(self, out: dict[str, str], incoming: Mapping[str, str] | None) -> None:
        """Put the current span's context on a message forwarded from the one with headers `incoming`; with
        tracing off, pass the incoming context on unchanged."""
        if self.tracer is not None:
            span = trace.get_current_span()
            if span.get_span_context().is_valid:
                _propagator.inject(out)
                return
        self.pass_on(out, incoming)

    def pass_on(self, out: dict[str, str], incoming: Mapping[str, str] | None) -> None:
        """Pass the incoming context on unchanged (a worker handing a work item to the next target: every attempt
        is a child of the dispatcher's span); when there was none but this process started a trace, its own."""
        parent, state = _incoming(incoming)
        if parent is not None:
            out[TRACEPARENT] = parent
            if state:
                out[TRACESTATE] = state
        elif self.tracer is not None and trace.get_current_span().get_span_context().is_valid:
            _propagator.inject(out)

    def trace_id(self, incoming: Mapping[str, str] | None) -> str | None:
        """The id of the request's trace (32 hex digits) for its completion event: the current span's when this
        process traces, else the incoming `traceparent`'s; None when there is neither."""
        if self.tracer is not None:
            ctx = trace.get_current_span().get_span_context()
            if ctx.is_valid:
                return format(ctx.trace_id, "032x")
        return valid_traceparent(_incoming(incoming)[0])


def from_env(environ: Mapping[str, str], service: str, **resource: AttributeValue) -> Tracing:
    """The tracing the standard OpenTelemetry variables ask for; off when they ask for none.

    On when `OTEL_TRACES_EXPORTER` names `otlp` or `console` (comma-separated, both allowed), or when it is
    unset and `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (then `otlp`).
    Off when none of these is set, when it is `none`, or when `OTEL_SDK_DISABLED` is `true`. The OTLP
    exporter speaks `http/protobuf` and reads its own variables (endpoint, headers, timeout, compression,
    certificates); `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` name the process (default
    `service`), `OTEL_TRACES_SAMPLER`/`_ARG` pick the sampler (default: follow the producer's sampled flag,
    sample every trace the fleet starts), `OTEL_BSP_*` tune the batch processor.

    Raises ConfigError naming the variable for a value this build cannot honour.
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return Tracing.off()
    named = environ.get("OTEL_TRACES_EXPORTER")
    if named is None or not named.strip():
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        exporters = ["otlp"] if endpoint else []
    else:
        exporters = [e.strip().lower() for e in named.split(",") if e.strip()]
        unknown = [e for e in exporters if e not in _EXPORTERS]
        if unknown:
            raise ConfigError(f"OTEL_TRACES_EXPORTER: {unknown[0]!r} is not an exporter of this build"
                              f" (use {', '.join(_EXPORTERS)})")
        if "none" in exporters:
            if len(exporters) > 1:
                raise ConfigError("OTEL_TRACES_EXPORTER: 'none' cannot be combined with another exporter")
            exporters = []
    if not exporters:
        return Tracing.off()
    if "otlp" in exporters:
        for var in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            protocol = environ.get(var)
            if protocol:
                if protocol.strip() not in _PROTOCOLS:
                    raise ConfigError(f"{var}: {protocol.strip()[:40]!r} is not supported by this build"
                                      f" (use {', '.join(_PROTOCOLS)})")
                break

    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    attrs: dict[str, AttributeValue] = dict(resource)
    if not environ.get("OTEL_SERVICE_NAME") and "service.name=" not in environ.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        attrs["service.name"] = service
    provider = TracerProvider(resource=Resource.create(attrs))
    for name in dict.fromkeys(exporters):
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:  # console: stderr, since stdout carries the process's JSON log lines
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
    return Tracing(provider)
