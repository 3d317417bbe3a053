"""`switchyard providers` and `providers test`: keys, credit and breakers as the fleet shares them, and one
real call to a pool's provider made by one of its workers (`<prefix>.admin.providers.test.<pool>`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from nats.aio.client import Client as NATS

from router.breaker import Verdict
from router.config import BreakerPolicy, Config
from router.errors import ErrorCode, ProviderFailure
from router.providers import adapter_for
from router.providers.base import run_probe
from router.providers.fakes import FakeAnthropic, FakeGemini, FakeOpenAI, FakeServer, Scenario
from workers import configstore
from workers.health import HealthView, PoolHealth

from .conftest import Fleet, fleet_config, running_fleet
from .helpers import Result, switchyard

KEY = "sk-planted-0123456789abcdef"
ODD_KEY = "planted:Zq81-no-known-shape"
"""A key that looks like no key scrub() knows: only masking the key itself keeps it out."""
TIMEOUT = httpx.Timeout(5.0)


def config(url: str, **providers: dict[str, Any]) -> Config:
    """Providers (each with its own pool of the same name) at the fake OpenAI; routes name all but `spare`."""
    base: dict[str, Any] = {
        name: {"format": "openai", "base_url": url, "api_key_env": f"SY_TEST_{name.upper()}_KEY", **extra}
        for name, extra in providers.items()
    }
    routed = [name for name in providers if name != "spare"]
    return fleet_config({name: url for name in providers}, providers=base,
                        routes={"draft": {"default": [f"{name}:gpt-4o-mini" for name in routed]}})


@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """The fleet's log lines, kept here rather than printed among the CLI's output."""
    with structlog.testing.capture_logs() as captured:
        yield captured


@pytest.fixture
def cli_env(nats_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, logs: list[Any]) -> Path:
    """The CLI finds the test's NATS; its data directory has no state.json."""
    monkeypatch.setenv("NATS_URL", nats_url)
    return tmp_path


async def providers(capsys: pytest.CaptureFixture[str], data_dir: Path, *args: str) -> Result:
    return await switchyard(capsys, "providers", *args, "--data-dir", str(data_dir))


@pytest.fixture
async def fleet(nats_url: str, nc: NATS, fake_openai: FakeOpenAI, cli_env: Path) -> AsyncIterator[Fleet]:
    """Pools `openai` (a key), `denied` (its key is refused), `echo` (its error quotes the key), `keyless` (no
    key) and `spare` (no worker, not routed); the config pushed as `switchyard up` pushes it."""
    fake_openai.scenarios["echo"] = Scenario(status=400, error_body={"error": {
        "message": f"Invalid header: the key {ODD_KEY} and {KEY} are not accepted", "type": "invalid_request_error",
    }})
    cfg = config(
        fake_openai.url + "/v1", openai={}, denied={"headers": {"x-fake-scenario": "unauthorized"}},
        echo={"headers": {"x-fake-scenario": "echo"}}, keyless={}, spare={},
    )
    await configstore.push(nc.jetstream(), cfg)
    keys: dict[str, str | None] = {"openai": KEY, "denied": KEY, "echo": ODD_KEY, "keyless": None}
    async with running_fleet(nats_url, cfg, None, pools=list(keys), api_keys=keys) as f:
        await reported(nc, list(keys))
        yield f


async def reported(nc: NATS, pools: list[str]) -> None:
    """Until every pool's worker has said it is live (its test endpoint is up by then)."""
    view = HealthView(nc.jetstream())
    await view.start()
    try:
        async with asyncio.timeout(10):
            while any(view.pool_has_key(pool) is None for pool in pools):
                await asyncio.sleep(0.02)
    finally:
        await view.stop()


# --- providers test --------------------------------------------------------------------------------


async def test_a_pools_worker_calls_its_provider_and_reports_the_latency(
    capsys: pytest.CaptureFixture[str], fleet: Fleet, fake_openai: FakeOpenAI, cli_env: Path
) -> None:
    r = await providers(capsys, cli_env, "test", "openai")
    assert r.code == 0, r.err
    assert r.out.startswith("pool openai, provider openai: ok in ")
    assert f"(GET {fake_openai.url}/v1/models: HTTP 200)" in r.out
    assert fake_openai.listed[-1]["authorization"] == f"Bearer {KEY}"  # the worker's own key went out
    assert not fake_openai.requests  # a models list: no generation, no tokens

    r = await providers(capsys, cli_env, "test", "openai", "--json")
    answer = json.loads(r.out)
    assert r.code == 0
    assert answer["ok"] is True and answer["status"] == 200 and answer["code"] is None and answer["error"] is None
    assert answer["pool"] == "openai" and answer["provider"] == "openai"
    assert isinstance(answer["latency_ms"], int) and 0 <= answer["latency_ms"] < 10_000


