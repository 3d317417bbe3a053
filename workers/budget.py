"""Account budgets shared by every dispatcher and worker: reserve before forwarding, settle at the end.

Spend lives in nats-server counters (stream `LLM_BUDGET`, `allow_msg_counter`), in integer
micro-dollars, two per account and period (`d20261130`, `m202611`, in `limits.timezone`):

- `<prefix>.budget.<account>.<period>.used`: spent, plus reserved by requests in flight, plus
  the dispatchers' slices not reserved yet (below); the number a slice is checked against;
- `<prefix>.budget.<account>.<period>.spent`: settled cost only (`budget status` shows
  reserved = used − spent, slices held included).

An increment is atomic and answers the new total, so the check is exact across any number of
replicas. A dispatcher does not increment the counters per request: it leases a slice of each
counter it needs (one increment of `used`, `router/budget.py`'s `slice_size`: ~2 % of the limit
while the headroom is large, shrinking to exactly the request's reservation near the limit) and
reserves requests' worst cases from its slices locally, with no round trip. When an increment takes
a total past its limit, the part that did not fit goes back at once (one decrement) and, when what
fitted cannot cover the request, so does the rest, with what was left of the dispatcher's slice,
and the request is refused: kept slices fitted under the limit when they were added, so `used`
(spent + reserved + slices held) never stays past it and spend never passes it. Two requests that
pass the limit together may both be refused. A slice is reserved from locally only under a limit
at least as high as the one it was checked against: after a limit is lowered (the account table,
a config push), the next request asks the counter again.

`used` keeps meaning "committed": the real spend of settled requests, the reservations of requests
in flight, and the unused remainders of dispatchers' slices. A dispatcher gives a remainder back
(one decrement, with a `Nats-Msg-Id` so that a retry is not counted twice) once its slice has been
idle for `IDLE_S`, when its period ends, and when it stops (`Budgets.stop`). A dispatcher that dies
leaves its remainders counted until the period ends (erring on refusing, never on overspending).

A worker does not increment the counters per request either. Its settlement of a request (in
`PoolWorker._end`, through which every end passes: done, error, give-up, a stream lost with its
worker) turns the reservation into the real cost: `used` by real cost − reserved (−reserved when
the request failed; the whole reservation kept when no cost is known) and `spent` by the cost, in
the day and month of the request's publish time (a request that ends after midnight settles in the
day it reserved in). `settle` only adds these to sums per counter, in memory; every `FLUSH_S` the
worker sends one increment per counter whose sum is not zero, all at once, each with a
`Nats-Msg-Id` of its own (`settle:<process>:<batch>:<subject>`), so that a batch tried again after
a failure (with the same ids, only within `RETRY_FOR_S` of its first try, well inside the stream's
duplicate window `DUPLICATE_WINDOW_S`) is never counted twice; past that it is dropped with a
warning. The settlement returns the unused part of the reservation to the shared counter, not to
a dispatcher's slice.

A batch cannot be deduplicated per request, so a request must be settled once: `_end` queues the
settlement only after the done marker (workers/progress.py) went out, on the connection the batch
will go out on. A redelivery that finds the marker settles nothing; one that does not find it
finds nothing queued by the worker before it. A worker stops by flushing what is pending (within
`STOP_S`); a worker killed loses what it had not flushed, at most `FLUSH_S` of settlements: their
reservations stay counted in `used` until the period ends (erring on refusing) and their spend is
missing from `spent`. `budget status` lags the replies by up to `FLUSH_S`: a request's reserved
amount returns to 0 with the flush after it ended.

A dispatcher remembers the reservations it made (`HELD_MAX`, by account and request id), so a
request delivered to it again finds its own; its release (a refused or unforwardable request) goes
back to the slice, no round trip. A request delivered again to *another* dispatcher reserves again
from that one's slice and is settled once (the work item is handed over once, idempotent on the
request id): one of its two reservations stays counted until the period ends, erring on refusing.

What else is not released by itself (the reservation stays counted, which errs on refusing, never
on overspending, until the period's end; `budget reset` forgets spend, not reservations): a
dispatcher that gives up on a request it reserved for (its forward failing five times); a slice
increment or give-back that failed in a way that leaves unknown whether it landed (it is taken as
not landed: an increment's slice is not used, a give-back is tried again with its message id until
the connection closes).

Crossing a budget's `alert_at` (and 100 %) with settled spend publishes one
`<prefix>.alerts.budget` event per account, period and threshold: the increment that crosses is
seen by one process only (its acknowledgement's total, less the batch's sum, is where the counter
stood before; the request named is the one whose cost, in the batch's order, crossed), and a
`create` of `<account>.<period>.<pct>` in `llm_budget_alerts` keeps it to once even after a reset.

Which budget applies is router/limits.py's: the account's row of PostgreSQL's `llm_account_limits`
(followed by the dispatcher, workers/accounts.py), then the config. An account with no budget at all
(both amounts `"unlimited"`) reserves nothing: no round trip, no counters. A period without a budget
is still reserved (from slices of `UNCAPPED_SLICE`, $1) and settled (so `budget status` shows its
spend) but never refuses. The work item
carries the limits the reservation was checked against, and the worker's alerts use them (a
batch's, per account and period: those of its latest request).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import msgspec
import structlog
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from router import budget as policy
from router.config import Config
from router.errors import ErrorCode, SwitchyardError
from router.limits import AccountLimits
from router.routing import Selection
from schemas import BudgetLimits, Request, WorkItem

from .health import _bucket
from .publish import now_ms

log = structlog.get_logger("budget")

STREAM = "LLM_BUDGET"
ALERTS_BUCKET = "llm_budget_alerts"
DUPLICATE_WINDOW_S = 120.0
_DAY_S = 86_400.0
MAX_AGE_S = 40 * _DAY_S
"""A month's counters outlive the month; older periods are dropped by age."""
_INCR = "Nats-Incr"
IDLE_S = 1.5
"""A slice no request reserved from for this long is given back."""
SWEEP_S = 0.5
"""How often a dispatcher looks for idle slices."""
STOP_S = 5.0
"""How long a stopping dispatcher tries to give its slices back."""
HELD_MAX = 16_384
"""Reservations remembered per dispatcher, so that a request delivered to it again reserves nothing more."""
FLUSH_S = 0.25
"""How often a worker sends its settlements, summed per counter: how long `budget status` may lag, and what a
killed worker loses at most."""
FLUSH_TIMEOUT_S = 5.0
"""How long one increment of a flush may wait for its acknowledgement before it counts as not landed."""
RETRY_FOR_S = DUPLICATE_WINDOW_S / 2
"""How long after its first try a batch's increment is tried again: never so late that the server may have
forgotten the message id of a first try that landed (the window, less the slowest tries' time)."""
FLUSH_CONCURRENCY = 256
"""Increments of one flush awaiting their acknowledgement at once."""


