"""What tracing (workers/tracing.py) costs a request, off and on, in CPU per request. No NATS: the calls that
the dispatcher and a worker make for one request that succeeds on its first target, in the order they make them.

    .venv/bin/python bench/bench_tracing.py [--requests 5000] [--rounds 5]

Per case, the best of --rounds runs of --requests requests (µs per request, CPU of this process):
  off, no traceparent     tracing off and a producer that sends no trace context
  off, traceparent        tracing off, the producer's traceparent/tracestate passed on and its trace id read
  on, traceparent         tracing on: the dispatcher's, the attempt's and the provider call's spans with the
                          attributes the code sets, ended into a batch span processor whose exporter drops them
  on, unsampled parent    tracing on, the producer's sampled flag 0: spans made but not recorded
The markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time
from collections.abc import Callable, Mapping, Sequence

from machine import cpu_model, version  # bench/ is on sys.path when a bench runs
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from workers.tracing import ATTEMPT_SPAN, DISPATCH_SPAN, PROVIDER_CALL_SPAN, Tracing

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
UNSAMPLED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"


class _Drop(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def one_request(t: Tracing, incoming: Mapping[str, str]) -> None:
    """The tracing calls of workers/dispatcher.py and workers/provider.py for one request, in their order."""
    # dispatcher: handle(), _traced(), inject() and the route attribute
    with t.consume(DISPATCH_SPAN, incoming, {"messaging.system": "nats", "messaging.destination.name": "llm.req.d.a",
                                              "messaging.nats.num_delivered": 1}) if t.on else contextlib.nullcontext():
        if t.on:
            t.current().set_attributes({"switchyard.request_id": "r", "switchyard.account": "acme",
                                        "switchyard.use_case": "draft", "switchyard.tier": "default"})
        work = {"Nats-Msg-Id": "acme:r"}
        t.inject(work, incoming)
        if t.on:
            t.current().set_attribute("switchyard.route", ["openai:gpt-4o-mini"])
    # worker: the attempt span, the trace id for the event, the provider call, the attempt's outcome
    with t.consume(ATTEMPT_SPAN, work, {"messaging.system": "nats", "switchyard.pool": "openai",
                                        "switchyard.attempt": 1}) if t.on else contextlib.nullcontext():
        t.trace_id(work)
        if t.on:
            with t.call(PROVIDER_CALL_SPAN, {"gen_ai.system": "openai", "server.address": "api.openai.com",
                                             "switchyard.try": 1}) as span:
                span.set_attributes({"gen_ai.usage.input_tokens": 12, "gen_ai.usage.output_tokens": 40})
            t.current().set_attribute("switchyard.retries", 0)


def measure(run: Callable[[], None], requests: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(requests):
            run()
        best = min(best, (time.process_time() - start) / requests)
    return best * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_Drop(), max_queue_size=100_000))
    off, on = Tracing.off(), Tracing(provider)
    cases = [
        ("off, no traceparent", off, {"Nats-Msg-Id": "acme:r"}),
        ("off, traceparent", off, {"Nats-Msg-Id": "acme:r", "traceparent": PARENT, "tracestate": "v=1"}),
        ("on, traceparent", on, {"Nats-Msg-Id": "acme:r", "traceparent": PARENT, "tracestate": "v=1"}),
        ("on, unsampled parent", on, {"Nats-Msg-Id": "acme:r", "traceparent": UNSAMPLED}),
    ]
    print(f"{cpu_model()}, Python {platform.python_version()}, opentelemetry-sdk {version('opentelemetry-sdk')},"
          f" {args.requests} requests, best of {args.rounds}\n")
    print("| case | µs CPU per request |")
    print("|---|---|")
    for name, t, incoming in cases:
        print(f"| {name} | {measure(lambda t=t, i=incoming: one_request(t, i), args.requests, args.rounds):.1f} |")
    on.shutdown()


if __name__ == "__main__":
    main()