async def test_a_refused_key_is_the_error_and_the_key_is_nowhere(
    capsys: pytest.CaptureFixture[str], fleet: Fleet, fake_openai: FakeOpenAI, cli_env: Path,
    logs: list[MutableMapping[str, Any]],
) -> None:
    r = await providers(capsys, cli_env, "test", "denied")
    assert r.code == 1
    assert r.out.startswith("pool denied, provider denied: failed in ")
    assert r.out.rstrip().endswith(
        "(GET " + fake_openai.url + "/v1/models: HTTP 401): UNAUTHORIZED: the provider rejected the API key"
        " (HTTP 401): check SY_TEST_DENIED_KEY"
    )
    assert fake_openai.listed[-1]["authorization"] == f"Bearer {KEY}"
    assert KEY not in r.out + r.err
    tested = [line for line in logs if line["event"] == "provider_tested"]
    assert tested and tested[-1]["code"] == "UNAUTHORIZED" and KEY not in str(logs)


async def test_a_key_quoted_back_by_the_provider_is_masked(
    capsys: pytest.CaptureFixture[str], fleet: Fleet, cli_env: Path
) -> None:
    r = await providers(capsys, cli_env, "test", "echo", "--json")
    answer = json.loads(r.out)
    assert r.code == 1
    assert answer["ok"] is False and answer["status"] == 400 and answer["code"] == "INVALID_REQUEST"
    assert answer["error"] == (
        "the provider refused the request (HTTP 400): Invalid header: the key [redacted] and [redacted] are not"
        " accepted"
    )
    assert ODD_KEY not in r.out + r.err and KEY not in r.out + r.err


async def test_a_worker_without_its_key_says_so_without_calling(
    capsys: pytest.CaptureFixture[str], fleet: Fleet, fake_openai: FakeOpenAI, cli_env: Path
) -> None:
    r = await providers(capsys, cli_env, "test", "keyless")
    assert r.code == 1
    assert r.out == (
        "pool keyless, provider keyless: failed: UNAUTHORIZED: no API key: set SY_TEST_KEYLESS_KEY in the"
        " environment of this pool's workers\n"
    )
    assert not fake_openai.listed


