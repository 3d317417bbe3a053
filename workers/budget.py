"""Account budgets shared by every dispatcher and worker: reserve before forwarding, settle at the end.

Spend lives in nats-server counters (stream `LLM_BUDGET`, `allow_msg_counter`), in integer
micro-dollars, two per account and period (`d20261130`, `m202611`, in `limits.timezone`):

- `<prefix>.budget.<account>.<period>.used`: spent plus reserved by requests in flight; the
  number a reservation is checked against;
- `<prefix>.budget.<account>.<period>.spent`: settled cost only (`budget status` shows
  reserved = used − spent).

An increment is atomic and answers the new total, so the check is exact across any number of
replicas: a dispatcher adds the request's worst case to both periods' `used` (one round trip,
the two in parallel) and, when a total passes its limit, takes it back and refuses. Two
requests that pass the limit together are both refused; spend never passes it.

Every increment carries a `Nats-Msg-Id` derived from the account, the request id and the
period, so a redelivered request or work item is never counted twice (within the stream's
duplicate window, `DUPLICATE_WINDOW_S`):

- `res:` the reservation (dispatcher). A redelivery finds its own earlier reservation (a
  duplicate) and reads what it reserved and the total it saw from the stored increment, so it
  makes the same decision: forward with the same reservation, or refuse and release.
- `rel:` a dispatcher's release of a reservation it refused or could not forward.
- `set:` the settlement on `used` (real cost − reserved; −reserved when the request failed) and
  `spent:` the cost on `spent`, both by the worker in `PoolWorker._end`, through which every end
  passes (done, error, give-up, a stream lost with its worker). A lost worker's item is
  delivered again and ends there. The periods are those of the request's publish time, so a
  request that ends after midnight settles in the day it reserved in.

What is not released by itself (the reservation stays counted, which errs on refusing, never on
overspending, until `budget reset` or the period's end): a dispatcher that gives up on a request
it reserved for (its forward failing five times); a redelivery later than the duplicate window
after the first delivery (dispatchers redeliver after 30 s, so only a dispatcher outage longer
than the window does this; the request then reserves again and its first reservation stays).

Crossing a budget's `alert_at` (and 100 %) with settled spend publishes one
`<prefix>.alerts.budget` event per account, period and threshold: the increment that crosses is
seen by one process only, and a `create` of `<account>.<period>.<pct>` in `llm_budget_alerts`
keeps it to once even after a reset.

Which budget applies is router/limits.py's: the account's row of PostgreSQL's `llm_account_limits`
(followed by the dispatcher, workers/accounts.py), then the config. An account with no budget at all
(both amounts `"unlimited"`) reserves nothing: no round trip, no counters. A period without a budget
is still reserved and settled (so `budget status` shows its spend) but never refuses. The work item
carries the limits the reservation was checked against, and the worker's alerts use them.
"""

from __future__ import annotations

import asyncio

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
from schemas import Request, WorkItem

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


def subject(prefix: str, account: str, period: str, kind: str) -> str:
    return f"{prefix}.budget.{account}.{period}.{kind}"


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


