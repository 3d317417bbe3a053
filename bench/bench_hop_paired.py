"""The dispatcher's hop at saturation with limits off and with rate + budget on, both at the same time, so
that the machine's drift (on a shared machine, ±20 % between runs a minute apart) falls on both alike.

Each round starts two processes at once, each with its own nats-server and one `Dispatcher` (bench/hop.py):
one with no rate limiter and no budgets, one with both as shipped (10⁵/s burst 5·10⁵ and $10⁹ a day by
default: everything is admitted). Each saturates its own dispatcher (64 requests in flight) for `--warmup`
seconds unmeasured (its accounts' leases and slices grown), then `--seconds` measured: requests/s and its
own process's CPU per request (its producer's and its dispatcher's). The two share the machine's cores for
the same seconds, so their ratio is not moved by what the machine does meanwhile. Printed: each round's
figures and ratio, and the median of the ratios.

With `--paced N`, each side runs an open loop of N requests/s instead (after `--warmup` seconds of the same,
unmeasured): printed are each side's p50 and p99 and the added p50, the figure of the bar at 100 requests/s.

Alternating short windows on one dispatcher then the other would leave the idle one's leases to expire
and its budget slices to be given back between its windows, which a saturated dispatcher never sees.

    .venv/bin/python bench/bench_hop_paired.py [--accounts 10] [--rounds 8] [--seconds 5] [--warmup 2]
        [--rate 100000,500000] [--paced 100]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import uvloop
from hop import dispatcher_hop, limits_config, pct  # bench/ is on sys.path when a bench runs
from machine import describe  # bench/ is on sys.path when a bench runs
from servers import nats_server  # bench/ is on sys.path when a bench runs

from workers.runtime import configure_logging


async def _serve(mode: str, accounts: int, seconds: float, warmup: float, per_second: float, burst: int,
                 paced: int) -> None:
    """One side of a round (a child process): its figures as one JSON line on stdout."""
    tag = uuid.uuid4().hex[:6]
    with nats_server() as url:
        on = mode == "both"
        async with dispatcher_hop(url, limits_config(per_second, burst), rate=on, budget=on) as hop:
            if paced:
                await hop.paced(warmup, lambda i: f"a{tag}{i % accounts}", paced)
                _, lat = await hop.paced(seconds, lambda i: f"a{tag}{i % accounts}", paced)
                p50, p99 = pct(lat)
                print(json.dumps({"p50": p50, "p99": p99}), flush=True)
                return
            await hop.saturation(warmup, lambda i: f"a{tag}{i % accounts}")
            cpu0 = time.process_time()
            count, rps, _ = await hop.saturation(seconds, lambda i: f"a{tag}{i % accounts}")
            cpu = (time.process_time() - cpu0) / max(1, count) * 1e6
    print(json.dumps({"rps": rps, "cpu_us": cpu}), flush=True)


def _round(args: list[str]) -> dict[str, dict[str, float]]:
    """Both sides at once: their figures by mode."""
    procs = {mode: subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve", mode, *args],
                                    stdout=subprocess.PIPE, text=True)
             for mode in ("off", "both")}
    out = {}
    for mode, proc in procs.items():
        stdout, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"the {mode} side failed (exit {proc.returncode})")
        out[mode] = json.loads(stdout.strip().splitlines()[-1])
    return out


def main_paced(accounts: int, rounds: int, per_second: int, args: list[str]) -> None:
    added = []
    print("| round | off: p50, p99 ms | both: p50, p99 ms | added p50 |")
    print("|--:|---|---|---|")
    for k in range(rounds):
        got = _round(args)
        added.append(got["both"]["p50"] - got["off"]["p50"])
        print(f"| {k + 1} | {got['off']['p50']:.3f}, {got['off']['p99']:.3f} | {got['both']['p50']:.3f},"
              f" {got['both']['p99']:.3f} | {added[-1]:+.3f} ms |", flush=True)
    print(f"\n{accounts} accounts at {per_second} requests/s, {rounds} rounds: added p50, median"
          f" {statistics.median(added):+.3f} ms (from {min(added):+.3f} to {max(added):+.3f})")
    print(describe("nats-py", "uvloop"), file=sys.stderr)


def main(accounts: int, rounds: int, args: list[str]) -> None:
    ratios = []
    print("| round | off: req/s, µs CPU/req | both: req/s, µs CPU/req | both against off |")
    print("|--:|---|---|---|")
    for k in range(rounds):
        got = _round(args)
        ratio = got["both"]["rps"] / got["off"]["rps"] - 1
        ratios.append(ratio)
        print(f"| {k + 1} | {got['off']['rps']:,.0f}, {got['off']['cpu_us']:.0f} | {got['both']['rps']:,.0f},"
              f" {got['both']['cpu_us']:.0f} | {ratio:+.1%} |", flush=True)
    print(f"\n{accounts} accounts, {rounds} rounds: both against off, median {statistics.median(ratios):+.1%}"
          f" (from {min(ratios):+.1%} to {max(ratios):+.1%})")
    print(describe("nats-py", "uvloop"), file=sys.stderr)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accounts", type=int, default=10, help="accounts the requests go round (default 10)")
    p.add_argument("--rounds", type=int, default=8, help="rounds (default 8)")
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per round (default 5)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds of saturation first (default 2)")
    p.add_argument("--rate", default="100000,500000", help="every account's per_second,burst (default 1e5,5e5)")
    p.add_argument("--paced", type=int, default=0, metavar="N",
                   help="an open loop of N requests/s on each side instead of saturation; p50 and p99 (default: off)")
    p.add_argument("--serve", choices=("off", "both"), help=argparse.SUPPRESS)  # one side of a round
    a = p.parse_args()
    try:
        ps, b = a.rate.split(",")
        rate_ps, rate_burst = float(ps), int(float(b))
    except ValueError:
        p.error("--rate takes per_second,burst")
    if a.accounts < 1 or a.rounds < 1 or a.seconds <= 0 or a.warmup < 0 or a.paced < 0:
        p.error("--accounts and --rounds at least 1, --seconds above 0, --warmup and --paced at least 0")
    configure_logging("error")
    if a.serve:
        uvloop.run(_serve(a.serve, a.accounts, a.seconds, a.warmup, rate_ps, rate_burst, a.paced))
    else:
        args = ["--accounts", str(a.accounts), "--seconds", str(a.seconds), "--warmup", str(a.warmup),
                "--rate", a.rate, "--paced", str(a.paced)]
        if a.paced:
            main_paced(a.accounts, a.rounds, a.paced, args)
        else:
            main(a.accounts, a.rounds, args)