async def test_no_worker_unknown_pool_and_no_fleet_are_one_line_each(
    capsys: pytest.CaptureFixture[str], fleet: Fleet, cli_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = await providers(capsys, cli_env, "test", "spare")
    assert (r.code, r.out, r.err) == (2, "", "switchyard: no live worker for pool spare\n")
    r = await providers(capsys, cli_env, "test", "nosuch")
    assert (r.code, r.out) == (1, "")
    assert r.err == "switchyard: no pool 'nosuch' in the fleet's config (pools: openai, denied, echo, keyless, spare)\n"
    r = await providers(capsys, cli_env, "test", "openai.>")
    assert (r.code, r.err) == (1, "switchyard: 'openai.>' is not a pool name (letters, digits, _ and - only)\n")
    monkeypatch.setenv("NATS_URL", "nats://127.0.0.1:9")
    r = await providers(capsys, cli_env, "test", "openai")
    assert r.code == 2 and r.err.startswith("switchyard: cannot reach NATS at nats://127.0.0.1:9")
    assert len(r.err.splitlines()) == 1


async def test_a_stopped_fleet_has_no_worker_to_ask(
    capsys: pytest.CaptureFixture[str], nats_url: str, nc: NATS, fake_openai: FakeOpenAI, cli_env: Path
) -> None:
    cfg = config(fake_openai.url + "/v1", openai={})
    await configstore.push(nc.jetstream(), cfg)
    async with running_fleet(nats_url, cfg, None):
        await reported(nc, ["openai"])
        assert (await providers(capsys, cli_env, "test", "openai")).code == 0
    r = await providers(capsys, cli_env, "test", "openai")
    assert (r.code, r.err) == (2, "switchyard: no live worker for pool openai\n")


# --- providers ---------------------------------------------------------------------------------------


async def test_the_listing_shows_keys_credit_breakers_and_workers(
    capsys: pytest.CaptureFixture[str], fleet: Fleet, nc: NATS, fake_openai: FakeOpenAI, cli_env: Path
) -> None:
    js = nc.jetstream()
    health = PoolHealth(HealthView(js), pool="openai", policy=BreakerPolicy(failures=1), provider="spare",
                        credit_cooldown_ms=600_000, has_key=True)
    await health.start()
    try:
        ticket = await health.admit(10_000)
        assert ticket is not None
        await health.record(ticket, Verdict.FAILURE)  # one failure opens it with this policy
        await health.out_of_credit()  # provider spare, as this "worker" says it is spare's
    finally:
        await health.stop()  # and its key report goes with it

    r = await providers(capsys, cli_env)
    assert r.code == 1, r.err
    url = fake_openai.url + "/v1"
    lines = r.out.splitlines()
    assert lines[0] == "the fleet's config, revision 1"
    assert lines[1].split() == ["provider", "format", "base", "URL", "key", "variable", "key", "credit"]
    assert lines[2].split() == ["openai", "openai", url, "SY_TEST_OPENAI_KEY", "yes", "ok"]
    assert lines[5].split() == ["keyless", "openai", url, "SY_TEST_KEYLESS_KEY", "no", "ok"]
    assert lines[6].split()[:5] == ["spare", "openai", url, "SY_TEST_SPARE_KEY", "unknown"]
    assert lines[6].split()[5:7] == ["exhausted", "until"]
    assert lines[8].split() == ["pool", "provider", "routed", "breaker", "workers", "key"]
    assert lines[9].split()[:5] == ["openai", "openai", "yes", "open", "until"]
    assert "UTC (after 1 failure)" in lines[9] and lines[9].split()[-2:] == ["1", "yes"]
    assert lines[10].split() == ["denied", "denied", "yes", "closed", "1", "yes"]
    assert lines[13].split() == ["spare", "spare", "no", "closed", "0", "unknown"]
    problems = r.out.split("needs a look:\n")[1].splitlines()
    assert [p.split(" until ")[0] for p in problems] == [
        "  - pool openai's breaker is open",
        "  - pool keyless is routed, but its workers have no API key (set SY_TEST_KEYLESS_KEY)",
        "  - provider spare is out of credit",
    ]

    r = await providers(capsys, cli_env, "--json")
    listing = json.loads(r.out)
    assert r.code == 1
    rows = {p["provider"]: p for p in listing["providers"]}
    assert rows["openai"]["key"] == "yes" and rows["openai"]["credit"] == "ok"
    [pool] = rows["openai"]["pools"]
    assert pool["breaker"] == "open" and pool["failures"] == 1 and pool["breaker_until"]
    assert pool["workers"] == 1 and pool["routed"] is True
    assert rows["keyless"]["key"] == "no"
    assert rows["spare"]["credit"] == "exhausted" and rows["spare"]["credit_until"]
    assert rows["spare"]["pools"][0] | {"breaker_until": None} == {
        "pool": "spare", "provider": "spare", "routed": False, "breaker": "closed", "failures": 0,
        "breaker_until": None, "workers": 0, "key": "unknown",
    }
    assert len(listing["problems"]) == 3


async def test_a_healthy_fleet_exits_0_and_one_with_no_worker_left_exits_1(
    capsys: pytest.CaptureFixture[str], nats_url: str, nc: NATS, fake_openai: FakeOpenAI, cli_env: Path
) -> None:
    cfg = config(fake_openai.url + "/v1", openai={}, local={"api_key_env": None})
    await configstore.push(nc.jetstream(), cfg)
    async with running_fleet(nats_url, cfg, None, api_keys={"openai": KEY}):
        await reported(nc, ["openai", "local"])
        r = await providers(capsys, cli_env)
    assert r.code == 0, r.out + r.err
    assert "needs a look" not in r.out
    assert [line.split()[-2:] for line in r.out.splitlines()[2:4]] == [["yes", "ok"], ["needed", "ok"]]
    assert r.out.splitlines()[3].split()[3:5] == ["-", "not"]  # no key variable, no key needed

    r = await providers(capsys, cli_env)  # the workers stopped and took their key reports with them
    assert r.code == 1
    assert r.out.splitlines()[2].split()[-2:] == ["unknown", "ok"]
    assert "  - pool openai is routed, but no live worker serves it\n" in r.out
    assert KEY not in r.out


async def test_without_a_pushed_config_or_a_fleet_it_says_so(
    capsys: pytest.CaptureFixture[str], nc: NATS, cli_env: Path, fake_openai: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from workers.runtime import ensure_topology

    await ensure_topology(nc.jetstream(), config(fake_openai.url, openai={}))  # the streams, no config
    r = await providers(capsys, cli_env)
    assert (r.code, r.out) == (1, "")
    assert r.err.startswith("switchyard: no config was pushed to this fleet") and len(r.err.splitlines()) == 1
    await nc.jetstream().delete_stream("LLM_REQ")
    r = await providers(capsys, cli_env)
    assert r.code == 2 and "no Switchyard streams" in r.err
    monkeypatch.setenv("NATS_URL", "nats://127.0.0.1:9")
    assert (await providers(capsys, cli_env, "--json")).code == 2


# --- each adapter's probe ----------------------------------------------------------------------------

PROBES = {
    "openai": ("https://api.example/v1", "https://api.example/v1/models", {"authorization": f"Bearer {KEY}"}),
    "anthropic": ("https://api.example", "https://api.example/v1/models?limit=1",
                  {"x-api-key": KEY, "anthropic-version": "2023-06-01"}),
    "gemini": ("https://api.example/", "https://api.example/v1beta/models?pageSize=1", {"x-goog-api-key": KEY}),
}


@pytest.mark.parametrize("fmt", list(PROBES))
async def test_each_adapters_probe_lists_models_with_its_auth(fmt: str) -> None:
    base, url, auth = PROBES[fmt]
    adapter = adapter_for(fmt)
    call = adapter.probe(base_url=base, api_key=KEY, headers={"x-team": "a"})
    assert call.url == url
    seen: list[httpx.Request] = []
    answers = iter([
        httpx.Response(200, json={"data": [], "models": []}),
        httpx.Response(401, json={"error": {"type": "authentication_error", "message": KEY}}),
        httpx.Response(200, text="<html>a login page</html>"),
    ])

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return next(answers)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        assert await run_probe(http, adapter, call, timeout=TIMEOUT) == 200
        with pytest.raises(ProviderFailure) as refused:
            await run_probe(http, adapter, call, timeout=TIMEOUT)
        with pytest.raises(ProviderFailure) as not_api:
            await run_probe(http, adapter, call, timeout=TIMEOUT)
    assert seen[0].method == "GET" and str(seen[0].url) == url and not seen[0].content
    assert {k: seen[0].headers[k] for k in auth} == auth and seen[0].headers["x-team"] == "a"
    assert KEY not in str(seen[0].url)
    assert refused.value.code is ErrorCode.UNAUTHORIZED and KEY not in refused.value.message
    assert not_api.value.code is ErrorCode.PROVIDER_ERROR and "is not a models list (HTTP 200)" in not_api.value.message


@pytest.mark.parametrize(("fmt", "fake_cls", "path"), [
    ("openai", FakeOpenAI, "/v1"), ("anthropic", FakeAnthropic, ""), ("gemini", FakeGemini, ""),
])
async def test_each_probe_against_its_fake_and_its_faults(fmt: str, fake_cls: type[FakeServer], path: str) -> None:
    fake = fake_cls()
    await fake.start()
    adapter = adapter_for(fmt)
    try:
        async with httpx.AsyncClient() as http:
            ok = adapter.probe(base_url=fake.url + path, api_key=KEY, headers={})
            assert await run_probe(http, adapter, ok, timeout=TIMEOUT) == 200
            no_credit = "credit_exhausted" if fmt == "anthropic" else "insufficient_quota"  # Anthropic's own words
            for scenario, code in (("unauthorized", ErrorCode.UNAUTHORIZED), ("server_error", ErrorCode.PROVIDER_ERROR),
                                   (no_credit, ErrorCode.PROVIDER_UNAVAILABLE)):
                call = adapter.probe(base_url=fake.url + path, api_key=KEY, headers={"x-fake-scenario": scenario})
                with pytest.raises(ProviderFailure) as failed:
                    await run_probe(http, adapter, call, timeout=TIMEOUT)
                assert failed.value.code is code, scenario
                assert failed.value.credit_exhausted is (code is ErrorCode.PROVIDER_UNAVAILABLE)
        port = fake.port
    finally:
        await fake.stop()
    gone = adapter.probe(base_url=f"http://127.0.0.1:{port}{path}", api_key=KEY, headers={})
    async with httpx.AsyncClient() as http:
        with pytest.raises(ProviderFailure) as unreachable:
            await run_probe(http, adapter, gone, timeout=TIMEOUT)
    assert unreachable.value.message == "could not reach the provider (connection refused)"
