"""The dispatcher's hop at saturation with limits off and with rate + budget on, measured in pairs of short
alternating windows, so that the machine's drift (on a shared machine, ±20 % between runs a minute apart)
falls on both modes alike.

Two fresh nats-servers, one `Dispatcher` on each in this process (bench/hop.py): one with no rate limiter
and no budgets, one with both as shipped (10⁵/s burst 5·10⁵ and $10⁹ a day by default: everything is
admitted). Each is saturated for `--warmup` seconds unmeasured (its accounts' leases and slices grown),
then the two take turns: `--window` seconds of 64 requests in flight on one, then on the other, `--pairs`
times, the first of each pair alternating. Each window counts requests/s and this process's CPU per
request (only the driven dispatcher and its producer work; the other waits). Printed: every pair's ratio,
their median, and the median of each mode.

    .venv/bin/python bench/bench_hop_paired.py [--accounts 10] [--pairs 20] [--window 1.5] [--warmup 2]
        [--rate 100000,500000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from contextlib import AsyncExitStack, ExitStack

import uvloop
from hop import Hop, dispatcher_hop  # bench/ is on sys.path when a bench runs
from machine import describe  # bench/ is on sys.path when a bench runs
from servers import nats_server  # bench/ is on sys.path when a bench runs

from router import config as config_mod
from workers.runtime import configure_logging


def _config(per_second: float, burst: int) -> config_mod.Config:
    return config_mod.from_mapping({
        "providers": {"openai": {"format": "openai", "base_url": "http://127.0.0.1:9/v1"}},
        "pools": {"openai": {"provider": "openai", "concurrency": 64}},
        "routes": {"draft": {"default": ["openai:gpt-4o-mini"]}},
        "limits": {"default": {"rate": {"per_second": per_second, "burst": burst},
                               "budget": {"daily_usd": 1e9, "monthly_usd": 1e9}}},
    })


async def _window(hop: Hop, seconds: float, accounts: int, tag: str) -> tuple[float, float]:
    """Requests/s and µs of this process's CPU a request over one saturated window."""
    cpu0 = time.process_time()
    count, rps, _ = await hop.saturation(seconds, lambda i: f"a{tag}{i % accounts}")
    return rps, (time.process_time() - cpu0) / max(1, count) * 1e6


async def main(accounts: int, pairs: int, window: float, warmup: float, per_second: float, burst: int) -> None:
    cfg = _config(per_second, burst)
    tag = uuid.uuid4().hex[:6]
    with ExitStack() as servers:
        off_url, on_url = servers.enter_context(nats_server()), servers.enter_context(nats_server())
        async with AsyncExitStack() as stack:
            hops = {
                "off": await stack.enter_async_context(dispatcher_hop(off_url, cfg, rate=False, budget=False)),
                "both": await stack.enter_async_context(dispatcher_hop(on_url, cfg, rate=True, budget=True)),
            }
            for hop in hops.values():
                await _window(hop, warmup, accounts, tag)
            seen: dict[str, list[tuple[float, float]]] = {"off": [], "both": []}
            ratios = []
            print("| pair | off: req/s, µs CPU/req | both: req/s, µs CPU/req | both against off |")
            print("|--:|---|---|---|")
            for k in range(pairs):
                order = ("off", "both") if k % 2 == 0 else ("both", "off")
                got = {mode: await _window(hops[mode], window, accounts, tag) for mode in order}
                for mode in order:
                    seen[mode].append(got[mode])
                ratio = got["both"][0] / got["off"][0] - 1
                ratios.append(ratio)
                print(f"| {k + 1} | {got['off'][0]:,.0f}, {got['off'][1]:.0f} | {got['both'][0]:,.0f}, "
                      f"{got['both'][1]:.0f} | {ratio:+.1%} |", flush=True)
    med = {m: (statistics.median(r for r, _ in v), statistics.median(c for _, c in v)) for m, v in seen.items()}
    print(f"\n{accounts} accounts, {pairs} pairs of {window:g} s windows: both against off, median of the pairs"
          f" {statistics.median(ratios):+.1%} (quartiles {statistics.quantiles(ratios, n=4)[0]:+.1%} to"
          f" {statistics.quantiles(ratios, n=4)[2]:+.1%}); medians: off {med['off'][0]:,.0f} req/s,"
          f" {med['off'][1]:.0f} µs CPU/req; both {med['both'][0]:,.0f} req/s, {med['both'][1]:.0f} µs CPU/req")
    print(describe("nats-py", "uvloop"), file=sys.stderr)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accounts", type=int, default=10, help="accounts the requests go round (default 10)")
    p.add_argument("--pairs", type=int, default=20, help="pairs of windows (default 20)")
    p.add_argument("--window", type=float, default=1.5, help="seconds per window (default 1.5)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds of saturation per mode (default 2)")
    p.add_argument("--rate", default="100000,500000", help="every account's per_second,burst (default 1e5,5e5)")
    a = p.parse_args()
    try:
        ps, b = a.rate.split(",")
        rate_ps, rate_burst = float(ps), int(float(b))
    except ValueError:
        p.error("--rate takes per_second,burst")
    if a.accounts < 1 or a.pairs < 2 or a.window <= 0:
        p.error("--accounts at least 1, --pairs at least 2, --window above 0")
    configure_logging("error")
    uvloop.run(main(a.accounts, a.pairs, a.window, a.warmup, rate_ps, rate_burst))
