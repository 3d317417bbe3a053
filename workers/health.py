"""The fleet's shared view of pool and provider health, in three JetStream KV buckets.

- `llm_breakers`: key = pool, value = its breaker (router/breaker.py). Workers change it with
  compare-and-set after a call that changes it, so every replica of a pool counts into one breaker;
  a half-open probe slot is claimed the same way before the call.
- `llm_credit`: key = provider, value = until when its credit counts as exhausted.
- `llm_pools`: key = `<pool>.<worker>`, value = whether that worker has its provider's key; each worker
  writes it at start and every REPORT_EVERY_S, and a report older than REPORT_TTL_MS is not believed,
  so a pool with no live worker reads as unknown.

HealthView keeps an in-memory copy of all three through KV watches, so the dispatcher (and each
worker) asks synchronously per request, without a round trip. PoolHealth is a worker's writer for its
own pool and provider. The functions at the end serve the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Callable
from typing import Generic, TypeVar

import msgspec
import nats.errors
import structlog
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from router import breaker
from router.breaker import BreakerState, Ticket, Verdict
from router.config import BreakerPolicy

log = structlog.get_logger("health")

BREAKERS = "llm_breakers"
CREDIT = "llm_credit"
POOLS = "llm_pools"
REPORT_EVERY_S = 10.0
REPORT_TTL_MS = 30_000
"""A key report is believed this long: three missed reports and the worker counts as gone."""
_CAS_GIVE_UP_S = 2.0
"""How long a change keeps trying its compare-and-set before it is given up (and logged). Each conflict
is another replica's change going through, and a breaker changes only a few times per counted failure
before it opens and stops changing, so a whole pool's calls failing at once settle in milliseconds."""
_CAS_PAUSE_S = 0.0005
"""The longest random pause before re-reading after a second conflict in a row; it doubles with each
further conflict, up to 32 times: writers that all re-read at once would all collide again."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Credit(msgspec.Struct, kw_only=True, frozen=True):
    """A provider said it has no credit left: its targets are skipped until `until_ms`."""

    until_ms: int
    since_ms: int
    pool: str = ""
    """The pool whose call found out."""


class KeyReport(msgspec.Struct, kw_only=True, frozen=True):
    pool: str
    provider: str
    has_key: bool
    until_ms: int
    """When this report stops being believed unless the worker writes it again."""


T = TypeVar("T")


_START_TRIES = 4


async def _bucket(js: JetStreamContext, name: str, ttl_s: float | None = None) -> KeyValue:
    """The bucket, created when missing. A JetStream API call that times out at start (a busy server) is
    tried again a few times rather than ending the process on its first try."""
    for attempt in range(_START_TRIES):
        try:
            try:
                return await js.key_value(name)
            except BucketNotFoundError:
                # Every process may get here at once; the server takes identical configs as one.
                return await js.create_key_value(
                    js_api.KeyValueConfig(bucket=name, history=1, ttl=ttl_s, storage=js_api.StorageType.FILE)
                )
        except nats.errors.TimeoutError:
            if attempt == _START_TRIES - 1:
                raise
            log.warning("bucket_slow", bucket=name, attempt=attempt + 1)
            await asyncio.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable: the last try returns or raises")


async def ensure_buckets(js: JetStreamContext) -> tuple[KeyValue, KeyValue, KeyValue]:
    """The breakers, credit and pools buckets, created when missing."""
    # Old key reports are cleaned up by age; readers go by each report's own `until_ms`.
    return await _bucket(js, BREAKERS), await _bucket(js, CREDIT), await _bucket(js, POOLS, ttl_s=300.0)


class _Mirror(Generic[T]):
    """A bucket's current values and revisions, kept up to date by a watch."""

    def __init__(self, name: str, kv: KeyValue, decode: Callable[[bytes], T]) -> None:
        self.name = name
        self.kv = kv
        self.decode = decode
        self.values: dict[str, tuple[T, int]] = {}
        self._watcher: KeyValue.KeyWatcher | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, *, follow: bool = True) -> None:
        """Read the bucket (the watch's initial replay ends with None), then follow its changes."""
        self._watcher = await self.kv.watchall()
        async for entry in self._watcher:
            if entry is None:
                break
            self._apply(entry)
        if follow:
            self._task = asyncio.create_task(self._follow(self._watcher))
        else:
            await self._watcher.stop()  # type: ignore[no-untyped-call]

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is not None:
                self._apply(entry)

    def _apply(self, entry: KeyValue.Entry) -> None:
        rev = entry.revision or 0
        held = self.values.get(entry.key)
        if held is not None and held[1] >= rev:
            return  # our own write, already applied when it was acknowledged
        if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
            self.values.pop(entry.key, None)
            return
        try:
            self.values[entry.key] = (self.decode(entry.value), rev)
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("bad_health_value", bucket=self.name, key=entry.key)

    def put_local(self, key: str, value: T, rev: int) -> None:
        """A value this process stored: applied now rather than when the watch brings it back."""
        held = self.values.get(key)
        if held is None or held[1] < rev:
            self.values[key] = (value, rev)

    async def stop(self) -> None:
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()  # type: ignore[no-untyped-call]
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


