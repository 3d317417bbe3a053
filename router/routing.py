"""Route selection: which targets a request is sent to, in what order, and why the others are skipped.

Pure (no I/O): the dispatcher calls `select()` once per request with the config, the live health
of pools and providers (`Health`, read from JetStream KV by `workers/health.py`) and the account's
own route (from PostgreSQL, cached by `workers/accounts.py`). `switchyard explain` and the
`llm.admin.explain` subject call `choose()` with the same inputs, so they answer what the
dispatcher would do.

Where the chain comes from, first match wins:

1. the request's `model`: the targets serving that model on the request's own route (the account's
   route and the use case × tier route, else the use case's `default`); any target of the config
   when the tier (`[tiers.<tier>]`) or the account (`[accounts.<name>]`) has `force_any_model`;
2. the account's own route for the use case and tier (or for every tier);
3. the route for use case × tier;
4. the use case's `default` route;
5. else nothing: `NO_ROUTE`.

Each target of that chain is then skipped, before any call, when it cannot serve the request
(its model lacks vision for an image, tools for a request with tools, or a window big enough
for the estimated prompt and answer) or cannot be called now (its pool's breaker is open, its
provider is out of credit, its workers have no key). A model the model table does not know has
no capability to miss: it is used as the config describes it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import msgspec

from schemas import Attempt, Request, Target, TextPart

from .config import Config, parse_target
from .errors import ErrorCode
from .models import ModelInfo, model_info

CHARS_PER_TOKEN = 4
"""The prompt estimate: a token per four characters of text (message text, tool calls' names and
arguments, tools' names, descriptions and parameter schemas as JSON). Close for English prose with
every major tokenizer, on the safe side for code; only a skip decision rests on it."""

IMAGE_TOKENS = 1_000
"""What an image adds to the prompt estimate, whatever its size: a mid-size image costs about
250 (Gemini) to 1,600 (Claude) tokens, GPT-4o about 765 at high detail."""

DEFAULT_OUTPUT_TOKENS = 1_024
"""The answer's reserve in the window when the request leaves out `max_tokens`: what the Anthropic
adapter then asks for, never more than the model can write (its `max_output_tokens`). OpenAI and
Gemini cut such an answer at the window rather than refuse the call, so this errs on their side."""

ModelLookup = Callable[[Config, str, str], ModelInfo]
"""`router.models.model_info`: what a model served over a wire format can do."""


class Health(Protocol):
    """The live state of pools and providers, shared by every replica."""

    def pool_open(self, pool: str, now_ms: int) -> bool:
        """The pool's breaker refuses calls now."""
        ...

    def provider_exhausted(self, provider: str, now_ms: int) -> bool:
        """The provider reported its credit exhausted and its cool-down has not passed."""
        ...

    def pool_has_key(self, pool: str) -> bool | None:
        """Whether the pool's workers have their API key; None: unknown (no live worker reported)."""
        ...


class AlwaysHealthy:
    """Every breaker closed, every provider in credit, keys unknown: for tests, and for a dispatcher
    or `explain` built without a view of the fleet's health."""

    def pool_open(self, pool: str, now_ms: int) -> bool:
        return False

    def provider_exhausted(self, provider: str, now_ms: int) -> bool:
        return False

    def pool_has_key(self, pool: str) -> bool | None:
        return None


class Source(enum.StrEnum):
    """Where a chain came from."""

    MODEL_OVERRIDE = "model_override"
    ACCOUNT_ROUTE = "account_route"
    TIER_ROUTE = "tier_route"
    DEFAULT_ROUTE = "default_route"
    NONE = "none"


class Skip(enum.StrEnum):
    """Why a target was not tried. The first six are about the request, the rest about now."""

    UNKNOWN_POOL = "unknown_pool"
    NOT_ALLOWED_FOR_TIER = "not_allowed_for_tier"
    NO_VISION = "no_vision"
    NO_TOOLS = "no_tools"
    CONTEXT_TOO_SMALL = "context_too_small"
    MAX_TOKENS_TOO_LARGE = "max_tokens_too_large"
    BREAKER_OPEN = "breaker_open"
    CREDIT_EXHAUSTED = "credit_exhausted"
    NO_KEY = "no_key"

    @property
    def attempt_error(self) -> str:
        """The `error` of the attempt that records this skip: `SKIPPED_<REASON>` (docs/protocol.md)."""
        return f"SKIPPED_{self.value.upper()}"


_TRANSIENT = frozenset({Skip.BREAKER_OPEN, Skip.CREDIT_EXHAUSTED})


class AccountRoute(msgspec.Struct, kw_only=True):
    """An account's own route for a use case, for one tier or for every tier (`*`)."""

    account: str
    use_case: str
    tier: str
    targets: list[Target]
    key_ref: str | None = None


class Needs(msgspec.Struct, kw_only=True):
    """What a request asks of a target: what selection looks at, and all it looks at."""

    use_case: str
    tier: str = "default"
    account: str = ""
    model: str | None = None
    image: bool = False
    tools: bool = False
    prompt_tokens: int = 0
    max_tokens: int | None = None


class Skipped(msgspec.Struct, kw_only=True):
    pool: str
    model: str
    reason: Skip
    detail: str

    def __str__(self) -> str:
        return f"{self.pool}:{self.model} ({self.reason}: {self.detail})"


class Selection(msgspec.Struct, kw_only=True):
    """The chain to try, in order, and every target left out with its reason.

    `code` is set when the chain is empty: the error the request is refused with, `message` saying
    why (naming every skipped target)."""

    chain: list[Target]
    skipped: list[Skipped]
    source: Source
    code: ErrorCode | None = None
    message: str = ""
    unknown_models: list[Target] = []
    """Targets (chosen or skipped) whose model the model table does not know: used as configured."""
    prompt_tokens: int = 0
    """The prompt estimate the window checks used."""

    def attempts(self) -> list[Attempt]:
        """The skipped targets as attempts for the work item, so the `done` and the event show them."""
        return [Attempt(pool=s.pool, model=s.model, error=s.reason.attempt_error) for s in self.skipped]


def needs(req: Request) -> Needs:
    """What `req` asks of a target, with its prompt estimated (see CHARS_PER_TOKEN, IMAGE_TOKENS)."""
    assert req.use_case is not None
    chars = images = 0
    for m in req.messages:
        content = m.content
        if isinstance(content, str):
            chars += len(content)
        elif content:
            for part in content:
                if isinstance(part, TextPart):
                    chars += len(part.text)
                else:
                    images += 1
        if m.tool_calls:
            for call in m.tool_calls:
                chars += len(call.name) + len(msgspec.json.encode(call.arguments))
    if req.tools:
        for tool in req.tools:
            chars += len(tool.name) + len(tool.description) + len(msgspec.json.encode(tool.parameters))
    return Needs(
        use_case=req.use_case,
        tier=req.tier,
        account=req.account,
        model=req.model,
        image=images > 0,
        tools=bool(req.tools),
        prompt_tokens=-(-chars // CHARS_PER_TOKEN) + images * IMAGE_TOKENS,
        max_tokens=req.max_tokens,
    )


def select(
    cfg: Config,
    req: Request,
    health: Health,
    *,
    account_route: AccountRoute | None = None,
    now_ms: int,
    models: ModelLookup = model_info,
) -> Selection:
    """The chain for `req`; never raises for a request that passed the door. An empty chain comes
    with the error code to refuse the request with (NO_ROUTE, CONTEXT_TOO_LONG, PROVIDER_UNAVAILABLE,
    UNAUTHORIZED when a target was skipped only for its missing key)."""
    return choose(cfg, needs(req), health, account_route=account_route, now_ms=now_ms, models=models)


def choose(
    cfg: Config,
    want: Needs,
    health: Health,
    *,
    account_route: AccountRoute | None = None,
    now_ms: int,
    models: ModelLookup = model_info,
) -> Selection:
    """`select()` for what a request needs rather than a request (`explain` has no request)."""
    source, candidates, skipped, why = _candidates(cfg, want, account_route)
    chain: list[Target] = []
    unknown: list[Target] = []
    for t in candidates:
        pool = cfg.pools.get(t.pool)
        if pool is None:
            skipped.append(Skipped(pool=t.pool, model=t.model, reason=Skip.UNKNOWN_POOL,
                                   detail=f"pool {t.pool!r} is not in the config"))
            continue
        provider = cfg.providers[pool.provider]
        info = models(cfg, provider.format, t.model)
        if not info.known:
            unknown.append(t)
        skip = _unfit(info, want) or _unavailable(t.pool, pool.provider, provider.api_key_env, health, now_ms)
        if skip is None:
            chain.append(t)
        else:
            skipped.append(Skipped(pool=t.pool, model=t.model, reason=skip[0], detail=skip[1]))
    if chain:
        return Selection(chain=chain, skipped=skipped, source=source, unknown_models=unknown,
                         prompt_tokens=want.prompt_tokens)
    code, message = _verdict(skipped, why, want)
    return Selection(chain=chain, skipped=skipped, source=source, code=code, message=message,
                     unknown_models=unknown, prompt_tokens=want.prompt_tokens)


def _unfit(info: ModelInfo, want: Needs) -> tuple[Skip, str] | None:
    """Why the model cannot serve this request whenever it is asked; None when it can (or may)."""
    if want.image and info.vision is False:
        return Skip.NO_VISION, f"model {info.name} does not accept images"
    if want.tools and info.tools is False:
        return Skip.NO_TOOLS, f"model {info.name} does not call tools"
    most = info.max_output_tokens
    if want.max_tokens is not None and most is not None and want.max_tokens > most:
        return Skip.MAX_TOKENS_TOO_LARGE, (
            f"max_tokens {want.max_tokens:,} is more than model {info.name} can write ({most:,})"
        )
    window = info.context_window
    if window is not None:
        answer = want.max_tokens
        if answer is None:
            answer = DEFAULT_OUTPUT_TOKENS if most is None else min(most, DEFAULT_OUTPUT_TOKENS)
        if want.prompt_tokens + answer > window:
            return Skip.CONTEXT_TOO_SMALL, (
                f"about {want.prompt_tokens:,} prompt tokens + {answer:,} for the answer"
                f" do not fit its window of {window:,}"
            )
    return None


def _unavailable(
    pool: str, provider: str, key_env: str | None, health: Health, now_ms: int
) -> tuple[Skip, str] | None:
    """Why the target cannot be called now; None when it can."""
    if health.pool_open(pool, now_ms):
        return Skip.BREAKER_OPEN, f"pool {pool}'s breaker is open"
    if health.provider_exhausted(provider, now_ms):
        return Skip.CREDIT_EXHAUSTED, f"provider {provider} is out of credit"
    if health.pool_has_key(pool) is False:
        where = f"set {key_env} in the environment of pool {pool}'s workers" if key_env else "check its config"
        return Skip.NO_KEY, f"pool {pool}'s workers have no API key for provider {provider}: {where}"
    return None


def _verdict(skipped: Sequence[Skipped], why: str, want: Needs) -> tuple[ErrorCode, str]:
    """The refusal for an empty chain. Targets skipped for what they can do never serve the request;
    among the others, one that is only down for now makes it PROVIDER_UNAVAILABLE (retryable)."""
    reasons = {s.reason for s in skipped}
    listed = "; ".join(str(s) for s in skipped)
    if not skipped:
        return ErrorCode.NO_ROUTE, why
    if reasons & _TRANSIENT:
        return ErrorCode.PROVIDER_UNAVAILABLE, f"no target can be called now: {listed}"
    if Skip.NO_KEY in reasons:  # a key the operator can set: name it rather than say nothing serves
        return ErrorCode.UNAUTHORIZED, f"no API key for a target that could serve this request: {listed}"
    if Skip.CONTEXT_TOO_SMALL in reasons:
        return ErrorCode.CONTEXT_TOO_LONG, (
            f"the prompt (about {want.prompt_tokens:,} tokens) and the answer fit no target's context window: {listed}"
        )
    if Skip.MAX_TOKENS_TOO_LARGE in reasons:
        return ErrorCode.INVALID_REQUEST, (
            f"max_tokens {want.max_tokens:,} is more than every target can write: {listed}"
        )
    return ErrorCode.NO_ROUTE, f"{why or 'no target can serve this request'}: {listed}"


def _candidates(
    cfg: Config, want: Needs, account_route: AccountRoute | None
) -> tuple[Source, list[Target], list[Skipped], str]:
    """The chain before skips, its source, targets already ruled out, and why there is none."""
    if account_route is not None and not account_route.targets:
        account_route = None
    if want.model is None and account_route is not None:
        return Source.ACCOUNT_ROUTE, list(account_route.targets), [], ""
    own, own_source = _own_route(cfg, want)
    if want.model is not None:
        return _forced(cfg, want, want.model, [*(account_route.targets if account_route else []), *own])
    if own:
        return own_source, own, [], ""
    configured = ", ".join(sorted(cfg.routes)) or "none"
    return Source.NONE, [], [], f"no route for use case {want.use_case!r} (configured: {configured})"


def _own_route(cfg: Config, want: Needs) -> tuple[list[Target], Source]:
    tiers = cfg.routes.get(want.use_case)
    if tiers is None:
        return [], Source.NONE
    names = tiers.get(want.tier) if want.tier != "default" else None
    if names:
        return [parse_target(n) for n in names], Source.TIER_ROUTE
    names = tiers.get("default")
    if names:
        return [parse_target(n) for n in names], Source.DEFAULT_ROUTE
    return [], Source.NONE


def _forced(
    cfg: Config, want: Needs, model: str, allowed: list[Target]
) -> tuple[Source, list[Target], list[Skipped], str]:
    chosen = _unique(t for t in allowed if _serves(cfg, t, model))
    if chosen:
        return Source.MODEL_OVERRIDE, chosen, [], ""
    elsewhere = _unique(t for t in _every_target(cfg) if _serves(cfg, t, model))
    tier = cfg.tiers.get(want.tier)
    account = cfg.accounts.get(want.account)
    if elsewhere and ((tier is not None and tier.force_any_model) or (account is not None and account.force_any_model)):
        return Source.MODEL_OVERRIDE, elsewhere, [], ""
    if not elsewhere:
        return Source.MODEL_OVERRIDE, [], [], f"model {model!r} is not served by any configured target"
    detail = (
        f"not on the route of use case {want.use_case!r}, tier {want.tier!r}"
        f" ({', '.join(str(t) for t in allowed) or 'none'}), and neither the tier nor the account may force"
        " other models"
    )
    skipped = [Skipped(pool=t.pool, model=t.model, reason=Skip.NOT_ALLOWED_FOR_TIER, detail=detail) for t in elsewhere]
    return Source.MODEL_OVERRIDE, [], skipped, f"model {model!r} may not be forced by tier {want.tier!r}"


def _serves(cfg: Config, t: Target, model: str) -> bool:
    """`model` names the target: as a bare model name, `pool:model` or `provider:model`."""
    if model == t.model:
        return True
    prefix, sep, name = model.partition(":")
    if not sep or name != t.model:
        return False
    pool = cfg.pools.get(t.pool)
    return prefix == t.pool or (pool is not None and prefix == pool.provider)


def _every_target(cfg: Config) -> Iterable[Target]:
    # The same few targets recur in every use case and tier: parse each once.
    names = dict.fromkeys(name for tiers in cfg.routes.values() for route in tiers.values() for name in route)
    return (parse_target(name) for name in names)


def _unique(targets: Iterable[Target]) -> list[Target]:
    seen: set[tuple[str, str]] = set()
    out: list[Target] = []
    for t in targets:
        if (t.pool, t.model) not in seen:
            seen.add((t.pool, t.model))
            out.append(t)
    return out
