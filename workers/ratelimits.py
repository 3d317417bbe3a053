"""Account rate limits shared by every dispatcher replica, in the JetStream KV bucket `llm_rates`.

- `a.<account>`: the account's GCRA state (router/ratelimit.py), changed only by compare-and-set, so
  any number of replicas admit exactly what one would. Each write carries a per-message TTL that ends
  when the state has drained back to a full bucket: an idle account leaves nothing behind, and a
  state that expired is exactly the same as none. A replica that dies loses nothing: the state is
  the server's.
- `pool.<pool>`: the same state for a pool's own limit towards its provider (`requests_per_minute`,
  `tokens_per_minute`), shared by the pool's worker replicas and checked before each provider call. A
  work item whose turn comes later books it, and the turn is kept with the workers' stream progress
  (`turn.<LLM_WORK sequence>` in `llm_streams`) for when the item comes back.
- `h.<stream sequence>`: a request that waits for its turn (`queue_ms`): how many times it was held,
  and the moment it was booked for. It expires after the request's deadline.

Each replica keeps the last state it saw of up to CACHE_SIZE accounts (least recently used first out),
so an account it served a moment ago costs one compare-and-set, not a read and a write. A cached
state can only be behind the server's (the TATs only grow), so a refusal it gives is right; it is
re-read before the refusal goes out, so that the retry hint counts what the other replicas admitted.

Leases (router/ratelimit.py): when an account's bucket has at least half its burst available and the
account kept this replica busy, its compare-and-set takes up to burst / 4 tokens at once; the next
requests of that account on this replica are admitted from them with no round trip until they run out
or expire (`lease_validity_us`). The lease's size follows the account's recent rate on this replica
(from 1, doubling while a lease is used up within its validity).

A replica takes an account's next lease ahead of need: once a request left its lease of the account with no
more tokens than its low-water mark (a quarter of them; the last one, or a request admitted by its own
one-token decision, for a lease of one), a background task takes the next one in the account's turn
(starting once the request that started it is handed over, `handed_over`, or `REFILL_DELAY_S` later at the
latest, so that its compare-and-set does not compete with that request's hand-over), so the account's next
requests here keep finding a token instead of awaiting a compare-and-set. It does the same when a request
used a token of a lease that will expire before the account's next request is due here (its latest spacing,
if within a validity, is longer than what is left of the lease's: `Lease.renew_due`), as after a burst, when
a large lease's tokens would expire unused one request before the account's pace here catches up. While the
lease has usable tokens, the new one follows it (`Lease.next`: used once the lease's are used up or expired)
and is sized so that the two hold at most `lease_cap` tokens; otherwise it takes the lease's place. At most
one such refill is in flight per account (requests that come while it runs wait for it, then use its
tokens), only for accounts in the lease LRU, and only while at least half the burst is available
(`ratelimit.refill_size`): near its limit an account is decided one request at a time, exactly, as before.
Its size follows the account's use here (`Lease.wanted_ahead`): one token after a request's own decision,
which makes the account's next request within the lease validity free, but none when the replica admitted
the account's previous request more than a validity before (an account that sends rarer than that would only
lose the token and cost a compare-and-set per request). A refill that fails is dropped; it never fails a
request. `close()` cancels the refills in flight and those about to start.

Requests that may wait (`queue_ms`), pool limits and limits with `tokens_per_minute` are always
decided one at a time on the shared state, and trigger no refill. A refusal is only ever given by the
shared state, so its retry hint is as before. A replica that stops or dies loses the unused tokens of
its leases, a whole lease taken ahead included (erring on refusing).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import math
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import msgspec
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import APIError, BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue

from router import ratelimit
from router.config import LimitsConfig, PoolConfig, RateLimit
from router.errors import ErrorCode, SwitchyardError
from router.limits import AccountLimits
from router.ratelimit import Lease, RateState
from schemas import Request

log = structlog.get_logger("ratelimits")

BUCKET = "llm_rates"
CACHE_SIZE = 4096
"""Accounts whose last state a replica keeps; a bound, not a limit: others are read when they come."""
MAX_HOLDS = 256
"""Requests one replica holds at once. A held request stays unacknowledged in LLM_REQ and counts
against the dispatch consumer's max_ack_pending (1000), so replicas × MAX_HOLDS must stay below it
or held requests would stop fresh ones from being delivered."""
EARLY_US = 2_000
"""A held request delivered this close before its booked moment is served (a nak's delay is not
exact to the millisecond)."""
_CAS_TRIES = 50
_REFILL_TRIES = 3
"""Compare-and-sets a refill ahead of need tries before it is dropped (nobody waits on it for long)."""
REFILL_DELAY_S = 0.005
"""How long after the request that left a lease at its low-water mark its refill starts at the latest; the
dispatcher starts it as soon as that request is handed over (`handed_over`). Started at once, the refill's
compare-and-set went out beside the request's work item and added to its hop; started on a fixed 1 ms timer,
it still did whenever the hand-over took longer (bench/RESULTS.md "Settlements in batches and rate leases
taken ahead" and "A refill started by the hand-over"). A request that comes meanwhile does not wait for it:
it decides as before."""
_WRONG_LAST = (10071, 10164)  # the server's "wrong last sequence" error codes


def now_us() -> int:
    return time.time_ns() // 1000


class RateLimited(SwitchyardError):
    """RATE_LIMITED for a request, naming its account and limit, with the retry hint when there is one."""

    def __init__(self, message: str, retry_after_ms: int | None) -> None:
        super().__init__(ErrorCode.RATE_LIMITED, message, retry_after_ms=retry_after_ms)


def pool_limit(pool: PoolConfig) -> RateLimit | None:
    """A pool's own limit towards its provider as the GCRA of accounts sees one, None when it has none:
    `requests_per_minute` / 60 per second with a burst of 1 (calls spaced evenly, never bunched), and
    `tokens_per_minute` with a minute's worth at once."""
    rpm, tpm = pool.requests_per_minute, pool.tokens_per_minute
    if rpm is None and tpm is None:
        return None
    # No requests_per_minute: an infinite rate makes every request conform at once in that dimension.
    return RateLimit(per_second=rpm / 60 if rpm else math.inf, burst=1, tokens_per_minute=tpm)


def describe_pool(pool: PoolConfig) -> str:
    """The pool's limit in words, for a refusal's message."""
    parts = [f"{pool.requests_per_minute:,} requests/min"] if pool.requests_per_minute else []
    parts += [f"{pool.tokens_per_minute:,} tokens/min"] if pool.tokens_per_minute else []
    return " and ".join(parts)


def pool_tokens(req: Request, limit: RateLimit) -> int:
    """The request's estimated tokens for a pool's limit (router/ratelimit.py's estimate), at most one
    minute's worth: a larger one waits for a full minute's bucket rather than never going."""
    if not limit.tokens_per_minute:
        return 0
    return min(ratelimit.estimated_tokens(req), limit.tokens_per_minute)


async def paused_until_ms(js: JetStreamContext, consumer: str, stream: str = "LLM_WORK") -> int:
    """Until when (Unix ms) `consumer` is paused; 0 when it is not. A pool's worker reads it before pausing
    its pool, so that a short wait (the pool's own limit) does not cut a longer one (a provider's 429) short.
    Raises what nats-py raises when the consumer cannot be read."""
    info = await js.consumer_info(stream, consumer)
    text = info.config.pause_until if info.config is not None else None
    if not text:
        return 0
    # RFC 3339 with up to nanoseconds (`2026-11-30T20:30:00.123456789Z`): Python reads microseconds.
    base, _, rest = text.rstrip("Z").partition(".")
    digits = "".join(ch for ch in rest if ch.isdigit())[:6]
    try:
        at = datetime.fromisoformat(f"{base}.{digits or '0'}").replace(tzinfo=UTC)
    except ValueError:
        return 0
    return int(at.timestamp() * 1000)


def turn_wait_ms(at_us: int) -> int | None:
    """None when a turn booked for `at_us` has come (within EARLY_US); else the milliseconds until it."""
    wait = at_us - now_us()
    return None if wait <= EARLY_US else -(-wait // 1000)


async def book_turn(kv: KeyValue, seq: int, at_us: int) -> None:
    """Keep the turn a work item (LLM_WORK's sequence `seq`) booked on its pool's own limit, as `turn.<seq>`
    in the workers' `llm_streams` bucket (whose TTL outlives any deadline), so that the item finds it when it
    comes back rather than asking again (which would put it behind items that asked meanwhile). Raises what
    nats-py raises."""
    await kv.put(f"turn.{seq}", str(at_us).encode())


async def booked_turn(kv: KeyValue, seq: int) -> int | None:
    """The turn `book_turn` kept for the work item `seq` (µs), None when it has none."""
    try:
        entry = await kv.get(f"turn.{seq}")
    except KeyNotFoundError:
        return None
    try:
        return int(entry.value or b"")
    except ValueError:
        return None


class Hold(msgspec.Struct, array_like=True, frozen=True):
    holds: int
    at_us: int


_state = msgspec.json.Decoder(RateState)
_hold = msgspec.json.Decoder(Hold)


class RateLimiter:
    """Admits requests against their account's limit, exactly across replicas (see the module doc)."""

    def __init__(self, js: JetStreamContext, kv: KeyValue) -> None:
        self.js = js
        self.kv = kv
        self._subject = f"$KV.{BUCKET}."
        self._cache: collections.OrderedDict[str, tuple[RateState, int]] = collections.OrderedDict()
        self._turns: dict[str, tuple[asyncio.Lock, int]] = {}
        """One decision at a time per account in this replica (and how many want one), so a busy account's
        requests do not race each other's compare-and-sets; an entry lives while someone waits."""
        self._held: list[int] = []
        """A heap of when each request this replica holds is due (µs): how many are held now."""
        self.conflicts = 0
        """Compare-and-sets lost to another replica's write (each one is re-read and tried again)."""
        self._leases: collections.OrderedDict[str, Lease] = collections.OrderedDict()
        """The last lease this replica took per account (up to CACHE_SIZE, least recently used first out)."""
        self.local = 0
        """Requests admitted from a lease, with no round trip."""
        self.leased = 0
        """Compare-and-sets that took more than one token."""
        self._refills: dict[str, asyncio.Task[None]] = {}
        """The refill ahead of need in flight per account (at most one, for accounts in `_leases`)."""
        self._due: dict[str, tuple[asyncio.TimerHandle, RateLimit, int, Lease]] = {}
        """Refills about to start (at the request's hand-over, or REFILL_DELAY_S later), per account: the timer
        and `_start_refill`'s arguments."""
        self._closed = False
        self.ahead = 0
        """Leases taken ahead of need (refills)."""
        self.from_ahead = 0
        """Requests admitted from a lease taken ahead of need (also counted in `local`)."""

    @classmethod
    async def open(cls, js: JetStreamContext) -> RateLimiter:
        """The limiter on the `llm_rates` bucket, created when missing."""
        try:
            kv = await js.key_value(BUCKET)
        except BucketNotFoundError:
            kv = await js.create_key_value(
                js_api.KeyValueConfig(bucket=BUCKET, history=1, storage=js_api.StorageType.FILE)
            )
        return cls(js, kv)

    def admitted_now(self, req: Request, limits: LimitsConfig, own: AccountLimits | None = None) -> bool:
        """True when `req` is admitted with nothing to await: its account has no rate limit, or a token of this
        replica's lease of the account's tokens is spent on it (the refill ahead of need started as `decide`
        would). False: `admit` decides it (nothing was spent). Saves the caller a task when the budget is
        asked too (workers/limits.py)."""
        return self.admitted_now_under(req, ratelimit.limits_for(limits, req.account, req.tier, own))

    def admitted_now_under(self, req: Request, limit: RateLimit | None) -> bool:
        """`admitted_now` for a request whose account's limit (`ratelimit.limits_for`) the caller resolved."""
        if req.queue_ms:
            return False
        if limit is None:
            return True
        key = f"a.{req.account}"
        held = self._leases.get(key)  # (a lease exists only under a limit that allows leases)
        if held is None:
            return False
        now = now_us()
        spent = self._spend(key, held, limit, now)
        if spent is None:
            return False
        if (spent.left <= spent.low or spent.renew_due(now)) and spent.next is None:
            self._ahead_of_need(key, limit, now)
        return True

    def _spend(self, key: str, held: Lease, limit: RateLimit, now: int) -> Lease | None:
        """A token spent at `now` from `held`, `key`'s lease, or else from the lease that follows it (which then
        takes its place), and counted: the lease it came from; None when neither has a usable token."""
        if not held.use(limit, now):
            nxt = held.then()
            if nxt is None:
                return None
            held = self._leases[key] = nxt
            if not nxt.use(limit, now):
                return None
        self.local += 1
        self.from_ahead += held.ahead
        return held

    async def admit(
        self, req: Request, msg: Msg, published_ms: int, limits: LimitsConfig, own: AccountLimits | None = None
    ) -> int | None:
        """None when `req` may go on now; the milliseconds to hold it for when it waits for its booked
        turn (the caller naks it with that delay; it is admitted when it comes back). `own` is the account's
        row of the account table, over the config's `limits`; an account with no rate limit at all is let
        through without touching the shared state.

        Raises RateLimited when the limit does not admit it within its `queue_ms` (counted from its
        publish, and never past its deadline). Raises what NATS raises when the bucket cannot be used:
        the request is then delivered again by the pull loop, never let through unchecked.
        """
        limit = ratelimit.limits_for(limits, req.account, req.tier, own)
        if limit is None:
            return None
        now = now_us()
        seq = msg.metadata.sequence.stream
        hold: Hold | None = None
        if msg.metadata.num_delivered > 1 and req.queue_ms:
            hold = await self._read_hold(seq)
            if hold is not None and hold.at_us > 0:
                if hold.at_us - now <= EARLY_US:
                    return None  # its turn, booked when it was first held
                return await self._hold(seq, hold.holds + 1, hold.at_us, req, published_ms, now)
        tokens = ratelimit.estimated_tokens(req) if limit.tokens_per_minute else 0
        wait_us = 0
        if req.queue_ms and self._holding(now) < MAX_HOLDS:
            end_ms = published_ms + min(req.queue_ms, req.timeout_ms)
            wait_us = end_ms * 1000 - now
        decision = await self.decide(req.account, limit, now, tokens=tokens, wait_us=wait_us, lease=not req.queue_ms)
        if decision.admitted:
            now = now_us()  # the decision's own clock moved on when it had to re-read
            if decision.at_us - now <= EARLY_US:
                return None
            return await self._hold(seq, (hold.holds if hold else 0) + 1, decision.at_us, req, published_ms, now)
        what = f"account {req.account!r} is limited to {ratelimit.describe(limit)}"
        if decision.impossible:
            raise RateLimited(f"{what}: {decision.impossible}", None)
        waited = " within its queue_ms" if req.queue_ms else ""
        raise RateLimited(f"{what}; this request was not admitted{waited}", decision.retry_after_ms)

    async def holds(self, msg: Msg) -> int:
        """How many of `msg`'s deliveries were holds rather than failures (for the pull loop's count)."""
        hold = await self._read_hold(msg.metadata.sequence.stream)
        return hold.holds if hold is not None else 0

    @property
    def cached_accounts(self) -> int:
        """Accounts whose state this replica keeps (at most CACHE_SIZE)."""
        return len(self._cache)

    async def decide(
        self, account: str, limit: RateLimit, now: int, *, tokens: int = 0, wait_us: int = 0, lease: bool = True
    ) -> ratelimit.Decision:
        """router/ratelimit.py's decision on the shared state of `account`, stored when it admits; with
        `lease` (and no `wait_us`), from this replica's lease of the account's tokens when it has a valid
        one, else taking a lease when the bucket has room (see the module doc). Raises RuntimeError when
        _CAS_TRIES compare-and-sets in a row lose to other replicas."""
        key = f"a.{account}"
        if not (lease and wait_us <= 0 and ratelimit.lease_cap(limit) > 1):
            return await self._in_turn(key, limit, now, tokens, wait_us)
        decision = self._from_lease(key, limit, now)
        if decision is None:
            refill = self._refills.get(key)
            if refill is not None and not refill.done():
                await asyncio.wait([refill])  # not cancelled with this request: the account's next ones use it
            decision = await self._in_turn(key, limit, now, tokens, wait_us, True)
        if decision.admitted:
            self._ahead_of_need(key, limit, decision.at_us)
        return decision

    async def close(self) -> None:
        """Cancel the refills ahead of need in flight and take no more (a dispatcher that stops)."""
        self._closed = True
        for handle, *_ in self._due.values():
            handle.cancel()
        self._due.clear()
        refills = list(self._refills.values())
        for task in refills:
            task.cancel()
        await asyncio.gather(*refills, return_exceptions=True)
        self._refills.clear()

    async def quiet(self) -> None:
        """Until no refill ahead of need is in flight or about to start (for counting the state's writes); those
        about to start start now."""
        while self._due or any(not t.done() for t in self._refills.values()):
            for key in list(self._due):
                self._start_refill(key)
            if refills := [t for t in self._refills.values() if not t.done()]:
                await asyncio.wait(refills)
            else:
                await asyncio.sleep(REFILL_DELAY_S)

    async def decide_pool(
        self, pool: str, limit: RateLimit, *, tokens: int = 0, wait_us: int = 0
    ) -> ratelimit.Decision:
        """The same decision for a pool's own limit towards its provider (`pool_limit`), on the state
        `pool.<name>` that every replica of the pool shares; with `wait_us`, a turn within it is booked
        (the caller keeps it with `book_turn`). Raises as `decide` does."""
        return await self._in_turn(f"pool.{pool}", limit, now_us(), tokens, wait_us)

    def _from_lease(self, key: str, limit: RateLimit, now: int) -> ratelimit.Decision | None:
        """An admission from this replica's lease of `key`'s tokens, None when it has no usable token."""
        held = self._leases.get(key)
        now = max(now, now_us())
        if held is None or self._spend(key, held, limit, now) is None:
            return None
        cached = self._cache.get(key)
        return ratelimit.Decision(True, now, cached[0] if cached is not None else RateState())

    async def _in_turn(
        self, key: str, limit: RateLimit, now: int, tokens: int, wait_us: int, lease: bool = False
    ) -> ratelimit.Decision:
        async with self._turn(key):
            if lease:
                # Another request or a refill of this replica may have taken a lease while this one waited its turn.
                local = self._from_lease(key, limit, now)
                if local is not None:
                    return local
            return await self._decide(key, limit, max(now, now_us()), tokens, wait_us, lease)

    @contextlib.asynccontextmanager
    async def _turn(self, key: str) -> AsyncIterator[None]:
        """The account's turn in this replica: one decision or refill at a time (see `_turns`)."""
        lock, waiting = self._turns.get(key) or (asyncio.Lock(), 0)
        self._turns[key] = (lock, waiting + 1)
        try:
            async with lock:
                yield
        finally:
            lock, waiting = self._turns[key]
            if waiting > 1:
                self._turns[key] = (lock, waiting - 1)
            else:
                del self._turns[key]

    def _ahead_of_need(self, key: str, limit: RateLimit, now: int) -> None:
        """Start the refill of `key`'s lease when a request left it at its low-water mark, or it will expire
        before the account's next request, unless its next lease is there already (see the module doc)."""
        held = self._leases.get(key)
        if (held is None or self._closed or held.next is not None
                or (held.left > held.low and not held.renew_due(now))):
            return
        running = self._refills.get(key)
        if key in self._due or (running is not None and not running.done()):
            return
        timer = asyncio.get_running_loop().call_later(REFILL_DELAY_S, self._start_refill, key)
        self._due[key] = (timer, limit, now, held)

    def handed_over(self, account: str) -> None:
        """A request of `account` was handed over: the account's refill ahead of need, if one is due, starts
        now rather than at its timer (the dispatcher calls it once the work item is stored)."""
        if self._due:
            key = f"a.{account}"
            if key in self._due:
                self._start_refill(key)

    def _start_refill(self, key: str) -> None:
        timer, limit, now, replacing = self._due.pop(key)
        timer.cancel()
        task = asyncio.get_running_loop().create_task(self._refill(key, limit, now, replacing))
        self._refills[key] = task
        task.add_done_callback(lambda done: self._refills.pop(key) if self._refills.get(key) is done else None)

    async def _refill(self, key: str, limit: RateLimit, now: int, replacing: Lease) -> None:
        """Take `key`'s next lease in its turn, in place of `replacing`; a failure is dropped (the next request
        decides as before)."""
        try:
            async with self._turn(key):
                await self._take_ahead(key, limit, now, replacing)
        except Exception as exc:  # NATS errors, a timeout: never a request's failure
            log.debug("rate_refill_dropped", key=key, error=repr(exc))

    async def _take_ahead(self, key: str, limit: RateLimit, now: int, replacing: Lease) -> None:
        held = self._leases.get(key)
        now = max(now, now_us())
        if held is not None and held is not replacing and held.usable(limit, now):
            return  # a request took a lease with tokens left while this refill waited its turn
        wanted = held.wanted_ahead(limit, now) if held is not None else 1
        # While its tokens last, the lease stays and the new one follows it (`Lease.next`): its size keeps the
        # tokens this replica holds of the account within `lease_cap`, as one lease would.
        keep = held if held is not None and held.next is None and held.usable(limit, now) else None
        room = ratelimit.lease_cap(limit) - keep.left if keep is not None else wanted
        cached = self._cache.get(key)
        state, rev = cached if cached is not None else await self._read(key)
        now = max(now, now_us())
        for _ in range(_REFILL_TRIES):
            size = min(ratelimit.refill_size(state, limit, now, wanted), room)
            if size <= 0:
                return
            decision = ratelimit.decide(state, limit, now, take=size)
            if not decision.admitted:
                return
            seq = await self._store(key, decision.state, rev, now)
            if seq is not None:
                self._remember(key, decision.state, seq)
                taken = Lease.taken_ahead(limit, size, decision.at_us, held)
                if keep is not None and self._leases.get(key) is keep:
                    keep.next = taken
                else:
                    self._lease(key, taken)
                self.ahead += 1
                return
            state, rev = await self._read(key)
            now = max(now, now_us())
        log.debug("rate_refill_dropped", key=key, error=f"{_REFILL_TRIES} compare-and-sets lost to other replicas")

    async def _decide(
        self, key: str, limit: RateLimit, now: int, tokens: int, wait_us: int, lease: bool = False
    ) -> ratelimit.Decision:
        cached = self._cache.get(key)
        fresh = cached is None
        state, rev = cached if cached is not None else await self._read(key)
        # The clock is read after the state: a state another replica wrote while this one waited for its
        # read must not look like it is from the future (that would refuse what it should admit).
        now = max(now, now_us())
        for _ in range(_CAS_TRIES):
            take = 1
            if lease:
                decision, take = ratelimit.decide_leasing(state, limit, now, self._leases.get(key), tokens=tokens)
            else:
                decision = ratelimit.decide(state, limit, now, tokens=tokens, wait_us=wait_us)
            if not decision.admitted:
                if fresh:
                    self._remember(key, state, rev)
                    return decision
            else:
                seq = await self._store(key, decision.state, rev, now)
                if seq is not None:
                    self._remember(key, decision.state, seq)
                    if lease:
                        prior = self._leases.get(key)
                        self._lease(key, Lease.taken(limit, take, decision.at_us, prior.latest_us() if prior else 0))
                    return decision
            state, rev = await self._read(key)
            fresh = True
            now = max(now, now_us())  # never back: a caller may decide on a clock ahead of this one
        raise RuntimeError(f"the rate state {key!r} kept changing under {_CAS_TRIES} tries")

    async def _store(self, key: str, state: RateState, rev: int, now: int) -> int | None:
        """Write `state` if `key` is still at revision `rev`: its new revision, None when another replica
        wrote first. Its TTL ends when the state has drained back to a full bucket."""
        ttl_s = max(1, -(-(state.idle_after_us() - now) // 1_000_000) + 1)
        headers = {"Nats-Expected-Last-Subject-Sequence": str(rev)}
        try:
            ack = await self.js.publish(self._subject + key, msgspec.json.encode(state), headers=headers, msg_ttl=ttl_s)
        except APIError as exc:
            if exc.err_code not in _WRONG_LAST:
                raise
            self.conflicts += 1
            return None
        return ack.seq

    async def _read(self, key: str) -> tuple[RateState, int]:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return RateState(), 0
        try:
            return _state.decode(entry.value or b""), entry.revision or 0
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("bad_rate_state", key=key, effect="counted as a full bucket and overwritten")
            return RateState(), entry.revision or 0

    def _remember(self, key: str, state: RateState, rev: int) -> None:
        self._cache[key] = (state, rev)
        self._cache.move_to_end(key)
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    def _lease(self, key: str, held: Lease) -> None:
        if held.size > 1:
            self.leased += 1
        self._leases[key] = held
        self._leases.move_to_end(key)
        if len(self._leases) > CACHE_SIZE:
            self._leases.popitem(last=False)

    async def _read_hold(self, seq: int) -> Hold | None:
        try:
            entry = await self.kv.get(f"h.{seq}")
            return _hold.decode(entry.value or b"")
        except (KeyNotFoundError, msgspec.DecodeError, msgspec.ValidationError):
            return None

    async def _hold(self, seq: int, holds: int, at_us: int, req: Request, published_ms: int, now: int) -> int:
        """Record the hold (before the nak, so a redelivery finds it) and return its delay in ms."""
        ttl_s = max(1, (published_ms + req.timeout_ms - now // 1000) // 1000 + 60)
        await self.js.publish(f"{self._subject}h.{seq}", msgspec.json.encode(Hold(holds, at_us)), msg_ttl=ttl_s)
        heapq.heappush(self._held, at_us)
        return max(1, -(-(at_us - now) // 1000))

    def _holding(self, now: int) -> int:
        held = self._held
        while held and (held[0] <= now or len(held) > MAX_HOLDS):
            heapq.heappop(held)
        return len(held)