_credit_decoder = msgspec.json.Decoder(Credit)
_report_decoder = msgspec.json.Decoder(KeyReport)


class HealthView:
    """What the fleet knows about each pool and provider, answered from memory.

    Implements the routing's `Health` protocol: `pool_open`, `provider_exhausted`, `pool_has_key`.
    """

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self._breakers: _Mirror[BreakerState] | None = None
        self._credit: _Mirror[Credit] | None = None
        self._pools: _Mirror[KeyReport] | None = None

    async def start(self) -> None:
        """Create the buckets when missing and load them; the view follows every change afterwards."""
        breakers, credit, pools = await ensure_buckets(self.js)
        self._breakers = _Mirror(BREAKERS, breakers, breaker.decode)
        self._credit = _Mirror(CREDIT, credit, _credit_decoder.decode)
        self._pools = _Mirror(POOLS, pools, _report_decoder.decode)
        for mirror in (self._breakers, self._credit, self._pools):
            await mirror.start()

    async def stop(self) -> None:
        for mirror in (self._breakers, self._credit, self._pools):
            if mirror is not None:
                await mirror.stop()

    @property
    def breakers(self) -> _Mirror[BreakerState]:
        assert self._breakers is not None, "HealthView.start() first"
        return self._breakers

    @property
    def credit(self) -> _Mirror[Credit]:
        assert self._credit is not None, "HealthView.start() first"
        return self._credit

    @property
    def pools(self) -> _Mirror[KeyReport]:
        assert self._pools is not None, "HealthView.start() first"
        return self._pools

    def breaker(self, pool: str) -> tuple[BreakerState, int]:
        """The pool's breaker and its revision (0: never written, which reads as closed)."""
        return self.breakers.values.get(pool, (breaker.CLOSED, 0))

    def pool_open(self, pool: str, now_ms: int) -> bool:
        """True when the pool's breaker refuses calls now: open and cooling down, or half-open with
        every probe slot taken."""
        return breaker.refuses(self.breaker(pool)[0], now_ms)

    def credit_until(self, provider: str, now_ms: int) -> int | None:
        """Until when the provider counts as out of credit, or None when it does not."""
        held = self.credit.values.get(provider)
        if held is None or held[0].until_ms <= now_ms:
            return None
        return held[0].until_ms

    def provider_exhausted(self, provider: str, now_ms: int) -> bool:
        return self.credit_until(provider, now_ms) is not None

    def pool_has_key(self, pool: str) -> bool | None:
        """Whether the pool's live workers have their provider's key; None when no live worker has
        reported (none runs, or none has for REPORT_TTL_MS)."""
        now = now_ms()
        live = [r for r, _ in self.pools.values.values() if r.pool == pool and r.until_ms > now]
        if not live:
            return None
        return any(r.has_key for r in live)


