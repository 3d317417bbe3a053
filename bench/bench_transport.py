"""Which HTTP transport should the provider workers use? Measure it.

A FakeOpenAI server (zero delays) runs in its own process, so its CPU is not counted
against the client. In this process, under uvloop, each candidate client drives our real
call path, `router.providers.base.run(http, openai_adapter, call, ...)`, at each
concurrency, for a non-streaming and a streaming answer, and we record requests/s,
p50/p99 latency and client CPU time per request (`time.process_time()` deltas).

Candidates (all with the pool limits of `workers.processes.http_client()`):
  httpx              httpx.AsyncClient() with its default transport (httpcore)
  httpx+aiohttp      httpx.AsyncClient(transport=httpx_aiohttp.AiohttpTransport(...))  <- production
  httpx2             httpx2.AsyncClient() with its default transport (httpcore2), if it imports
  httpx2+aiohttp     httpx2.AsyncClient(transport=httpx_aiohttp.httpx2.AiohttpTransport(...)), if it imports
  aiohttp            a raw aiohttp.ClientSession POST + read: the floor, no parsing at all

    .venv/bin/python bench/bench_transport.py [--duration 3] [--warmup 0.5] [--concurrency 1,32,128]
        [--modes whole,stream] [--chunks 20] [--rounds 1] [--candidates httpx,httpx+aiohttp,...]

The markdown table goes to stdout, progress to stderr. Exit status 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing as mp
import os
import platform
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import aiohttp
import httpx
import uvloop
from httpx_aiohttp import AiohttpTransport
from machine import cpu_model, version  # bench/ is on sys.path when a bench runs

from router.providers import base
from router.providers import openai as openai_adapter
from router.providers.fakes.common import Scenario
from router.providers.fakes.openai import FakeOpenAI
from schemas import Message, Request

# The pool limits production uses (workers/processes.py: http_client()).
MAX_CONNECTIONS = 1000
MAX_KEEPALIVE = 200
# What the worker passes as its timeout (read is the pool's timeout_ms).
TIMEOUT = {"connect": 5.0, "read": 60.0, "write": 10.0, "pool": 5.0}
WORDS_PER_CHUNK = 2

OneCall = Callable[[bool], Awaitable[None]]


def answer_text(chunks: int) -> str:
    """An answer that the fake streams as exactly `chunks` text chunks."""
    return " ".join(f"word{i}" for i in range(chunks * WORDS_PER_CHUNK))


# ---------------------------------------------------------------- the server, in its own process


def _serve(conn: Connection, chunks: int) -> None:
    async def main() -> None:
        fake = FakeOpenAI(Scenario(text=answer_text(chunks), words_per_chunk=WORDS_PER_CHUNK))
        conn.send(await fake.start())
        try:
            while True:  # the fake logs every request: keep its memory flat
                await asyncio.sleep(1)
                fake.requests.clear()
                fake.request_headers.clear()
        finally:
            await fake.stop()

    uvloop.run(main())


def start_server(chunks: int) -> tuple[mp.process.BaseProcess, str]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(child, chunks), daemon=True, name="fake-openai")
    proc.start()
    if not parent.poll(30):
        proc.terminate()
        raise SystemExit("the fake server did not start within 30 s")
    url = parent.recv()
    return proc, url


# ---------------------------------------------------------------- the candidates


def calls(url: str) -> dict[bool, base.HttpCall]:
    """The HttpCall our OpenAI adapter builds, non-streaming and streaming."""

    def build(stream: bool) -> base.HttpCall:
        req = Request(
            id="bench", account="bench", reply_to="bench.reply", stream=stream, max_tokens=256,
            messages=[Message(role="user", content="Say something short about routers.")],
        )
        return openai_adapter.build(req, model="gpt-4o-mini", base_url=url + "/v1", api_key="sk-bench",
                                    headers={})

    return {False: build(False), True: build(True)}


def via_run(http: Any, timeout: Any, call_for: dict[bool, base.HttpCall], chunks: int) -> OneCall:
    """One request through our real driver, `base.run`, checking the answer came whole."""

    async def one(stream: bool) -> None:
        texts = 0
        finished = None
        async for ev in base.run(http, openai_adapter, call_for[stream], stream=stream, timeout=timeout):
            if isinstance(ev, base.TextDelta):
                texts += 1
            elif isinstance(ev, base.Finished):
                finished = ev
        if finished is None or texts != (chunks if stream else 1):
            raise RuntimeError(f"incomplete answer: {texts} text events, finished={finished is not None}")

    return one


@asynccontextmanager
async def httpx_default(url: str, chunks: int) -> AsyncIterator[OneCall]:
    limits = httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_KEEPALIVE)
    async with httpx.AsyncClient(limits=limits, follow_redirects=False) as http:
        yield via_run(http, httpx.Timeout(**TIMEOUT), calls(url), chunks)


@asynccontextmanager
async def httpx_aiohttp(url: str, chunks: int) -> AsyncIterator[OneCall]:
    limits = httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_KEEPALIVE)
    async with httpx.AsyncClient(transport=AiohttpTransport(limits=limits), follow_redirects=False) as http:
        yield via_run(http, httpx.Timeout(**TIMEOUT), calls(url), chunks)


@asynccontextmanager
async def httpx2_default(url: str, chunks: int) -> AsyncIterator[OneCall]:
    import httpx2

    limits = httpx2.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_KEEPALIVE)
    async with httpx2.AsyncClient(limits=limits, follow_redirects=False) as http:
        yield via_run(http, httpx2.Timeout(**TIMEOUT), calls(url), chunks)


@asynccontextmanager
async def httpx2_aiohttp(url: str, chunks: int) -> AsyncIterator[OneCall]:
    import httpx2
    from httpx_aiohttp.httpx2 import AiohttpTransport as Httpx2AiohttpTransport

    limits = httpx2.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_KEEPALIVE)
    transport = Httpx2AiohttpTransport(limits=limits)
    async with httpx2.AsyncClient(transport=transport, follow_redirects=False) as http:
        yield via_run(http, httpx2.Timeout(**TIMEOUT), calls(url), chunks)


@asynccontextmanager
async def aiohttp_raw(url: str, chunks: int) -> AsyncIterator[OneCall]:
    call_for = calls(url)
    timeout = aiohttp.ClientTimeout(sock_connect=TIMEOUT["connect"], sock_read=TIMEOUT["read"])
    connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(stream: bool) -> None:
            call = call_for[stream]
            async with session.post(call.url, json=call.body, headers=call.headers) as resp:
                if resp.status >= 400:
                    raise RuntimeError(f"HTTP {resp.status}")
                if stream:
                    async for _ in resp.content.iter_any():
                        pass
                else:
                    await resp.read()

        yield one


CANDIDATES: dict[str, tuple[str, Callable[[str, int], Any]]] = {
    "httpx": ("httpx (default transport, httpcore)", httpx_default),
    "httpx+aiohttp": ("httpx + AiohttpTransport", httpx_aiohttp),
    "httpx2": ("httpx2 (default transport, httpcore2)", httpx2_default),
    "httpx2+aiohttp": ("httpx2 + AiohttpTransport", httpx2_aiohttp),
    "aiohttp": ("aiohttp raw (floor, no parsing)", aiohttp_raw),
}


# ---------------------------------------------------------------- measuring


@dataclass
class Cell:
    candidate: str
    stream: bool
    concurrency: int
    requests: int = 0
    errors: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    first_error: str = ""

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s if self.wall_s else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        lat = sorted(self.latencies)
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / self.requests * 1e6 if self.requests else float("nan")


async def drive(one: OneCall, stream: bool, concurrency: int, seconds: float, cell: Cell | None) -> None:
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            try:
                await one(stream)
            except Exception as exc:
                if cell is None:
                    raise
                cell.errors += 1
                cell.first_error = cell.first_error or f"{type(exc).__name__}: {exc}"
                continue
            if cell is not None:
                cell.latencies.append(time.perf_counter() - t)
                cell.requests += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def measure(name: str, one: OneCall, stream: bool, concurrency: int, args: argparse.Namespace) -> Cell:
    cell = Cell(name, stream, concurrency)
    await drive(one, stream, concurrency, args.warmup, None)  # opens the connections, warms caches
    gc.collect()
    cpu0, t0 = time.process_time(), time.perf_counter()
    await drive(one, stream, concurrency, args.duration, cell)
    cell.wall_s, cell.cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    return cell


async def run_all(url: str, args: argparse.Namespace) -> tuple[list[Cell], list[str]]:
    """Every cell, candidates interleaved within each (answer, concurrency) so that a burst of
    load from elsewhere on the machine does not land on one candidate only."""
    notes: list[str] = []
    async with AsyncExitStack() as stack:
        clients: dict[str, OneCall] = {}
        for key in args.candidates:
            label, factory = CANDIDATES[key]
            try:
                one = await stack.enter_async_context(factory(url, args.chunks))
                for stream in (False, True):  # a first call of each kind, which must succeed
                    await one(stream)
            except Exception as exc:
                notes.append(f"{label}: skipped ({type(exc).__name__}: {exc})")
                print("  " + notes[-1], file=sys.stderr, flush=True)
                continue
            clients[label] = one
        merged: dict[tuple[bool, int, str], Cell] = {}
        for rnd in range(args.rounds):
            for stream in args.modes:
                for conc in args.concurrency:
                    for label, one in clients.items():
                        cell = await measure(label, one, stream, conc, args)
                        print(f"  [{rnd + 1}/{args.rounds}] {label:38} {'stream' if stream else 'whole':6} "
                              f"c={conc:<4} {cell.rps:6.0f} req/s {cell.cpu_us:6.0f} µs CPU/req"
                              + (f"  {cell.errors} errors ({cell.first_error})" if cell.errors else ""),
                              file=sys.stderr, flush=True)
                        m = merged.setdefault((stream, conc, label), Cell(label, stream, conc))
                        m.requests += cell.requests
                        m.errors += cell.errors
                        m.wall_s += cell.wall_s
                        m.cpu_s += cell.cpu_s
                        m.latencies += cell.latencies
                        m.first_error = m.first_error or cell.first_error
    return list(merged.values()), notes


# ---------------------------------------------------------------- reporting


def environment() -> str:
    dists = ["httpx", "httpcore", "httpx-aiohttp", "aiohttp", "httpx2", "httpcore2", "uvloop"]
    return (
        f"CPU: {cpu_model()}, {os.cpu_count()} cores; Python {platform.python_version()}; "
        + ", ".join(f"{d} {version(d)}" for d in dists)
    )


def table(cells: list[Cell]) -> str:
    rows = [
        "| transport | answer | conc. | req/s | p50 ms | p99 ms | client CPU µs/req | errors |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for c in cells:
        rows.append(
            f"| {c.candidate} | {'stream' if c.stream else 'whole'} | {c.concurrency} | {c.rps:,.0f} "
            f"| {c.pct(0.50):.2f} | {c.pct(0.99):.2f} | {c.cpu_us:,.0f} | {c.errors} |"
        )
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=3.0, help="measured seconds per cell (default 3)")
    p.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each cell (default 0.5)")
    p.add_argument("--concurrency", default="1,32,128",
                   help="comma-separated in-flight request counts (default 1,32,128)")
    p.add_argument("--rounds", type=int, default=1,
                   help="sweeps over every cell; the figures pool all rounds (default 1)")
    p.add_argument("--chunks", type=int, default=20, help="text chunks per streamed answer (default 20)")
    p.add_argument("--modes", default="whole,stream", help="whole, stream or both (default whole,stream)")
    p.add_argument("--candidates", default=",".join(CANDIDATES),
                   help=f"comma-separated subset of {', '.join(CANDIDATES)} (default all)")
    args = p.parse_args(argv)
    args.concurrency = [int(x) for x in args.concurrency.split(",") if x.strip()]
    modes = {"whole": False, "stream": True}
    try:
        args.modes = [modes[m.strip()] for m in args.modes.split(",") if m.strip()]
        args.candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
        for c in args.candidates:
            CANDIDATES[c]
    except KeyError as exc:
        p.error(f"unknown value {exc}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    proc, url = start_server(args.chunks)
    try:
        print(f"fake OpenAI at {url} (pid {proc.pid}); {environment()}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        cells, notes = uvloop.run(run_all(url, args))
        elapsed = time.perf_counter() - started
    finally:
        proc.terminate()
        proc.join(5)
    print(f"\n{environment()}\n")
    print(f"Each cell: {args.warmup:g} s warm-up, then {args.duration:g} s measured"
          f"{f' in each of {args.rounds} rounds' if args.rounds > 1 else ''}; streamed answers have "
          f"{args.chunks} text chunks; server in its own process; client under uvloop "
          f"(whole run {elapsed:.0f} s).\n")
    print(table(cells))
    for note in notes:
        print(f"\n- {note}")
    errors = sum(c.errors for c in cells)
    return 1 if errors or (notes and not cells) else 0


if __name__ == "__main__":
    sys.exit(main())
