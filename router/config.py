"""The routing config: a TOML file decoded once into Structs and validated."""

from __future__ import annotations

import tomllib
import zoneinfo
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from schemas import Target

Name = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]+$")]


class ConfigError(ValueError):
    """The config does not decode or is inconsistent; the message names the field."""


class ProviderConfig(Struct, kw_only=True, forbid_unknown_fields=True):
    format: Literal["openai", "anthropic", "gemini"]
    base_url: str
    api_key_env: str | None = None
    api_key_ref: str | None = None
    headers: dict[str, str] = {}
    genai_prices_id: str | None = None
    """Provider id in genai-prices, when it differs from the provider's name (e.g. `google`)."""
    free: bool = False
    """The provider does not charge (a local model, the demo provider): cost is 0."""
    credit_cooldown_ms: Annotated[int, Meta(ge=1000)] = 900_000
    """How long the whole provider counts as out of credit after a call said so (every pool, every
    replica); its targets are skipped meanwhile."""


class RetryPolicy(Struct, kw_only=True, forbid_unknown_fields=True):
    attempts: Annotated[int, Meta(ge=1, le=20)] = 3
    initial_ms: Annotated[int, Meta(ge=0)] = 100
    multiplier: Annotated[float, Meta(ge=1.0)] = 2.0
    max_ms: Annotated[int, Meta(ge=0)] = 5000
    jitter: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.25


class BreakerPolicy(Struct, kw_only=True, forbid_unknown_fields=True):
    failures: Annotated[int, Meta(ge=1)] = 5
    """Consecutive provider-side failures that open the pool's breaker."""
    cooldown_ms: Annotated[int, Meta(ge=0)] = 60_000
    """How long an open breaker refuses calls before it lets probes through (half-open)."""
    successes: Annotated[int, Meta(ge=1)] = 2
    """Successful probes that close a half-open breaker."""
    probes: Annotated[int, Meta(ge=1)] = 1
    """Probe calls allowed at once while half-open."""


class PoolConfig(Struct, kw_only=True, forbid_unknown_fields=True):
    provider: str
    concurrency: Annotated[int, Meta(ge=1, le=10_000)] = 64
    timeout_ms: Annotated[int, Meta(ge=100)] = 60_000
    ack_wait_ms: Annotated[int, Meta(ge=1000, le=3_600_000)] = 30_000
    """How long a work item may go without an ack or an in-progress beat before JetStream hands it
    to another worker: the time to notice a lost worker. Workers beat every third of it."""
    retry: RetryPolicy = msgspec.field(default_factory=RetryPolicy)
    breaker: BreakerPolicy = msgspec.field(default_factory=BreakerPolicy)
    requests_per_minute: Annotated[int, Meta(ge=1)] | None = None
    """The pool's own limit of calls to its provider, shared by all its worker replicas, spaced evenly
    (no burst); a work item over it waits in the queue for its turn. None: no limit."""
    tokens_per_minute: Annotated[int, Meta(ge=1)] | None = None
    """The pool's own limit of estimated input + output tokens a minute towards its provider, shared by
    all its worker replicas (a minute's worth at once); over it, a work item waits. None: no limit."""


UNLIMITED = "unlimited"
Unlimited = Literal["unlimited"]
"""The spelling of "no limit" for a rate or a budget amount (`per_second = "unlimited"`,
`daily_usd = "unlimited"`); a limit nobody sets is never guessed from a zero."""


class RateLimit(Struct, kw_only=True, forbid_unknown_fields=True):
    per_second: Annotated[float, Meta(gt=0)] | Unlimited = 10
    """Requests per second an account may send, on average; `"unlimited"`: no request rate (with no
    `tokens_per_minute` either, the dispatcher does not look at the rate state at all)."""
    burst: Annotated[int, Meta(ge=1)] = 50
    """Requests an idle account may send at once."""
    tokens_per_minute: Annotated[int, Meta(ge=1)] | None = None
    """Input + output tokens per minute, when set."""


class Budget(Struct, kw_only=True, forbid_unknown_fields=True):
    daily_usd: Annotated[float, Meta(ge=0)] | Unlimited = 100.0
    """USD a day; `"unlimited"`: no daily budget."""
    monthly_usd: Annotated[float, Meta(ge=0)] | Unlimited = 1000.0
    """USD a month; `"unlimited"`: no monthly budget. With neither, nothing is reserved or counted."""
    alert_at: Annotated[float, Meta(gt=0, le=1)] = 0.8


