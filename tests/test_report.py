"""`switchyard report` against a real PostgreSQL: audit rows written here, numbers computed by hand."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from tests.conftest import free_port
from tests.helpers import switchyard

NOW = datetime.now(UTC)
ACME_AT = NOW - timedelta(days=2)  # 24 h apart at least: always two different UTC days
GLOBEX_AT = NOW - timedelta(days=3)

# request_id, account, use_case, tier, status, code, provider, model, in, out, cost, latency, ttft, finished
ROWS = [
    ("a1", "acme", "draft", "pro", "ok", None, "openai", "gpt-4o", 10, 20, Decimal("0.01"), 100, 50, ACME_AT),
    ("a2", "acme", "draft", "pro", "ok", None, "openai", "gpt-4o", 10, 20, Decimal("0.01"), 200, 60, ACME_AT),
    ("a3", "acme", "draft", "pro", "ok", None, "openai", "gpt-4o", 10, 20, Decimal("0.01"), 300, 70, ACME_AT),
    ("a4", "acme", "draft", "pro", "error", "PROVIDER_UNAVAILABLE", "anthropic", "claude", 0, 0, None, 5, None,
     ACME_AT),
    ("g1", "globex", "summary", "free", "ok", None, "anthropic", "claude", 100, 50, Decimal("0.5"), 1000, 400,
     GLOBEX_AT),
    ("g2", "globex", "summary", "free", "ok", None, "anthropic", "claude", 100, 50, Decimal("0.25"), 3000, None,
     GLOBEX_AT),
    ("g3", "globex", "summary", "free", "error", "RATE_LIMITED", None, None, 0, 0, None, 0, None, GLOBEX_AT),
    # ten days old: outside the default 7d
    ("o1", "acme", "draft", "pro", "ok", None, "openai", "gpt-4o", 1, 1, Decimal("100"), 10, 5,
     NOW - timedelta(days=10)),
]


async def _insert(db: asyncpg.Pool) -> None:
    await db.executemany(
        "INSERT INTO llm_audit (request_id, account, use_case, tier, status, code, provider, model, input_tokens,"
        " output_tokens, cost_usd, latency_ms, ttft_ms, started_at, finished_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,"
        " $14::timestamptz - $12::integer * interval '1 millisecond', $14)",
        ROWS,
    )


async def _json(capsys: pytest.CaptureFixture[str], *args: str) -> list[dict[str, object]]:
    r = await switchyard(capsys, "report", "--json", *args)
    assert (r.code, r.err) == (0, ""), r
    rows: list[dict[str, object]] = json.loads(r.out)
    return rows


@pytest.fixture
async def ledger(db: asyncpg.Pool, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> asyncpg.Pool:
    monkeypatch.setenv("DATABASE_URL", pg_url)
    await _insert(db)
    return db


async def test_by_account(ledger: asyncpg.Pool, capsys: pytest.CaptureFixture[str]) -> None:
    rows = {r["account"]: r for r in await _json(capsys)}
    assert set(rows) == {"acme", "globex"}  # o1 is older than 7 days
    acme, globex = rows["acme"], rows["globex"]
    assert (acme["requests"], acme["ok"], acme["success_rate"]) == (4, 3, 0.75)
    # successful requests only: 100, 200, 300 → p50 200, p95 200 + 0.9 × 100
    assert (acme["p50_latency_ms"], acme["p95_latency_ms"], acme["p50_ttft_ms"]) == (200, 290, 60)
    assert (acme["input_tokens"], acme["output_tokens"]) == (30, 60)
    assert acme["cost_usd"] == pytest.approx(0.03)
    assert (globex["requests"], globex["ok"]) == (3, 2)
    assert globex["success_rate"] == pytest.approx(2 / 3)
    assert (globex["p50_latency_ms"], globex["p50_ttft_ms"], globex["p95_ttft_ms"]) == (2000, 400, 400)
    assert globex["cost_usd"] == pytest.approx(0.75)


async def test_by_provider_model_use_case_tier(ledger: asyncpg.Pool, capsys: pytest.CaptureFixture[str]) -> None:
    by_provider = {r["provider"]: r for r in await _json(capsys, "--by", "provider")}
    assert {k: (v["requests"], v["ok"]) for k, v in by_provider.items()} == {
        "openai": (3, 3), "anthropic": (3, 2), "-": (1, 0)}
    assert by_provider["anthropic"]["cost_usd"] == pytest.approx(0.75)
    assert by_provider["anthropic"]["p50_latency_ms"] == 2000  # the 5 ms error is not a latency
    assert by_provider["-"]["p50_latency_ms"] is None
    by_model = {r["model"]: r["requests"] for r in await _json(capsys, "--by", "model")}
    assert by_model == {"gpt-4o": 3, "claude": 3, "-": 1}
    by_use_case = {r["use_case"]: (r["requests"], r["cost_usd"]) for r in await _json(capsys, "--by", "use_case")}
    assert by_use_case == {"draft": (4, pytest.approx(0.03)), "summary": (3, pytest.approx(0.75))}
    by_tier = {r["tier"]: r["success_rate"] for r in await _json(capsys, "--by", "tier")}
    assert by_tier == {"pro": 0.75, "free": pytest.approx(2 / 3)}


async def test_by_day(ledger: asyncpg.Pool, capsys: pytest.CaptureFixture[str]) -> None:
    rows = await _json(capsys, "--by", "day")
    assert [(r["day"], r["requests"]) for r in rows] == [
        (GLOBEX_AT.date().isoformat(), 3), (ACME_AT.date().isoformat(), 4)]


async def test_since(ledger: asyncpg.Pool, capsys: pytest.CaptureFixture[str]) -> None:
    assert await _json(capsys, "--since", "30m") == []
    assert [r["account"] for r in await _json(capsys, "--since", "60h")] == ["acme"]
    acme = {r["account"]: r for r in await _json(capsys, "--since", "2w")}["acme"]
    assert (acme["requests"], acme["cost_usd"]) == (5, pytest.approx(100.03))
    r = await switchyard(capsys, "report", "--since", "30m")
    assert (r.code, r.out.strip()) == (0, "no requests in the audit ledger in the last 30m")


async def test_table_and_csv(ledger: asyncpg.Pool, capsys: pytest.CaptureFixture[str]) -> None:
    r = await switchyard(capsys, "report")
    assert r.code == 0, r
    lines = r.out.splitlines()
    assert lines[0].split() == ["account", "requests", "success", "p50", "ms", "p95", "ms", "ttft", "p50", "ttft",
                                "p95", "input", "tok", "output", "tok", "cost"]
    assert lines[1].split() == ["acme", "4", "75.0%", "200", "290", "60", "69", "30", "60", "$0.0300"]
    assert lines[-1].split()[:3] == ["total", "7", "71.4%"]
    assert lines[-1].split()[-1] == "$0.7800"

    r = await switchyard(capsys, "report", "--csv", "--by", "provider")
    assert r.code == 0, r
    table = list(csv.DictReader(io.StringIO(r.out)))
    assert list(table[0]) == ["provider", "requests", "ok", "success_rate", "p50_latency_ms", "p95_latency_ms",
                              "p50_ttft_ms", "p95_ttft_ms", "input_tokens", "output_tokens", "cost_usd"]
    dash = next(t for t in table if t["provider"] == "-")
    assert (dash["requests"], dash["ok"], dash["p50_latency_ms"], float(dash["cost_usd"])) == ("1", "0", "", 0.0)


async def test_user_mistakes(pg_url: str, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DATABASE_URL", pg_url)
    r = await switchyard(capsys, "report", "--since", "7 days")
    assert (r.code, r.out) == (1, "")
    assert r.err.strip().splitlines() == ["switchyard: report: --since '7 days' is not a duration like 30m, 12h,"
                                          " 7d or 4w"]
    r = await switchyard(capsys, "report", "--by", "region")
    assert r.code == 2  # argparse's own exit code for a bad argument
    assert "invalid choice: 'region'" in r.err.splitlines()[-1]
    assert "Traceback" not in r.err


async def test_unreachable_database(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"postgresql://auditor:s3cret@127.0.0.1:{free_port()}/ledger"
    monkeypatch.setenv("DATABASE_URL", url)
    r = await switchyard(capsys, "report")
    assert (r.code, r.out) == (2, "")
    [line] = r.err.strip().splitlines()
    assert f"postgresql://auditor@127.0.0.1:{url.rsplit(':', 1)[1]}" in line
    assert "s3cret" not in line
