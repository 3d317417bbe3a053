"""`switchyard reprice`: the audit ledger's costs again, from each row's token counts at today's prices.

Every successful request of the window with a provider and a model is priced again the way a worker
prices a call (router/pricing.py: the config's `[models]` price or `free`, then genai-prices), by the
arithmetic in router/reprice.py. Errors are left alone: the fleet records no cost for them. The
command shows what would change; `--apply` writes the new costs, and sets `repriced_at`, in the same
transaction that read them. A row whose model has no price now is counted as unpriced and keeps
its cost.

The config is `--config`, else the fleet's config.json in the data directory, else the shipped
example; the database is DATABASE_URL, else the one `switchyard up` wrote to state.json.
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import msgspec

from router.config import Config, ConfigError
from router.reprice import Repricing, Row, Summary

from .accounts import database, routing_config
from .fleet import OK, REFUSED, say
from .report import parse_since

_CHUNK = 5_000

_ROWS = """
SELECT account, request_id, provider, model, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
       reasoning_tokens, cost_usd
FROM llm_audit
WHERE finished_at >= now() - $1::interval AND status = 'ok' AND provider IS NOT NULL AND model IS NOT NULL
"""
# Only a row still holding the cost that was read is changed: nothing written in between is overwritten.
_APPLY = """
UPDATE llm_audit a SET cost_usd = r.new_cost, repriced_at = now()
FROM llm_reprice r
WHERE a.account = r.account AND a.request_id = r.request_id AND a.cost_usd IS NOT DISTINCT FROM r.old_cost
"""


class ModelOut(msgspec.Struct, kw_only=True):
    provider: str
    model: str
    rows: int
    changed: int
    unpriced: int
    old_usd: float
    new_usd: float


class Outcome(msgspec.Struct, kw_only=True):
    """What `--json` prints."""

    since: str
    prices_from: str
    """Where the config's own prices came from."""
    rows: int
    """Successful requests of the window with a provider and a model."""
    changed: int
    unpriced: int
    old_total_usd: float
    new_total_usd: float
    difference_usd: float
    applied: bool
    written: int | None
    """Rows updated by `--apply` (equal to `changed` unless the ledger changed meanwhile); None without it."""
    models: list[ModelOut]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    r = sub.add_parser("reprice", help="recompute the audit ledger's costs at today's prices; --apply writes them")
    r.add_argument("--since", default="30d", help="how far back: 30m, 12h, 7d, 4w (default 30d)")
    r.add_argument("--apply", action="store_true", help="write the new costs (default: only show them)")
    r.add_argument("--json", action="store_true", help="a JSON object instead of a table")
    r.add_argument("--config", default=None, help="the config whose prices apply (default: the fleet's config.json,"
                                                  " else the shipped example)")
    r.add_argument("--data-dir", type=Path, default=None, help="the fleet `switchyard up` started here")
    r.set_defaults(run=reprice_command)


async def reprice_command(args: argparse.Namespace) -> int:
    """Raises NoFleet when the database is not there or cannot be reached."""
    since = parse_since(args.since)
    if since is None:
        say(f"reprice: --since {args.since[:50]!r} is not a duration like 30m, 12h, 7d or 4w")
        return REFUSED
    try:
        cfg, where = routing_config(args.config, args.data_dir)
    except ConfigError as exc:
        say(f"reprice: {exc}")
        return REFUSED
    async with database(args.data_dir) as conn:
        summary, written = await reprice(conn, cfg, since, apply=args.apply)
    out = _outcome(summary, args.since, where, written)
    if args.json:
        print(msgspec.json.encode(out).decode())
    else:
        _table(out)
    return OK


async def reprice(
    conn: asyncpg.Connection, cfg: Config, since: timedelta, *, apply: bool
) -> tuple[Summary, int | None]:
    """Price the window's rows again; with `apply`, write the changed costs in the same transaction.
    Returns the sums and, with `apply`, how many rows were written."""
    pricing = Repricing(cfg)
    async with conn.transaction(readonly=not apply):
        if apply:
            await conn.execute(
                "CREATE TEMP TABLE llm_reprice (account text, request_id text, old_cost numeric(18, 10),"
                " new_cost numeric(18, 10), PRIMARY KEY (account, request_id)) ON COMMIT DROP"
            )
        changes: list[tuple[str, str, Decimal | None, Decimal]] = []
        async for r in conn.cursor(_ROWS, since, prefetch=_CHUNK):
            row = Row(provider=r["provider"], model=r["model"], input_tokens=r["input_tokens"],
                      output_tokens=r["output_tokens"], cache_read_tokens=r["cache_read_tokens"],
                      cache_write_tokens=r["cache_write_tokens"], reasoning_tokens=r["reasoning_tokens"],
                      cost_usd=r["cost_usd"])
            new = pricing.add(row)
            if new is not None and apply:
                changes.append((r["account"], r["request_id"], r["cost_usd"], new))
                if len(changes) >= _CHUNK:
                    await conn.copy_records_to_table("llm_reprice", records=changes)
                    changes.clear()
        written: int | None = None
        if apply:
            if changes:
                await conn.copy_records_to_table("llm_reprice", records=changes)
            status = await conn.execute(_APPLY)
            written = int(status.split()[-1])  # "UPDATE <n>"
    return pricing.summary(), written


def _usd(value: Decimal) -> float:
    return float(value)


def _outcome(s: Summary, since: str, where: str, written: int | None) -> Outcome:
    return Outcome(
        since=since, prices_from=where, rows=s.rows, changed=s.changed, unpriced=s.unpriced,
        old_total_usd=_usd(s.old_total_usd), new_total_usd=_usd(s.new_total_usd),
        difference_usd=_usd(s.difference_usd), applied=written is not None, written=written,
        models=[ModelOut(provider=m.provider, model=m.model, rows=m.rows, changed=m.changed, unpriced=m.unpriced,
                         old_usd=_usd(m.old_usd), new_usd=_usd(m.new_usd)) for m in s.models],
    )


def _money(value: float) -> str:
    return f"${value:,.6f}"


def _table(o: Outcome) -> None:
    if not o.rows:
        print(f"no priced requests in the audit ledger in the last {o.since}; nothing to reprice")
        return
    table = [("provider", "model", "rows", "changed", "unpriced", "old cost", "new cost", "difference")]
    for m in o.models:
        table.append((m.provider, m.model, f"{m.rows:,}", f"{m.changed:,}", f"{m.unpriced:,}", _money(m.old_usd),
                      _money(m.new_usd), _money(m.new_usd - m.old_usd)))
    table.append(("total", "", f"{o.rows:,}", f"{o.changed:,}", f"{o.unpriced:,}", _money(o.old_total_usd),
                  _money(o.new_total_usd), _money(o.difference_usd)))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for n, row in enumerate(table):
        if n == len(table) - 1:
            print("  ".join("-" * w for w in widths))
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        print("  ".join(cells).rstrip())
    print(f"prices: {o.prices_from}, then genai-prices")
    for m in o.models:
        if m.unpriced:
            print(f"unpriced: {m.unpriced:,} rows of {m.provider}:{m.model}: no price for the model now;"
                  " their cost is kept (give it one under [models] in the config)")
    if o.written is None:
        print(f"not written: `switchyard reprice --since {o.since} --apply` writes the {o.changed:,} new costs")
    else:
        print(f"wrote {o.written:,} new costs (repriced_at set)")
        if o.written != o.changed:
            print(f"{o.changed - o.written:,} rows changed in the ledger meanwhile and were left as they are")