class Limits(Struct, kw_only=True, forbid_unknown_fields=True):
    rate: RateLimit = msgspec.field(default_factory=RateLimit)
    budget: Budget = msgspec.field(default_factory=Budget)


class LimitsConfig(Struct, kw_only=True, forbid_unknown_fields=True):
    """An account's limits: `accounts.<name>`, else `tiers.<tier>` of the request, else `default` (a section
    given replaces the one it overrides whole; what it leaves out takes the built-in defaults)."""

    default: Limits = msgspec.field(default_factory=Limits)
    tiers: dict[str, Limits] = {}
    accounts: dict[str, Limits] = {}
    timezone: str = "UTC"
    """Where budget days and months begin and end (an IANA name, e.g. `Europe/Paris`)."""


class TierConfig(Struct, kw_only=True, forbid_unknown_fields=True):
    force_any_model: bool = False
    """A request of this tier may force (`model`) any model the config serves, not only those of its
    own route."""


Temperature = Literal["any", "max_1", "only_1"]
"""What a model accepts as `temperature`: anything the protocol allows (0–2), at most 1, or only 1."""

PerMTok = Annotated[float, Meta(ge=0)]


class ModelConfig(Struct, kw_only=True, forbid_unknown_fields=True):
    """What the config says about one model, over the built-in table (`router.models`). Unset fields
    keep the table's value; a model only the config describes is used as described."""

    context_window: Annotated[int, Meta(ge=1)] | None = None
    """Input + output tokens."""
    max_output_tokens: Annotated[int, Meta(ge=1)] | None = None
    vision: bool | None = None
    tools: bool | None = None
    temperature: Temperature | None = None
    input_usd_per_mtok: PerMTok | None = None
    """Price of a million input tokens in USD; with `output_usd_per_mtok`, wins over genai-prices."""
    output_usd_per_mtok: PerMTok | None = None
    free: bool = False
    """The model costs nothing wherever it is served (a self-hosted model): cost is 0."""


class AccountConfig(Struct, kw_only=True, forbid_unknown_fields=True):
    force_any_model: bool = False
    """This account's requests may force (`model`) any model the config serves, whatever their tier."""


class AuditConfig(Struct, kw_only=True, forbid_unknown_fields=True):
    events_retention_days: Annotated[int, Meta(ge=1, le=365)] = 7
    """How long the LLM_EVENTS stream keeps a completion event (its max age): an event the auditor has not
    written by then is lost. Applied to the stream by each process at start and by `config push`;
    `switchyard status` warns once the oldest unwritten event is half this old."""
    retention_days: Annotated[int, Meta(ge=1)] | None = None
    """How long the ledger keeps a row (`llm_audit`, by the time its request finished): every auditor
    deletes older rows, in small batches, at start and then every hour. None: rows are kept for good."""


class Config(Struct, kw_only=True, forbid_unknown_fields=True):
    subject_prefix: Name = "llm"
    providers: dict[Name, ProviderConfig]
    pools: dict[Name, PoolConfig]
    routes: dict[Name, dict[Name, list[str]]]
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    tiers: dict[Name, TierConfig] = {}
    accounts: dict[Name, AccountConfig] = {}
    models: dict[str, ModelConfig] = {}
    """Keyed by the model name as routes and requests spell it."""
    audit: AuditConfig = msgspec.field(default_factory=AuditConfig)

    def route(self, use_case: str, tier: str) -> list[Target] | None:
        """The targets for use case × tier, falling back to the use case's `default` tier."""
        tiers = self.routes.get(use_case)
        if tiers is None:
            return None
        names = tiers.get(tier) or tiers.get("default")
        if not names:
            return None
        return [parse_target(n) for n in names]


def parse_target(name: str) -> Target:
    pool, sep, model = name.partition(":")
    if not sep or not pool or not model:
        raise ValueError(f"target {name!r} is not of the form `pool:model`")
    return Target(pool=pool, model=model)


