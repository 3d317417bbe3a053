"""`switchyard report`: requests, success rate, latency, tokens and cost from the audit ledger.

Reads the view `llm_report_rows` (migration 005) over `llm_audit`, grouped by one dimension, for
the requests that finished within `--since`. Latency and time to first token are percentiles of
the successful requests only: a refusal answered in a millisecond says nothing about a provider's
speed. Days are UTC days.

The database is DATABASE_URL, else the one `switchyard up` wrote to the data directory's
state.json.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from datetime import timedelta
from pathlib import Path

import asyncpg
import msgspec

from .accounts import database
from .fleet import OK, REFUSED, say

DIMENSIONS = ("account", "provider", "model", "use_case", "tier", "day")
# the view's columns, never user text, go into the query
_KEY = {d: f"{d}::text" for d in DIMENSIONS}
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_SINCE = re.compile(r"([1-9][0-9]{0,5})([mhdw])")


class Group(msgspec.Struct, kw_only=True):
    key: str
    """The group's value of the dimension (an account's name, a day as YYYY-MM-DD, …)."""
    requests: int
    ok: int
    success_rate: float
    """ok / requests, 0 to 1."""
    p50_latency_ms: float | None
    p95_latency_ms: float | None
    p50_ttft_ms: float | None
    p95_ttft_ms: float | None
    input_tokens: int
    output_tokens: int
    cost_usd: float


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    r = sub.add_parser("report", help="requests, success rate, latency, tokens and cost from the audit ledger")
    r.add_argument("--since", default="7d", help="how far back: 30m, 12h, 7d, 4w (default 7d)")
    r.add_argument("--by", choices=DIMENSIONS, default="account", help="group by (default account)")
    out = r.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="a JSON array of objects instead of a table")
    out.add_argument("--csv", action="store_true", help="CSV with a header instead of a table")
    r.add_argument("--data-dir", type=Path, default=None, help="the fleet `switchyard up` started here: its database")
    r.set_defaults(run=report_command)


def parse_since(text: str) -> timedelta | None:
    """`30m`, `12h`, `7d`, `4w` as a timedelta; None when `text` is not one."""
    m = _SINCE.fullmatch(text.strip())
    if m is None:
        return None
    return timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})


async def report_command(args: argparse.Namespace) -> int:
    """Raises NoFleet when the database is not there or cannot be reached."""
    since = parse_since(args.since)
    if since is None:
        say(f"report: --since {args.since[:50]!r} is not a duration like 30m, 12h, 7d or 4w")
        return REFUSED
    async with database(args.data_dir) as conn:
        groups, total = await report(conn, args.by, since)
    if args.json:
        print(msgspec.json.encode([_record(args.by, g) for g in groups]).decode())
    elif args.csv:
        _csv(args.by, groups)
    else:
        _table(args.by, args.since, groups, total)
    return OK


async def report(conn: asyncpg.Connection, by: str, since: timedelta) -> tuple[list[Group], Group | None]:
    """The groups of `by` (one of DIMENSIONS) over the requests finished within `since`, and their total
    (None when there are none)."""
    key = _KEY[by]
    rows = await conn.fetch(
        f"""
        SELECT GROUPING({key}) = 1 AS is_total, {key} AS key,
               count(*) AS requests, count(*) FILTER (WHERE ok) AS ok,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) FILTER (WHERE ok) AS p50_latency_ms,
               percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) FILTER (WHERE ok) AS p95_latency_ms,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY ttft_ms) FILTER (WHERE ok) AS p50_ttft_ms,
               percentile_cont(0.95) WITHIN GROUP (ORDER BY ttft_ms) FILTER (WHERE ok) AS p95_ttft_ms,
               coalesce(sum(input_tokens), 0) AS input_tokens, coalesce(sum(output_tokens), 0) AS output_tokens,
               coalesce(sum(cost_usd), 0) AS cost_usd
        FROM llm_report_rows
        WHERE finished_at >= now() - $1::interval
        GROUP BY ROLLUP ({key})
        ORDER BY is_total, key
        """,
        since,
    )
    groups: list[Group] = []
    total: Group | None = None
    for r in rows:
        if not r["requests"]:  # ROLLUP's total over no rows at all
            continue
        g = Group(key=r["key"] or "", requests=r["requests"], ok=r["ok"], success_rate=r["ok"] / r["requests"],
                  p50_latency_ms=r["p50_latency_ms"], p95_latency_ms=r["p95_latency_ms"],
                  p50_ttft_ms=r["p50_ttft_ms"], p95_ttft_ms=r["p95_ttft_ms"], input_tokens=r["input_tokens"],
                  output_tokens=r["output_tokens"], cost_usd=float(r["cost_usd"]))
        if r["is_total"]:
            total = g
        else:
            groups.append(g)
    return groups, total


def _record(by: str, g: Group) -> dict[str, object]:
    """A group as the JSON/CSV object, its key named by the dimension."""
    fields = msgspec.structs.asdict(g)
    return {by: fields.pop("key"), **fields}


def _csv(by: str, groups: list[Group]) -> None:
    columns = [by, *(f for f in Group.__struct_fields__ if f != "key")]
    w = csv.DictWriter(sys.stdout, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for g in groups:
        w.writerow({k: "" if v is None else v for k, v in _record(by, g).items()})


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _table(by: str, since: str, groups: list[Group], total: Group | None) -> None:
    if total is None:
        print(f"no requests in the audit ledger in the last {since}")
        return
    table = [(by, "requests", "success", "p50 ms", "p95 ms", "ttft p50", "ttft p95", "input tok", "output tok",
              "cost")]
    for g in [*groups, msgspec.structs.replace(total, key="total")]:
        table.append((g.key, f"{g.requests:,}", f"{g.success_rate * 100:.1f}%", _ms(g.p50_latency_ms),
                      _ms(g.p95_latency_ms), _ms(g.p50_ttft_ms), _ms(g.p95_ttft_ms), f"{g.input_tokens:,}",
                      f"{g.output_tokens:,}", f"${g.cost_usd:,.4f}"))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for n, row in enumerate(table):
        if n == len(table) - 1 and len(table) > 2:
            print("  ".join("-" * w for w in widths))
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        print("  ".join(cells).rstrip())
