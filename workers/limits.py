"""The dispatcher's limit checks for one request: its account's rate (workers/ratelimits.py) and budget
(workers/budget.py), in one round trip where the two may overlap. (The reservation usually makes none:
it comes from the dispatcher's slice of the account's budget, and only taking a new slice is awaited.)

- A request without `queue_ms` whose rate is decided from this dispatcher's lease of its account's
  tokens (nothing to await, `RateLimiter.admitted_now`) only reserves, with no task for the rate, and
  when the dispatcher's budget slices cover it too (`Budgets.reserve_here`) nothing is awaited at all.
- Otherwise a request without `queue_ms` asks both at once: the rate's compare-and-set and the budget's
  reservation are in flight together, so the hop waits for the slower of the two, not their sum.
  - The rate refuses (RATE_LIMITED): the reservation is released, the request ends.
  - The budget refuses (BUDGET_EXCEEDED): the rate's token stays spent. Giving it back would need a
    second compare-and-set that could undo another request's admission, and a refused request is
    one the account did send.
  - Either fails on NATS: nothing is given back. The pull loop delivers the request again; its
    reservation is then found (idempotent on the request id) and its rate asked again.
  - A redelivery refused either way whose earlier delivery handed the request over is not refused: the
    dispatcher finds the hand-over first (workers/dispatcher.py) and leaves the answer to its worker.
- A request with `queue_ms` may be held for its booked turn, so it asks the rate first and reserves
  only once it is admitted: a reservation is not kept while it waits, and holds keep their order.
- An account with no rate limit skips the rate state, one with no budget skips the reservation
  (router/limits.py); with neither, the hop makes no round trip at all.
"""

from __future__ import annotations

import asyncio

import msgspec
from nats.aio.msg import Msg

from router.config import Config
from router.limits import AccountLimits, ResolvedLimits
from router.routing import Selection
from schemas import BudgetLimits, Request

from .budget import BudgetRefused, Budgets
from .ratelimits import RateLimited, RateLimiter

_resolved = ResolvedLimits()
"""The accounts' limits as last resolved (router/limits.py): one lookup per request while nothing changed."""


class Held(msgspec.Struct, frozen=True):
    """The request waits in the stream for its booked turn: nak it with this delay."""

    ms: int


class Admitted(msgspec.Struct, frozen=True):
    """The request may be forwarded with this reservation (0: nothing reserved), checked against `budget`."""

    reserved_usd: float = 0.0
    budget: BudgetLimits | None = None


async def admit(
    rates: RateLimiter | None,
    budgets: Budgets | None,
    cfg: Config,
    req: Request,
    msg: Msg,
    published_ms: int,
    selection: Selection,
    own: AccountLimits | None,
) -> Held | Admitted:
    """Check `req` against its account's rate and budget (see the module doc). Raises RateLimited,
    BudgetRefused, or what NATS raises (the request is then delivered again)."""
    resolved = _resolved.of(cfg.limits, req.account, req.tier, own)
    budget = resolved.budget if budgets is not None else None
    if budgets is None or budget is None:
        held = await rates.admit(req, msg, published_ms, cfg.limits, own) if rates is not None else None
        return Held(held) if held is not None else Admitted()
    if rates is None or rates.admitted_now_under(req, resolved.rate):  # the rate asked nothing of NATS: no task
        try:
            here = budgets.reserve_here(cfg, req, selection, published_ms, own, limits=budget)
        except BudgetRefused:
            here = None  # decided again below (and a redelivery's earlier hand-over looked for by the dispatcher)
        if here is not None:  # nor did the budget: nothing awaited
            return Admitted(here, budget)
        return Admitted(await budgets.reserve(cfg, req, selection, published_ms, own, limits=budget), budget)
    if req.queue_ms:
        held = await rates.admit(req, msg, published_ms, cfg.limits, own)
        if held is not None:
            return Held(held)
        return Admitted(await budgets.reserve(cfg, req, selection, published_ms, own, limits=budget), budget)
    rate, reserved = await asyncio.gather(
        rates.admit(req, msg, published_ms, cfg.limits, own),
        budgets.reserve(cfg, req, selection, published_ms, own, limits=budget),
        return_exceptions=True,
    )
    if isinstance(rate, BaseException):
        if isinstance(rate, RateLimited) and isinstance(reserved, float):
            await budgets.release(cfg, req, published_ms, reserved)  # the request ends here
        raise rate
    if isinstance(reserved, BaseException):
        raise reserved
    if rate is not None:  # not asked to wait, but booked a moment ahead: kept, its redelivery finds it
        return Held(rate)
    return Admitted(reserved, budget)