def _check(cfg: Config) -> None:
    try:
        zoneinfo.ZoneInfo(cfg.limits.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"limits.timezone: unknown time zone {cfg.limits.timezone!r} (an IANA name such as"
                          " `UTC` or `Europe/Paris`)") from None
    for name, pool in cfg.pools.items():
        if pool.provider not in cfg.providers:
            raise ConfigError(f"pools.{name}.provider: unknown provider {pool.provider!r}")
    for use_case, tiers in cfg.routes.items():
        for tier, targets in tiers.items():
            where = f"routes.{use_case}.{tier}"
            if not targets:
                raise ConfigError(f"{where}: needs at least one target")
            for i, t in enumerate(targets):
                try:
                    target = parse_target(t)
                except ValueError as exc:
                    raise ConfigError(f"{where}[{i}]: {exc}") from None
                if target.pool not in cfg.pools:
                    raise ConfigError(f"{where}[{i}]: unknown pool {target.pool!r}")
    for name, model in cfg.models.items():
        _check_model(name, model)
    for name, prov in cfg.providers.items():
        if prov.api_key_ref is not None:  # accepted only once something reads it: never ignored silently
            raise ConfigError(f"providers.{name}.api_key_ref: keys stored encrypted in the database are found by the"
                              " name api_key_env gives (`switchyard keys set NAME`), not by a reference; remove"
                              " api_key_ref")
        if not prov.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"providers.{name}.base_url: must start with http:// or https://")


def _check_model(name: str, model: ModelConfig) -> None:
    where = f'models."{name}"'
    if (model.input_usd_per_mtok is None) != (model.output_usd_per_mtok is None):
        missing = "input_usd_per_mtok" if model.input_usd_per_mtok is None else "output_usd_per_mtok"
        raise ConfigError(f"{where}.{missing}: needed with the other price, a price is both or neither")
    if model.free and model.input_usd_per_mtok is not None:
        raise ConfigError(f"{where}.free: a free model has no price; set `free` or the prices, not both")
    window, out = model.context_window, model.max_output_tokens
    if window is not None and out is not None and out > window:
        raise ConfigError(f"{where}.max_output_tokens: {out} is more than the context_window {window}")


def _convert(raw: object, typ: type[Any], where: str) -> Any:
    try:
        return msgspec.convert(raw, typ)
    except msgspec.ValidationError as exc:
        msg, sep, path = str(exc).rpartition(" - at `$")
        if not sep:
            raise ConfigError(f"{where or 'config'}: {exc}") from None
        path = path.rstrip("`")
        path = path if path.startswith("[") else path.lstrip(".")
        dotted = f"{where}.{path}" if where and path and not path.startswith("[") else f"{where}{path}"
        raise ConfigError(f"{dotted}: {msg}") from None


def _named_sections(raw: Mapping[str, object]) -> None:
    """Check each named entry on its own, so an error names its pool/provider/route, not `[...]`."""
    for section, typ in (("providers", ProviderConfig), ("pools", PoolConfig)):
        entries = raw.get(section)
        if isinstance(entries, dict):
            for key, value in entries.items():
                _convert(value, typ, f"{section}.{key}")
    models = raw.get("models")
    if isinstance(models, dict):
        for key, value in models.items():
            # Model names hold dots (`gemini-2.5-flash`), so the name is quoted as TOML would.
            _convert(value, ModelConfig, f'models."{key}"')
    routes = raw.get("routes")
    if isinstance(routes, dict):
        for use_case, tiers in routes.items():
            if isinstance(tiers, dict):
                for tier, targets in tiers.items():
                    _convert(targets, list[str], f"routes.{use_case}.{tier}")
    limits = raw.get("limits")
    for part in ("tiers", "accounts"):
        named = limits.get(part) if isinstance(limits, dict) else None
        if isinstance(named, dict):
            for key, value in named.items():
                _convert(value, Limits, f"limits.{part}.{key}")


def from_mapping(raw: Mapping[str, object]) -> Config:
    """Validate a decoded config. Raises ConfigError whose message starts with the field's path."""
    _named_sections(raw)
    cfg: Config = _convert(raw, Config, "")
    _check(cfg)
    return cfg


def load(path: Path) -> Config:
    """Read and validate a TOML config file. Raises ConfigError naming the bad field."""
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return from_mapping(raw)


def encode(cfg: Config) -> bytes:
    return msgspec.json.encode(cfg)


def decode(data: bytes) -> Config:
    return from_mapping(msgspec.json.decode(data))
