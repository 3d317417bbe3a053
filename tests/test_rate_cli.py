"""`switchyard rate status`: an account's limit and what its shared bucket holds, read from a real nats-server."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client as NATS

from router import config as config_mod
from router.config import RateLimit
from workers.processes import load_config
from workers.ratelimits import RateLimiter, now_us
from workers.runtime import ensure_topology

from .conftest import fleet_config
from .helpers import switchyard


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nats_url: str) -> Path:
    """A config whose default is 1 request every 100 s with a burst of 20 (nothing refills during a test),
    with one account lifted and one on tokens per minute; the CLI pointed at the test's nats-server."""
    monkeypatch.setenv("NATS_URL", nats_url)
    monkeypatch.delenv("DATABASE_URL", raising=False)  # no account table: the config's limits
    raw = msgspec.to_builtins(fleet_config({"openai": "http://127.0.0.1:9/v1"}))
    raw["limits"] = {"default": {"rate": {"per_second": 0.01, "burst": 20}},
                     "accounts": {"vip": {"rate": {"per_second": "unlimited"}},
                                  "metered": {"rate": {"per_second": 0.01, "burst": 20, "tokens_per_minute": 1000}}}}
    path = tmp_path / "config.json"
    path.write_bytes(config_mod.encode(config_mod.from_mapping(raw)))
    return path


async def test_status_shows_what_an_accounts_bucket_holds(
    capsys: pytest.CaptureFixture[str], nc: NATS, config_file: Path
) -> None:
    js = nc.jetstream()
    await ensure_topology(js, load_config(str(config_file)))
    busy, idle = f"busy-{uuid.uuid4().hex[:8]}", f"idle-{uuid.uuid4().hex[:8]}"
    limiter = await RateLimiter.open(js)
    limit = RateLimit(per_second=0.01, burst=20)
    now = now_us()
    for _ in range(5):  # decided one at a time on the shared state (no lease: what every replica sees)
        assert (await limiter.decide(busy, limit, now, lease=False)).admitted
    await limiter.close()

    got = await switchyard(capsys, "rate", "status", "--account", busy, "--json", "--config", str(config_file))
    assert got.code == 0, got.err
    [row] = json.loads(got.out)
    assert row["account"] == busy and row["per_second"] == 0.01 and row["burst"] == 20
    assert row["requests_available"] == 15 and row["next_in_ms"] == 0
    assert 400_000 < row["full_in_ms"] <= 500_000  # five tokens at 100 s each
    assert row["limit_source"] == "limits.default" and row["tokens_per_minute"] == "unlimited"

    # Every account with a bucket in use is listed; one never seen has a full bucket; a lifted one has no limit.
    got = await switchyard(capsys, "rate", "status", "--json", "--config", str(config_file))
    assert got.code == 0, got.err
    assert busy in {r["account"] for r in json.loads(got.out)}
    got = await switchyard(capsys, "rate", "status", "--account", idle, "--json", "--config", str(config_file))
    [row] = json.loads(got.out)
    assert (row["requests_available"], row["full_in_ms"], row["next_in_ms"]) == (20, 0, 0)
    got = await switchyard(capsys, "rate", "status", "--account", "vip", "--json", "--config", str(config_file))
    [row] = json.loads(got.out)
    assert row["per_second"] == "unlimited" and row["requests_available"] is None

    # The table says the same in words.
    got = await switchyard(capsys, "rate", "status", "--account", busy, "--config", str(config_file))
    assert got.code == 0
    assert busy in got.out and "15 of 20 requests" in got.out and "0.01/s burst 20" in got.out


async def test_an_empty_bucket_says_when_the_next_request_goes(
    capsys: pytest.CaptureFixture[str], nc: NATS, config_file: Path
) -> None:
    js = nc.jetstream()
    await ensure_topology(js, load_config(str(config_file)))
    account = f"empty-{uuid.uuid4().hex[:8]}"
    limiter = await RateLimiter.open(js)
    limit = RateLimit(per_second=0.01, burst=20, tokens_per_minute=1000)
    now = now_us()
    admitted = 0
    while (await limiter.decide(account, limit, now, tokens=10, lease=False)).admitted:
        admitted += 1
    await limiter.close()
    assert admitted == 20
    # The account's own section: the same limit, with its tokens per minute.
    cfg_raw = json.loads(config_file.read_text())
    cfg_raw["limits"]["accounts"][account] = cfg_raw["limits"]["accounts"]["metered"]
    config_file.write_text(json.dumps(cfg_raw))
    got = await switchyard(capsys, "rate", "status", "--account", account, "--json", "--config", str(config_file))
    assert got.code == 0, got.err
    [row] = json.loads(got.out)
    assert row["requests_available"] == 0 and 99_000 <= row["next_in_ms"] <= 100_000
    # 200 estimated tokens taken; one comes back every 60 ms (1,000 a minute) while the test runs.
    assert row["tokens_per_minute"] == 1000 and 1000 - 20 * 10 <= row["tokens_available"] <= 1000 - 20 * 10 + 50
    assert row["limit_source"] == f"limits.accounts.{account}"


async def test_no_fleet_is_exit_2(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_URL", "nats://127.0.0.1:9")
    got = await switchyard(capsys, "rate", "status")
    assert got.code == 2 and "cannot reach NATS" in got.err and "Traceback" not in got.err


@pytest.mark.parametrize("account", ["a.b", "*", "", "x" * 129, "a b"])
async def test_an_account_that_is_not_a_name_is_one_line(capsys: pytest.CaptureFixture[str], account: str) -> None:
    got = await switchyard(capsys, "rate", "status", "--account", account)
    assert got.code == 2 and "is not a name" in got.err and "Traceback" not in got.err
