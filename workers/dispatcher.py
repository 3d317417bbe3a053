"""The dispatcher: validates each request, picks its route (router/routing.py) and hands it to a pool."""

from __future__ import annotations

import asyncio
import re

import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import NotFoundError

from router.config import Config
from router.errors import ErrorCode, SwitchyardError
from router.routing import AlwaysHealthy, Health, Selection, select
from router.vitals import Vitals
from schemas import (
    Attempt,
    CompletionEvent,
    Error,
    InvalidMessage,
    Request,
    WorkItem,
    decode_reply,
    decode_request,
    encode,
    peek_request,
)
from schemas.limits import id_problem

from . import limits
from .accounts import AccountRoutes
from .budget import BudgetRefused, Budgets
from .metrics import DispatcherMetrics
from .progress import Progress
from .publish import Publisher, PublishRefused, now_ms, prompt_fingerprint
from .pull import serve_pull
from .ratelimits import RateLimited, RateLimiter
from .runtime import MAX_DELIVER
from .tracing import DISPATCH_SPAN, Tracing

log = structlog.get_logger("dispatcher")

_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")


def _published_ms(msg: Msg) -> int:
    """When the producer's publish reached LLM_REQ (the stream's own timestamp, the same on every
    redelivery): a request's deadline counts from here, not from when a dispatcher got to it."""
    return int(msg.metadata.timestamp.timestamp() * 1000)


def _check_deadline(req: Request, published_ms: int) -> None:
    """Raises Refusal(TIMEOUT) for a request whose deadline passed while it waited: its producer has
    given up, so no provider is called (and paid) for it."""
    waited = now_ms() - published_ms
    if waited >= req.timeout_ms:
        raise Refusal(
            ErrorCode.TIMEOUT,
            f"the request waited {waited} ms in the queue, past its timeout_ms of {req.timeout_ms}; nothing was sent"
            " to a provider",
        )


PROBE_TTL_S = 300
"""How long a hand-over probe (`Dispatcher._handed_over`) stays in LLM_WORK: past the stream's 120 s duplicate
window, so that while its id is taken a hand-over that finds the id taken also finds the probe that took it."""


def _hand_over_id(req: Request, k: int) -> str:
    """The `k`-th message id a request's work item may be stored under: `<account>:<id>`, then, past ids that
    probes took (`_handed_over`), `<account>:<id>:<k>`. A request's deliveries are at most MAX_DELIVER, and
    each makes at most one probe, so the ids never run out."""
    return f"{req.account}:{req.id}" if k == 0 else f"{req.account}:{req.id}:{k}"


class ReusedId(InvalidMessage):
    """Another request of the same account used this id within the duplicate window."""


class Refusal(SwitchyardError):
    """The dispatcher refuses a request; it is answered and dead-lettered. `attempts` are the targets
    it skipped, recorded in the completion event."""

    def __init__(self, code: ErrorCode, message: str, *, attempts: list[Attempt] | None = None) -> None:
        super().__init__(code, message)
        self.attempts = attempts or []


def _kept_refusal(data: bytes) -> SwitchyardError:
    """The refusal `Progress.refusing` kept, to give again as it was (INTERNAL if it cannot be read)."""
    try:
        reply = decode_reply(data)
    except Exception:
        reply = None
    if not isinstance(reply, Error):
        return SwitchyardError(ErrorCode.INTERNAL,
                               "this request was refused before, and that refusal could not be read")
    return SwitchyardError.from_reply(reply)


ACCOUNTS_START_S = 5.0
"""How long a dispatcher with account routes waits for their first read before it serves anyway."""


