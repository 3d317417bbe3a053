"""`switchyard dlq list|show|replay|purge` against a real nats-server, run through the CLI's own main()."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from schemas import Done, Error, Reply, decode_reply
from workers.runtime import ensure_topology

from .conftest import Fleet, fleet_config
from .helpers import Result, request, switchyard


@pytest.fixture
async def js(nats_url: str, nc: NATS, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[JetStreamContext]:
    """The fleet's streams on a fresh server, and NATS_URL pointing the CLI at it."""
    monkeypatch.setenv("NATS_URL", nats_url)
    js = nc.jetstream()
    await ensure_topology(js, fleet_config({"openai": "http://127.0.0.1:9/v1"}))
    yield js




async def put(
    js: JetStreamContext, stage: str, body: bytes, *, subject: str = "llm.req.draft.acme", code: str = "NO_ROUTE",
    error: str = "no route for use case 'draft'", truncated: int | None = None,
) -> int:
    """A copy as a process that gave up would leave it."""
    headers = {"Switchyard-Error-Code": code, "Switchyard-Error": error, "Switchyard-Subject": subject}
    if truncated is not None:
        headers["Switchyard-Truncated"] = str(truncated)
    return (await js.publish(f"llm.dlq.{stage}", body, headers=headers)).seq


def a_request(**fields: Any) -> bytes:
    return msgspec.json.encode(request("hello again", reply_to="_INBOX.gone", **fields))


async def test_list_shows_one_line_per_copy_newest_last_and_a_count(
    js: JetStreamContext, capsys: pytest.CaptureFixture[str]
) -> None:
    first = await put(js, "dispatch", a_request(), error="x" * 300)
    second = await put(js, "work", b"\x00" * 900, subject="llm.work.openai", code="INTERNAL",
                       error="the worker gave up", truncated=5_000_000)
    third = await put(js, "audit", b"{}", subject="llm.events.completed", code="INVALID_REQUEST", error="bad event")

    res = await switchyard(capsys, "dlq", "list")
    assert res.code == 0, res.err
    lines = res.out.splitlines()
    assert lines[0].split() == ["seq", "stage", "time", "(UTC)", "code", "size", "subject", "error"]
    rows = lines[1:4]
    assert [int(r.split()[0]) for r in rows] == [first, second, third]
    assert rows[0].split()[1] == "dispatch" and " NO_ROUTE " in rows[0] and " llm.req.draft.acme " in rows[0]
    assert rows[0].endswith("x" * 71 + "…")  # the error, shortened
    assert "900 (truncated from 5000000)" in rows[1] and "llm.work.openai" in rows[1]
    assert rows[2].split()[1] == "audit" and rows[2].endswith("bad event")
    assert lines[4] == "3 dead letters"

    res = await switchyard(capsys, "dlq", "list", "--stage", "work")
    assert [r.split()[0] for r in res.out.splitlines()[1:-1]] == [str(second)]
    assert res.out.splitlines()[-1] == "1 dead letter of stage work"

    res = await switchyard(capsys, "dlq", "list", "--limit", "2")
    assert [int(r.split()[0]) for r in res.out.splitlines()[1:-1]] == [second, third]
    assert res.out.splitlines()[-1] == "the newest 2 of 3 dead letters (--limit 0 shows all)"

    # Reading left no consumer behind on LLM_DLQ.
    assert await js.consumers_info("LLM_DLQ") == []


async def test_list_json_and_an_empty_queue(js: JetStreamContext, capsys: pytest.CaptureFixture[str]) -> None:
    res = await switchyard(capsys, "dlq", "list")
    assert (res.code, res.out) == (0, "no dead letters\n")
    seq = await put(js, "work", b"cut", subject="llm.work.openai", truncated=2_000_000)

    res = await switchyard(capsys, "dlq", "list", "--json")
    assert res.code == 0
    [item] = json.loads(res.out)
    assert item["seq"] == seq and item["stage"] == "work" and item["code"] == "NO_ROUTE"
    assert item["subject"] == "llm.work.openai" and item["size"] == 3 and item["truncated"] == 2_000_000
    assert item["error"] == "no route for use case 'draft'" and item["time"].endswith("Z")