def subject(prefix: str, account: str, period: str, kind: str) -> str:
    return f"{prefix}.budget.{account}.{period}.{kind}"


def _used_subjects(prefix: str, account: str, day: str, month: str) -> tuple[str, str]:
    """The `used` counters (day, month) a reservation of `account` in that day and month takes from (kept per
    account by `Budgets._account`)."""
    return subject(prefix, account, day, "used"), subject(prefix, account, month, "used")


class BudgetAlert(msgspec.Struct, kw_only=True):
    """One on `<prefix>.alerts.budget` when an account's settled spend first crosses a threshold of a period."""

    v: int = 1
    account: str
    period: str
    """`day` or `month`."""
    period_key: str
    """Which one: `d20261130`, `m202611` (in the budgets' time zone)."""
    threshold_pct: int
    limit_usd: float
    spent_usd: float
    request_id: str
    """The request whose settlement crossed it."""
    at_ms: int


@dataclass
class _Spend:
    """What a batch adds to one `spent` counter, for its alerts: the requests in the order they were settled."""

    account: str
    period: policy.PeriodKind
    period_key: str
    limits: BudgetLimits | None = None
    """The latest request's (the limits its reservation was checked against)."""
    requests: list[tuple[str, int]] = field(default_factory=list)
    """(request id, cost in micro-dollars)."""


@dataclass
class _Step:
    """One increment of a batch, kept with its message id until acknowledged."""

    subject: str
    delta: int
    msg_id: str
    first_s: float
    """When it was first tried (the event loop's clock)."""
    spend: _Spend | None
    """A `spent` counter's: what to alert on."""