class PoolHealth:
    """A worker's side: its pool's breaker (admission and outcomes), its provider's credit, its key report."""

    def __init__(
        self,
        view: HealthView,
        *,
        pool: str,
        policy: BreakerPolicy,
        provider: str,
        credit_cooldown_ms: int,
        has_key: bool,
    ) -> None:
        self.view = view
        self.pool = pool
        self.policy = policy
        self.provider = provider
        self.credit_cooldown_ms = credit_cooldown_ms
        self.has_key = has_key
        self.report_key = f"{pool}.{uuid.uuid4().hex[:16]}"
        self._report_soon = asyncio.Event()
        self._changing = asyncio.Lock()
        self.log = log.bind(pool=pool)

    async def start(self) -> None:
        """Load the shared state and say whether this worker has its key, before the first call."""
        await self.view.start()
        await self._report()

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.view.pools.kv.delete(self.report_key)
        await self.view.stop()

    def key_changed(self, has_key: bool) -> None:
        """The worker gained or lost its key (a stored key set or deleted): reported now, not at the next beat."""
        if has_key != self.has_key:
            self.has_key = has_key
            self._report_soon.set()

    async def keep_reporting(self, stop: asyncio.Event) -> None:
        """Write the key report every REPORT_EVERY_S, and at once when `key_changed`, until `stop` is set."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REPORT_EVERY_S), asyncio.TaskGroup() as tg:
                    # Whichever comes first ends the wait: the other waiter is cancelled with the group.
                    stopped = tg.create_task(stop.wait())
                    soon = tg.create_task(self._report_soon.wait())
                    await asyncio.wait([stopped, soon], return_when=asyncio.FIRST_COMPLETED)
                    stopped.cancel()
                    soon.cancel()
            self._report_soon.clear()
            if not stop.is_set():
                await self._report()

    async def _report(self) -> None:
        report = KeyReport(pool=self.pool, provider=self.provider, has_key=self.has_key,
                           until_ms=now_ms() + REPORT_TTL_MS)
        try:
            await self.view.pools.kv.put(self.report_key, msgspec.json.encode(report))
        except Exception as exc:  # NATS away for a moment: the next report makes up for it
            self.log.warning("key_report_failed", error=repr(exc))

    # --- the breaker ---------------------------------------------------------------------------

    async def admit(self, lease_ms: int) -> Ticket | None:
        """A ticket for one call to the pool, or None when the breaker refuses it now. Closed costs no
        round trip; claiming a half-open probe slot is a compare-and-set. Raises what NATS raises."""
        state, _ = self.view.breaker(self.pool)
        if state.state == "closed":
            return Ticket(None, state.since_ms)  # the hot path: nothing to claim, nothing to write
        token = uuid.uuid4().hex[:16]
        ticket: Ticket | None = None

        def claim(s: BreakerState) -> BreakerState | None:
            nonlocal ticket
            decided = breaker.admit(s, self.policy, now_ms(), token=token, lease_ms=lease_ms)
            ticket = decided.ticket
            return decided.state

        if not await self._change(claim):
            return None  # other replicas kept changing it: this call stays out rather than over-probe
        return ticket

    async def record(self, ticket: Ticket, outcome: Verdict) -> None:
        """Count one call's outcome; a write only when it changes the breaker. Raises what NATS raises."""

        def count(s: BreakerState) -> BreakerState:
            return breaker.record(s, self.policy, now_ms(), ticket, outcome)

        state, _ = self.view.breaker(self.pool)
        if count(state) == state:
            return  # the hot path (a success while closed with no failures): no lock, no write
        if not await self._change(count):
            self.log.warning("breaker_update_lost", outcome=outcome.value)

    async def _change(self, step: Callable[[BreakerState], BreakerState | None]) -> bool:
        """Store `step(state)` with compare-and-set, re-reading and re-applying it after a conflict, until
        it holds or there is nothing to store (True) or _CAS_GIVE_UP_S passed (False). One change at a
        time per process, so a replica's own calls never conflict with each other, only with other
        replicas' (a burst of failures would otherwise be a burst of conflicts)."""
        async with self._changing:
            state, rev = self.view.breaker(self.pool)
            give_up = time.monotonic() + _CAS_GIVE_UP_S
            conflicts = 0
            while True:
                new = step(state)
                if new is None or new == state:
                    return True
                try:
                    await self._store(state, new, rev)
                    return True
                except KeyWrongLastSequenceError:
                    if time.monotonic() > give_up:
                        return False
                    conflicts += 1
                    state, rev = await self._read(conflicts)

    async def _store(self, old: BreakerState, new: BreakerState, rev: int) -> None:
        kv = self.view.breakers.kv
        stored = await kv.update(self.pool, breaker.encode(new), last=rev)
        self.view.breakers.put_local(self.pool, new, stored)
        if new.state != old.state:
            self.log.warning(f"breaker_{new.state}", failures=new.failures, until_ms=new.until_ms or None)

    async def _read(self, conflicts: int = 0) -> tuple[BreakerState, int]:
        """The stored breaker, after `conflicts` compare-and-sets in a row found the copy stale. The
        first re-reads at once (the copy was merely behind), later ones after a random pause."""
        if conflicts > 1:
            await asyncio.sleep(random.uniform(0, _CAS_PAUSE_S * 2 ** min(conflicts - 2, 5)))
        try:
            entry = await self.view.breakers.kv.get(self.pool)
        except KeyNotFoundError:
            return breaker.CLOSED, 0
        rev = entry.revision or 0
        try:
            state = breaker.decode(entry.value or b"")
        except (msgspec.DecodeError, msgspec.ValidationError):
            state = breaker.CLOSED  # overwritten by the next change
        self.view.breakers.put_local(self.pool, state, rev)
        return state, rev

    # --- credit ----------------------------------------------------------------------------------

    def credit_until(self) -> int | None:
        return self.view.credit_until(self.provider, now_ms())

    async def out_of_credit(self) -> int:
        """Mark the provider out of credit for its cool-down (every pool, every replica); returns until when."""
        now = now_ms()
        credit = Credit(until_ms=now + self.credit_cooldown_ms, since_ms=now, pool=self.pool)
        rev = await self.view.credit.kv.put(self.provider, msgspec.json.encode(credit))
        self.view.credit.put_local(self.provider, credit, rev)
        self.log.error("provider_credit_exhausted", provider=self.provider, until_ms=credit.until_ms)
        return credit.until_ms