async def test_show_prints_headers_and_the_body(js: JetStreamContext, capsys: pytest.CaptureFixture[str]) -> None:
    body = a_request(id="r-show")
    seq = await put(js, "dispatch", body, error="no route, répété")

    res = await switchyard(capsys, "dlq", "show", str(seq))
    assert res.code == 0, res.err
    assert f"sequence: {seq}" in res.out and "stage:    dispatch" in res.out
    assert "Switchyard-Error: no route, répété" in res.out and "Switchyard-Subject: llm.req.draft.acme" in res.out
    assert f"body ({len(body)} bytes, JSON):" in res.out
    assert '\n  "id": "r-show",\n' in res.out  # pretty

    raw = await put(js, "work", b"\x00\xffhi\n", subject="llm.work.openai")
    res = await switchyard(capsys, "dlq", "show", str(raw))
    assert "body (5 bytes, not JSON):\n\\x00\\xffhi\n" in res.out

    res = await switchyard(capsys, "dlq", "show", str(seq), "--json")
    shown = json.loads(res.out)
    assert shown["body"]["id"] == "r-show" and shown["headers"]["Switchyard-Error-Code"] == "NO_ROUTE"


async def test_what_is_not_there_is_one_line_and_exit_code_1(
    js: JetStreamContext, capsys: pytest.CaptureFixture[str]
) -> None:
    for action in ("show", "replay"):
        res = await switchyard(capsys, "dlq", action, "42")
        assert res.code == 1
        assert res.err == ("switchyard: no dead letter with sequence 42 in LLM_DLQ;"
                           " `switchyard dlq list` shows what there is\n")


async def test_replay_refuses_a_truncated_copy_and_subjects_outside_the_fleet(
    js: JetStreamContext, capsys: pytest.CaptureFixture[str]
) -> None:
    cut = await put(js, "dispatch", b'{"v": 1, "id": "r', truncated=3_000_000)
    res = await switchyard(capsys, "dlq", "replay", str(cut))
    assert res.code == 1 and "cannot be replayed as is" in res.err and res.err.count("\n") == 1

    seq = await put(js, "dispatch", a_request())
    for target in ("orders.new", "llm.dlq.dispatch", "llm.res.job1", "llm.req.>", "llm.req.draft.a b", "llm.req"):
        res = await switchyard(capsys, "dlq", "replay", str(seq), "--to", target)
        assert res.code == 1, target
        assert res.err.startswith(f"switchyard: will not publish on {target!r}: a replay goes only to llm.req.…")

    nowhere = await put(js, "dispatch", a_request(), subject="")
    res = await switchyard(capsys, "dlq", "replay", str(nowhere))
    assert res.code == 1 and "give --to SUBJECT" in res.err

    # Every refused copy is still there.
    info = await js.stream_info("LLM_DLQ")
    assert info.state.messages == 3 and (await js.stream_info("LLM_REQ")).state.messages == 0


async def test_replay_publishes_past_the_duplicate_window_and_deletes_the_copy(
    js: JetStreamContext, capsys: pytest.CaptureFixture[str]
) -> None:
    body = a_request(id="r-dup")
    seq = await put(js, "dispatch", body)
    # The request was published once already, with the id the producer gave it.
    await js.publish("llm.req.draft.acme", body, headers={"Nats-Msg-Id": "acme:r-dup"})

    res = await switchyard(capsys, "dlq", "replay", str(seq), "--keep")
    assert res.code == 0, res.err
    assert f"replayed dead letter {seq} (dispatch, NO_ROUTE) on llm.req.draft.acme: LLM_REQ sequence 2" in res.out
    assert f"kept dead letter {seq} (--keep)" in res.out
    res = await switchyard(capsys, "dlq", "replay", str(seq))
    assert "LLM_REQ sequence 3" in res.out and f"deleted dead letter {seq}" in res.out

    assert (await js.stream_info("LLM_REQ")).state.messages == 3  # none taken for a duplicate
    with pytest.raises(NotFoundError):
        await js.get_msg("LLM_DLQ", seq=seq)


