"""Who may publish and subscribe to what on the fleet's NATS server: one permission table per role.

Pure data, no I/O: `workers/natsauth.py` writes these into a nats-server config, one nkey user per
role. Every user lives in the server's one (global) account, where JetStream is reached through
the subjects of its API (`$JS.API.>`), its acknowledgements (`$JS.ACK.>`) and KV's `$KV.<bucket>.>`;
a permission on those subjects is a permission on the stream, consumer or bucket they name.

Roles:
- `producer` of one account: publishes `<prefix>.req.*.<account>` only, and reads only its own
  inboxes (`_INBOX.<account>.>`, which its connection must use as inbox prefix) and its own
  durable results (`<prefix>.res.<account>.>`).
- `dispatcher`, `worker` (one per pool) and `auditor`: what the fleet's own processes need, and of
  the fleet's shared state (KV keys, budget counters) only the keys each role writes for its own
  work (`kv_writes`, `budget_writes`): a worker of pool P writes pool P's breaker, rate state and key
  reports, never another pool's; the dispatcher writes no breaker, credit or key report; the
  auditor writes no KV key and no budget counter.
- `admin`: everything (the operator's CLI, `switchyard up` itself, admin subjects, `$SRV`); the
  only credential that may write `llm_config` (config push), any pool's breaker (breaker reset),
  or change a bucket's or stream's stored configuration beyond what `ensure_topology` does.
"""

from __future__ import annotations

from typing import Literal

import msgspec

Role = Literal["producer", "dispatcher", "worker", "auditor", "admin"]

STREAMS = ("LLM_REQ", "LLM_WORK", "LLM_EVENTS", "LLM_DLQ", "LLM_RES", "LLM_BUDGET")
"""The fleet's streams (workers/runtime.py)."""
BUCKETS = (
    "llm_config", "llm_streams", "llm_rates", "llm_breakers", "llm_credit", "llm_pools", "llm_budget_alerts",
)
"""The fleet's KV buckets; each is the stream `KV_<bucket>`."""


class Permissions(msgspec.Struct, kw_only=True, frozen=True):
    """Subjects a user may publish to and subscribe to; anything else is refused by the server."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


class User(msgspec.Struct, kw_only=True, frozen=True):
    """One credential: its role, what it is for (an account for a producer, a pool for a worker), and
    its nkey's public half. The seed (the secret) never appears here."""

    role: Role
    name: str
    public_key: str


def inbox_prefix(account: str) -> str:
    """The inbox prefix a producer of `account` connects with (nats-py's `inbox_prefix=`)."""
    return f"_INBOX.{account}"


def kv_writes(user: User) -> tuple[str, ...]:
    """The KV keys (as `$KV.<bucket>.<key>` subjects) a fleet process of `user`'s role writes for its own
    work: a put, a compare-and-set, a create and a delete are all publishes there. Keys are those of
    workers/ratelimits.py, health.py, progress.py and budget.py."""
    match user.role:
        case "dispatcher":
            # account rate states (`a.<account>`) and held requests (`h.<stream seq>`), for every account
            return ("$KV.llm_rates.a.*", "$KV.llm_rates.h.*")
        case "worker":
            pool = user.name
            return (
                f"$KV.llm_breakers.{pool}",  # its own pool's breaker (compare-and-set, probe slots)
                f"$KV.llm_pools.{pool}.*",  # its key reports, `<pool>.<worker>`
                f"$KV.llm_rates.pool.{pool}",  # its pool's own rate limit towards the provider
                # the credential is per pool and the pool's provider may change with a config push, so
                # any provider's credit mark (a key per provider, shared by every pool of it)
                "$KV.llm_credit.*",
                # how far each stream got (`<hash of account and id>`) and held items (`hold.<seq>`):
                # a work item handed over from another pool continues there, so not per pool
                "$KV.llm_streams.>",
                # budget alerts raised once per `<account>.<period>.<pct>`, for any account it settles
                "$KV.llm_budget_alerts.>",
            )
        case _:
            return ()


def budget_writes(user: User, prefix: str = "llm") -> tuple[str, ...]:
    """The budget counters (`<prefix>.budget.<account>.<period>.<kind>`) a fleet process increments: the
    dispatcher reserves and releases on `used`, a worker settles `used` and adds to `spent`, for any
    account (a request of any account may come to it)."""
    match user.role:
        case "dispatcher":
            return (f"{prefix}.budget.*.*.used",)
        case "worker":
            return (f"{prefix}.budget.*.*.used", f"{prefix}.budget.*.*.spent")
        case _:
            return ()