# --- for the CLI ---------------------------------------------------------------------------------


async def _read_all(js: JetStreamContext, bucket: str, decode: Callable[[bytes], T]) -> dict[str, T]:
    """Every key's value, read one by one from the keys the bucket's stream lists. Not a watch: nats-py's
    watch may mark the end of its replay before entries the server already sent, which a one-shot read
    would then miss."""
    try:
        kv = await js.key_value(bucket)
        info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"$KV.{bucket}.>")
    except (BucketNotFoundError, NotFoundError):
        return {}
    values: dict[str, T] = {}
    for subject in info.state.subjects or {}:
        key = subject.removeprefix(f"$KV.{bucket}.")
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:  # deleted (nats-py's KeyDeletedError is one), or gone since the listing
            continue
        if not entry.value:
            continue  # as the watch reads it: no value, no entry
        try:
            values[key] = decode(entry.value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("bad_health_value", bucket=bucket, key=key)
    return values


async def breaker_status(js: JetStreamContext) -> dict[str, BreakerState]:
    """Every pool's stored breaker; a pool that has none has never left closed."""
    return await _read_all(js, BREAKERS, breaker.decode)


async def reset_breaker(js: JetStreamContext, pool: str) -> None:
    """Close the pool's breaker now, whatever it was; a replica in the middle of a change re-reads it. On a
    secure fleet only the admin credential may write another pool's breaker (router/natsperms.py): with
    any other, the server refuses the write and this raises nats-py's TimeoutError."""
    kv = await _bucket(js, BREAKERS)
    await kv.put(pool, breaker.encode(BreakerState(since_ms=now_ms())))


async def credit_status(js: JetStreamContext) -> dict[str, Credit]:
    """Each provider ever marked out of credit, with until when (past: it is back)."""
    return await _read_all(js, CREDIT, _credit_decoder.decode)