class BudgetRefused(SwitchyardError):
    """The request may not be forwarded: its budget would be exceeded, or its cost could not be counted."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.BUDGET_EXCEEDED, message)


_KINDS: tuple[policy.PeriodKind, policy.PeriodKind] = ("day", "month")

COUNTERS_KEPT = 16_384
"""How many accounts' `_Counters` a dispatcher keeps (all of them are dropped when more come: rebuilt on use)."""


@dataclass(slots=True)
class _Counters:
    """An account's `used` counter subjects in the periods `per`, and the caps of `limits` in micro-dollars."""

    per: policy.Periods
    limits: BudgetLimits
    day: str
    month: str
    day_cap: int | None
    month_cap: int | None


class Budgets:
    """Reservations from leased slices (dispatcher), settlements and alerts (worker) for one process."""

    def __init__(self, js: JetStreamContext, prefix: str) -> None:
        self.js = js
        self.prefix = prefix
        self._alerts: KeyValue | None = None
        self.slices = policy.Slices()
        """What this process holds of the accounts' counters (a dispatcher's; a worker holds none)."""
        self._locks: dict[str, asyncio.Lock] = {}
        self._held: OrderedDict[str, tuple[int, bool]] = OrderedDict()
        """Reservations made here, by `<account> <request id>`, so that a redelivery to this process finds its own:
        the amount, and whether a later delivery found it; oldest first."""
        self._counters: dict[str, _Counters] = {}
        """Per account, the `used` counters and caps its latest reservation here took from (`_account`)."""
        self._back: list[tuple[str, int, str]] = []
        """Give-backs (subject, amount, message id) that did not go out yet: tried again, idempotently."""
        self._sweeper: asyncio.Task[None] | None = None
        self._timezone = "UTC"
        self._id = uuid.uuid4().hex[:12]
        self._seq = 0
        self._sums: dict[str, int] = {}
        """Settlements not sent yet (a worker's): the sum per counter subject."""
        self._spends: dict[str, _Spend] = {}
        """Of those, per `spent` subject, the requests they sum (for alerts)."""
        self._unsent: list[_Step] = []
        """Increments of earlier batches not acknowledged: tried again, with their message ids."""
        self._batch_no = 0
        self._flusher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        """Set by `stop`: flush now rather than at the end of FLUSH_S."""

    @classmethod
    async def open(cls, js: JetStreamContext, prefix: str) -> Budgets:
        """Started: its buckets exist."""
        budgets = cls(js, prefix)
        await budgets.start()
        return budgets

    async def start(self) -> None:
        """Create the alerts bucket when missing."""
        self._alerts = await alerts_bucket(self.js)

    async def stop(self) -> None:
        """Send the settlements not sent yet (a worker) and give back every slice this process holds (a
        dispatcher), before the connection closes, each within STOP_S. What does not go out is logged: a
        settlement's reservation stays counted, its spend not shown; a slice stays counted; until the period
        ends, which errs on refusing."""
        await self._stop_flushing()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(BaseException):
                await self._sweeper
            self._sweeper = None
        self._queue_back(self.slices.drain())
        try:
            async with asyncio.timeout(STOP_S):
                await self._give_back()
        except TimeoutError:
            pass
        if self._back:
            log.warning("budget_slices_not_given_back", usd=policy.usd(sum(a for _, a, _ in self._back)),
                        effect="counted until the period ends (erring on refusing)")
            self._back.clear()

    async def _incr(self, subj: str, delta: int, msg_id: str | None = None, timeout: float | None = None) -> PubAck:
        headers = {_INCR: str(delta)}
        if msg_id is not None:
            headers["Nats-Msg-Id"] = msg_id
        return await self.js.publish(subj, b"", timeout=timeout, headers=headers)

    async def reserve(
        self, cfg: Config, req: Request, selection: Selection, published_ms: int, own: AccountLimits | None = None,
        *, limits: BudgetLimits | None = None,
    ) -> float:
        """Reserve `req`'s worst case in its account's day and month (`own`: the account's row of the account
        table, over the config), from this dispatcher's slices of the two counters, taking a new slice of a
        counter (one increment) only when its own cannot cover it. Returns the reservation in USD (0: its chain
        is free, or its account has no budget: nothing counted). Raises BudgetRefused when a period's limit
        would be passed (nothing stays reserved) or the chain has a target without a price; NATS errors as
        nats-py raises them (nothing stays reserved). `limits`: the budget `own` and the config give, when the
        caller has it already."""
        ready = self._reservation(cfg, req, selection, published_ms, own, limits)
        if isinstance(ready, float):
            return ready
        amount, acct, mine = ready
        at = now_ms()
        used: dict[policy.PeriodKind, str] = {"day": acct.day, "month": acct.month}
        caps: dict[policy.PeriodKind, int | None] = {"day": acct.day_cap, "month": acct.month_cap}
        short = [k for k in _KINDS if not self.slices.take(used[k], amount, at, caps[k])]
        if short:
            got = await asyncio.gather(*(self._lease(used[k], caps[k], amount) for k in short),
                                       return_exceptions=True)
            failed = [(k, g) for k, g in zip(short, got, strict=True) if g is not True]
            if failed:  # what was reserved for this request in the other period goes back to its slice
                for k in _KINDS:
                    if k not in dict(failed):
                        self.slices.get(used[k]).add(amount, at)
                self._ensure_sweeper()
                k, why = failed[0]
                if isinstance(why, BaseException):
                    raise why
                cap = caps[k]
                assert cap is not None and isinstance(why, int)
                raise BudgetRefused(policy.over_limit_message(req.account, k, cap, why, amount))
        return self._reserved(mine, amount)

    def reserve_here(
        self, cfg: Config, req: Request, selection: Selection, published_ms: int, own: AccountLimits | None = None,
        *, limits: BudgetLimits | None = None,
    ) -> float | None:
        """`reserve` when it needs nothing from NATS (this dispatcher's slices of both periods cover the request,
        or it reserves nothing): the reservation in USD, with no task and no await. None, with nothing
        reserved, when `reserve` must be awaited. Raises BudgetRefused as `reserve` does (nothing reserved)."""
        ready = self._reservation(cfg, req, selection, published_ms, own, limits)
        if isinstance(ready, float):
            return ready
        amount, acct, mine = ready
        held = self.slices.held
        day, month = held.get(acct.day), held.get(acct.month)
        if (day is None or month is None or amount > day.remaining or amount > month.remaining
                or not day.covers(acct.day_cap) or not month.covers(acct.month_cap)):
            return None
        at = now_ms()
        day.take(amount, at, acct.day_cap)  # (both covered: neither takes without the other)
        month.take(amount, at, acct.month_cap)
        return self._reserved(mine, amount)

    def _account(self, account: str, per: policy.Periods, limits: BudgetLimits) -> _Counters:
        """The `used` counters and caps of `account` in the periods `per` under `limits` (kept per account: asked
        per request)."""
        got = self._counters.get(account)
        if got is not None and got.limits is limits and (got.per is per or got.per == per):
            got.per = per
            return got
        day, month = _used_subjects(self.prefix, account, per.day, per.month)
        day_cap, month_cap = policy.caps(limits)
        got = _Counters(per, limits, day, month, day_cap, month_cap)
        if len(self._counters) >= COUNTERS_KEPT:
            self._counters.clear()  # (rebuilt by the accounts that come next)
        self._counters[account] = got
        return got

    def _reservation(
        self, cfg: Config, req: Request, selection: Selection, published_ms: int, own: AccountLimits | None,
        limits: BudgetLimits | None,
    ) -> float | tuple[int, _Counters, str]:
        """What a reservation needs before it takes from the slices: the USD when it is decided already (0:
        nothing to reserve; a redelivery's earlier reservation), else (micro-dollars, the account's `used`
        counters and caps, the key of `_held`). Raises BudgetRefused for a chain with a
        target without a price."""
        limits = limits or policy.limits_for(cfg, req.account, req.tier, own)
        if limits is None:
            return 0.0
        try:
            amount = policy.reservation(cfg, req, selection.chain, selection.prompt_tokens)
        except policy.UnpricedTargets as exc:
            raise BudgetRefused(str(exc)) from None
        if amount == 0:
            return 0.0
        mine = f"{req.account} {req.id}"
        if (earlier := self._held.get(mine)) is not None:  # delivered here again: what it reserved then
            return self._found(mine, earlier[0])
        self._timezone = cfg.limits.timezone
        return amount, self._account(req.account, policy.periods(published_ms, cfg.limits.timezone), limits), mine

    def _found(self, mine: str, amount: int) -> float:
        """A reservation made here before, found by a later delivery of its request: marked found, in USD."""
        self._held[mine] = (amount, True)
        self._held.move_to_end(mine)
        return policy.usd(amount)

    def _reserved(self, mine: str, amount: int) -> float:
        """Remember a reservation made here (for a redelivery of its request) and return it in USD."""
        held = self._held
        held[mine] = (amount, False)
        if len(held) > HELD_MAX:
            held.popitem(last=False)  # the oldest
        if self._sweeper is None or self._sweeper.done():
            self._ensure_sweeper()
        return policy.usd(amount)

    async def _lease(self, subj: str, cap: int | None, amount: int) -> bool | int:
        """Reserve `amount` for one request from what is left of this dispatcher's slice of `subj` and a new
        slice (one increment, shared with the requests waiting for it when the slice is larger than they
        need). True: reserved; an int: refused, the counter's total before the increment (for the message)."""
        own = self.slices.get(subj)
        need = amount - own.remaining
        if policy.slice_size(cap, own.seen, need) == need:  # near the limit: in parallel, as without slices
            return await self._grow(subj, cap, amount)
        lock = self._locks.setdefault(subj, asyncio.Lock())
        try:
            async with lock:
                if self.slices.take(subj, amount, now_ms(), cap):  # the slice a request before this one took covers it
                    return True
                return await self._grow(subj, cap, amount)
        finally:
            if not lock.locked() and self._locks.get(subj) is lock:
                del self._locks[subj]

    async def _grow(self, subj: str, cap: int | None, amount: int) -> bool | int:
        held = self.slices.get(subj)
        rest = min(held.remaining, amount)
        held.remaining -= rest  # this request's, whatever happens next: put back unless it is reserved
        need = amount - rest
        size = policy.slice_size(cap, held.seen, need)
        try:
            total = int((await self._incr(subj, size)).val or 0)
        except BaseException:
            self.slices.get(subj).add(rest, now_ms())
            raise
        keep = policy.kept(cap, total, size, need)
        held = self.slices.get(subj)  # (the sweeper may have dropped the slice meanwhile)
        if keep is None:  # refused: the increment goes back at once, and what was left of the slice with it
            held.seen = total - size - rest
            await self._incr(subj, -(size + rest))
            return total - size
        held.seen = total - size + keep
        held.cap = cap
        held.add(keep - need, now_ms())
        if keep < size:  # what did not fit under the limit goes back at once
            await self._incr(subj, keep - size)
        return True

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        """Give back slices idle for IDLE_S or whose period ended; ends when nothing is held."""
        while self.slices.held or self._back:
            await asyncio.sleep(SWEEP_S)
            current = policy.periods(now_ms(), self._timezone)
            self._queue_back(self.slices.due(now_ms(), int(IDLE_S * 1000), {current.day, current.month}))
            await self._give_back()
            if self._back and getattr(getattr(self.js, "_nc", None), "is_closed", False):
                self._back.clear()  # the connection is gone: counted until the period ends
                return

    def _queue_back(self, due: list[tuple[str, int]]) -> None:
        for subj, amount in due:
            self._seq += 1
            self._back.append((subj, amount, f"back:{self._id}:{self._seq}"))

    async def _give_back(self) -> None:
        """One decrement per slice given back, with a message id so that a retry is never counted twice."""
        pending, self._back = self._back, []
        results = await asyncio.gather(*(self._incr(s, -a, m) for s, a, m in pending), return_exceptions=True)
        for item, res in zip(pending, results, strict=True):
            if isinstance(res, BaseException):
                self._back.append(item)
                log.debug("budget_give_back_failed", error=repr(res))

    async def release(self, cfg: Config, req: Request, published_ms: int, reserved_usd: float) -> None:
        """Give back a reservation this dispatcher made and will not forward: to its slices, no round trip
        (they are given back to the counters when idle). Once only: a second release finds nothing."""
        held = self._held.pop(f"{req.account} {req.id}", None)
        if held is None:
            return
        self._put_back(cfg, req, published_ms, held[0])

    def handed_over_already(self, cfg: Config, req: Request, published_ms: int) -> None:
        """The work item's hand-over was a duplicate: an earlier delivery handed the request over (the dispatcher
        that did so died or could not ack), and that hand-over's reservation is the one its worker settles. A
        reservation this delivery made afresh goes back to the slice; one it found from an earlier delivery
        here is that hand-over's own and stays."""
        mine = f"{req.account} {req.id}"
        held = self._held.get(mine)
        if held is None or held[1]:
            return
        del self._held[mine]
        self._put_back(cfg, req, published_ms, held[0])

    def _put_back(self, cfg: Config, req: Request, published_ms: int, amount: int) -> None:
        per = policy.periods(published_ms, cfg.limits.timezone)
        at = now_ms()
        for k in _KINDS:
            self.slices.get(subject(self.prefix, req.account, per.of(k), "used")).add(amount, at)
        self._ensure_sweeper()

    def settle(self, cfg: Config, work: WorkItem, cost_usd: float | None, *, failed: bool) -> None:
        """Queue the turning of the work item's reservation into its real cost (a failed request costs nothing;
        a cost nothing knows keeps the whole reservation): added to this process's sums per counter, which go
        out every FLUSH_S, one increment per counter (`_flush`). No round trip, nothing raised.

        Not idempotent on the request id: the caller settles a request once, after its done marker (so that a
        redelivery finds it and settles nothing, `PoolWorker._end`). The alert limits of each `spent` counter
        are those of the latest request of the batch (`work.budget`: what its reservation was checked against;
        the config's for an item from an older dispatcher)."""
        reserved = policy.to_micros(work.reserved_usd)
        if reserved == 0:
            return
        req = work.request
        cost = 0 if failed else (reserved if cost_usd is None else policy.to_micros(cost_usd))
        per = policy.periods(work.accepted_ms, cfg.limits.timezone)
        limits = work.budget or policy.limits_for(cfg, req.account, req.tier)
        for k in _KINDS:
            self._add(subject(self.prefix, req.account, per.of(k), "used"), cost - reserved)
            if cost:
                spent = subject(self.prefix, req.account, per.of(k), "spent")
                self._add(spent, cost)
                entry = self._spends.get(spent)
                if entry is None:
                    entry = self._spends[spent] = _Spend(req.account, k, per.of(k))
                entry.limits = limits
                entry.requests.append((req.id, cost))
        self._ensure_flusher()

    def _add(self, subj: str, delta: int) -> None:
        self._sums[subj] = self._sums.get(subj, 0) + delta

    async def _stop_flushing(self) -> None:
        if self._flusher is None or self._flusher.done():
            return
        self._wake.set()
        try:
            async with asyncio.timeout(STOP_S):
                await self._flusher
        except TimeoutError:
            pass  # (the flusher was cancelled with the wait)
        self._flusher = None
        self._unsent += self._batch(0.0)
        self._drop(self._unsent, "the worker stopped")

    def _ensure_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        """Flush every FLUSH_S (at once when `stop` asks); ends when nothing is left to send."""
        while self._sums or self._unsent:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FLUSH_S):
                    await self._wake.wait()
            self._wake.clear()
            await self._flush()
            if self._unsent and getattr(getattr(self.js, "_nc", None), "is_closed", False):
                self._drop(self._unsent, "the connection closed")
                return

    async def _flush(self) -> None:
        """Send the pending sums, one increment per counter, with the batches not acknowledged yet (the same
        message ids: a retry of an increment that did land is a duplicate, counted once). A batch is tried
        again only within RETRY_FOR_S of its first try, well inside the stream's duplicate window."""
        now = asyncio.get_running_loop().time()
        steps: list[_Step] = []
        late: list[_Step] = []
        for step in self._unsent:
            (steps if now - step.first_s < RETRY_FOR_S else late).append(step)
        if late:
            self._drop(late, "not acknowledged within the retry window")
        steps += self._batch(now)
        self._unsent = steps  # until acknowledged: a stop that cuts this flush short still knows them
        gate = asyncio.Semaphore(FLUSH_CONCURRENCY)

        async def send(step: _Step) -> PubAck:
            async with gate:
                return await self._incr(step.subject, step.delta, step.msg_id, timeout=FLUSH_TIMEOUT_S)

        results = await asyncio.gather(*(send(s) for s in steps), return_exceptions=True)
        self._unsent = [s for s, r in zip(steps, results, strict=True) if isinstance(r, BaseException)]
        for step, res in zip(steps, results, strict=True):
            if isinstance(res, BaseException):
                log.debug("budget_settle_failed", subject=step.subject, error=repr(res))
            elif step.spend is not None:
                await self._alert(step.spend, step.delta, res)

    def _batch(self, now: float) -> list[_Step]:
        """The pending sums as one batch of increments (zero sums left out), each with a message id unique to
        this process, batch and counter."""
        sums, spends = self._sums, self._spends
        self._sums, self._spends = {}, {}
        if not any(sums.values()):
            return []
        self._batch_no += 1
        return [_Step(subj, delta, f"settle:{self._id}:{self._batch_no}:{subj}", now, spends.get(subj))
                for subj, delta in sums.items() if delta]

    @staticmethod
    def _drop(steps: list[_Step], why: str) -> None:
        """Give up on increments that may not be tried again (logged with what that leaves wrong)."""
        for step in steps:
            if step.subject.endswith(".spent"):
                effect = "spend shown low by this much until the period ends"
            elif step.delta < 0:
                effect = "reservations stay counted until the period ends (erring on refusing)"
            else:
                effect = "spend past its reservations not counted against the limit"
            log.warning("budget_settlement_dropped", subject=step.subject, usd=policy.usd(step.delta), why=why,
                        effect=effect)
        steps.clear()

    async def _alert(self, spend: _Spend, total: int, ack: PubAck) -> None:
        """Alert on each threshold the batch took the counter across, naming the request whose settlement (in
        the batch's order) crossed it. The counter's total after the batch is the acknowledgement's, or, for a
        duplicate (a retry of an increment that had landed, its acknowledgement lost), the one stored with the
        first try's message (one read, on this rare path)."""
        limits = spend.limits
        cap = None if limits is None else policy.cap(limits, spend.period)
        if limits is None or cap is None:
            return
        try:
            after = int(ack.val) if not ack.duplicate and ack.val is not None else await self._total_at(ack)
        except Exception as exc:
            log.warning("budget_alert_failed", account=spend.account, period=spend.period_key, error=repr(exc),
                        effect="a threshold this batch crossed is not alerted")
            return
        running = after - total  # the total before this batch
        for request_id, cost in spend.requests:
            for pct in policy.crossed(running, running + cost, cap, limits.alert_at):
                try:
                    await self._raise_alert(BudgetAlert(
                        account=spend.account, period=spend.period, period_key=spend.period_key, threshold_pct=pct,
                        limit_usd=policy.usd(cap), spent_usd=policy.usd(running + cost), request_id=request_id,
                        at_ms=now_ms(),
                    ))
                except Exception as exc:
                    log.warning("budget_alert_failed", account=spend.account, period=spend.period_key,
                                threshold_pct=pct, error=repr(exc))
            running += cost

    async def _total_at(self, ack: PubAck) -> int:
        """A counter's total just after the increment `ack` acknowledged (its stored message says it)."""
        async with asyncio.timeout(FLUSH_TIMEOUT_S):
            msg = await self.js.get_msg(STREAM, seq=ack.seq, direct=True)
        return _val(msg.data)

    async def _raise_alert(self, alert: BudgetAlert) -> None:
        kv = self._alerts or await alerts_bucket(self.js)
        key = f"{alert.account}.{alert.period_key}.{alert.threshold_pct}"
        try:
            await kv.create(key, msgspec.json.encode(alert))
        except KeyWrongLastSequenceError:
            return  # raised already for this account, period and threshold
        await self.js.publish(f"{self.prefix}.alerts.budget", msgspec.json.encode(alert),
                              headers={"Nats-Msg-Id": f"alert:{key}"})
        log.warning("budget_alert", account=alert.account, period=alert.period_key, threshold_pct=alert.threshold_pct,
                    spent_usd=alert.spent_usd, limit_usd=alert.limit_usd)


async def alerts_bucket(js: JetStreamContext) -> KeyValue:
    return await _bucket(js, ALERTS_BUCKET, ttl_s=MAX_AGE_S)


async def counter(js: JetStreamContext, subj: str) -> int:
    """A counter's total now (0 when it has none)."""
    try:
        msg = await js.get_msg(STREAM, subject=subj, direct=True)
    except NotFoundError:
        return 0
    return _val(msg.data)


def _val(data: bytes | None) -> int:
    """A counter message's total."""
    return int(msgspec.json.decode(data or b'{"val": "0"}', type=dict[str, str]).get("val", "0"))
