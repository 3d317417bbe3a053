"""Hostile input against a running fleet: every message ends handled, answered or dead-lettered, and no
loop dies. The generated corpus has a few thousand messages here; SWITCHYARD_HOSTILE_N=100000 runs the
long mode."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
import nats
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api

from router.providers.fakes import FakeOpenAI
from schemas import Done, Error, decode_reply

from .conftest import Fleet, fleet_config, running_fleet
from .helpers import ask_raw, audit_row, request

N = int(os.environ.get("SWITCHYARD_HOSTILE_N", "2000"))


async def dlq_copies(nc: NATS, stage: str, expect: int, timeout: float = 60.0, *,
                     headers_only: bool = False) -> list[Msg]:
    """Every copy on `llm.dlq.<stage>` so far, waiting until there are `expect` of them."""
    config = api.ConsumerConfig(headers_only=True) if headers_only else None
    sub = await nc.jetstream().subscribe(f"llm.dlq.{stage}", ordered_consumer=True, config=config)
    out: list[Msg] = []
    end = asyncio.get_running_loop().time() + timeout
    try:
        while len(out) < expect and asyncio.get_running_loop().time() < end:
            try:
                out.append(await sub.next_msg(timeout=2))
            except nats.errors.TimeoutError:
                continue
    finally:
        await sub.unsubscribe()
    return out


async def refusal(nc: NATS, body: bytes, reply_to: str, subject: str = "llm.req.draft.acme") -> Error:
    replies = await ask_raw(nc, body, subject=subject, inbox=reply_to)
    [reply] = replies
    assert isinstance(reply, Error), reply
    return reply


def _body(**fields: Any) -> tuple[dict[str, Any], str]:
    inbox = f"_INBOX.t{uuid.uuid4().hex}"
    return request(reply_to=inbox, **fields), inbox


def _alive(fleet: Fleet) -> None:
    assert fleet.task is not None and not fleet.task.done(), "a serve loop of the fleet ended"


async def _served(nc: NATS, db: asyncpg.Pool, account: str = "acme") -> None:
    body = request(account=account)
    [*_, done] = await ask_raw(nc, body, subject=f"llm.req.draft.{account}")
    assert isinstance(done, Done)
    await audit_row(db, body["id"])


# --- the cases seen ---------------------------------------------------------------------------------


async def test_a_reply_to_longer_than_the_control_line_is_dead_lettered(fleet: Fleet, nc: NATS,
                                                                       db: asyncpg.Pool) -> None:
    long_inbox = "_INBOX." + "x" * 5000
    js = nc.jetstream()
    valid = request(reply_to=long_inbox)
    invalid = request(reply_to=long_inbox, max_tokens=-1)
    for body in (valid, invalid):
        await js.publish("llm.req.draft.acme", msgspec.json.encode(body))
    copies = await dlq_copies(nc, "dispatch", expect=2)
    assert len(copies) == 2
    errors = [c.headers["Switchyard-Error"] for c in copies if c.headers]
    assert [c.headers["Switchyard-Error-Code"] for c in copies if c.headers] == ["INVALID_REQUEST"] * 2
    assert "`reply_to` is 5007 characters; the limit is 256" in errors[0]
    assert "max_tokens" in errors[1]  # refused for its first fault; nobody to answer either way
    await _served(nc, db)
    _alive(fleet)


async def test_a_body_near_max_payload_is_refused_and_its_copy_cut_to_fit(fleet: Fleet, nc: NATS,
                                                                         db: asyncpg.Pool) -> None:
    for spare in (4000, 100):  # the second leaves no room for the copy's headers
        body, inbox = _body(text="")
        raw = msgspec.json.encode(body)
        filler = "y" * (nc.max_payload - spare - len(raw))
        body["messages"][0]["content"] = filler
        data = msgspec.json.encode(body)
        assert nc.max_payload - spare - 10 <= len(data) <= nc.max_payload
        err = await refusal(nc, data, inbox)
        assert err.code == "INVALID_REQUEST"
        assert f"the limit is {nc.max_payload - 16 * 1024} bytes" in err.message
    copies = await dlq_copies(nc, "dispatch", expect=2)
    assert [c.headers.get("Switchyard-Truncated") if c.headers else None for c in copies][1] is not None
    truncated = copies[1]
    assert truncated.headers is not None
    assert int(truncated.headers["Switchyard-Truncated"]) > len(truncated.data)
    await _served(nc, db)
    _alive(fleet)


async def test_nul_characters_are_refused_at_the_door(fleet: Fleet, nc: NATS, db: asyncpg.Pool) -> None:
    body, inbox = _body(id="bad\u0000id")
    err = await refusal(nc, msgspec.json.encode(body), inbox)
    assert err.code == "INVALID_REQUEST" and "`id` may not contain" in err.message
    body, inbox = _body(metadata={"team": "a\u0000b"})
    err = await refusal(nc, msgspec.json.encode(body), inbox)
    assert err.code == "INVALID_REQUEST" and "NUL" in err.message
    # A prompt about escapes is not a NUL character.
    body = request(text="what does \\u0000 mean in JSON?")
    [*_, done] = await ask_raw(nc, body)
    assert isinstance(done, Done)
    await audit_row(db, body["id"])
    await _served(nc, db)
    _alive(fleet)


async def test_deep_nesting_is_refused_naming_the_field(fleet: Fleet, nc: NATS, db: asyncpg.Pool) -> None:
    for depth, words in ((5000, "nested too deeply"), (40, "nested more than 32 levels")):
        body, inbox = _body(tools=[{"name": "t", "parameters": "DEEP"}])
        data = msgspec.json.encode(body).replace(b'"DEEP"', b'{"a":' * depth + b"1" + b"}" * depth)
        err = await refusal(nc, data, inbox)
        assert err.code == "INVALID_REQUEST" and words in err.message, err.message
    await _served(nc, db)
    _alive(fleet)


async def test_a_lone_surrogate_gets_an_answer_when_id_and_reply_to_are_readable(fleet: Fleet, nc: NATS) -> None:
    body, inbox = _body(text="SURROGATE")
    data = msgspec.json.encode(body).replace(b"SURROGATE", b"\\udcff")
    err = await refusal(nc, data, inbox)
    assert err.code == "INVALID_REQUEST" and err.id == body["id"] and "not valid JSON" in err.message
    _alive(fleet)


async def test_each_limit_is_named_in_its_refusal(fleet: Fleet, nc: NATS) -> None:
    many = [{"role": "user", "content": "x"}] * 1025
    image = {"type": "image", "url": "https://example.com/a.png"}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"id": "a.b"}, "`id` may not contain '.'"),
        ({"id": "a b"}, "`id` may not contain ' '"),
        ({"id": "x" * 129}, "length <= 128"),
        ({"messages": many}, "length <= 1024"),
        ({"messages": [{"role": "user", "content": [image] * 65}]}, "65 images; the limit is 64"),
        ({"tools": [{"name": f"t{i}"} for i in range(129)]}, "length <= 128"),
        ({"metadata": {f"k{i}": "v" for i in range(65)}}, "length <= 64"),
        ({"metadata": {"k": "v" * 1025}}, "length <= 1024"),
        ({"model": "m" * 257}, "length <= 256"),
    ]
    for fields, words in cases:
        body, inbox = _body(**fields)
        err = await refusal(nc, msgspec.json.encode(body), inbox)
        assert err.code == "INVALID_REQUEST" and words in err.message, (fields.keys(), err.message)
    _alive(fleet)


async def test_ids_are_scoped_by_account(fleet: Fleet, nc: NATS, db: asyncpg.Pool) -> None:
    rid = uuid.uuid4().hex
    for account in ("acme", "globex"):
        body = request(id=rid, account=account)
        [*_, done] = await ask_raw(nc, body, subject=f"llm.req.draft.{account}", msg_id=f"{account}:{rid}")
        assert isinstance(done, Done)
    async with asyncio.timeout(10):
        while await db.fetchval("SELECT count(*) FROM llm_audit WHERE request_id = $1", rid) < 2:
            await asyncio.sleep(0.05)
    accounts = {r["account"] for r in await db.fetch("SELECT account FROM llm_audit WHERE request_id = $1", rid)}
    assert accounts == {"acme", "globex"}


async def test_a_reused_id_in_one_account_is_refused_not_dropped(fleet: Fleet, nc: NATS) -> None:
    first, inbox1 = _body()
    second, inbox2 = _body(id=first["id"])
    [*_, done] = await ask_raw(nc, msgspec.json.encode(first), inbox=inbox1)
    assert isinstance(done, Done)
    err = await refusal(nc, msgspec.json.encode(second), inbox2)
    assert err.code == "INVALID_REQUEST" and "was used by another request" in err.message


async def test_a_request_for_another_account_or_its_results_is_refused(fleet: Fleet, nc: NATS) -> None:
    # The subject's account is the one NATS permissions bind to a producer's credential: a body naming
    # another, or results under another account's `llm.res.<account>.`, would spend or write as it.
    body, inbox = _body(account="globex")
    err = await refusal(nc, msgspec.json.encode(body), inbox)
    assert err.code == "INVALID_REQUEST"
    assert "`account` is 'globex' but the subject is for account 'acme'" in err.message
    elsewhere = request(reply_to="llm.res.globex.job.1")
    await nc.jetstream().publish("llm.req.draft.acme", msgspec.json.encode(elsewhere))
    copies = await dlq_copies(nc, "dispatch", expect=2)
    by_id = {msgspec.json.decode(c.data)["id"]: c.headers or {} for c in copies}
    assert by_id[body["id"]]["Switchyard-Error-Code"] == "INVALID_REQUEST"
    refused = by_id[elsewhere["id"]]["Switchyard-Error"]
    assert "must be the request's own account's, `llm.res.acme.<anything>`" in refused
    # Its refusal went nowhere: answering would have written into globex's results.
    info = await nc.jetstream().stream_info("LLM_RES", subjects_filter="llm.res.globex.>")
    assert not info.state.subjects
    _alive(fleet)


# --- the generated corpus ---------------------------------------------------------------------------


@dataclass
class Hostile:
    """One generated message. `field` is None for raw bytes or random JSON; else the request field
    that was replaced by `value`, and the message keeps a readable `id` and `reply_to` unless
    `field` is one of them."""

    raw: bytes | None
    field: str | None = None
    value: Any = None
    ascii_only: bool = True

    def encode(self, i: int) -> tuple[bytes, bool]:
        """The body for message i, and whether it must get an error reply."""
        if self.raw is not None:
            return self.raw, False
        body: dict[str, Any] = request(id=f"h{i}", reply_to=f"_INBOX.hostile.{i}")
        raws: list[bytes] = []
        value = self.value
        if isinstance(value, Deep):
            raws.append(value.text())
            value = "__RAW0__"
        match self.field:
            case "content":
                body["messages"][0]["content"] = value
            case "parameters":
                body["tools"] = [{"name": "t", "parameters": value}]
            case "arguments":
                body["messages"].insert(0, {"role": "assistant", "tool_calls": [
                    {"id": "c1", "name": "t", "arguments": value}]})
            case "metadata_value":
                body["metadata"] = {"k": value}
            case "signature":
                body["messages"].insert(0, {"role": "assistant", "tool_calls": [
                    {"id": "c1", "name": "t", "arguments": {}, "signature": value}]})
            case field:
                assert field is not None
                body[field] = value
        text = json.dumps(body, ensure_ascii=self.ascii_only)
        for n, raw in enumerate(raws):
            text = text.replace(f'"__RAW{n}__"', raw.decode())
        return text.encode("utf-8", "surrogatepass"), self.field not in ("id", "reply_to")


@dataclass
class Deep:
    depth: int
    opener: str

    def text(self) -> bytes:
        closer = "]" if self.opener == "[" else "}"
        return (self.opener * self.depth + "1" + closer * self.depth).encode()


EDGE = ["\u0000", "\udcff", "\ud800", "\uffff", "\u202e", "\u200b", "\U0010ffff", "é", "\n", "\r\n", "\t",
        " ", ".", "*", ">", "\\", '"', "\x7f", "\x1b", "\ufeff"]
edge_text = st.lists(st.sampled_from(EDGE) | st.text(max_size=4), max_size=12).map("".join)
huge_text = st.tuples(st.integers(10_000, 1_100_000), st.sampled_from(["x", "é", "\u0000", "\udcff", "😀"])).map(
    lambda t: t[1] * (t[0] // 4)
)
scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
           | st.integers(min_value=2**63, max_value=2**80) | edge_text)
json_values = st.recursive(
    scalars, lambda c: st.lists(c, max_size=6) | st.dictionaries(edge_text, c, max_size=6), max_leaves=25
)
deep = st.builds(Deep, st.integers(1, 5000), st.sampled_from(["[", '{"a":']))
wide = st.integers(1, 30_000).map(lambda n: list(range(n)))
values = json_values | edge_text | huge_text | deep | wide
fields = st.sampled_from([
    "id", "account", "use_case", "tier", "messages", "max_tokens", "temperature", "model", "stream", "tools",
    "tool_choice", "reply_to", "timeout_ms", "metadata", "v", "extra", "content", "parameters", "arguments",
    "metadata_value", "queue_ms", "signature",
])
hostile = (
    st.builds(Hostile, raw=st.binary(max_size=2048))
    | st.builds(Hostile, raw=json_values.map(lambda v: json.dumps(v).encode()))
    | st.builds(Hostile, raw=st.none(), field=fields, value=values, ascii_only=st.booleans())
)


def corpus(n: int, batch: int = 0) -> list[Hostile]:
    """`n` generated messages, the same ones for the same `batch` (its seed)."""
    out: list[Hostile] = []

    @seed(batch)
    @settings(max_examples=n, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(hostile)
    def collect(h: Hostile) -> None:
        out.append(h)

    collect()
    return out


def numbered_corpus(n: int, per_batch: int = 1000) -> Iterator[tuple[int, Hostile]]:
    """`n` messages numbered from 0, generated a batch at a time so the long mode's memory stays flat."""
    for b, start in enumerate(range(0, n, per_batch)):
        yield from enumerate(corpus(min(per_batch, n - start), batch=b), start)