class BudgetRefused(SwitchyardError):
    """The request may not be forwarded: its budget would be exceeded, or its cost could not be counted."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.BUDGET_EXCEEDED, message)


_KINDS: tuple[policy.PeriodKind, policy.PeriodKind] = ("day", "month")


class Budgets:
    """Reservations (dispatcher), settlements and alerts (worker) for one process."""

    def __init__(self, js: JetStreamContext, prefix: str) -> None:
        self.js = js
        self.prefix = prefix
        self._alerts: KeyValue | None = None

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
        """Nothing to stop; kept so that a process ends what it opened."""

    async def _incr(self, subj: str, delta: int, msg_id: str) -> PubAck:
        return await self.js.publish(subj, b"", headers={_INCR: str(delta), "Nats-Msg-Id": msg_id})

    async def reserve(
        self, cfg: Config, req: Request, selection: Selection, published_ms: int, own: AccountLimits | None = None
    ) -> float:
        """Reserve `req`'s worst case in its account's day and month (`own`: the account's row of the account
        table, over the config). Returns the reservation in USD (0: its chain is free, or its account has no
        budget: nothing counted, no round trip). Raises BudgetRefused when a period's limit would be passed
        (nothing stays reserved) or the chain has a target without a price; NATS errors as nats-py raises
        them."""
        limits = policy.limits_for(cfg, req.account, req.tier, own)
        if limits is None:
            return 0.0
        try:
            amount = policy.reservation(cfg, req, selection.chain, selection.prompt_tokens)
        except policy.UnpricedTargets as exc:
            raise BudgetRefused(str(exc)) from None
        if amount == 0:
            return 0.0
        per = policy.periods(published_ms, cfg.limits.timezone)
        caps = {k: policy.cap(limits, k) for k in _KINDS}
        keys = {k: per.of(k) for k in _KINDS}
        used = {k: subject(self.prefix, req.account, keys[k], "used") for k in _KINDS}
        acks = await asyncio.gather(*(
            self._incr(used[k], amount, f"res:{req.account}:{req.id}:{keys[k]}") for k in _KINDS
        ))
        held = {k: amount for k in _KINDS}
        totals: dict[policy.PeriodKind, int] = {}
        for k, ack in zip(_KINDS, acks, strict=True):
            if ack.duplicate:  # a redelivery: what the first delivery reserved, and the total it saw
                held[k], totals[k] = await self._stored(ack)
            else:
                totals[k] = int(ack.val or 0)
        over = [(k, c) for k in _KINDS if (c := caps[k]) is not None and totals[k] > c]
        if over:
            await asyncio.gather(*(
                self._incr(used[k], -held[k], f"rel:{req.account}:{req.id}:{keys[k]}") for k in _KINDS
            ))
            k, c = over[0]
            raise BudgetRefused(policy.over_limit_message(req.account, k, c, totals[k] - held[k], held[k]))
        first = held["day"]
        if held["month"] != first:  # a redelivery that reserved one period afresh: align it with the other
            await self._incr(used["month"], first - held["month"], f"fix:{req.account}:{req.id}:{keys['month']}")
        return policy.usd(first)

    async def _stored(self, ack: PubAck) -> tuple[int, int]:
        """The increment and resulting total of the stored message a duplicate publish points at."""
        msg = await self.js.get_msg(STREAM, seq=ack.seq, direct=True)
        total = msgspec.json.decode(msg.data or b'{"val": "0"}', type=dict[str, str]).get("val", "0")
        return int((msg.headers or {}).get(_INCR, "0")), int(total)

    async def release(self, cfg: Config, req: Request, published_ms: int, reserved_usd: float) -> None:
        """Give back a reservation the dispatcher will not forward (idempotent)."""
        amount = policy.to_micros(reserved_usd)
        if amount == 0:
            return
        per = policy.periods(published_ms, cfg.limits.timezone)
        await asyncio.gather(*(
            self._incr(subject(self.prefix, req.account, per.of(k), "used"), -amount,
                       f"rel:{req.account}:{req.id}:{per.of(k)}")
            for k in _KINDS
        ))

    async def settle(self, cfg: Config, work: WorkItem, cost_usd: float | None, *, failed: bool) -> None:
        """Turn the work item's reservation into its real cost (a failed request costs nothing; a cost
        nothing knows keeps the whole reservation), and alert on thresholds the spend crossed. Idempotent on
        the request id. Logs rather than raises: a settlement that did not land leaves the reservation
        counted, which errs on refusing, and must not hold back the request's reply."""
        reserved = policy.to_micros(work.reserved_usd)
        if reserved == 0:
            return
        req = work.request
        cost = 0 if failed else (reserved if cost_usd is None else policy.to_micros(cost_usd))
        per = policy.periods(work.accepted_ms, cfg.limits.timezone)
        try:
            steps = [
                self._incr(subject(self.prefix, req.account, per.of(k), "used"), cost - reserved,
                           f"set:{req.account}:{req.id}:{per.of(k)}")
                for k in _KINDS
            ]
            if cost:
                steps += [
                    self._incr(subject(self.prefix, req.account, per.of(k), "spent"), cost,
                               f"spent:{req.account}:{req.id}:{per.of(k)}")
                    for k in _KINDS
                ]
            acks = await asyncio.gather(*steps)
            if cost:
                await self._alert(cfg, work, per, cost, acks[2:])
        except Exception as exc:
            log.warning("budget_settle_failed", request_id=req.id, account=req.account, error=repr(exc),
                        effect="the reservation stays counted until the period ends or `budget reset`")

    async def _alert(
        self, cfg: Config, work: WorkItem, per: policy.Periods, cost: int, spent_acks: list[PubAck]
    ) -> None:
        req = work.request
        # The limits the reservation was checked against; an item from an older dispatcher has none.
        limits = work.budget or policy.limits_for(cfg, req.account, req.tier)
        if limits is None:
            return
        for k, ack in zip(_KINDS, spent_acks, strict=True):
            cap = policy.cap(limits, k)
            if ack.duplicate or ack.val is None or cap is None:
                continue
            after = int(ack.val)
            for pct in policy.crossed(after - cost, after, cap, limits.alert_at):
                await self._raise_alert(BudgetAlert(
                    account=req.account, period=k, period_key=per.of(k), threshold_pct=pct,
                    limit_usd=policy.usd(cap), spent_usd=policy.usd(after), request_id=req.id, at_ms=now_ms(),
                ))

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
    return int(msgspec.json.decode(msg.data or b'{"val": "0"}', type=dict[str, str]).get("val", "0"))
