"""What the Prometheus metrics (workers/metrics.py) cost: the calls made for one request, and one scrape.

    .venv/bin/python bench/bench_metrics.py [--requests 20000] [--rounds 5]

No NATS: the metric calls the dispatcher and a worker make for one request that succeeds on its first
target, in their order (the dispatcher's hand-over, the worker's attempt and its end with tokens, latency,
time to first token and cost), CPU of this process per request, best of --rounds runs. Then the CPU one
scrape takes (`generate_latest`, which the /metrics handler runs on the event loop) for a worker whose
series cover many use cases and models, and for the dispatcher's health view of many pools.
The markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

from machine import cpu_model, version  # bench/ is on sys.path when a bench runs
from prometheus_client import generate_latest

from router import config as config_mod
from router.config import Config
from schemas import Request, Target, Usage, WorkItem
from workers.metrics import OK, DispatcherMetrics, WorkerMetrics


def _config(use_cases: int, models: int) -> Config:
    return config_mod.from_mapping({
        "providers": {"openai": {"format": "openai", "base_url": "http://127.0.0.1:1/v1"}},
        "pools": {"openai": {"provider": "openai"}},
        "routes": {f"uc{u}": {"default": [f"openai:m{m}" for m in range(models)]} for u in range(use_cases)},
    })


def per_request(requests: int, rounds: int) -> float:
    """µs of CPU for the metric calls of one request (best round)."""
    cfg = _config(6, 3)
    dm, wm = DispatcherMetrics(), WorkerMetrics("openai")
    now = int(time.time() * 1000)
    work = WorkItem(request=Request(id="r", account="acme", use_case="uc1", messages=[], reply_to="_INBOX.x"),
                    route=[Target(pool="openai", model="m1")], accepted_ms=now - 900)
    usage = Usage(input_tokens=212, output_tokens=96, cache_read_tokens=8)
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(requests):
            dm.handed(cfg, "uc1", "openai")
            wm.attempted(cfg, "openai", "m1", OK)
            wm.ended(cfg, work, "openai", OK, usage, 0.000692, now - 500)
        best = min(best, (time.process_time() - start) / requests * 1e6)
    return best


def scrape_ms(fill: Callable[[], bytes], rounds: int) -> tuple[float, int]:
    """ms of CPU for one scrape (best round) and the number of sample lines."""
    best, lines = float("inf"), 0
    for _ in range(rounds):
        start = time.process_time()
        text = fill()
        best = min(best, (time.process_time() - start) * 1000)
        lines = sum(1 for line in text.splitlines() if line and not line.startswith(b"#"))
    return best, lines


def worker_scrape(use_cases: int, models: int) -> Callable[[], bytes]:
    cfg = _config(use_cases, models)
    wm = WorkerMetrics("openai")
    now = int(time.time() * 1000)
    for u in range(use_cases):
        for m in range(models):
            work = WorkItem(request=Request(id="r", account="a", use_case=f"uc{u}", messages=[], reply_to="_INBOX.x"),
                            route=[Target(pool="openai", model=f"m{m}")], accepted_ms=now - 900)
            wm.ended(cfg, work, "openai", OK, Usage(input_tokens=1, output_tokens=1), 0.001, now - 500)
            wm.ended(cfg, work, "openai", "PROVIDER_ERROR", Usage(), None, None)
    return lambda: generate_latest(wm.registry)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    us = per_request(args.requests, args.rounds)
    small_ms, small_lines = scrape_ms(worker_scrape(6, 3), args.rounds)
    big_ms, big_lines = scrape_ms(worker_scrape(30, 10), args.rounds)
    print(f"{cpu_model()}, Python {platform.python_version()}, prometheus-client {version('prometheus-client')}\n")
    print("| what | cost |\n|---|---|")
    print(f"| the metric calls of one request (dispatcher and worker) | {us:.1f} µs CPU |")
    print(f"| one scrape of a worker, 6 use cases × 3 models ({small_lines} samples) | {small_ms:.2f} ms CPU |")
    print(f"| one scrape of a worker, 30 use cases × 10 models ({big_lines} samples) | {big_ms:.2f} ms CPU |")


if __name__ == "__main__":
    main()
