"""What the garbage collector costs a saturated dispatcher, with and without `workers.runtime.settle_heap()`
(a collection, then `gc.freeze()`, once the process is set up, as each role does before it serves).

One `Dispatcher` in this process with rate + budget on (bench/hop.py; 10⁵/s burst 5·10⁵, $10⁹ a day), on a
fresh nats-server, saturated (64 in flight) for `--warmup` seconds unmeasured, then `--seconds` measured with
a `gc.callbacks` hook: collections per generation, the time they took per request, the longest pause, and the
hop's requests/s and p50/p99. The two modes alternate, `--rounds` times each.

    .venv/bin/python bench/bench_gc.py [--rounds 3] [--seconds 5] [--warmup 2] [--accounts 100]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import uvloop
from hop import dispatcher_hop, limits_config, pct  # bench/ is on sys.path when a bench runs
from machine import describe  # bench/ is on sys.path when a bench runs
from servers import nats_server  # bench/ is on sys.path when a bench runs

from workers.runtime import configure_logging, settle_heap


async def _serve(settled: bool, accounts: int, seconds: float, warmup: float) -> None:
    """One measurement (a child process, so that each starts from the same heap): one JSON line on stdout."""
    tag = uuid.uuid4().hex[:6]
    took = [0.0, 0.0, 0.0]
    count = [0, 0, 0]
    longest = [0.0]
    started = [0.0]

    def hook(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        spent = time.perf_counter() - started[0]
        took[info["generation"]] += spent
        count[info["generation"]] += 1
        longest[0] = max(longest[0], spent)

    with nats_server() as url:
        async with dispatcher_hop(url, limits_config(100_000, 500_000), rate=True, budget=True,
                                 settle=False) as hop:
            if settled:
                settle_heap()
            await hop.saturation(warmup, lambda i: f"a{tag}{i % accounts}")
            gc.callbacks.append(hook)
            n, rps, lat = await hop.saturation(seconds, lambda i: f"a{tag}{i % accounts}")
            gc.callbacks.remove(hook)
    p50, p99 = pct(lat)
    print(json.dumps({"rps": rps, "p50": p50, "p99": p99, "tracked": len(gc.get_objects()),
                      "collections": count, "us_per_req": [t / n * 1e6 for t in took], "longest_ms": longest[0] * 1e3}))


def main(rounds: int, args: list[str]) -> None:
    print("| heap | req/s | p50, p99 ms | collections gen 0/1/2 | µs a request in gen 0/1/2 | longest pause |")
    print("|---|--:|---|---|---|--:|")
    for _ in range(rounds):
        for mode in ("as started", "settled"):
            out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--serve", mode, *args],
                                 capture_output=True, text=True, timeout=600)
            if out.returncode != 0:
                raise SystemExit(f"the {mode} run failed (exit {out.returncode}): {out.stderr[-500:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            c, us = r["collections"], r["us_per_req"]
            print(f"| {mode} | {r['rps']:,.0f} | {r['p50']:.2f}, {r['p99']:.2f} | {c[0]} / {c[1]} / {c[2]} |"
                  f" {us[0]:.1f} / {us[1]:.1f} / {us[2]:.1f} | {r['longest_ms']:.1f} ms |", flush=True)
    print(describe("nats-py", "uvloop"), file=sys.stderr)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="rounds of both modes (default 3)")
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds (default 5)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds of saturation first (default 2)")
    p.add_argument("--accounts", type=int, default=100, help="accounts the requests go round (default 100)")
    p.add_argument("--serve", choices=("as started", "settled"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.rounds < 1 or a.seconds <= 0 or a.warmup < 0 or a.accounts < 1:
        p.error("--rounds and --accounts at least 1, --seconds above 0, --warmup at least 0")
    configure_logging("error")
    if a.serve:
        uvloop.run(_serve(a.serve == "settled", a.accounts, a.seconds, a.warmup))
    else:
        main(a.rounds, ["--seconds", str(a.seconds), "--warmup", str(a.warmup), "--accounts", str(a.accounts)])
