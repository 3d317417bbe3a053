"""Planted keys appear nowhere: with keys from the environment and stored encrypted (global and one
account's own), every error path of a real in-process fleet is driven, and every log line, every
message on the NATS server (replies, events, work items, DLQ copies, KV writes), every audit row, every
metric and `switchyard keys list` is searched for the keys and for their distinctive parts."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import re
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry, generate_latest

from router.providers import openai as openai_adapter
from router.providers.base import Event, HttpCall
from router.providers.fakes import FakeOpenAI, Scenario
from router.redact import _DISTINCTIVE
from router.secrets import MASTER_KEYS_ENV, parse_master_keys
from schemas import Done, Error, Reply, Request
from workers import auditor, dispatcher, metrics, provider
from workers.keys import KeyRing
from workers.processes import api_keys
from workers.runtime import configure_logging

from .conftest import fleet_config, running_fleet
from .helpers import ask_raw, audit_row, request, switchyard

RUN = uuid.uuid4().hex[:6]
ENV_KEY = f"envprobe.{RUN}{uuid.uuid4().hex}"
"""The openai provider's key, from its environment variable."""
GLOBAL_KEY = f"zaiprobe.{RUN}{uuid.uuid4().hex}"
"""The zai provider's key for every account, stored encrypted."""
GLOBEX_KEY = f"gxprobe/{RUN}{uuid.uuid4().hex}"
"""Account globex's own key for zai, stored encrypted."""
PLANTED = (ENV_KEY, GLOBAL_KEY, GLOBEX_KEY)


def needles() -> list[str]:
    """Each key and each part of it long enough to give it away (as router/redact.py splits them)."""
    out: set[str] = set(PLANTED)
    for key in PLANTED:
        out |= {p for p in re.split(r"[.:_\-/]", key) if len(p) >= _DISTINCTIVE}
    return sorted(out)


def echo(status: int, message: str) -> Scenario:
    return Scenario(status=status, error_body={"error": {"message": message, "type": "invalid_request_error",
                                                         "code": None}})


ALL = " ".join(PLANTED)
SCENARIOS = {
    # A 401 whose body quotes every key.
    "planted_401": echo(401, f"Incorrect API key provided: {ALL}. Find your key at https://example.invalid"),
    # A refusal quoting the keys in its text, then in the URL it was called at.
    "echo_body": echo(400, f"Invalid request made with keys {ALL}"),
    "echo_url": echo(400, f"Bad URL https://api.example.invalid/v1/chat/completions?key={GLOBAL_KEY}"
                          f"&api_key={GLOBEX_KEY}&token={ENV_KEY}"),
    # A server error quoting the keys: retried, then the next target.
    "server_echo": echo(500, f"internal error for {ALL}"),
    "slow_echo": Scenario(ttft_ms=4000, error_body={"error": {"message": ALL}}),
}


class Crashes:
    """Bugs planted in the OpenAI adapter, picked by a marker in the prompt: each raises an exception whose
    text carries the key (and headers) of the call, as a careless adapter could."""

    def __init__(self) -> None:
        self.mode: str | None = None
        self.call: HttpCall | None = None

    def build(self, original: Any) -> Any:
        def build(req: Request, **kw: Any) -> HttpCall:
            call: HttpCall = original(req, **kw)
            text = " ".join(str(m.content) for m in req.messages)
            found = re.search(r"\[\[crash:(\w+)\]\]", text)
            self.mode, self.call = (found.group(1) if found else None), call
            if self.mode == "build":
                raise ValueError(f"cannot translate with key {kw.get('api_key')} and headers {call.headers}")
            return call

        return build

    def parse_response(self, original: Any) -> Any:
        def parse_response(body: bytes) -> list[Event]:
            if self.mode == "parse":
                assert self.call is not None
                raise KeyError(f"no choices in the answer to {self.call.headers}")
            events: list[Event] = original(body)
            return events

        return parse_response

    def stream_parser(self, original: Any) -> Any:
        crashes = self

        class Parser:
            def __init__(self) -> None:
                self.inner = original()
                self.seen = 0

            def feed(self, event: Any) -> list[Event]:
                out: list[Event] = self.inner.feed(event)
                self.seen += len(out)
                if crashes.mode == "stream" and self.seen >= 2:  # after a chunk went out
                    assert crashes.call is not None
                    raise RuntimeError(f"stream parser bug, call headers {crashes.call.headers}")
                return out

            def close(self) -> list[Event]:
                closed: list[Event] = self.inner.close()
                return closed

        return Parser


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> Iterator[io.StringIO]:
    """Every structlog line, through the processors every process runs (workers/runtime.py), into a buffer;
    stdlib logging (nats-py, asyncio) through caplog."""
    buf = io.StringIO()
    configure_logging("debug")
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(buf), cache_logger_on_first_use=False)
    caplog.set_level(logging.DEBUG)
    try:
        yield buf
    finally:
        structlog.reset_defaults()