class Dispatcher:
    def __init__(
        self,
        js: JetStreamContext,
        pub: Publisher,
        cfg: Config,
        *,
        concurrency: int = 256,
        health: Health | None = None,
        accounts: AccountRoutes | None = None,
        rates: RateLimiter | None = None,
        budgets: Budgets | None = None,
        metrics: DispatcherMetrics | None = None,
        tracing: Tracing | None = None,
        progress: Progress | None = None,
    ) -> None:
        """`health` says which pools and providers can be called (default: all of them); `accounts`
        holds the accounts' own routes, followed while `serve` runs (default: none); `tracing` makes a span
        per request (default: off, the producer's trace context is passed on as it came); `progress` keeps
        the refusals a redelivery must give again (workers/progress.py; default: none kept, a redelivery
        decides anew)."""
        self.progress = progress
        self.tracing = tracing or Tracing.off()
        self.js = js
        self.pub = pub
        self.cfg = cfg
        self.prefix = cfg.subject_prefix
        self.concurrency = concurrency
        self.health: Health = health if health is not None else AlwaysHealthy()
        self.live_health = health is not None
        self.accounts = accounts
        self.rates = rates
        """The accounts' rate limits, shared by every replica (default: none enforced)."""
        self.budgets = budgets
        """The accounts' budgets, shared by every replica (default: none enforced)."""
        self.metrics = metrics if metrics is not None else DispatcherMetrics()
        """What it counts (default: a registry nobody serves)."""
        self.vitals = Vitals(clock=now_ms)
        """Requests in flight and recent outcomes (forwarded, or refused), served by its health endpoint."""

    async def serve(self, stop: asyncio.Event) -> None:
        try:
            await self._serve(stop)
        finally:
            if self.rates is not None:
                await self.rates.close()  # no refill of a rate lease outlives the dispatcher

    async def _serve(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tg:
            if self.accounts is not None:
                tg.create_task(self.accounts.run(stop))
                try:
                    async with asyncio.timeout(ACCOUNTS_START_S):
                        await self.accounts.loaded.wait()
                except TimeoutError:
                    log.warning("account_routes_not_loaded", waited_s=ACCOUNTS_START_S,
                                effect="serving with the config's routes until PostgreSQL answers")
            log.info("dispatcher_started", account_routes=self.accounts is not None)
            await serve_pull(self.pub.nc, "LLM_REQ", "dispatch", self.vitals.tracked(self.handle), stop,
                             limit=self.concurrency,
                             give_up=self.give_up, max_deliver=MAX_DELIVER,
                             holds=self.rates.holds if self.rates is not None else None)

    def select(self, req: Request) -> Selection:
        """The chain for an accepted request. Raises Refusal (with the skipped targets) when it is empty."""
        assert req.use_case is not None
        own = self.accounts.lookup(req.account, req.use_case, req.tier) if self.accounts is not None else None
        selection = select(self.cfg, req, self.health, account_route=own, now_ms=now_ms())
        if selection.code is not None:
            raise Refusal(selection.code, selection.message, attempts=selection.attempts())
        if selection.skipped:
            log.debug("targets_skipped", request_id=req.id, account=req.account,
                      skipped=[str(s) for s in selection.skipped])
        return selection

    async def handle(self, msg: Msg) -> None:
        """One request, in a span of its own (a child of the producer's `traceparent`) when tracing is on."""
        if not self.tracing.on:
            return await self._handle(msg)
        attributes: dict[str, str | int] = {
            "messaging.system": "nats", "messaging.destination.name": msg.subject[:200],
            "messaging.nats.num_delivered": msg.metadata.num_delivered,
        }
        with self.tracing.consume(DISPATCH_SPAN, msg.headers, attributes):
            await self._handle(msg)

    async def _handle(self, msg: Msg) -> None:
        """One request: the error boundary for what a request can cause. What escapes it (NATS failing
        under it) reaches the pull loop, which delivers the request again and finally gives up on it."""
        use_case, account = self._subject_tokens(msg.subject)
        req: Request | None = None
        try:
            if self.progress is not None and msg.metadata.num_delivered > 1:
                kept = await self.progress.refusal(msg.metadata.sequence.stream)
                if kept is not None:  # refused before a dispatcher was lost: the same answer, decided once
                    await self._refuse(msg, _kept_refusal(kept), None, use_case, account, again=True)
                    await msg.term()
                    return
            if use_case is None or account is None:
                raise InvalidMessage(
                    f"subject {msg.subject[:200]!r} is not {self.prefix}.req.<use_case>.<account>"
                    " (names of 1-128 characters from A-Z a-z 0-9 _ -)"
                )
            req = decode_request(msg.data, use_case=use_case, account=account, max_payload=self.pub.nc.max_payload)
            published_ms = _published_ms(msg)
            if self.tracing.on:
                self._traced(req)
            _check_deadline(req, published_ms)
            selection = self.select(req)
            own = self.accounts.limits(req.account) if self.accounts is not None else None
            # Rate and budget in one round trip (workers/limits.py); raises RateLimited or BudgetRefused.
            # A redelivery finds its own reservation rather than adding another.
            admitted = await limits.admit(self.rates, self.budgets, self.cfg, req, msg, published_ms, selection, own)
            if isinstance(admitted, limits.Held):  # waits for its booked turn in the stream (queue_ms), not here
                self.tracing.current().set_attribute("switchyard.held_ms", admitted.ms)
                await msg.nak(delay=admitted.ms / 1000)
                return
            reserved = admitted.reserved_usd
            route = selection.chain
            work = encode(WorkItem(request=req, route=route, attempts=selection.attempts(), accepted_ms=published_ms,
                                   reserved_usd=reserved, budget=admitted.budget if reserved else None))
            headers = {"Nats-Msg-Id": _hand_over_id(req, 0)}
            self.tracing.inject(headers, msg.headers)  # the worker's attempt spans are children of this one
            if self.tracing.on:
                self.tracing.current().set_attribute("switchyard.route", [str(t) for t in route])
            try:
                self.pub.check(f"{self.prefix}.work.{route[0].pool}", work, headers)
            except PublishRefused as exc:
                if self.budgets is not None:
                    await self.budgets.release(self.cfg, req, published_ms, reserved)
                raise InvalidMessage(f"invalid request: too large to hand to a pool: {exc}", field="$") from None
            ack = await self.pub.publish(f"{self.prefix}.work.{route[0].pool}", work, headers)
            if ack.duplicate and msg.metadata.num_delivered > 1:  # its earlier hand-over, or a probe's id
                ack = await self._past_probes(f"{self.prefix}.work.{route[0].pool}", work, headers, req, ack)
            if self.rates is not None:  # its refill ahead of need, if it started one, goes out now
                self.rates.handed_over(req.account)
            if ack.duplicate and self.budgets is not None:  # its worker settles the first hand-over's reservation
                self.budgets.handed_over_already(self.cfg, req, published_ms)
            if ack.duplicate and msg.metadata.num_delivered == 1:
                # Not this message's own earlier hand-over (that would be a redelivery): another request
                # reused the id. Forwarding nothing and acking would drop this one without a word.
                raise ReusedId(
                    f"invalid request: `id` {req.id!r} was used by another request of account {req.account!r}"
                    " in the last two minutes; every request needs its own id",
                    field="$.id",
                )
            await msg.ack()
            self.metrics.handed(self.cfg, req.use_case, route[0].pool)
            log.debug("dispatched", request_id=req.id, account=req.account, pool=route[0].pool)
        except InvalidMessage as exc:
            # A reused id's completion event would take the place of the first request's own.
            record = not isinstance(exc, ReusedId)
            err = SwitchyardError(ErrorCode.INVALID_REQUEST, str(exc))
            await self._refuse(msg, err, req, use_case, account, record=record)
            await msg.term()
        except (Refusal, RateLimited, BudgetRefused) as exc:
            if req is not None and msg.metadata.num_delivered > 1 and await self._handed_over(req):
                # An earlier delivery handed the request over (its dispatcher died, or could not ack): its worker
                # answers. Refusing now, on state that has changed since, would follow that answer with a second.
                await msg.ack()
                return
            # Decided on state that changes (rates, budgets, health, the clock): kept, so a redelivery answers
            # the same.
            await self._refuse(msg, exc, req, use_case, account, keep=True)
            await msg.term()

    async def _handed_over(self, req: Request) -> bool:
        """Whether an earlier delivery of `req` handed it over to a pool: a probe with the hand-over's message id
        on `<prefix>.work.$handed` (a subject no pool reads) is a duplicate exactly when the work item was
        published within the duplicate window. A probe that is not one takes the id (a deleted message's id
        stays taken for the window): it is stored for PROBE_TTL_S, so that a later delivery that is admitted
        after all (this refusal could not be kept) finds the probe behind the id and hands over under the
        next id (`_past_probes`); a later probe does the same. Asked only before a redelivery is refused.
        Raises what NATS raises (the request is then delivered again)."""
        subject = f"{self.prefix}.work.$handed"
        for k in range(MAX_DELIVER + 1):
            ack = await self.pub.js.publish(subject, b"", headers={"Nats-Msg-Id": _hand_over_id(req, k)},
                                            msg_ttl=PROBE_TTL_S)
            if not ack.duplicate:
                return False
            if not await self._probe_at(ack):
                return True
        return False

    async def _past_probes(self, subject: str, work: bytes, headers: dict[str, str], req: Request, ack: PubAck
                           ) -> PubAck:
        """The hand-over of a redelivered request whose id was found taken (`ack`): by its own earlier hand-over
        (kept as is), or by probes of earlier deliveries refused after them whose refusal could not be kept
        (`_handed_over`): then under the first id no probe took."""
        for k in range(1, MAX_DELIVER + 2):
            if not await self._probe_at(ack):
                return ack
            headers["Nats-Msg-Id"] = _hand_over_id(req, k)
            ack = await self.pub.publish(subject, work, headers)
            if not ack.duplicate:
                return ack
        return ack

    async def _probe_at(self, ack: PubAck) -> bool:
        """Whether the message that took a duplicate's id (`ack.seq` of a duplicate is the first one's) is a
        hand-over probe. A work item taken by its worker is gone from the work queue; a probe stays longer
        than its id is taken. Raises what NATS raises."""
        try:
            first = await self.pub.js.get_msg(ack.stream, ack.seq)
        except NotFoundError:
            return False
        return first.subject == f"{self.prefix}.work.$handed"

    async def give_up(self, msg: Msg, reason: str) -> None:
        """The pull loop's last resort: answer INTERNAL when a reply subject can be read, copy to the DLQ."""
        use_case, account = self._subject_tokens(msg.subject)
        err = SwitchyardError(ErrorCode.INTERNAL, f"the dispatcher gave up on this request: {reason}")
        await self._refuse(msg, err, None, use_case, account)

    def _traced(self, req: Request) -> None:
        self.tracing.current().set_attributes({
            "switchyard.request_id": req.id, "switchyard.account": req.account,
            "switchyard.use_case": req.use_case or "", "switchyard.tier": req.tier,
        })

    def _subject_tokens(self, subject: str) -> tuple[str | None, str | None]:
        tokens = subject.split(".")
        if len(tokens) != 4 or not all(_NAME.fullmatch(t) for t in tokens[2:]):
            return None, None
        return tokens[2], tokens[3]

    async def _refuse(
        self,
        msg: Msg,
        err: SwitchyardError,
        req: Request | None,
        use_case: str | None,
        account: str | None,
        *,
        record: bool = True,
        keep: bool = False,
        again: bool = False,
    ) -> None:
        """Answer when a reply subject can be read, copy to the DLQ (unless the refusal is a passing one the
        producer heard), record the event (unless not `record`). With `keep`, the answer is first kept for a
        redelivery of the message (workers/progress.py; raises, with nothing sent, when it cannot be). `again`:
        the kept refusal of an earlier delivery, given again (its copy and event are the same messages, which
        their streams drop as duplicates; it is not counted a second time).

        Each step is tried on its own; raises only when neither the answer nor the copy went out, so
        that the caller leaves the message in the stream rather than lose it.
        """
        rid, reply_to = (req.id, req.reply_to) if req is not None else peek_request(msg.data, account or "")
        account = req.account if req is not None else account
        if keep and self.progress is not None and rid is not None and reply_to is not None:
            await self.progress.refusing(msg.metadata.sequence.stream, encode(err.to_reply(rid, 0)))
        log.warning("refused", request_id=rid, code=err.code.value, error=err.message[:500], subject=msg.subject[:200])
        self.tracing.failed(err.code.value)
        if not again:
            self.vitals.fail()
        answered = copied = False
        if rid is not None and reply_to is not None:
            try:
                await self.pub.reply(reply_to, err.to_reply(rid, 0), account=account or "")
                answered = True
            except Exception as exc:
                log.warning("refusal_reply_failed", request_id=rid, error=repr(exc))
        # A passing refusal (every target down for now) that its producer heard needs no copy: the producer
        # retries, and an outage would flood the queue. Everything else an operator may want to fix and replay.
        passing = answered and err.retryable and err.code is not ErrorCode.INTERNAL
        if not passing:
            try:
                await self.pub.dead_letter("dispatch", msg.data, subject=msg.subject, code=err.code.value,
                                           error=err.message, origin_seq=msg.metadata.sequence.stream)
                copied = True
            except Exception as exc:
                log.warning("dead_letter_failed", request_id=rid, error=repr(exc))
        if not (answered or copied):
            raise RuntimeError("neither the refusal nor its dead-letter copy could be published")
        if not again:
            self.metrics.refused(self.cfg, (req.use_case if req is not None else None) or use_case, err.code.value)
        if record and rid is not None and account is not None and id_problem(rid) is None:
            try:
                event = self._refusal_event(err, rid, req, use_case, account)
                event.trace_id = self.tracing.trace_id(msg.headers)
                await self.pub.refusal_event(event, origin_seq=msg.metadata.sequence.stream)
            except Exception as exc:
                log.warning("refusal_event_failed", request_id=rid, error=repr(exc))

    @staticmethod
    def _refusal_event(
        err: SwitchyardError, rid: str, req: Request | None, use_case: str | None, account: str
    ) -> CompletionEvent:
        chars, digest = prompt_fingerprint(req) if req is not None else (0, "")
        t = now_ms()
        return CompletionEvent(
            id=rid,
            account=account,
            use_case=(req.use_case if req else None) or use_case or "",
            tier=req.tier if req else "default",
            status="error",
            code=err.code.value,
            started_ms=t,
            finished_ms=t,
            attempts=err.attempts if isinstance(err, Refusal) else [],
            prompt_chars=chars,
            prompt_sha256=digest,
            metadata=req.metadata if req else {},
        )