def _topology() -> list[str]:
    """Every fleet process creates or updates the fleet's streams and consumers at start (workers/runtime.py
    `ensure_topology`), creates the KV buckets it finds missing (never updates one: nats-py's KV creates a
    bucket's stream, and the stream's limits are what keep its keys), and follows buckets with ordered
    consumers. Writing a key is `kv_writes`'."""
    api = "$JS.API"
    subjects = [f"{api}.INFO", f"{api}.STREAM.NAMES"]
    for stream in STREAMS:
        subjects += [f"{api}.STREAM.INFO.{stream}", f"{api}.STREAM.CREATE.{stream}", f"{api}.STREAM.UPDATE.{stream}"]
    for stream in (f"KV_{b}" for b in BUCKETS):
        subjects += [f"{api}.STREAM.INFO.{stream}", f"{api}.STREAM.CREATE.{stream}"]
    subjects += [f"{api}.CONSUMER.DURABLE.CREATE.{s}.*" for s in ("LLM_REQ", "LLM_WORK", "LLM_EVENTS")]
    subjects += [f"{api}.CONSUMER.INFO.{s}.*" for s in ("LLM_REQ", "LLM_WORK", "LLM_EVENTS")]
    for bucket in BUCKETS:
        stream = f"KV_{bucket}"
        subjects += [
            f"{api}.CONSUMER.CREATE.{stream}", f"{api}.CONSUMER.CREATE.{stream}.>",
            f"{api}.CONSUMER.DELETE.{stream}.*", f"{api}.CONSUMER.INFO.{stream}.*",
            f"{api}.DIRECT.GET.{stream}", f"{api}.DIRECT.GET.{stream}.>", f"{api}.STREAM.MSG.GET.{stream}",
            f"$JS.FC.{stream}.>",
        ]
    return subjects


def _service(user: User, prefix: str) -> list[str]:
    """What the dispatcher, the workers and the auditor all publish: replies (to inboxes and
    `<prefix>.res.>`), events, alerts and dead letters; and what their role writes of the shared
    state: its KV keys and budget counters, whose stored totals it reads back."""
    return [
        *_topology(),
        "_INBOX.>", f"{prefix}.res.>", f"{prefix}.events.>", f"{prefix}.alerts.>", f"{prefix}.dlq.>",
        *kv_writes(user), *budget_writes(user, prefix),
        "$JS.API.DIRECT.GET.LLM_BUDGET", "$JS.API.DIRECT.GET.LLM_BUDGET.>",
    ]


def permissions(user: User, prefix: str = "llm") -> Permissions | None:
    """The user's permissions; None for `admin`, which is not restricted."""
    match user.role:
        case "producer":
            account = user.name
            return Permissions(
                publish=(
                    f"{prefix}.req.*.{account}",
                    # `switchyard ask` and other tools look the fleet up by its request stream
                    "$JS.API.STREAM.INFO.LLM_REQ",
                    # a consumer of its own stored replies: the filter is part of the subject, and the
                    # server refuses a body whose filter differs from it
                    f"$JS.API.CONSUMER.CREATE.LLM_RES.*.{prefix}.res.{account}.>",
                ),
                subscribe=(f"{inbox_prefix(account)}.>", f"{prefix}.res.{account}.>"),
            )
        case "dispatcher":
            return Permissions(
                publish=(
                    *_service(user, prefix),
                    "$JS.API.CONSUMER.MSG.NEXT.LLM_REQ.dispatch", "$JS.ACK.LLM_REQ.dispatch.>",
                    f"{prefix}.work.*",
                    # what took a hand-over's id: its work item or a probe (workers/dispatcher.py `_probe_at`)
                    "$JS.API.STREAM.MSG.GET.LLM_WORK",
                ),
                # the admin service (`<prefix>.admin.*`, micro discovery on `$SRV.>`)
                subscribe=("_INBOX.>", f"{prefix}.admin.>", "$SRV.>"),
            )
        case "worker":
            consumer = f"pool-{user.name}"
            return Permissions(
                publish=(
                    *_service(user, prefix),
                    f"$JS.API.CONSUMER.MSG.NEXT.LLM_WORK.{consumer}", f"$JS.ACK.LLM_WORK.{consumer}.>",
                    # a provider's 429 pauses the pool's consumer
                    f"$JS.API.CONSUMER.PAUSE.LLM_WORK.{consumer}",
                    # a failed target hands the work item to the next one, in any pool
                    f"{prefix}.work.*",
                ),
                subscribe=("_INBOX.>", f"{prefix}.admin.providers.test.{user.name}",
                           f"{prefix}.admin.health.worker.{user.name}", "$SRV.>"),
            )
        case "auditor":
            return Permissions(
                publish=(*_service(user, prefix), "$JS.API.CONSUMER.MSG.NEXT.LLM_EVENTS.audit",
                         "$JS.ACK.LLM_EVENTS.audit.>"),
                subscribe=("_INBOX.>", f"{prefix}.admin.health.auditor", "$SRV.>"),
            )
        case "admin":
            return None
