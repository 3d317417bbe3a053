"""A dispatcher lost between refusing a request and terminating its message: the redelivery answers the same
refusal (workers/progress.py keeps it before it goes out) instead of deciding anew, so the producer never gets
a refusal and then an answer. Real nats-server; the loss is a message left in the stream after the refusal."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from router.config import Config
from router.providers.fakes import FakeOpenAI
from schemas import Error, decode_reply, decode_work
from workers.budget import Budgets
from workers.dispatcher import PROBE_TTL_S, Dispatcher
from workers.progress import Progress, ensure_bucket
from workers.publish import Publisher
from workers.runtime import ensure_topology

from .helpers import request
from .test_budget_fleet import MAX_TOKENS, PROMPT, _config


@dataclass
class _Scene:
    """One request of account `acme` published into a clean LLM_REQ, a dispatcher with budgets under a config
    of $0 a day (`refusing`; `admitting` is $100), its consumer bound, and the replies on the request's inbox."""

    js: JetStreamContext
    dispatcher: Dispatcher
    budgets: Budgets
    sub: JetStreamContext.PullSubscription
    body: dict[str, Any]
    replies: list[Any]
    refusing: Config
    admitting: Config

    @classmethod
    async def start(cls, nc: NATS, progress: bool) -> _Scene:
        fake = FakeOpenAI()
        refusing, admitting = _config(fake, daily_usd=0.0), _config(fake, daily_usd=100.0)
        js = nc.jetstream()
        await ensure_topology(js, refusing)
        for stream in ("LLM_REQ", "LLM_WORK", "LLM_DLQ"):
            await js.purge_stream(stream)
        budgets = await Budgets.open(js, "llm")
        dispatcher = Dispatcher(js, Publisher(nc, js, "llm"), refusing, budgets=budgets,
                                progress=Progress(nc, await ensure_bucket(js)) if progress else None)
        inbox = f"_INBOX.once.{uuid.uuid4().hex}"
        replies: list[Any] = []

        async def on_reply(m: Msg) -> None:
            replies.append(decode_reply(m.data))

        await nc.subscribe(inbox, cb=on_reply)
        body = {**request(PROMPT, max_tokens=MAX_TOKENS, account="acme"), "reply_to": inbox}
        await js.publish("llm.req.draft.acme", msgspec.json.encode(body))
        sub = await js.pull_subscribe_bind("dispatch", "LLM_REQ")
        return cls(js, dispatcher, budgets, sub, body, replies, refusing, admitting)


async def _one_refused_then_redelivered(
    nc: NATS, progress: bool, handed_before: bool = False, raise_budget: bool = True
) -> tuple[list[Any], list[bytes]]:
    """A request refused by a budget of $0, its message put back as if its dispatcher had died before the
    term; the budget raised to $100 before the redelivery. With `handed_before`, the request's first delivery
    had handed it over instead (its work item id is taken) and the redelivery finds a budget of $0. The replies,
    and the work items handed to the pool."""
    scene = await _Scene.start(nc, progress)
    js, dispatcher, budgets, sub, body = scene.js, scene.dispatcher, scene.budgets, scene.sub, scene.body
    replies, admitting = scene.replies, scene.admitting
    items: list[bytes] = []

    async def on_item(m: Msg) -> None:
        items.append(m.data)

    await nc.subscribe("llm.work.openai", cb=on_item)
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
    # A redelivery never handed over (and with no refusal kept) is refused as always; the probe that looked for
    # its hand-over stays only for its TTL.
    replies, items = await _one_refused_then_redelivered(nc, progress=False, raise_budget=False)
    assert [type(r) for r in replies] == [Error, Error] and items == []
    probe = await nc.jetstream().get_msg("LLM_WORK", subject="llm.work.$handed")
    assert probe.headers is not None and probe.headers.get("Nats-TTL") == str(PROBE_TTL_S)


async def _probed_then(nc: NATS, admit_later: bool, refuse_after: bool = False) -> tuple[list[Any], list[bytes]]:
    """A request refused on its second delivery (a budget of $0), whose probe found no hand-over, but whose
    refusal could not be kept (NATS failing just then): nothing went out, and the message comes back. Its third
    delivery meets a budget of $100 with `admit_later`, else $0 again; with `refuse_after`, a fourth delivery
    (the third's acknowledgement lost) meets $0. The replies and the work items stored for the pool (a core
    subscriber would also see publishes the stream dropped as duplicates)."""
    scene = await _Scene.start(nc, progress=True)
    js, dispatcher, budgets, sub = scene.js, scene.dispatcher, scene.budgets, scene.sub
    replies, refusing, admitting = scene.replies, scene.refusing, scene.admitting
    progress = dispatcher.progress
    assert progress is not None
    keep = progress.refusing

    async def failing(seq: int, refusal: bytes) -> None:
        raise TimeoutError("nats: timeout")

    try:
        [first] = await sub.fetch(1, timeout=5)
        await first.nak()  # its dispatcher lost before it decided anything
        [second] = await sub.fetch(1, timeout=5)
        progress.refusing = failing  # type: ignore[method-assign,assignment]
        try:
            await dispatcher.handle(second)
        except Exception:
            pass  # what the pull loop sees: the message is delivered again
        else:
            raise AssertionError("a refusal that could not be kept must not be answered")
        progress.refusing = keep  # type: ignore[method-assign]
        await second.nak()
        if admit_later:
            dispatcher.cfg = admitting
        [third] = await sub.fetch(1, timeout=5)
        assert third.metadata.num_delivered == 3
        if refuse_after:
            third.ack = lambda: asyncio.sleep(0)  # type: ignore[method-assign]
        await dispatcher.handle(third)
        if refuse_after:
            dispatcher.cfg = refusing
            await third.nak()
            [fourth] = await sub.fetch(1, timeout=5)
            await dispatcher.handle(fourth)
        await nc.flush()
        await asyncio.sleep(0.3)
        assert (await js.stream_info("LLM_REQ")).state.messages == 0
        stored = (await js.stream_info("LLM_WORK", subjects_filter="llm.work.openai")).state.subjects or {}
        items = []
        if stored:
            items.append((await js.get_msg("LLM_WORK", subject="llm.work.openai")).data or b"")
        assert stored.get("llm.work.openai", 0) == len(items)
    finally:
        await sub.unsubscribe()
        await budgets.stop()
    return replies, items


async def test_a_probe_whose_refusal_was_not_kept_does_not_swallow_the_later_hand_over(nc: NATS) -> None:
    # The probe took the hand-over's id (a deleted message's id stays taken for the duplicate window): the later
    # admitted delivery finds the probe behind it and hands over under the next id, rather than taking the
    # probe for its own earlier hand-over and acknowledging a request nobody serves.
    replies, items = await _probed_then(nc, admit_later=True)
    assert replies == [] and len(items) == 1
    [item] = items
    assert decode_work(item).request.account == "acme"


async def test_a_second_probe_is_not_answered_by_the_first(nc: NATS) -> None:
    # Refused again: the second probe finds the first behind the id, not a hand-over, so the request is refused
    # (one answer) instead of acknowledged without one.
    replies, items = await _probed_then(nc, admit_later=False)
    assert [type(r) for r in replies] == [Error] and replies[0].code == "BUDGET_EXCEEDED" and items == []
    # And one handed over under the next id is found there by a later probe: not refused after its answer.
    replies, items = await _probed_then(nc, admit_later=True, refuse_after=True)
    assert replies == [] and len(items) == 1
