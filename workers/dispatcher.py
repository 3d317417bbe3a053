"""The dispatcher: validates each request, picks its route and hands it to a pool."""

from __future__ import annotations

import asyncio

import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from router.config import Config, parse_target
from router.errors import ErrorCode, SwitchyardError
from schemas import (
    REPLY_PREFIXES,
    CompletionEvent,
    InvalidMessage,
    Request,
    Target,
    WorkItem,
    decode_request,
    encode,
    peek_request,
)

from .publish import Publisher, now_ms, prompt_fingerprint
from .pull import serve_pull
from .runtime import MAX_DELIVER

log = structlog.get_logger("dispatcher")


class Refusal(SwitchyardError):
    """The dispatcher refuses a request; it is answered and dead-lettered."""


def choose_route(cfg: Config, req: Request) -> list[Target]:
    """The ordered targets for a request. Raises Refusal(NO_ROUTE) when there are none."""
    assert req.use_case is not None
    targets = cfg.route(req.use_case, req.tier)
    if targets is None:
        raise Refusal(
            ErrorCode.NO_ROUTE,
            f"no route for use case {req.use_case!r} (configured: {', '.join(sorted(cfg.routes)) or 'none'})",
        )
    if req.model is not None:
        return forced_targets(cfg, req.model, targets)
    return targets


def _names(cfg: Config, t: Target) -> tuple[str, ...]:
    return (t.model, f"{t.pool}:{t.model}", f"{cfg.pools[t.pool].provider}:{t.model}")


def forced_targets(cfg: Config, model: str, route: list[Target]) -> list[Target]:
    """The targets for a request that forces `model` (`provider:model`, `pool:model` or a bare model name):
    those of its own route first; else the first target anywhere in the config that serves it."""
    chosen = [t for t in route if model in _names(cfg, t)]
    if chosen:
        return chosen
    for tiers in cfg.routes.values():
        for names in tiers.values():
            for name in names:
                t = parse_target(name)
                if model in _names(cfg, t):
                    return [t]
    raise Refusal(ErrorCode.NO_ROUTE, f"model {model!r} is not served by any configured target")


class Dispatcher:
    def __init__(self, js: JetStreamContext, pub: Publisher, cfg: Config, *, concurrency: int = 256) -> None:
        self.js = js
        self.pub = pub
        self.cfg = cfg
        self.prefix = cfg.subject_prefix
        self.concurrency = concurrency

    async def serve(self, stop: asyncio.Event) -> None:
        log.info("dispatcher_started")
        await serve_pull(self.pub.nc, "LLM_REQ", "dispatch", self.handle, stop, limit=self.concurrency)

    async def handle(self, msg: Msg) -> None:
        """One request: the error boundary. Never raises except on cancellation."""
        tokens = msg.subject.split(".")
        use_case, account = (tokens[2], tokens[3]) if len(tokens) == 4 else (None, None)
        req: Request | None = None
        try:
            if use_case is None:
                raise InvalidMessage(f"subject {msg.subject!r} is not {self.prefix}.req.<use_case>.<account>")
            req = decode_request(msg.data, use_case=use_case, account=account)
            route = choose_route(self.cfg, req)
            work = WorkItem(request=req, route=route, accepted_ms=now_ms())
            await self.js.publish(
                f"{self.prefix}.work.{route[0].pool}", encode(work), headers={"Nats-Msg-Id": req.id}
            )
            await msg.ack()
            log.debug("dispatched", request_id=req.id, account=req.account, pool=route[0].pool)
        except InvalidMessage as exc:
            await self._refuse(msg, SwitchyardError(ErrorCode.INVALID_REQUEST, str(exc)), req, use_case, account)
        except Refusal as exc:
            await self._refuse(msg, exc, req, use_case, account)
        except Exception as exc:
            log.exception("dispatch_failed", subject=msg.subject)
            if msg.metadata.num_delivered < MAX_DELIVER:
                await msg.nak(delay=1)
                return
            err = SwitchyardError(ErrorCode.INTERNAL, f"the dispatcher failed on this request ({type(exc).__name__})")
            await self._refuse(msg, err, req, use_case, account)

    async def _refuse(
        self, msg: Msg, err: SwitchyardError, req: Request | None, use_case: str | None, account: str | None
    ) -> None:
        """Answer when a reply subject can be read, copy to the DLQ, record the event, drop the message."""
        rid, reply_to = (req.id, req.reply_to) if req is not None else peek_request(msg.data)
        log.warning("refused", request_id=rid, code=err.code.value, error=err.message, subject=msg.subject)
        if rid and reply_to and reply_to.startswith(REPLY_PREFIXES) and not any(c in reply_to for c in " *>"):
            await self.pub.reply(reply_to, err.to_reply(rid, 0))
        await self.pub.dead_letter(
            "dispatch", msg.data, subject=msg.subject, code=err.code.value, error=err.message, request_id=rid
        )
        if rid:
            chars, digest = prompt_fingerprint(req) if req is not None else (0, "")
            t = now_ms()
            await self.pub.event(
                CompletionEvent(
                    id=rid,
                    account=req.account if req else account or "",
                    use_case=(req.use_case if req else None) or use_case or "",
                    tier=req.tier if req else "default",
                    status="error",
                    code=err.code.value,
                    started_ms=t,
                    finished_ms=t,
                    prompt_chars=chars,
                    prompt_sha256=digest,
                    metadata=req.metadata if req else {},
                )
            )
        await msg.term()