@pytest.mark.timeout(max(120, N // 20))  # the long mode needs more than the default two minutes
async def test_a_generated_hostile_corpus_never_stops_the_fleet(
    nats_url: str, fake_openai: FakeOpenAI, db: asyncpg.Pool
) -> None:
    cfg = fleet_config({"openai": fake_openai.url + "/v1"})
    troubles: list[str] = []

    async def on_error(exc: Exception) -> None:
        troubles.append(repr(exc))

    async def on_disconnect() -> None:
        troubles.append("disconnected")

    nc = await nats.connect(nats_url, error_cb=on_error, disconnected_cb=on_disconnect)
    js = nc.jetstream()
    replied: set[str] = set()

    async def on_reply(msg: Msg) -> None:
        reply = decode_reply(msg.data)
        assert isinstance(reply, Error), reply  # no hostile message is served: its use case has no route
        replied.add("h" + msg.subject.rsplit(".", 1)[1])

    await nc.subscribe("_INBOX.hostile.*", cb=on_reply)
    published: set[str] = set()
    must_reply: set[str] = set()
    good: list[str] = []
    async with running_fleet(nats_url, cfg, db) as fleet:
        for i, h in numbered_corpus(N):
            data, answer = h.encode(i)
            if len(data) > nc.max_payload:
                continue  # the server refuses it from the producer already
            # A use case of its own per message: its dead-letter copy names it, and none has a route.
            await js.publish(f"llm.req.h{i}.acme", data)
            published.add(f"llm.req.h{i}.acme")
            if answer:
                must_reply.add(f"h{i}")
            if i % 100 == 0:  # valid requests interleaved with the hostile ones
                body = request()
                await js.publish("llm.req.draft.acme", msgspec.json.encode({**body, "reply_to": "_INBOX.good.x"}))
                good.append(body["id"])
        copies = await dlq_copies(nc, "dispatch", expect=len(published), timeout=max(120, N / 50), headers_only=True)
        subjects = {c.headers["Switchyard-Subject"] for c in copies if c.headers}
        assert subjects == published, f"{len(published - subjects)} messages without a dead-letter copy"
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):
                while not must_reply <= replied:
                    await asyncio.sleep(0.1)
        assert not (missing := must_reply - replied), f"no reply to {sorted(missing)[:5]}; {troubles[:5]}"
        for rid in good:
            await audit_row(db, rid, timeout=30)
        _alive(fleet)
        info = await js.consumer_info("LLM_REQ", "dispatch")
        assert info.num_pending == 0 and info.num_ack_pending == 0
    # The same server and store, a new fleet: nothing poisonous was left behind.
    async with running_fleet(nats_url, cfg, db) as again:
        await _served(nc, db)
        _alive(again)
        for stream in ("LLM_REQ", "LLM_WORK"):
            assert (await js.stream_info(stream)).state.messages == 0
    await nc.close()
