"""The admin service: a NATS micro service named `switchyard`, served by every dispatcher.

Its endpoints answer on `<prefix>.admin.<name>` in the queue group `q` (one replica answers):

- `explain`: which chain a request would get and why each other target is skipped, worked out
  by router/routing.py with the dispatcher's own config, health view and account routes. The
  request and reply shapes are in docs/protocol.md, "Admin subjects".

nats-py's micro package also answers `$SRV.PING|INFO|STATS.switchyard` for discovery and counts.
`switchyard explain` builds the same reply (`explain()`) from what it reads itself.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
import structlog
from msgspec import Meta
from nats.aio.client import Client as NATS
from nats.micro import add_service
from nats.micro.request import Request as MicroRequest
from nats.micro.service import Service

from router.config import Config
from router.models import model_info
from router.routing import AccountRoute, Health, Needs, Selection, choose
from schemas import Target

from .dispatcher import Dispatcher
from .publish import now_ms

log = structlog.get_logger("admin")

SERVICE = "switchyard"
VERSION = "1.0.0"
"""The admin service's own version (semver, as the micro protocol wants); not the wire protocol's."""

Token = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]


class ExplainRequest(msgspec.Struct, kw_only=True):
    """What `<prefix>.admin.explain` takes: the parts of a request that selection looks at."""

    use_case: Token
    tier: Token = "default"
    account: Token | None = None
    model: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    image: bool = False
    tools: bool = False
    prompt_tokens: Annotated[int, Meta(ge=0)] = 0
    max_tokens: Annotated[int, Meta(gt=0)] | None = None


class Candidate(msgspec.Struct, kw_only=True):
    """A target of the chain, with what the model table says about its model."""

    pool: str
    model: str
    provider: str | None
    known: bool
    """False: the model table does not know the model; it is used as the config describes it."""
    context_window: int | None
    vision: bool | None
    tools: bool | None


class SkippedTarget(msgspec.Struct, kw_only=True):
    pool: str
    model: str
    reason: str
    detail: str
    known: bool


class OwnRoute(msgspec.Struct, kw_only=True):
    tier: str
    """The tier the route was set for, or `*` for every tier."""
    targets: list[str]


class Explanation(msgspec.Struct, kw_only=True):
    """What `<prefix>.admin.explain` answers, and what `switchyard explain --json` prints."""

    use_case: str
    tier: str
    account: str | None
    model: str | None
    source: str
    chain: list[Candidate]
    skipped: list[SkippedTarget]
    code: str | None
    """Set when the chain is empty: the error code the request would be refused with."""
    message: str
    prompt_tokens: int
    account_route: OwnRoute | None
    account_routes: Literal["on", "off", "unavailable"]
    """Whether the account's own route was looked up: `off` without a database, `unavailable` when
    it could not be reached."""
    live_health: bool
    """False: breakers, credit and keys were not read; every target counted as callable."""


def needs_of(ask: ExplainRequest) -> Needs:
    return Needs(use_case=ask.use_case, tier=ask.tier, account=ask.account or "", model=ask.model, image=ask.image,
                 tools=ask.tools, prompt_tokens=ask.prompt_tokens, max_tokens=ask.max_tokens)


def explain(
    cfg: Config,
    ask: ExplainRequest,
    health: Health,
    *,
    account_route: AccountRoute | None,
    account_routes: Literal["on", "off", "unavailable"],
    live_health: bool,
) -> Explanation:
    """The answer to `ask` under this config, health and account route."""
    selection = choose(cfg, needs_of(ask), health, account_route=account_route, now_ms=now_ms())
    return _explanation(cfg, ask, selection, account_route, account_routes, live_health)


def _explanation(
    cfg: Config,
    ask: ExplainRequest,
    sel: Selection,
    own: AccountRoute | None,
    account_routes: Literal["on", "off", "unavailable"],
    live_health: bool,
) -> Explanation:
    unknown = {(t.pool, t.model) for t in sel.unknown_models}
    return Explanation(
        use_case=ask.use_case,
        tier=ask.tier,
        account=ask.account,
        model=ask.model,
        source=sel.source.value,
        chain=[_candidate(cfg, t) for t in sel.chain],
        skipped=[
            SkippedTarget(pool=s.pool, model=s.model, reason=s.reason.value, detail=s.detail,
                          known=(s.pool, s.model) not in unknown)
            for s in sel.skipped
        ],
        code=sel.code.value if sel.code else None,
        message=sel.message,
        prompt_tokens=sel.prompt_tokens,
        account_route=OwnRoute(tier=own.tier, targets=[str(t) for t in own.targets]) if own else None,
        account_routes=account_routes,
        live_health=live_health,
    )


def _candidate(cfg: Config, t: Target) -> Candidate:
    pool = cfg.pools[t.pool]
    info = model_info(cfg, cfg.providers[pool.provider].format, t.model)
    return Candidate(pool=t.pool, model=t.model, provider=pool.provider, known=info.known,
                     context_window=info.context_window, vision=info.vision, tools=info.tools)


class Answerer:
    """What the admin endpoints read at each call: the dispatcher's current config, health view and
    account routes (it is handed the dispatcher, whose `cfg` may be swapped while it runs)."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self._decode = msgspec.json.Decoder(ExplainRequest)

    async def explain(self, request: MicroRequest) -> None:
        """One error boundary: a bad request is answered 400, anything else 500 (and logged)."""
        try:
            ask = self._decode.decode(request.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await _error(request, "400", f"invalid explain request: {exc}")
            return
        try:
            d = self.dispatcher
            own = d.accounts.lookup(ask.account, ask.use_case, ask.tier) if d.accounts and ask.account else None
            answer = explain(
                d.cfg, ask, d.health, account_route=own, account_routes="on" if d.accounts else "off",
                live_health=d.live_health,
            )
        except Exception:
            log.exception("explain_failed")
            await _error(request, "500", "the dispatcher failed to explain this request; see its log")
            return
        await request.respond(msgspec.json.encode(answer))


async def _error(request: MicroRequest, code: str, message: str) -> None:
    """A micro error (Nats-Service-Error-Code, Nats-Service-Error headers) with the same in JSON."""
    line = " ".join(message.split())[:1000]
    body = msgspec.json.encode({"error": {"code": code, "message": line}})
    await request.respond_error(code, line, data=body)


async def start(nc: NATS, dispatcher: Dispatcher, prefix: str) -> Service:
    """Start the service on `nc`; the caller stops it (`await service.stop()`)."""
    service = await add_service(
        nc, name=SERVICE, version=VERSION, queue_group="q",
        description="Switchyard's admin calls: explain (more to come)",
    )
    answerer = Answerer(dispatcher)
    await service.add_endpoint(name="explain", subject=f"{prefix}.admin.explain", handler=answerer.explain)
    return service

