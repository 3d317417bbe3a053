"""A dispatcher lost between refusing a request and terminating its message: the redelivery answers the same
refusal (workers/progress.py keeps it before it goes out) instead of deciding anew, so the producer never gets
a refusal and then an answer. Real nats-server; the loss is a message left in the stream after the refusal."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from router.providers.fakes import FakeOpenAI
from schemas import Error, decode_reply
from workers.budget import Budgets
from workers.dispatcher import Dispatcher
from workers.progress import Progress, ensure_bucket
from workers.publish import Publisher
from workers.runtime import ensure_topology

from .helpers import request
from .test_budget_fleet import MAX_TOKENS, PROMPT, _config


async def _one_refused_then_redelivered(
    nc: NATS, progress: bool, handed_before: bool = False, raise_budget: bool = True
) -> tuple[list[Any], list[bytes]]:
    """A request refused by a budget of $0, its message put back as if its dispatcher had died before the
    term; the budget raised to $100 before the redelivery. With `handed_before`, the request's first delivery
    had handed it over instead (its work item id is taken) and the redelivery finds a budget of $0. The replies,
    and the work items handed to the pool."""
    fake = FakeOpenAI()
    refusing, admitting = _config(fake, daily_usd=0.0), _config(fake, daily_usd=100.0)
    js = nc.jetstream()
    await ensure_topology(js, refusing)
    await js.purge_stream("LLM_REQ")
    await js.purge_stream("LLM_WORK")
    await js.purge_stream("LLM_DLQ")
    budgets = await Budgets.open(js, "llm")
    dispatcher = Dispatcher(js, Publisher(nc, js, "llm"), refusing, budgets=budgets,
                            progress=Progress(nc, await ensure_bucket(js)) if progress else None)
    inbox = f"_INBOX.once.{uuid.uuid4().hex}"
    replies: list[Any] = []
    items: list[bytes] = []

    async def on_reply(m: Msg) -> None:
        replies.append(decode_reply(m.data))

    async def on_item(m: Msg) -> None:
        items.append(m.data)

    await nc.subscribe(inbox, cb=on_reply)
    await nc.subscribe("llm.work.openai", cb=on_item)
    body = {**request(PROMPT, max_tokens=MAX_TOKENS, account="acme"), "reply_to": inbox}
    await js.publish("llm.req.draft.acme", msgspec.json.encode(body))
    sub = await js.pull_subscribe_bind("dispatch", "LLM_REQ")
    try:
        [first] = await sub.fetch(1, timeout=5)
        if handed_before:  # its work item went out (the id is taken), then its dispatcher died before the ack
            await js.publish("llm.work.nopool", b"{}", headers={"Nats-Msg-Id": f"acme:{body['id']}"})
            await first.nak()
            [again] = await sub.fetch(1, timeout=5)
            await dispatcher.handle(again)
            await nc.flush()
            await asyncio.sleep(0.3)
            assert (await js.stream_info("LLM_REQ")).state.messages == 0
            return replies, items

        async def lost() -> None:  # the dispatcher dies after its reply, before the term: the message comes back
            await Msg.nak(first)

        first.term = lost  # type: ignore[method-assign]
        await dispatcher.handle(first)
        if raise_budget:
            dispatcher.cfg = admitting  # by the redelivery, the budget would admit the request
        [again] = await sub.fetch(1, timeout=5)
        assert again.metadata.num_delivered == 2
        await dispatcher.handle(again)
        await nc.flush()
        await asyncio.sleep(0.3)
        assert (await js.stream_info("LLM_REQ")).state.messages == 0  # terminated: nothing left to redeliver
        if progress and items == []:  # refused twice, the same refusal: counted once
            refusals = dispatcher.metrics.registry.get_sample_value(
                "switchyard_dispatcher_refusals_total", {"use_case": "draft", "code": "BUDGET_EXCEEDED"})
            assert refusals == 1
            dlq = await js.stream_info("LLM_DLQ")
            assert dlq.state.messages == 1  # one dead-letter copy: the second is the same message id
    finally:
        await sub.unsubscribe()
        await budgets.stop()
    return replies, items


async def test_a_redelivered_refusal_is_the_same_refusal_not_an_answer(nc: NATS) -> None:
    replies, items = await _one_refused_then_redelivered(nc, progress=True)
    assert len(replies) == 2 and all(isinstance(r, Error) for r in replies)
    assert replies[0] == replies[1] and replies[0].code == "BUDGET_EXCEEDED"  # a duplicate, dropped as one
    assert items == []  # never handed to a pool: no provider call, no second terminal reply


async def test_without_the_kept_refusal_the_redelivery_decides_anew(nc: NATS) -> None:
    # What the kept refusal prevents: the redelivery, on the raised budget, hands the request to a pool, whose
    # answer would follow the refusal the producer already has.
    replies, items = await _one_refused_then_redelivered(nc, progress=False)
    assert [type(r) for r in replies] == [Error]
    assert len(items) == 1


async def test_a_redelivery_that_was_handed_over_already_is_not_refused(nc: NATS) -> None:
    # The redelivery would be refused (a budget of $0), but its first delivery handed it over: its worker answers,
    # so it is acknowledged without a word, rather than a refusal following that answer.
    replies, items = await _one_refused_then_redelivered(nc, progress=True, handed_before=True)
    assert replies == [] and items == []
    # A redelivery never handed over (and with no refusal kept) is refused as always, and the probe that looked
    # for its hand-over is gone.
    replies, items = await _one_refused_then_redelivered(nc, progress=False, raise_budget=False)
    assert [type(r) for r in replies] == [Error, Error] and items == []
    info = await nc.jetstream().stream_info("LLM_WORK", subjects_filter="llm.work.$handed")
    assert not info.state.subjects
