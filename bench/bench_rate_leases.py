"""Rate leases (workers/ratelimits.py): what the account rate check adds to the dispatcher's hop with and
without leases, for traffic shapes with many or few requests per account per lease validity.

One `Dispatcher` in this process on a fresh nats-server (as bench/bench_limits.py's dispatcher rows):
requests published into LLM_REQ for `--accounts` accounts in turn, timed until their work item reaches
`llm.work.<pool>`, closed loop at 64 in flight (saturation) then open loop at 100 requests/s. Modes:

- `off`: no rate limiter, no budgets;
- `rate`: the rate check as shipped (leases); `rate without leases`: every decision a compare-and-set;
- `both`: rate and budget as shipped; `both without leases`: the budget as shipped, the rate without leases.

"Without leases" sets router.ratelimit.LEASE_SHARE so large that no lease is ever more than one token. The
rate limit is `--rate per_second,burst` (default 1e6,1e6: everything is admitted; a lease is at most
burst / 4 tokens, valid burst / 4 / per_second seconds, 0.25 s by default). Besides latency, each cell
counts the CPU of this process per request at saturation (the producer's and the dispatcher's; only the
dispatcher's differs between modes), the rate state's KV writes per request (those of leases taken
ahead of need included), the share of decisions made from a lease, and the share made from a lease taken
ahead of need.

    .venv/bin/python bench/bench_rate_leases.py [--accounts 100,10] [--seconds 5] [--rounds 2]
        [--modes off,rate,"rate without leases",both,"both without leases"] [--rate 1e6,1e6]
        [--paced-only] [--warmup 2] [--saturation-warmup 0]

Before the paced phase is measured, `--warmup` seconds of the same paced load go unmeasured, so that every
account has been seen and its leases follow the paced rate rather than the saturation before it. With
`--saturation-warmup`, so many seconds of saturation go unmeasured before it is measured: the steady state
of a saturated dispatcher, rather than the first seconds of fresh accounts whose leases grow from one token.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid

import uvloop
from hop import dispatcher_hop, limits_config, pct  # bench/ is on sys.path when a bench runs
from machine import describe  # bench/ is on sys.path when a bench runs
from servers import nats_server  # bench/ is on sys.path when a bench runs

from router import ratelimit
from workers.ratelimits import BUCKET
from workers.runtime import configure_logging

MODES = ("off", "rate", "rate without leases", "both", "both without leases")


async def _cell(url: str, mode: str, accounts: int, seconds: float, per_second: float, burst: int,
                saturate: bool, warmup: float, sat_warmup: float) -> str:
    tag = uuid.uuid4().hex[:6]  # fresh accounts per cell: no state or lease left from another cell

    def account(i: int) -> str:
        return f"a{tag}{i % accounts}"

    share = ratelimit.LEASE_SHARE
    if mode.endswith("without leases"):
        ratelimit.LEASE_SHARE = 10**18
    try:
        async with dispatcher_hop(url, limits_config(per_second, burst), rate=mode != "off",
                                  budget=mode.startswith("both")) as hop:
            rates = hop.rates

            async def writes() -> int:
                try:
                    return int((await hop.js.stream_info(f"KV_{BUCKET}")).state.last_seq)
                except Exception:
                    return 0

            def marks() -> tuple[int, int]:
                return (rates.local, rates.from_ahead) if rates else (0, 0)

            async def counted(n: int, w0: int, mark: tuple[int, int]) -> str:
                if rates is None or n == 0:
                    return "—"
                await rates.quiet()  # the refills the last requests started are counted with them
                return (f"{(await writes() - w0) / n:.2f} writes/req, {(rates.local - mark[0]) / n:.0%} from a lease"
                        f" ({(rates.from_ahead - mark[1]) / n:.0%} taken ahead)")

            sat = "—"
            if saturate:
                if sat_warmup > 0:  # unmeasured: the accounts' leases grown to the saturated rate
                    await hop.saturation(sat_warmup, account)
                w0, mark = await writes(), marks()
                cpu0 = time.process_time()
                count, rps, lat = await hop.saturation(seconds, account)
                cpu = (time.process_time() - cpu0) / max(1, count) * 1e6
                p50, _ = pct(lat)
                sat = f"{rps:,.0f} req/s, {cpu:.0f} µs CPU/req, p50 {p50:.2f} ms; {await counted(count, w0, mark)}"
            if warmup > 0:  # unmeasured: every account seen once, leases sized to the paced rate
                await hop.paced(warmup, account)
            w0, mark = await writes(), marks()
            n, lat = await hop.paced(seconds, account)
            p50, p99 = pct(lat)
            slow = f"p50 {p50:.3f} ms, p99 {p99:.3f} ms; {await counted(n, w0, mark)}"
    finally:
        ratelimit.LEASE_SHARE = share
    return f"| {mode} | {accounts} | {sat} | {slow} |"


async def main(accounts: list[int], seconds: float, rounds: int, modes: list[str], per_second: float,
               burst: int, saturate: bool, warmup: float, sat_warmup: float) -> None:
    with nats_server() as url:
        print("| dispatcher limits | accounts | saturation (64 in flight) | 100 req/s open loop |")
        print("|---|--:|---|---|")
        for rnd in range(rounds):  # interleaved, so a burst of load from elsewhere does not hit one mode only
            for n in accounts:
                for mode in modes:
                    row = await _cell(url, mode, n, seconds, per_second, burst, saturate, warmup, sat_warmup)
                    print(row.replace(f"| {mode} |", f"| {mode} (round {rnd + 1}) |", 1), flush=True)
    print(f"\n{describe('nats-py', 'uvloop')}", file=sys.stderr)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accounts", default="100,10", help="numbers of accounts to spread requests over (default 100,10)")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per cell and phase (default 5)")
    p.add_argument("--rounds", type=int, default=2, help="rounds (default 2)")
    p.add_argument("--modes", default=",".join(MODES), help="modes, comma-separated (default: all)")
    p.add_argument("--rate", default="1e6,1e6", help="every account's per_second,burst (default 1e6,1e6)")
    p.add_argument("--paced-only", action="store_true",
                   help="skip the saturation phase (for a limit that would refuse it, e.g. the default 10,50)")
    p.add_argument("--warmup", type=float, default=2.0,
                   help="unmeasured seconds of the paced load before it is measured (default 2)")
    p.add_argument("--saturation-warmup", type=float, default=0.0,
                   help="unmeasured seconds of saturation before it is measured (default 0: the fresh accounts'"
                        " first seconds are measured, their leases still growing)")
    a = p.parse_args()
    a_modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    try:
        nums = [int(x) for x in a.accounts.split(",") if x.strip()]
        ps, b = a.rate.split(",")
        rate_ps, rate_burst = float(ps), int(float(b))
    except ValueError:
        p.error("--accounts takes integers, --rate per_second,burst")
    if not a_modes or any(m not in MODES for m in a_modes) or not nums or min(nums) < 1:
        p.error(f"--modes: choose among {', '.join(MODES)}; --accounts: positive integers")
    configure_logging("error")
    uvloop.run(main(nums, a.seconds, a.rounds, a_modes, rate_ps, rate_burst, not a.paced_only, a.warmup,
                     a.saturation_warmup))