class Wire:
    """Every message published on the server while the test runs (subject, headers, body)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str], bytes]] = []

    async def on_msg(self, msg: Msg) -> None:
        self.seen.append((msg.subject, dict(msg.headers or {}), msg.data))

    def text(self) -> str:
        return "\n".join(f"{s} {h} {d.decode('utf-8', 'replace')}" for s, h, d in self.seen)

    def on(self, prefix: str) -> list[tuple[str, dict[str, str], bytes]]:
        return [m for m in self.seen if m[0].startswith(prefix)]


@pytest.fixture
async def fakes() -> AsyncIterator[dict[str, FakeOpenAI]]:
    out = {"openai": FakeOpenAI(), "zai": FakeOpenAI()}
    for fake in out.values():
        await fake.start()
    out["openai"].scenarios.update({k: v for k, v in SCENARIOS.items() if k != "server_echo"})
    out["zai"].scenarios.update(SCENARIOS)
    yield out
    for fake in out.values():
        await fake.stop()


def record_metrics(monkeypatch: pytest.MonkeyPatch) -> list[CollectorRegistry]:
    """The registries of every process's metrics (dispatcher, each worker, auditor) made from now on."""
    made: list[CollectorRegistry] = []
    for module, name in ((dispatcher, "DispatcherMetrics"), (provider, "WorkerMetrics"), (auditor, "AuditorMetrics")):
        real = getattr(metrics, name)

        def recording(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
            made_one = _real(*args, **kwargs)
            made.append(made_one.registry)
            return made_one

        monkeypatch.setattr(module, name, recording)
    return made


def authorizations(fake: FakeOpenAI) -> set[str]:
    return {v for h in fake.request_headers for k, v in h.items() if k.lower() == "authorization"}


async def test_planted_keys_appear_in_no_log_line_message_row_or_listing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    tmp_path: Path, nats_url: str, nc: NATS, db: asyncpg.Pool, pg_url: str, fakes: dict[str, FakeOpenAI],
    logged: io.StringIO,
) -> None:
    crashes = Crashes()
    registries = record_metrics(monkeypatch)
    monkeypatch.setattr(openai_adapter, "build", crashes.build(openai_adapter.build))
    monkeypatch.setattr(openai_adapter, "parse_response", crashes.parse_response(openai_adapter.parse_response))
    monkeypatch.setattr(openai_adapter, "stream_parser", crashes.stream_parser(openai_adapter.stream_parser))

    master = f"1:{base64.b64encode(os.urandom(32)).decode()}"
    for name, value in {"DATABASE_URL": pg_url, MASTER_KEYS_ENV: master, "SWITCHYARD_DATA_DIR": str(tmp_path),
                        "SY_TEST_OPENAI_KEY": ENV_KEY}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("SY_TEST_ZAI_KEY", raising=False)
    await db.execute("TRUNCATE llm_provider_keys")
    for key, extra in ((GLOBAL_KEY, ()), (GLOBEX_KEY, ("--account", "globex"))):
        monkeypatch.setattr("sys.stdin", io.StringIO(key))
        assert (await switchyard(capsys, "keys", "set", "SY_TEST_ZAI_KEY", *extra)).code == 0

    cfg = fleet_config(
        {"openai": fakes["openai"].url + "/v1", "zai": fakes["zai"].url + "/v1"},
        routes={"only_openai": {"default": ["openai:gpt-4o-mini"]}, "only_zai": {"default": ["zai:gpt-4o-mini"]},
                "chain": {"default": ["zai:gpt-4o-mini", "openai:gpt-4o-mini"]}},
    )
    ring = KeyRing(pg_url, parse_master_keys(master))
    stop = asyncio.Event()
    ring_task = asyncio.create_task(ring.run(stop))
    await asyncio.wait_for(ring.loaded.wait(), 10)
    wire = Wire()
    spy = await nc.subscribe(">", cb=wire.on_msg)

    cases: list[tuple[str, str, str, dict[str, Any], str | None]] = [
        # (use case, account, prompt, request fields, the code the producer gets; None: done)
        ("only_zai", "globex", "hello", {}, None),
        ("only_zai", "acme", "hello", {}, None),
        ("only_openai", "acme", "hello", {"stream": True}, None),
        ("only_openai", "acme", "[[fake:planted_401]]", {}, "UNAUTHORIZED"),
        ("only_zai", "globex", "[[fake:planted_401]]", {}, "UNAUTHORIZED"),
        ("only_zai", "acme", "[[fake:echo_body]]", {}, "INVALID_REQUEST"),
        ("only_zai", "globex", "[[fake:echo_url]]", {"stream": True}, "INVALID_REQUEST"),
        ("chain", "globex", "[[fake:server_echo]]", {}, None),  # zai fails, openai answers
        ("only_zai", "globex", "[[crash:build]]", {}, "INTERNAL"),
        ("only_openai", "acme", "[[crash:stream]] tell me a long story", {"stream": True}, "INTERNAL"),
        ("only_zai", "globex", "[[crash:parse]]", {}, "INTERNAL"),  # the pull loop's last resort, after retries
        ("only_openai", "acme", "[[fake:slow_echo]]", {"timeout_ms": 1000}, "TIMEOUT"),
    ]
    replies: dict[str, list[Reply]] = {}
    try:
        async with running_fleet(nats_url, cfg, db, api_keys=api_keys(cfg), keyring=ring):
            for use_case, account, prompt, fields, want in cases:
                body = request(prompt, account=account, **fields)
                got = await ask_raw(nc, body, subject=f"llm.req.{use_case}.{account}", timeout=60)
                replies[body["id"]] = got
                last = got[-1]
                assert (last.code if isinstance(last, Error) else None) == want, (prompt, last)
            rows = [await audit_row(db, rid, timeout=20) for rid in replies]
            for code in ("", "--json"):
                listing = await switchyard(capsys, "keys", "list", *([code] if code else []))
                assert listing.code == 0 and "SY_TEST_ZAI_KEY" in listing.out
                wire.seen.append(("keys list", {}, (listing.out + listing.err).encode()))
            await nc.flush()
    finally:
        await spy.unsubscribe()
        stop.set()
        await asyncio.wait_for(ring_task, 10)

    # The keys were in use: each went to its provider, for the right accounts.
    assert f"Bearer {ENV_KEY}" in authorizations(fakes["openai"])
    assert authorizations(fakes["zai"]) == {f"Bearer {GLOBAL_KEY}", f"Bearer {GLOBEX_KEY}"}
    # What was searched holds what each path leaves, so a capture that missed them cannot pass unseen.
    log_text = logged.getvalue()
    for event in ("build_failed", "handler_failed", "worker_failed", "fell_back", "failed", "stored_keys_loaded"):
        assert f'"event": "{event}"' in log_text, event
    assert wire.on("llm.events.completed") and wire.on("llm.dlq.work") and wire.on("llm.work.")
    assert wire.on("_INBOX.") and len(rows) == len(cases)
    assert "[redacted]" in wire.text() and "[redacted]" in log_text
    assert len(registries) == 4 and 'code="UNAUTHORIZED"' in "".join(generate_latest(r).decode() for r in registries)

    haystacks: Mapping[str, str] = {
        "log lines": log_text,
        "stdlib log records": caplog.text,
        "NATS messages and keys list": wire.text(),
        "replies": msgspec.json.encode(replies).decode(),
        "audit rows": repr([dict(r) for r in rows]),
        "every audit row": repr([dict(r) for r in await db.fetch("SELECT * FROM llm_audit")]),
        "metrics": "".join(generate_latest(r).decode() for r in registries),
    }
    for where, text in haystacks.items():
        for needle in needles():
            assert needle not in text, f"a planted key (or a part of one) in the {where}"
    assert isinstance(replies[next(iter(replies))][-1], Done)


@pytest.mark.parametrize("template", [
    "GET https://generativelanguage.example/v1beta/models?key={v}&pageSize=1",
    "POST https://api.example/v1/chat?api_key={v}",
    "called https://api.example/v1/x?a=1&token={v}#top",
    "headers {{'x-api-key': '{v}', 'content-type': 'application/json'}}",
    'headers {{"x-goog-api-key": "{v}"}}',
    "x-api-key: {v}",
    "invalid api_key={v} given",
    "access_token={v}",
    "Authorization: Bearer {v}",
])
def test_a_value_named_as_a_key_is_masked_whatever_its_shape(template: str) -> None:
    from router.redact import MASK, scrub

    value = f"{uuid.uuid4().hex[:6]}.{uuid.uuid4().hex}"  # no known shape, never remembered
    out = scrub(template.format(v=value))
    assert value not in out and MASK in out
    assert out == template.format(v=MASK) or template.startswith("Authorization")
