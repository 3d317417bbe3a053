"""A provider worker: serves one pool's work items, streams replies, records completions."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
import msgspec
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.micro import add_service
from nats.micro.request import Request as MicroRequest

from router import breaker, pricing, providers
from router.breaker import Ticket, Verdict
from router.config import Config, PoolConfig, ProviderConfig
from router.errors import ErrorCode, ProviderFailure, SwitchyardError
from router.models import model_info
from router.providers.base import run_probe
from router.redact import MASK, remember_secret, scrub
from router.retry import retry_delay_ms, share_ms
from router.vitals import Vitals
from schemas import (
    Attempt,
    Chunk,
    CompletionEvent,
    Done,
    Request,
    ToolCall,
    Usage,
    WorkItem,
    decode_work,
    encode,
)

from . import discovery
from .budget import Budgets
from .health import HealthView, PoolHealth
from .keys import KeyRing
from .metrics import OK, WorkerMetrics
from .progress import Finished, Progress
from .publish import Publisher, now_ms, prompt_fingerprint
from .pull import serve_pull
from .ratelimits import (
    RateLimiter,
    book_turn,
    booked_turn,
    describe_pool,
    now_us,
    paused_until_ms,
    pool_limit,
    pool_tokens,
    turn_wait_ms,
)
from .runtime import MAX_DELIVER
from .tracing import ATTEMPT_SPAN, PROVIDER_CALL_SPAN, Tracing

log = structlog.get_logger("worker")

PROBE_MARGIN_MS = 1000
"""Added to a probe's share of time for its slot's claim: the slot outlives the call it was claimed for
only when the worker holding it is lost."""

TEST_SERVICE = "switchyard-worker"
"""The micro service each worker serves `providers test` from (`$SRV.INFO.switchyard-worker` lists them)."""
TEST_TIMEOUT_S = 10.0
"""How long `providers test`'s one call to the provider may take, all of it."""


def provider_test_subject(prefix: str, pool: str) -> str:
    """Where `switchyard providers test POOL` asks one of the pool's workers (queue group `q`)."""
    return f"{prefix}.admin.providers.test.{pool}"


class ProviderTest(msgspec.Struct, kw_only=True):
    """A worker's answer on `provider_test_subject`, and what `switchyard providers test --json` prints."""

    pool: str
    provider: str
    ok: bool
    url: str
    """What was called (GET), credentials masked."""
    latency_ms: int | None = None
    """How long the call took, failed or not; None when no call was made (the worker has no key)."""
    status: int | None = None
    """The provider's HTTP status; None when it never answered."""
    code: str | None = None
    """Not ok: our error code for the failure."""
    error: str | None = None
    """Not ok: one sentence, with anything like a key masked."""


@dataclass
class _Outcome:
    """What one request produced, successful or not."""

    seq: int = 0
    text: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    raw_usage: dict[str, object] | None = None
    first_token_ms: int | None = None
    cost_usd: float | None = None
    terminal_sent: bool = False
    tries: int = 0
    """Calls made to the provider on this target (retries are the calls after the first)."""
    trace_id: str | None = None
    """The request's trace id, for its completion event."""


@dataclass
class _Held:
    """The call in progress on this target, for when its share of the request's time runs out."""

    ticket: Ticket | None = None
    last: ProviderFailure | None = None


