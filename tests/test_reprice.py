"""`switchyard reprice` against a real PostgreSQL: audit rows written here, the new costs computed in SQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import genai_prices
import pytest

from router import config as config_mod
from router.reprice import ledger_usd
from tests.conftest import fleet_config, free_port
from tests.helpers import switchyard

NOW = datetime.now(UTC)
RECENT = NOW - timedelta(days=3)
OLD = NOW - timedelta(days=40)  # outside the default 30d


def _per_mtok(model: str) -> tuple[Decimal, Decimal]:
    """genai-prices' own price of a million input and of a million output tokens, asked directly."""
    def price(i: int, o: int) -> Decimal:
        return Decimal(genai_prices.calc_price(genai_prices.Usage(input_tokens=i, output_tokens=o), model,
                                               provider_id="openai").total_price)
    return price(1_000_000, 0), price(0, 1_000_000)


# request_id, status, provider, model, input, output, cost, finished
ROWS: list[tuple[Any, ...]] = [
    # the config's own price (2.5 / 10 per million): p1 is right already, p2 and p3 are not
    ("p1", "ok", "openai", "house-model", 1000, 500, Decimal("0.0075"), RECENT),
    ("p2", "ok", "openai", "house-model", 2000, 100, Decimal("0.001"), RECENT),
    ("p3", "ok", "openai", "house-model", 400, 40, None, RECENT),  # written without a price
    # genai-prices' price
    ("g1", "ok", "openai", "gpt-4o-mini", 10_000, 2_000, Decimal("0.5"), RECENT),
    ("g2", "ok", "openai", "gpt-4o-mini", 3_000, 0, Decimal("0"), RECENT),
    # a provider the config no longer has and a model nothing prices: reported, not zeroed
    ("u1", "ok", "mystery", "no-such-model-xyz", 100, 100, Decimal("0.25"), RECENT),
    ("u2", "ok", "mystery", "no-such-model-xyz", 100, 100, None, RECENT),
    # not repriced: an error (the fleet records no cost for one), a refusal, a row older than --since
    ("e1", "error", "openai", "house-model", 5000, 5000, None, RECENT),
    ("r1", "error", None, None, 0, 0, None, RECENT),
    ("o1", "ok", "openai", "house-model", 1000, 1000, Decimal("1"), OLD),
]

# The new cost of every row `--since 30d` reprices, in SQL: the ledger's rounding, the prices above.
# %s are genai-prices' input and output prices of gpt-4o-mini per million tokens.
EXPECTED = """
SELECT request_id, cost_usd AS old,
       CASE model
           WHEN 'house-model' THEN round((input_tokens * 2.5 + output_tokens * 10) / 1000000.0, 10)
           WHEN 'gpt-4o-mini' THEN round((input_tokens * {0} + output_tokens * {1}) / 1000000.0, 10)
       END AS new
FROM llm_audit
WHERE status = 'ok' AND provider IS NOT NULL AND finished_at >= now() - interval '30 days'
"""


async def _expected(db: asyncpg.Pool) -> dict[str, tuple[Decimal | None, Decimal | None]]:
    mini_in, mini_out = _per_mtok("gpt-4o-mini")
    rows = await db.fetch(EXPECTED.format(mini_in, mini_out))
    return {r["request_id"]: (r["old"], r["new"]) for r in rows}