async def test_purge_one_stage_or_all(js: JetStreamContext, capsys: pytest.CaptureFixture[str]) -> None:
    for stage in ("dispatch", "dispatch", "work", "audit"):
        await put(js, stage, b"{}")

    res = await switchyard(capsys, "dlq", "purge", "--stage", "dispatch")
    assert res.code == 1  # no terminal to ask on (pytest's stdin is not a TTY), no --yes
    assert res.err == ("switchyard: purge would delete 2 dead letters of stage dispatch for good; add --yes to do it"
                       " without a terminal to confirm on\n")
    assert (await js.stream_info("LLM_DLQ")).state.messages == 4

    res = await switchyard(capsys, "dlq", "purge", "--stage", "dispatch", "--yes")
    assert (res.code, res.out) == (0, "deleted 2 dead letters of stage dispatch\n")
    res = await switchyard(capsys, "dlq", "list")
    assert res.out.splitlines()[-1] == "2 dead letters"

    res = await switchyard(capsys, "dlq", "purge", "--yes")
    assert (res.code, res.out) == (0, "deleted 2 dead letters\n")
    res = await switchyard(capsys, "dlq", "purge", "--yes")
    assert (res.code, res.out) == (0, "no dead letters; nothing to purge\n")


@pytest.mark.parametrize(("answer", "left"), [(b"y\n", 0), (b"n\n", 1)])
async def test_purge_asks_on_a_terminal(js: JetStreamContext, nats_url: str, answer: bytes, left: int) -> None:
    await put(js, "work", b"{}")
    parent, child = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "switchyard"), "dlq", "purge", stdin=child,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "NATS_URL": nats_url},
    )
    os.close(child)
    try:
        assert proc.stderr is not None
        prompt = await asyncio.wait_for(proc.stderr.readuntil(b"[y/N] "), 30)
        assert prompt == b"delete 1 dead letter from LLM_DLQ for good? [y/N] "
        os.write(parent, answer)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        os.close(parent)
    assert (await js.stream_info("LLM_DLQ")).state.messages == left
    assert proc.returncode == (0 if left == 0 else 1)
    assert out == (b"deleted 1 dead letter\n" if left == 0 else b"nothing deleted\n")


async def switchyard_process(nats_url: str, *args: str) -> Result:
    """`switchyard ARGS` as a process: the fleet in this one logs to stdout."""
    out = await asyncio.to_thread(
        subprocess.run, [str(Path(sys.executable).parent / "switchyard"), *args],
        env={**os.environ, "NATS_URL": nats_url}, capture_output=True, text=True, timeout=60,
    )
    return Result(out.returncode, out.stdout, out.stderr)


async def test_a_request_dead_lettered_for_want_of_a_route_is_served_once_replayed(
    fleet: Fleet, nc: NATS, nats_url: str
) -> None:
    js = nc.jetstream()
    inbox = f"_INBOX.t{uuid.uuid4().hex}"
    replies: asyncio.Queue[Reply] = asyncio.Queue()

    async def on_reply(msg: Msg) -> None:
        await replies.put(decode_reply(msg.data))

    await nc.subscribe(inbox, cb=on_reply)
    # A producer sends to a use case the fleet does not route: the dispatcher refuses it and keeps a copy.
    body = msgspec.json.encode(request("Write a haiku about queues", reply_to=inbox))
    await js.publish("llm.req.drafts.acme", body)
    refusal = await asyncio.wait_for(replies.get(), 10)
    assert isinstance(refusal, Error) and refusal.code == "NO_ROUTE"
    res = await switchyard_process(nats_url, "dlq", "list", "--json")
    [copy] = json.loads(res.out)
    assert (copy["stage"], copy["code"], copy["subject"]) == ("dispatch", "NO_ROUTE", "llm.req.drafts.acme")

    # The operator sees the typo and sends the request where it belonged.
    res = await switchyard_process(nats_url, "dlq", "replay", str(copy["seq"]), "--to", "llm.req.draft.acme")
    assert res.code == 0, res.err
    assert f"deleted dead letter {copy['seq']}" in res.out
    done = await asyncio.wait_for(replies.get(), 10)
    assert isinstance(done, Done) and done.text and done.provider == "openai"
    res = await switchyard_process(nats_url, "dlq", "list")
    assert res.out == "no dead letters\n"
