"""The wire messages of protocol version 1, as msgspec Structs.

Every message is a UTF-8 JSON object. New fields always get a default so that
older producers and consumers keep working.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from . import limits as L

VERSION = 1

REPLY_PREFIXES = ("_INBOX.", "llm.res.")

JSONObject = dict[str, object]
NonEmpty = Annotated[str, Meta(min_length=1)]
Token = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]


MetadataKey = Annotated[str, Meta(max_length=L.MAX_METADATA_KEY)]
MetadataValue = Annotated[str, Meta(max_length=L.MAX_METADATA_VALUE)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], Meta(max_length=L.MAX_METADATA)]


# --- request -----------------------------------------------------------------


class TextPart(Struct, tag="text", tag_field="type", kw_only=True):
    text: str


class ImagePart(Struct, tag="image", tag_field="type", kw_only=True, omit_defaults=True):
    """An image given by `url`, or inline as base64 `data` with its `media_type`."""

    url: Annotated[str, Meta(max_length=L.MAX_IMAGE_URL)] | None = None
    data: str | None = None
    media_type: Annotated[str, Meta(max_length=L.MAX_MEDIA_TYPE)] | None = None

    def __post_init__(self) -> None:
        if (self.url is None) == (self.data is None):
            raise ValueError("an image part needs exactly one of `url` or `data`")
        if self.data is not None and not self.media_type:
            raise ValueError("an image part with `data` needs `media_type` (e.g. image/png)")


Part = TextPart | ImagePart


class ToolCall(Struct, kw_only=True):
    id: Annotated[str, Meta(min_length=1, max_length=L.MAX_TOOL_CALL_ID)]
    name: NonEmpty
    arguments: JSONObject = {}
    signature: str | msgspec.UnsetType | None = msgspec.UNSET
    """Opaque state the provider attached to the call (Gemini's thought signature), to be sent back
    with it. UNSET, not None, by default so the field is left out of the JSON when there is none
    while an empty `arguments` is still written; null from a producer counts as none."""


class Message(Struct, kw_only=True, omit_defaults=True):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | Annotated[list[Part], Meta(max_length=L.MAX_PARTS)] | None = None
    tool_calls: Annotated[list[ToolCall], Meta(max_length=L.MAX_TOOL_CALLS)] | None = None
    tool_call_id: Annotated[str, Meta(max_length=L.MAX_TOOL_CALL_ID)] | None = None

    def __post_init__(self) -> None:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message with role `tool` needs `tool_call_id`")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only a message with role `assistant` may carry `tool_calls`")
        if self.content is None and not self.tool_calls:
            raise ValueError("a message needs `content` (or `tool_calls` for role `assistant`)")
        if self.role == "system" and not isinstance(self.content, str):
            raise ValueError("a `system` message's `content` must be a string")


class Tool(Struct, kw_only=True):
    name: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: Annotated[str, Meta(max_length=L.MAX_TOOL_DESCRIPTION)] = ""
    parameters: JSONObject = msgspec.field(default_factory=lambda: {"type": "object", "properties": {}})


class NamedToolChoice(Struct, kw_only=True):
    name: NonEmpty


ToolChoice = Literal["auto", "none", "required"] | NamedToolChoice


class Request(Struct, kw_only=True, omit_defaults=True):
    """An LLM request, published on `llm.req.<use_case>.<account>`."""

    v: Literal[1] = 1
    id: Annotated[str, Meta(min_length=1, max_length=L.MAX_ID)]
    use_case: Token | None = None
    account: Token
    tier: Token = "default"
    messages: Annotated[list[Message], Meta(min_length=1, max_length=L.MAX_MESSAGES)]
    max_tokens: Annotated[int, Meta(gt=0)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    model: Annotated[str, Meta(max_length=L.MAX_MODEL)] | None = None
    stream: bool = False
    tools: Annotated[list[Tool], Meta(max_length=L.MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    reply_to: NonEmpty
    timeout_ms: Annotated[int, Meta(gt=0, le=3_600_000)] = 60_000
    queue_ms: Annotated[int, Meta(ge=0, le=3_600_000)] = 0
    """How long the request may wait for its account's rate limit (from its publish) instead of being
    refused RATE_LIMITED; 0: not at all. At most `timeout_ms` (checked at the door)."""
    metadata: Metadata = {}


# --- replies -----------------------------------------------------------------


class Usage(Struct, kw_only=True, omit_defaults=True):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0


class Attempt(Struct, kw_only=True):
    pool: str
    model: str
    error: str | None = None
    latency_ms: int | None = None


class Chunk(Struct, tag="chunk", tag_field="type", kw_only=True):
    id: str
    seq: int
    text: str


class Done(Struct, tag="done", tag_field="type", kw_only=True):
    id: str
    seq: int
    text: str = ""
    tool_calls: list[ToolCall] = []
    finish_reason: str = "stop"
    provider: str
    model: str
    usage: Usage = msgspec.field(default_factory=Usage)
    cost_usd: float | None = None
    attempts: list[Attempt] = []
    latency_ms: int = 0
    ttft_ms: int | None = None


class Error(Struct, tag="error", tag_field="type", kw_only=True):
    id: str
    seq: int
    code: str
    status: int
    message: str
    retryable: bool
    retry_after_ms: int | None = None


Reply = Chunk | Done | Error


# --- internal hops -------------------------------------------------------------


class Target(Struct, kw_only=True):
    """One step of a route: a pool and the model to ask it for."""

    pool: str
    model: str

    def __str__(self) -> str:
        return f"{self.pool}:{self.model}"


class BudgetLimits(Struct, kw_only=True, frozen=True):
    """The budget a request's reservation was checked against, carried to the worker that settles it so
    that its alerts use the same limits. An amount of None: no budget for that period."""

    daily_usd: float | None = None
    monthly_usd: float | None = None
    alert_at: float = 0.8


class WorkItem(Struct, kw_only=True):
    """What the dispatcher hands to a pool on `llm.work.<pool>`.

    `route[0]` is the target this pool serves; the rest is the fallback chain.
    """

    v: Literal[1] = 1
    request: Request
    route: Annotated[list[Target], Meta(min_length=1)]
    attempts: list[Attempt] = []
    accepted_ms: int
    """When the request was published (its LLM_REQ timestamp, Unix ms); the deadline counts from here."""
    reserved_usd: float = 0.0
    """What the dispatcher reserved against the account's budget; the worker that ends the request settles it
    (0: nothing reserved, nothing to settle)."""
    budget: BudgetLimits | None = None
    """The limits `reserved_usd` was checked against (None: the worker alerts against its config's)."""


class CompletionEvent(Struct, kw_only=True):
    """One per request that ends, on `llm.events.completed`. Never carries the prompt or answer."""

    v: Literal[1] = 1
    id: str
    account: str
    use_case: str
    tier: str = "default"
    status: Literal["ok", "error"]
    code: str | None = None
    provider: str | None = None
    model: str | None = None
    attempts: list[Attempt] = []
    usage: Usage = msgspec.field(default_factory=Usage)
    raw_usage: JSONObject | None = None
    cost_usd: float | None = None
    latency_ms: int = 0
    ttft_ms: int | None = None
    started_ms: int
    finished_ms: int
    prompt_chars: int = 0
    prompt_sha256: str = ""
    finish_reason: str | None = None
    metadata: dict[str, str] = {}
    trace_id: Annotated[str, Meta(pattern="^[0-9a-f]{32}$")] | None = None
    """The request's OpenTelemetry trace id, when it came with a W3C `traceparent` or the fleet traced it."""


__all__ = [
    "REPLY_PREFIXES",
    "VERSION",
    "Attempt",
    "Chunk",
    "CompletionEvent",
    "Done",
    "Error",
    "ImagePart",
    "Message",
    "NamedToolChoice",
    "Part",
    "Reply",
    "Request",
    "Target",
    "TextPart",
    "Tool",
    "ToolCall",
    "ToolChoice",
    "Usage",
    "WorkItem",
]
