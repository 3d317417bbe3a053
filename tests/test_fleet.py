"""The fleet end to end: request in over NATS, streamed answer out, audit row in PostgreSQL."""

from __future__ import annotations

import asyncio

import asyncpg
import msgspec
from nats.aio.client import Client as NATS

from schemas import Chunk, Done, Error, decode_reply

from .conftest import Fleet
from .helpers import ask_raw, audit_row, dlq_messages, request


async def test_streamed_request_gets_ordered_chunks_then_done_and_an_audit_row(
    fleet: Fleet, nc: NATS, db: asyncpg.Pool
) -> None:
    body = request(stream=True, tier="pro", metadata={"job": "e2e"})
    replies = await ask_raw(nc, body, msg_id=body["id"])

    chunks = [r for r in replies if isinstance(r, Chunk)]
    assert len(chunks) > 3
    assert [r.seq for r in replies] == list(range(len(replies)))
    done = replies[-1]
    assert isinstance(done, Done)
    assert sum(isinstance(r, Done) for r in replies) == 1
    assert done.text == "".join(c.text for c in chunks)
    assert done.provider == "openai" and done.model == "gpt-4o-mini"
    assert done.usage.input_tokens > 0 and done.usage.output_tokens > 0
    assert done.cost_usd is not None and done.cost_usd > 0
    assert done.attempts[0].pool == "openai" and done.attempts[0].error is None

    row = await audit_row(db, body["id"])
    assert row["status"] == "ok" and row["account"] == "acme" and row["use_case"] == "draft"
    assert row["input_tokens"] == done.usage.input_tokens
    assert row["output_tokens"] == done.usage.output_tokens
    assert float(row["cost_usd"]) == done.cost_usd
    assert row["tier"] == "pro"
    assert row["prompt_chars"] == len("Write a haiku about queues")
    assert len(row["prompt_sha256"]) == 64


async def test_unstreamed_request_gets_one_done(fleet: Fleet, nc: NATS, db: asyncpg.Pool) -> None:
    body = request("Say hello")
    replies = await ask_raw(nc, body)
    assert len(replies) == 1
    assert isinstance(replies[0], Done) and replies[0].seq == 0 and "hello" in replies[0].text.lower()
    await audit_row(db, body["id"])


async def test_invalid_json_gets_invalid_request_and_a_dead_letter(fleet: Fleet, nc: NATS) -> None:
    # Broken JSON: no reply subject can be read, so only the DLQ copy tells.
    await nc.jetstream().publish("llm.req.draft.acme", b'{"id": "x1", "reply_to": "_INBOX.zz", ')
    [copy] = await dlq_messages(nc, "dispatch")
    assert copy.headers["Switchyard-Error-Code"] == "INVALID_REQUEST"
    assert "not valid JSON" in copy.headers["Switchyard-Error"]
    assert copy.headers["Switchyard-Subject"] == "llm.req.draft.acme"
    # ...and the dispatcher keeps serving.
    replies = await ask_raw(nc, request("still there?"))
    assert isinstance(replies[-1], Done)


async def test_missing_field_names_the_field(fleet: Fleet, nc: NATS, db: asyncpg.Pool) -> None:
    body = request()
    del body["messages"]
    [err] = await ask_raw(nc, body)
    assert isinstance(err, Error)
    assert err.code == "INVALID_REQUEST" and err.status == 400 and not err.retryable
    assert "messages" in err.message
    [copy] = await dlq_messages(nc, "dispatch")
    assert copy.headers["Switchyard-Error-Code"] == "INVALID_REQUEST"
    row = await audit_row(db, body["id"])
    assert row["status"] == "error" and row["code"] == "INVALID_REQUEST"
    assert isinstance((await ask_raw(nc, request("next one")))[-1], Done)


async def test_unknown_use_case_gets_no_route(fleet: Fleet, nc: NATS) -> None:
    body = request()
    [err] = await ask_raw(nc, body, subject="llm.req.poetry.acme")
    assert isinstance(err, Error) and err.code == "NO_ROUTE" and err.status == 404
    assert "poetry" in err.message
    [copy] = await dlq_messages(nc, "dispatch")
    assert copy.headers["Switchyard-Error-Code"] == "NO_ROUTE"
    assert isinstance((await ask_raw(nc, request("next one")))[-1], Done)


async def test_account_must_match_the_subject(fleet: Fleet, nc: NATS) -> None:
    [err] = await ask_raw(nc, request(account="other"))
    assert isinstance(err, Error) and err.code == "INVALID_REQUEST" and "account" in err.message


async def test_undecodable_work_item_is_dead_lettered_and_the_pool_keeps_serving(fleet: Fleet, nc: NATS) -> None:
    await nc.jetstream().publish("llm.work.openai", b'{"v": 1, "request": "not a request"}')
    [copy] = await dlq_messages(nc, "work")
    assert copy.headers["Switchyard-Subject"] == "llm.work.openai"
    assert copy.data == b'{"v": 1, "request": "not a request"}'
    assert isinstance((await ask_raw(nc, request("still serving?")))[-1], Done)


async def test_a_republished_request_is_served_once(fleet: Fleet, nc: NATS) -> None:
    # A producer unsure its publish arrived may publish again with the same Nats-Msg-Id.
    body = request("only once please")
    replies = await ask_raw(nc, body, msg_id=body["id"])
    again = msgspec.json.encode({**body, "reply_to": "_INBOX.unused"})
    ack = await nc.jetstream().publish("llm.req.draft.acme", again, headers={"Nats-Msg-Id": body["id"]})
    assert ack.duplicate
    assert len(replies) == 1 and isinstance(replies[0], Done)


async def test_replies_to_llm_res_are_kept_for_a_producer_that_reads_later(fleet: Fleet, nc: NATS) -> None:
    # A batch job publishes and goes away; its replies wait in LLM_RES.
    body = request("Summarise the night's tickets", stream=True)
    subject = f"llm.res.acme.nightly.{body['id']}"
    await nc.jetstream().publish("llm.req.draft.acme", msgspec.json.encode({**body, "reply_to": subject}),
                                 headers={"Nats-Msg-Id": body["id"]})
    await asyncio.sleep(1.0)  # nobody is listening meanwhile
    sub = await nc.jetstream().subscribe(subject, ordered_consumer=True)
    replies = []
    while not replies or not isinstance(replies[-1], Done | Error):
        replies.append(decode_reply((await sub.next_msg(timeout=10)).data))
    await sub.unsubscribe()
    assert [r.seq for r in replies] == list(range(len(replies)))
    assert isinstance(replies[-1], Done) and replies[-1].text == "".join(r.text for r in replies[:-1])