class _Heartbeat:
    """Tells JetStream every in-flight work item is still in progress, well inside ack_wait.

    One loop for the whole worker rather than a task per request.
    """

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.inflight: dict[int, Msg] = {}  # by id(): nats-py's Msg is not hashable
        self._idle = asyncio.Event()

    @contextlib.contextmanager
    def held(self, msg: Msg) -> Iterator[None]:
        self.inflight[id(msg)] = msg
        self._idle.clear()
        try:
            yield
        finally:
            del self.inflight[id(msg)]
            if not self.inflight:
                self._idle.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Beat until `stop` is set and the last held message is done."""
        while True:
            if stop.is_set() and not self.inflight:
                return
            # Wake early for shutdown (stop, then idle) rather than sleeping a whole period.
            waiter = self._idle if stop.is_set() else stop
            try:
                async with asyncio.timeout(self.every_s):
                    await waiter.wait()
                continue
            except TimeoutError:
                pass
            for msg in list(self.inflight.values()):
                try:
                    await msg.in_progress()
                except Exception as exc:  # a missed beat is not worth failing the request for
                    log.warning("keepalive_failed", error=repr(exc))


class PoolWorker:
    def __init__(
        self,
        js: JetStreamContext,
        pub: Publisher,
        http: httpx.AsyncClient,
        cfg: Config,
        pool: str,
        api_keys: Mapping[str, str | None],
        progress: Progress,
        *,
        keepalive_s: float | None = None,
        health: PoolHealth | None = None,
        budgets: Budgets | None = None,
        rates: RateLimiter | None = None,
        metrics: WorkerMetrics | None = None,
        tracing: Tracing | None = None,
        keyring: KeyRing | None = None,
    ) -> None:
        """`health` is the pool's shared breaker, its provider's credit and its key report (default: read
        and written through `js`'s KV buckets). `rates` holds the pool's own rate limit state (default:
        the `llm_rates` bucket of `js`, opened when the pool first has a limit). `keyring` holds the keys
        stored in PostgreSQL (workers/keys.py; default: environment keys only)."""
        self.keyring = keyring
        self.tracing = tracing or Tracing.off()
        """A span per attempt and per provider call (default: off; the trace context is passed on as it came)."""
        self.js = js
        self.pub = pub
        self.http = http
        self.cfg = cfg
        self.pool_name = pool
        self.pool: PoolConfig = cfg.pools[pool]
        self.provider_name = self.pool.provider
        self.provider: ProviderConfig = cfg.providers[self.provider_name]
        self.adapter = providers.adapter_for(self.provider.format)
        self.api_key = api_keys.get(self.provider_name)
        remember_secret(self.api_key)  # masked in every reply and log line of this process, whatever its shape
        # How often a long call tells JetStream it is still in progress: well inside ack_wait.
        self.heartbeat = _Heartbeat(keepalive_s if keepalive_s is not None else self.pool.ack_wait_ms / 3000)
        self.progress = progress
        self.rates = rates
        self.budgets = budgets
        """Settles each request's budget reservation when it ends (default: nothing settled)."""
        self.metrics = metrics if metrics is not None else WorkerMetrics(pool)
        """What it counts (default: a registry nobody serves)."""
        self.log = log.bind(pool=pool)
        self.vitals = Vitals(clock=now_ms)
        """Recent attempts and the provider's last check, served by the health endpoint (workers/discovery.py)."""
        self.reporter = discovery.Reporter("worker", self.vitals, pool=pool, provider=lambda: self.provider_name,
                                           in_flight=lambda: len(self.heartbeat.inflight))
        self.health = health or PoolHealth(
            HealthView(js), pool=pool, policy=self.pool.breaker, provider=self.provider_name,
            credit_cooldown_ms=self.provider.credit_cooldown_ms,
            has_key=self._has_key(),
        )
        if keyring is not None:
            keyring.on_change(self._keys_changed)

    def reconfigure(self, cfg: Config, api_keys: Mapping[str, str | None]) -> None:
        """Follow a pushed config: the pool's timeouts, retries and breaker policy, its provider, prices and
        models. Set without an await, so no request sees half of it. The process's own concurrency limit and
        heartbeat period stay as started (the pool's consumer caps the pool's concurrency either way)."""
        pool = cfg.pools.get(self.pool_name)
        if pool is None:
            self.log.warning("pool_removed", effect="this worker keeps its last settings; the dispatcher no longer"
                             " routes here, so stop it once its queue is empty")
            return
        provider = cfg.providers[pool.provider]
        self.cfg, self.pool, self.provider_name, self.provider = cfg, pool, pool.provider, provider
        self.adapter = providers.adapter_for(provider.format)
        self.api_key = api_keys.get(pool.provider)
        remember_secret(self.api_key)
        self.health.policy = pool.breaker
        self.health.provider = pool.provider
        self.health.credit_cooldown_ms = provider.credit_cooldown_ms
        self.health.has_key = self._has_key()

    def key_for(self, account: str | None) -> str | None:
        """The key a call for `account` uses (None: the pool's own, as `providers test` calls): the account's
        own stored key, else the environment's, else the global stored key (workers/keys.py)."""
        name = self.provider.api_key_env
        if self.keyring is None or not name:
            return self.api_key
        own = self.keyring.get(name, account) if account is not None else None
        return own or self.api_key or self.keyring.get(name, None)

    def _has_key(self) -> bool:
        """What the key report says: a key for some account at least (an account with none is refused
        UNAUTHORIZED here and falls back), or none needed."""
        name = self.provider.api_key_env
        return not name or bool(self.api_key) or (self.keyring is not None and self.keyring.has(name))

    def _keys_changed(self) -> None:
        self.health.key_changed(self._has_key())

    def _store_hint(self, name: str) -> str:
        """The other way to give a key, where this worker reads stored keys."""
        return f", or store one (`switchyard keys set {name}`)" if self.keyring is not None else ""

    async def serve(self, stop: asyncio.Event) -> None:
        self.log.info("worker_started", provider=self.provider_name, concurrency=self.pool.concurrency)
        if not self._has_key():
            self.log.warning("no_api_key", provider=self.provider_name, variable=self.provider.api_key_env,
                             effect="every request is refused with UNAUTHORIZED and falls back to the next target")
        consumer = f"pool-{self.pool_name}"
        # The endpoint is up before the key report says this worker is live, and stays up until the report
        # is gone: a worker that `switchyard providers` counts answers `providers test`.
        self.reporter.stop = stop
        service = await add_service(self.pub.nc, name=TEST_SERVICE, version="1.0.0", queue_group="q",
                                    metadata=self.reporter.metadata(), stats_handler=self.reporter.stats_handler,
                                    description="a pool's worker: providers test, health")
        await service.add_endpoint(name="providers-test", handler=self.answer_provider_test,
                                   subject=provider_test_subject(self.pub.prefix, self.pool_name))
        await discovery.add_health(service, self.reporter, self.pub.prefix)
        try:
            await self.health.start()
            self.metrics.follow(self.health.view, lambda: self.cfg, lambda: len(self.heartbeat.inflight),
                                lambda: self.vitals.provider)
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self.heartbeat.run(stop))
                    tg.create_task(self.health.keep_reporting(stop))
                    await serve_pull(self.pub.nc, "LLM_WORK", consumer, self.handle, stop,
                                     limit=self.pool.concurrency, give_up=self.give_up, max_deliver=MAX_DELIVER,
                                     holds=self._holds)
            finally:
                await self.health.stop()
        finally:
            with contextlib.suppress(Exception):  # a closed connection took its subscriptions with it
                await service.stop()

    async def answer_provider_test(self, request: MicroRequest) -> None:
        """`switchyard providers test`: one models-list call to the provider with this worker's key, answered as
        a ProviderTest. Counts toward nothing (no breaker, no credit)."""
        await request.respond(msgspec.json.encode(await self.test_provider()))

    async def test_provider(self) -> ProviderTest:
        """One models-list call to the provider with this worker's key (`providers test`, and the periodic
        check of workers/discovery.py). The error boundary of the call: the answer never carries the key, and
        anything unexpected is logged and answered as a failure."""
        provider, cfg, key = self.provider_name, self.provider, self.key_for(None)  # one config for the whole call
        adapter = providers.adapter_for(cfg.format)
        call = adapter.probe(base_url=cfg.base_url, api_key=key, headers=cfg.headers)
        status: int | None = None
        latency_ms: int | None = None
        failure: ProviderFailure | None = None
        if cfg.api_key_env and not key:
            failure = ProviderFailure(ErrorCode.UNAUTHORIZED, f"no API key: set {cfg.api_key_env} in the environment"
                                      f" of this pool's workers{self._store_hint(cfg.api_key_env)}", retry=False)
        else:
            started = asyncio.get_running_loop().time()
            try:
                async with asyncio.timeout(TEST_TIMEOUT_S):
                    status = await run_probe(self.http, adapter, call,
                                             timeout=httpx.Timeout(TEST_TIMEOUT_S, connect=5.0))
            except ProviderFailure as exc:
                failure, status = exc, exc.http_status
            except TimeoutError:
                failure = ProviderFailure(ErrorCode.PROVIDER_ERROR,
                                          f"the provider did not answer within {TEST_TIMEOUT_S:g} s", retry=False)
            except Exception as exc:
                self.log.exception("provider_test_failed", provider=provider)
                failure = ProviderFailure(ErrorCode.INTERNAL, f"the worker failed to call the provider"
                                          f" ({type(exc).__name__}); see its log", retry=False)
            latency_ms = round((asyncio.get_running_loop().time() - started) * 1000)
        error = None
        if failure is not None:
            error = failure.message
            if failure.http_status is not None and failure.code is ErrorCode.UNAUTHORIZED and cfg.api_key_env:
                error += f": check {cfg.api_key_env}"
            # scrub() knows the usual key shapes; the key itself is masked whatever its shape.
            error = scrub(error.replace(key, MASK) if key else error)
        answer = ProviderTest(
            pool=self.pool_name, provider=provider, ok=failure is None, url=scrub(call.url), latency_ms=latency_ms,
            status=status, code=failure.code.value if failure else None, error=error,
        )
        self.log.info("provider_tested", provider=provider, ok=answer.ok, latency_ms=latency_ms, status=status,
                      code=answer.code)
        return answer

    async def handle(self, msg: Msg) -> None:
        """One work item: the error boundary for what a request can cause. What escapes it (NATS failing
        under it) reaches the pull loop, which delivers the item again and finally gives up on it."""
        try:
            work = decode_work(msg.data)
        except Exception as exc:  # ValueError, RecursionError, ...: no request can be read, nobody to answer
            self.log.error("bad_work_item", error=str(exc)[:500])
            await self.pub.dead_letter(
                "work", msg.data, subject=msg.subject, code=ErrorCode.INVALID_REQUEST.value,
                error=f"undecodable work item: {exc}", origin_seq=msg.metadata.sequence.stream,
            )
            await msg.term()
            return
        req = work.request
        bound = self.log.bind(request_id=req.id, account=req.account)
        out = _Outcome()
        try:
            with self.heartbeat.held(msg), self._attempt_span(msg, work):
                out.trace_id = self.tracing.trace_id(msg.headers)
                await self._serve(msg, work, out, bound)
        except Exception as exc:
            if out.terminal_sent or out.seq == 0:
                raise  # nothing half-done to end here: a redelivery serves it, or finds its terminal reply
            # A stream that started cannot be resumed by a redelivery: end it now, with one error.
            bound.exception("worker_failed")
            err = SwitchyardError(ErrorCode.INTERNAL, f"the worker failed on this request ({type(exc).__name__})")
            await self._end(work, out, err)
            await self.pub.dead_letter("work", msg.data, subject=msg.subject, code=err.code.value, error=repr(exc),
                                       origin_seq=msg.metadata.sequence.stream)
            await msg.term()

    async def give_up(self, msg: Msg, reason: str) -> None:
        """The pull loop's last resort for a work item: answer its producer unless its terminal reply
        already went out, and copy it to the dead-letter queue."""
        err = SwitchyardError(ErrorCode.INTERNAL, f"the worker gave up on this request: {reason}")
        try:
            work = decode_work(msg.data)
        except Exception:
            work = None
        if work is not None:
            req = work.request
            state = await self.progress.lookup(req.account, req.id)
            if isinstance(state, Finished):
                if state.event is not None:
                    await self.pub.publish(*self._event_message(state.event, req.account, req.id))
            else:
                await self._end(work, _Outcome(seq=state or 0, trace_id=self.tracing.trace_id(msg.headers)), err)
        await self.pub.dead_letter("work", msg.data, subject=msg.subject, code=err.code.value, error=reason,
                                   origin_seq=msg.metadata.sequence.stream)

    async def _resumed(self, msg: Msg, work: WorkItem, bound: structlog.BoundLogger) -> bool:
        """A redelivered item: finish what a lost or failed worker had started. True when handled here."""
        req = work.request
        state = await self.progress.lookup(req.account, req.id)
        if state is None:
            return False  # nothing went out: serve it afresh
        if isinstance(state, Finished):
            if state.event is not None:  # answered, but its completion event is still to be recorded
                await self.pub.publish(*self._event_message(state.event, req.account, req.id))
            bound.info("already_answered")
        else:
            err = SwitchyardError(
                ErrorCode.PROVIDER_ERROR,
                "the worker streaming this answer was lost after sending part of it; the answer is incomplete,"
                " send the request again",
            )
            work.attempts.append(Attempt(pool=self.pool_name, model=work.route[0].model, error=err.code.value))
            await self._end(work, _Outcome(seq=state, trace_id=self.tracing.trace_id(msg.headers)), err)
            bound.warning("stream_lost", next_seq=state)
        await msg.ack()
        return True

    async def _serve(self, msg: Msg, work: WorkItem, out: _Outcome, bound: structlog.BoundLogger) -> None:
        req = work.request
        if msg.metadata.num_delivered > 1 and await self._resumed(msg, work, bound):
            return
        target = work.route[0]
        started = now_ms()
        deadline_ms = work.accepted_ms + req.timeout_ms
        # A call that will be refused anyway (no key, no credit) takes no turn of the pool's own limit.
        turn = await self._pool_turn(req, msg, deadline_ms) if self._refusal(req.account) is None else None
        if isinstance(turn, int):  # its turn is booked for later: back in the queue until then
            await self.progress.count_hold(msg.metadata.sequence.stream)
            await msg.nak(delay=turn / 1000)
            self.metrics.waited("pool_limit")
            bound.info("waiting_for_pool_limit", wait_ms=turn)
            return
        failure: SwitchyardError | None = turn
        try:
            async with asyncio.timeout(max(0.0, (deadline_ms - started) / 1000)) as budget:
                if failure is None:
                    failure = await self._call_with_retries(req, target.model, out, deadline_ms, len(work.route))
        except TimeoutError:
            if not budget.expired():
                raise  # a NATS or HTTP timeout inside, not the request's own deadline
            failure = SwitchyardError(ErrorCode.TIMEOUT, f"the request's timeout of {req.timeout_ms} ms passed")
        attempt = Attempt(
            pool=self.pool_name,
            model=target.model,
            error=failure.code.value if failure else None,
            latency_ms=now_ms() - started,
        )
        work.attempts.append(attempt)
        self.metrics.attempted(self.cfg, self.provider_name, target.model, failure.code.value if failure else OK)
        if self.tracing.on:
            self._trace_attempt(out, failure)
        self.vitals.record(failure is None, attempt.latency_ms or 0)
        if failure is None:
            out.cost_usd = self._cost(target.model, out.usage)
            await self._end(work, out, None)
            await msg.ack()
            bound.info("completed", latency_ms=now_ms() - work.accepted_ms, chunks=out.seq,
                       input_tokens=out.usage.input_tokens, output_tokens=out.usage.output_tokens)
            return
        if self._can_fall_back(work, out, failure):
            nxt = WorkItem(request=req, route=work.route[1:], attempts=work.attempts, accepted_ms=work.accepted_ms,
                           reserved_usd=work.reserved_usd, budget=work.budget)
            headers = {"Nats-Msg-Id": f"{req.account}:{req.id}:{len(nxt.attempts)}"}
            self.tracing.pass_on(headers, msg.headers)  # the next attempt is a child of the dispatcher's span too
            self.tracing.current().set_attribute("switchyard.fell_back_to", str(nxt.route[0]))
            await self.pub.publish(f"{self.pub.prefix}.work.{nxt.route[0].pool}", encode(nxt), headers)
            await msg.ack()
            self.metrics.fell_back(self.provider_name, failure.code.value)
            bound.warning("fell_back", code=failure.code.value, error=failure.message, to=str(nxt.route[0]))
            return
        if await self._wait_for_provider(msg, out, failure, deadline_ms, bound):
            return
        await self._end(work, out, failure)
        await msg.ack()
        bound.warning("failed", code=failure.code.value, error=failure.message, chunks=out.seq)

    def _attempt_span(self, msg: Msg, work: WorkItem) -> contextlib.AbstractContextManager[object]:
        """The span of this attempt at the request: a child of the dispatcher's span (the work item's headers)."""
        if not self.tracing.on:
            return contextlib.nullcontext()
        req, target = work.request, work.route[0]
        attributes: dict[str, str | int] = {
            "messaging.system": "nats", "messaging.destination.name": msg.subject[:200],
            "messaging.nats.num_delivered": msg.metadata.num_delivered,
            "switchyard.request_id": req.id, "switchyard.account": req.account, "switchyard.pool": self.pool_name,
            "switchyard.provider": self.provider_name, "gen_ai.request.model": target.model,
            "switchyard.attempt": len(work.attempts) + 1,
        }
        if work.attempts:  # the previous target's error is why this one is tried
            attributes["switchyard.fallback_reason"] = work.attempts[-1].error or ""
        return self.tracing.consume(ATTEMPT_SPAN, msg.headers, attributes)

    def _trace_attempt(self, out: _Outcome, failure: SwitchyardError | None) -> None:
        span = self.tracing.current()
        span.set_attribute("switchyard.retries", max(0, out.tries - 1))
        if failure is not None:
            self.tracing.failed(failure.code.value)

    async def _holds(self, msg: Msg) -> int:
        return await self.progress.holds(msg.metadata.sequence.stream)

    async def _wait_for_provider(
        self, msg: Msg, out: _Outcome, failure: SwitchyardError, deadline_ms: int, bound: structlog.BoundLogger
    ) -> bool:
        """A provider that asked to be left alone for a while (429 with a wait) is waited for rather than
        answered with a 429 of ours: the whole pool stops pulling for the wait (its consumer paused, for every
        replica) and this item goes back to the queue for it. Only for a wait longer than the pool retries in
        place, when nothing was streamed, no fallback is left and the wait ends before the request's deadline.
        True when the item was put back."""
        wait = failure.retry_after_ms if isinstance(failure, ProviderFailure) and failure.http_status == 429 else None
        # A wait short enough to retry in place (within the pool's max_ms) was retried already.
        if wait is None or wait <= self.pool.retry.max_ms or out.seq or now_ms() + wait >= deadline_ms:
            return False
        await self._put_back(msg, wait, bound)
        self.metrics.waited("provider_wait")
        bound.info("waiting_for_provider", wait_ms=wait, code=failure.code.value)
        return True

    async def _put_back(self, msg: Msg, wait: int, bound: structlog.BoundLogger) -> None:
        """Stop the whole pool pulling for `wait` ms (its consumer paused, for every replica) and put this item
        back in the queue for that long, counted as a hold rather than a failed delivery. A pause that already
        lasts longer (a provider's longer wait) is left as it is."""
        until_ms = now_ms() + wait
        until = datetime.fromtimestamp(until_ms / 1000, UTC)
        consumer = f"pool-{self.pool_name}"
        try:
            if until_ms > await paused_until_ms(self.js, consumer):
                await self.js.pause_consumer("LLM_WORK", consumer, until.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
        except Exception as exc:  # the item still waits its turn; the other replicas may just try sooner
            bound.warning("pool_pause_failed", error=repr(exc))
        await self.progress.count_hold(msg.metadata.sequence.stream)
        await msg.nak(delay=wait / 1000)

    async def _pool_turn(self, req: Request, msg: Msg, deadline_ms: int) -> int | SwitchyardError | None:
        """None when the pool's own rate limit (if any) lets this request call the provider now, its turn
        taken; the milliseconds to wait when its turn is booked for later (in the order items asked, a
        turn booked once and found again when the item comes back); PROVIDER_UNAVAILABLE with the wait
        when its turn would come after its deadline. Raises what NATS raises when the `llm_rates` or
        `llm_streams` bucket cannot be used (the item is delivered again, never let through unchecked)."""
        pool = self.pool
        limit = pool_limit(pool)
        if limit is None:
            return None
        if self.rates is None:
            self.rates = await RateLimiter.open(self.js)
        seq = msg.metadata.sequence.stream
        if msg.metadata.num_delivered > 1:
            booked = await booked_turn(self.progress.kv, seq)
            if booked is not None:
                return turn_wait_ms(booked)
        decision = await self.rates.decide_pool(self.pool_name, limit, tokens=pool_tokens(req, limit),
                                                wait_us=deadline_ms * 1000 - now_us())
        if decision.admitted:
            wait = turn_wait_ms(decision.at_us)
            if wait is not None:
                await book_turn(self.progress.kv, seq, decision.at_us)
            return wait
        return SwitchyardError(
            ErrorCode.PROVIDER_UNAVAILABLE,
            f"pool {self.pool_name!r} is at its own rate limit of {describe_pool(pool)} towards provider"
            f" {self.provider_name!r}, and its next turn comes after this request's deadline",
            retry_after_ms=decision.retry_after_ms,
        )

    async def _end(self, work: WorkItem, out: _Outcome, failure: SwitchyardError | None) -> None:
        """The terminal reply, the done marker, the budget's settlement, then the completion event. Once the
        reply is out nothing may call the provider again: an event that cannot be published is kept in the
        progress bucket for the redelivery to publish, and the error goes up so the item is delivered again.
        The settlement is queued only once the done marker went out, on the same connection as the batch that
        will carry it: a redelivery that finds the marker settles nothing, one that does not find it finds
        nothing settled (workers/budget.py)."""
        req = work.request
        reply = self._done(req, work, out) if failure is None else failure.to_reply(req.id, out.seq)
        await self.pub.reply(req.reply_to, reply, account=req.account)
        out.terminal_sent = True
        self.metrics.ended(self.cfg, work, self.provider_name, failure.code.value if failure else OK, out.usage,
                           out.cost_usd, out.first_token_ms)
        await self.progress.finished(req.account, req.id)
        if self.budgets is not None:
            self.budgets.settle(self.cfg, work, out.cost_usd, failed=failure is not None)
        event = encode(self._event(work, out, error=failure.code.value if failure else None))
        try:
            await self.pub.publish(*self._event_message(event, req.account, req.id))
        except Exception:
            await self.progress.keep_event(req.account, req.id, event)
            raise

    def _event_message(self, event: bytes, account: str, request_id: str) -> tuple[str, bytes, dict[str, str]]:
        return f"{self.pub.prefix}.events.completed", event, {"Nats-Msg-Id": f"done:{account}:{request_id}"}

    @staticmethod
    def _can_fall_back(work: WorkItem, out: _Outcome, failure: SwitchyardError) -> bool:
        # Only before the first chunk, and not for a request the next provider would refuse too.
        return (
            len(work.route) > 1
            and out.seq == 0
            and failure.code not in (ErrorCode.INVALID_REQUEST, ErrorCode.TIMEOUT)
        )

    async def _call_with_retries(
        self, req: Request, model: str, out: _Outcome, deadline_ms: int, targets_left: int
    ) -> ProviderFailure | None:
        """Call the provider within this target's share of the request's time, retrying retryable failures
        until a chunk went out. Returns the last failure; the share running out is one (PROVIDER_ERROR, so
        the next target is tried), the request's own deadline is left to the caller (TIMEOUT)."""
        refused = self._refusal(req.account)
        if refused is not None:
            return refused
        try:
            call = self.adapter.build(
                req, model=model, base_url=self.provider.base_url, api_key=self.key_for(req.account),
                headers=self.provider.headers,
                temperature_rule=model_info(self.cfg, self.provider.format, model).temperature,
            )
        except ProviderFailure as failure:  # the adapter says this request cannot go to this API
            return failure
        except Exception as exc:
            self.log.exception("build_failed", request_id=req.id, format=self.provider.format)
            return ProviderFailure(
                ErrorCode.INTERNAL,
                f"the request could not be translated for the {self.provider.format} API ({type(exc).__name__})",
                retry=False,
            )
        left = deadline_ms - now_ms()
        share = share_ms(left, targets_left)
        # A share that ends with the request is left to the request's own deadline: TIMEOUT, no fallback.
        ends = asyncio.get_running_loop().time() + share / 1000 if share < left else None
        held = _Held()
        try:
            async with asyncio.timeout_at(ends) as share_cm:
                return await self._tries(req, call, out, share_cm, deadline_ms, held)
        except TimeoutError:
            if not share_cm.expired():
                raise  # a NATS or HTTP timeout inside, not this target's share
        if held.ticket is None and held.last is not None:
            return held.last  # the share ran out between two tries
        if held.ticket is not None:
            await self._record(held.ticket, Verdict.FAILURE)
        return ProviderFailure(
            ErrorCode.PROVIDER_ERROR,
            f"pool {self.pool_name!r} did not answer within {share} ms, its share of the request's time"
            f" ({targets_left} targets left)",
            retry=False,
        )

    def _refusal(self, account: str) -> ProviderFailure | None:
        """Why this worker will not call its provider at all now for `account`, if it will not."""
        name = self.provider.api_key_env
        if name and not self.key_for(account):
            return ProviderFailure(
                ErrorCode.UNAUTHORIZED,
                f"no API key for provider {self.provider_name!r}: set {name} in the environment of pool"
                f" {self.pool_name!r}'s workers{self._store_hint(name)}",
                retry=False,
            )
        until = self.health.credit_until()
        if until is not None:
            return ProviderFailure(
                ErrorCode.PROVIDER_UNAVAILABLE,
                f"provider {self.provider_name!r} is out of credit until"
                f" {datetime.fromtimestamp(until / 1000, UTC):%H:%M:%S} UTC",
                retry=False,
            )
        return None

    async def _tries(
        self, req: Request, call: providers.HttpCall, out: _Outcome, share: asyncio.Timeout, deadline_ms: int,
        held: _Held,
    ) -> ProviderFailure | None:
        policy = self.pool.retry
        timeout = httpx.Timeout(connect=5.0, read=self.pool.timeout_ms / 1000, write=10.0, pool=5.0)
        for attempt in range(policy.attempts):
            ticket = await self._admit(int(self._left_ms(share, deadline_ms)) + PROBE_MARGIN_MS)
            if ticket is None:
                # After a failed try, that failure says more than the breaker it opened.
                return held.last or ProviderFailure(
                    ErrorCode.PROVIDER_UNAVAILABLE, f"breaker open for pool {self.pool_name!r}", retry=False
                )
            held.ticket = ticket
            out.tries += 1
            try:
                if self.tracing.on:
                    await self._call_traced(req, call, out, share, timeout)
                else:
                    await self._call(req, call, out, share, timeout)
            except ProviderFailure as failure:
                held.ticket, held.last = None, failure
                await self._failed(req, ticket, failure)
                if not failure.retry or out.seq > 0 or attempt == policy.attempts - 1:
                    return failure
                delay = retry_delay_ms(policy, attempt, asked_ms=failure.retry_after_ms,
                                       left_ms=self._left_ms(share, deadline_ms))
                if delay is None:
                    self.log.info("not_retrying", request_id=req.id, code=failure.code.value,
                                  asked_ms=failure.retry_after_ms, max_ms=policy.max_ms,
                                  left_ms=int(self._left_ms(share, deadline_ms)))
                    return failure
                self.metrics.retried(self.provider_name, failure.code.value)
                self.log.info("retrying", request_id=req.id, code=failure.code.value, delay_ms=delay,
                              http_status=failure.http_status)
                await asyncio.sleep(delay / 1000)
            else:
                held.ticket = None
                await self._record(ticket, Verdict.SUCCESS)
                return None
        raise AssertionError("unreachable: the loop returns on its last attempt")

    async def _call(
        self, req: Request, call: providers.HttpCall, out: _Outcome, share: asyncio.Timeout, timeout: httpx.Timeout
    ) -> None:
        async for ev in providers.run(self.http, self.adapter, call, stream=req.stream, timeout=timeout):
            match ev:
                case providers.TextDelta(text=text):
                    if req.stream and text and out.seq == 0:
                        # A stream that started cannot fall back: from here it may use the request's time.
                        share.reschedule(None)
                    await self._text(req, out, text)
                case providers.Finished() as fin:
                    out.finish_reason = fin.finish_reason
                    out.usage = fin.usage
                    out.raw_usage = fin.raw_usage
                    out.tool_calls = fin.tool_calls

    async def _call_traced(
        self, req: Request, call: providers.HttpCall, out: _Outcome, share: asyncio.Timeout, timeout: httpx.Timeout
    ) -> None:
        """`_call` in a span of its own, a child of the attempt's: the provider, the host called (never the
        URL's path or query, nor a header), the outcome's code and HTTP status, the tokens."""
        attributes: dict[str, str | int] = {
            "gen_ai.system": self.provider.format, "server.address": httpx.URL(self.provider.base_url).host,
            "switchyard.try": out.tries,
        }
        failed: ProviderFailure | None = None
        with self.tracing.call(PROVIDER_CALL_SPAN, attributes) as span:
            try:
                await self._call(req, call, out, share, timeout)
            except ProviderFailure as failure:
                failed = failure  # raised once the span has ended, so that it keeps our code rather than the type
                if failure.http_status is not None:
                    span.set_attribute("http.response.status_code", failure.http_status)
                self.tracing.failed(failure.code.value)
            else:
                span.set_attributes({"gen_ai.usage.input_tokens": out.usage.input_tokens,
                                     "gen_ai.usage.output_tokens": out.usage.output_tokens})
        if failed is not None:
            raise failed

    @staticmethod
    def _left_ms(share: asyncio.Timeout, deadline_ms: int) -> float:
        """Time left in this target's share (the request's, when the share ends with it)."""
        when = share.when()
        if when is None:
            return float(deadline_ms - now_ms())
        return (when - asyncio.get_running_loop().time()) * 1000

    async def _failed(self, req: Request, ticket: Ticket, failure: ProviderFailure) -> None:
        if failure.code is ErrorCode.UNAUTHORIZED and self.provider.api_key_env:
            failure.message += f" for provider {self.provider_name!r}: check {self.provider.api_key_env}"
        if failure.credit_exhausted:
            # Every pool of this provider, on every replica, skips it for its cool-down.
            try:
                await self.health.out_of_credit()
            except Exception as exc:
                self.log.warning("credit_mark_failed", request_id=req.id, error=repr(exc))
        await self._record(ticket, breaker.verdict(failure))

    async def _admit(self, lease_ms: int) -> Ticket | None:
        try:
            return await self.health.admit(lease_ms)
        except Exception as exc:  # only a half-open claim does I/O: without it, no probe
            self.log.warning("breaker_unreachable", error=repr(exc))
            return None

    async def _record(self, ticket: Ticket, outcome: Verdict) -> None:
        try:
            await self.health.record(ticket, outcome)
        except Exception as exc:  # the request's outcome does not depend on the breaker's bookkeeping
            self.log.warning("breaker_update_failed", outcome=outcome.value, error=repr(exc))

    async def _text(self, req: Request, out: _Outcome, text: str) -> None:
        if out.first_token_ms is None:
            out.first_token_ms = now_ms()
        out.text.append(text)
        if req.stream and text:
            if out.seq == 0:
                await self.progress.started(req.account, req.id)
            await self.pub.reply(req.reply_to, Chunk(id=req.id, seq=out.seq, text=text), account=req.account)
            out.seq += 1
            await self.progress.sent(req.account, req.id, out.seq)

    def _cost(self, model: str, usage: Usage) -> float | None:
        # The config's price or `free` first, then genai-prices by provider, by wire format, by model name.
        return pricing.target_cost_usd(self.cfg, self.provider_name, model, usage)

    def _done(self, req: Request, work: WorkItem, out: _Outcome) -> Done:
        model = work.route[0].model
        return Done(
            id=req.id,
            seq=out.seq,
            text="".join(out.text),
            tool_calls=out.tool_calls,
            finish_reason=out.finish_reason or "stop",
            provider=self.provider_name,
            model=model,
            usage=out.usage,
            cost_usd=out.cost_usd,
            attempts=work.attempts,
            latency_ms=now_ms() - work.accepted_ms,
            ttft_ms=(out.first_token_ms - work.accepted_ms) if out.first_token_ms else None,
        )

    def _event(self, work: WorkItem, out: _Outcome, *, error: str | None) -> CompletionEvent:
        req = work.request
        chars, digest = prompt_fingerprint(req)
        model = work.route[0].model
        finished = now_ms()
        return CompletionEvent(
            id=req.id,
            account=req.account,
            use_case=req.use_case or "",
            tier=req.tier,
            status="error" if error else "ok",
            code=error,
            provider=self.provider_name,
            model=model,
            attempts=work.attempts,
            usage=out.usage,
            raw_usage=out.raw_usage,
            cost_usd=None if error else out.cost_usd,
            latency_ms=finished - work.accepted_ms,
            ttft_ms=(out.first_token_ms - work.accepted_ms) if out.first_token_ms else None,
            started_ms=work.accepted_ms,
            finished_ms=finished,
            prompt_chars=chars,
            prompt_sha256=digest,
            finish_reason=out.finish_reason,
            metadata=req.metadata,
            trace_id=out.trace_id,
        )