@pytest.fixture
async def ledger(db: asyncpg.Pool, pg_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The rows above in the ledger, DATABASE_URL set; returns the config file whose prices apply."""
    monkeypatch.setenv("DATABASE_URL", pg_url)
    await db.executemany(
        "INSERT INTO llm_audit (request_id, account, use_case, tier, status, provider, model, input_tokens,"
        " output_tokens, cost_usd, started_at, finished_at) VALUES ($1, 'acme', 'draft', 'default', $2, $3, $4,"
        " $5, $6, $7, $8, $8)",
        ROWS,
    )
    cfg = fleet_config({"openai": "http://127.0.0.1:9/v1"},
                       models={"house-model": {"input_usd_per_mtok": 2.5, "output_usd_per_mtok": 10.0}})
    path = tmp_path / "config.json"
    path.write_bytes(config_mod.encode(cfg))
    return path


async def _reprice(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> dict[str, Any]:
    r = await switchyard(capsys, "reprice", "--json", "--config", str(config), *args)
    assert (r.code, r.err) == (0, ""), r
    out: dict[str, Any] = json.loads(r.out)
    return out


async def _ledger(db: asyncpg.Pool) -> dict[str, tuple[Decimal | None, datetime | None]]:
    return {r["request_id"]: (r["cost_usd"], r["repriced_at"])
            for r in await db.fetch("SELECT request_id, cost_usd, repriced_at FROM llm_audit")}


async def test_the_difference_is_shown_and_nothing_is_written(
    ledger: Path, db: asyncpg.Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = await _expected(db)
    assert set(expected) == {"p1", "p2", "p3", "g1", "g2", "u1", "u2"}
    before = await _ledger(db)
    out = await _reprice(capsys, ledger)

    old_total = sum((old or Decimal(0) for old, _ in expected.values()), Decimal(0))
    # an unpriced row keeps its cost in the new total
    new_total = sum((new if new is not None else old or Decimal(0) for old, new in expected.values()), Decimal(0))
    changed = {rid for rid, (old, new) in expected.items() if new is not None and new != old}
    assert changed == {"p2", "p3", "g1", "g2"}  # p1 holds its price already; u1, u2 have none
    assert (out["rows"], out["changed"], out["unpriced"]) == (7, 4, 2)
    assert out["old_total_usd"] == float(old_total)
    assert out["new_total_usd"] == float(new_total)
    assert out["difference_usd"] == float(new_total - old_total)
    assert (out["applied"], out["written"]) == (False, None)

    models = {(m["provider"], m["model"]): m for m in out["models"]}
    assert set(models) == {("openai", "house-model"), ("openai", "gpt-4o-mini"), ("mystery", "no-such-model-xyz")}
    house = models[("openai", "house-model")]
    assert (house["rows"], house["changed"], house["unpriced"]) == (3, 2, 0)
    assert house["new_usd"] == float(sum((expected[r][1] or 0 for r in ("p1", "p2", "p3")), Decimal(0)))
    mystery = models[("mystery", "no-such-model-xyz")]
    assert (mystery["rows"], mystery["changed"], mystery["unpriced"]) == (2, 0, 2)
    assert mystery["old_usd"] == mystery["new_usd"] == 0.25

    assert await _ledger(db) == before  # shown, not written

    wider = await _reprice(capsys, ledger, "--since", "8w")  # the 40-day-old row too
    assert (wider["rows"], wider["changed"]) == (8, 5)


async def test_apply_writes_exactly_the_rows_shown(
    ledger: Path, db: asyncpg.Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = await _expected(db)
    before = await _ledger(db)
    shown = await _reprice(capsys, ledger)
    applied = await _reprice(capsys, ledger, "--apply")
    assert {k: v for k, v in applied.items() if k not in ("applied", "written")} == {
        k: v for k, v in shown.items() if k not in ("applied", "written")}
    assert (applied["applied"], applied["written"]) == (True, shown["changed"])

    after = await _ledger(db)
    repriced = {rid for rid, (_, at) in after.items() if at is not None}
    assert repriced == {rid for rid, (old, new) in expected.items() if new is not None and new != old}
    assert len(repriced) == shown["changed"]
    for rid, (cost, _) in after.items():
        if rid in repriced:
            assert cost == expected[rid][1], rid
        else:
            assert cost == before[rid][0], rid  # unchanged, unpriced (not zeroed), error, refusal, old
    total = await db.fetchval("SELECT sum(cost_usd) FROM llm_audit WHERE request_id = ANY($1::text[])",
                              list(expected))
    assert float(total) == applied["new_total_usd"]

    again = await _reprice(capsys, ledger)  # nothing left to change
    assert (again["changed"], again["old_total_usd"]) == (0, applied["new_total_usd"])


async def test_table(ledger: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = await switchyard(capsys, "reprice", "--config", str(ledger))
    assert (r.code, r.err) == (0, ""), r
    lines = r.out.splitlines()
    assert lines[0].split() == ["provider", "model", "rows", "changed", "unpriced", "old", "cost", "new", "cost",
                                "difference"]
    total = next(line for line in lines if line.startswith("total")).split()
    assert total[1:4] == ["7", "4", "2"]
    assert any(line.startswith("unpriced: 2 rows of mystery:no-such-model-xyz") for line in lines)
    assert lines[-1] == "not written: `switchyard reprice --since 30d --apply` writes the 4 new costs"

    r = await switchyard(capsys, "reprice", "--config", str(ledger), "--since", "10m")
    assert (r.code, r.out.strip()) == (0, "no priced requests in the audit ledger in the last 10m; nothing to reprice")


async def test_user_mistakes(
    pg_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("DATABASE_URL", pg_url)
    r = await switchyard(capsys, "reprice", "--since", "30 days")
    assert (r.code, r.out) == (1, "")
    assert r.err.splitlines() == ["switchyard: reprice: --since '30 days' is not a duration like 30m, 12h, 7d or 4w"]

    missing = tmp_path / "nowhere.toml"
    r = await switchyard(capsys, "reprice", "--config", str(missing))
    assert (r.code, r.out) == (1, "")
    assert r.err.splitlines() == [f"switchyard: reprice: --config {missing}: no such file"]

    url = f"postgresql://auditor:s3cret@127.0.0.1:{free_port()}/ledger"
    monkeypatch.setenv("DATABASE_URL", url)
    r = await switchyard(capsys, "reprice", "--apply")
    assert (r.code, r.out) == (2, "")
    [line] = r.err.splitlines()
    assert "cannot connect to PostgreSQL" in line and "s3cret" not in line
    assert "Traceback" not in r.err


async def test_a_new_cost_is_compared_as_the_ledger_stores_it(db: asyncpg.Pool) -> None:
    # What the auditor's insert makes of a float cost, and what reprice compares with: equal, halves included.
    for cost in (0.1, 0.0075, 1 / 3, 2.5e-11, 5e-11, 1.23456789015, 0.00000000015, 12345.678901234567):
        stored = await db.fetchval("SELECT $1::numeric(18, 10)", cost)
        assert ledger_usd(cost) == stored, cost
