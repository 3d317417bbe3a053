"""Anthropic Messages API format (`POST /v1/messages`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, NamedTuple

import httpx

from schemas import ImagePart, Message, NamedToolChoice, Request, TextPart, ToolCall, Usage

from .. import models
from ..config import Temperature
from ..errors import ErrorCode, ProviderFailure, StreamBroken
from .base import Event, Finished, HttpCall, TextDelta, error_body, event_json, retry_after_ms
from .sse import SSEvent

format = "anthropic"

API_VERSION = "2023-06-01"

# Anthropic requires `max_tokens`; our requests may leave it out.
DEFAULT_MAX_TOKENS = 1024

# Our temperature range is OpenAI's (0–2); Anthropic rejects anything above 1.
_MAX_TEMPERATURE = 1.0

_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

_TOOL_CHOICE: dict[str, dict[str, object]] = {
    "auto": {"type": "auto"},
    "none": {"type": "none"},
    "required": {"type": "any"},
}


# --- request -------------------------------------------------------------------


def _block(part: TextPart | ImagePart) -> dict[str, object]:
    match part:
        case TextPart(text=text):
            return {"type": "text", "text": text}
        case ImagePart(url=str(url)):
            return {"type": "image", "source": {"type": "url", "url": url}}
        case ImagePart(data=data, media_type=media_type):
            return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    raise AssertionError(f"unknown content part {part!r}")  # pragma: no cover


def _content(content: str | list[TextPart | ImagePart] | None) -> str | list[dict[str, object]]:
    if content is None:
        return []
    if isinstance(content, str):
        return content
    return [_block(p) for p in content]


def _assistant(msg: Message) -> dict[str, object]:
    if not msg.tool_calls:
        return {"role": "assistant", "content": _content(msg.content)}
    blocks: list[dict[str, object]] = []
    text = _content(msg.content)
    # The API rejects empty text blocks, and a tool-calling turn often has no text.
    if isinstance(text, str):
        if text:
            blocks.append({"type": "text", "text": text})
    else:
        blocks.extend(text)
    blocks.extend(
        {"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments} for c in msg.tool_calls
    )
    return {"role": "assistant", "content": blocks}


def _tool_result(msg: Message) -> dict[str, object]:
    return {"type": "tool_result", "tool_use_id": msg.tool_call_id, "content": _content(msg.content)}


def _messages(messages: list[Message]) -> tuple[list[str], list[dict[str, object]]]:
    """The system prompts, and the turns in Anthropic's shape.

    Tool results go back as `tool_result` blocks of a user turn; consecutive ones share
    one turn, since the API wants every result of a tool-calling turn in the next user turn.
    """
    system: list[str] = []
    out: list[dict[str, object]] = []
    results: list[dict[str, object]] | None = None
    for msg in messages:
        if msg.role == "tool":
            if results is None:
                results = []
                out.append({"role": "user", "content": results})
            results.append(_tool_result(msg))
            continue
        results = None
        if msg.role == "system":
            system.append(str(msg.content))
        elif msg.role == "assistant":
            out.append(_assistant(msg))
        else:
            out.append({"role": "user", "content": _content(msg.content)})
    return system, out


def build(
    req: Request,
    *,
    model: str,
    base_url: str,
    api_key: str | None,
    headers: Mapping[str, str],
    temperature_rule: Temperature | None = None,
) -> HttpCall:
    """The HTTP call for `req`. `temperature_rule` is the config's rule for `model`
    (`router.models.model_info(...).temperature`); without it, the built-in table's."""
    system, messages = _messages(req.messages)
    body: dict[str, object] = {
        "model": model,
        "max_tokens": req.max_tokens if req.max_tokens is not None else DEFAULT_MAX_TOKENS,
        "messages": messages,
    }
    if len(system) == 1:
        body["system"] = system[0]
    elif system:
        body["system"] = [{"type": "text", "text": s} for s in system]
    temperature = models.clamp_temperature(
        temperature_rule or models.temperature_rule(format, model), req.temperature
    )
    if temperature is not None:
        # The API caps every model at 1, whatever the config says of it.
        body["temperature"] = min(temperature, _MAX_TEMPERATURE)
    if req.tools:
        tools: list[dict[str, object]] = []
        for t in req.tools:
            tool: dict[str, object] = {"name": t.name}
            if t.description:
                tool["description"] = t.description
            tool["input_schema"] = t.parameters
            tools.append(tool)
        body["tools"] = tools
        # A tool choice only means something alongside tools; without them it is left out.
        match req.tool_choice:
            case NamedToolChoice(name=name):
                body["tool_choice"] = {"type": "tool", "name": name}
            case str(choice):
                body["tool_choice"] = _TOOL_CHOICE[choice]
    if req.stream:
        body["stream"] = True
    h = {"content-type": "application/json", "anthropic-version": API_VERSION, **headers}
    if api_key:
        h["x-api-key"] = api_key
    return HttpCall(url=base_url.rstrip("/") + "/v1/messages", headers=h, body=body)


def probe(*, base_url: str, api_key: str | None, headers: Mapping[str, str]) -> HttpCall:
    """The cheapest call that proves the base URL and the key: one model of `GET /v1/models` (no tokens)."""
    h = {"anthropic-version": API_VERSION, **headers}
    if api_key:
        h["x-api-key"] = api_key
    return HttpCall(url=base_url.rstrip("/") + "/v1/models?limit=1", headers=h, body={})


# --- response ------------------------------------------------------------------


def _int(raw: Mapping[str, object], key: str) -> int:
    value = raw.get(key)
    return value if isinstance(value, int) else 0


def _usage(raw: Mapping[str, object]) -> Usage:
    """Our Usage from Anthropic's, whose `input_tokens` leaves out cache reads and writes."""
    read = _int(raw, "cache_read_input_tokens")
    write = _int(raw, "cache_creation_input_tokens")
    details = raw.get("output_tokens_details")
    return Usage(
        input_tokens=_int(raw, "input_tokens") + read + write,
        output_tokens=_int(raw, "output_tokens"),
        cache_read_tokens=read,
        cache_write_tokens=write,
        reasoning_tokens=_int(details, "thinking_tokens") if isinstance(details, dict) else 0,
    )


def _arguments(name: str, raw: object) -> dict[str, object]:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except ValueError as exc:
            raise StreamBroken(f"tool call {name!r} came with input that is not JSON") from exc
    if not isinstance(raw, dict):
        raise StreamBroken(f"tool call {name!r} came with input that is not a JSON object")
    return raw


def _finish(stop_reason: object) -> str:
    return _FINISH.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def parse_response(body: bytes) -> list[Event]:
    """Events of a whole (non-streamed) message. Raises ProviderFailure when it is not one."""
    try:
        data = json.loads(body)
        blocks = data["content"]
        raw_usage = data.get("usage") or {}
        texts = [b["text"] for b in blocks if b["type"] == "text"]
        calls = [
            ToolCall(id=b["id"], name=b["name"], arguments=_arguments(b["name"], b.get("input")))
            for b in blocks
            if b["type"] == "tool_use"
        ]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ProviderFailure(
            ErrorCode.PROVIDER_ERROR, "the provider's answer is not an Anthropic message", retry=True
        ) from exc
    if not isinstance(raw_usage, dict):
        raw_usage = {}
    events: list[Event] = []
    if "".join(texts):
        events.append(TextDelta("".join(texts)))
    events.append(
        Finished(
            finish_reason=_finish(data.get("stop_reason")),
            usage=_usage(raw_usage),
            raw_usage=raw_usage or None,
            tool_calls=calls,
            model=data.get("model"),
        )
    )
    return events


class _ToolBlock(NamedTuple):
    id: str
    name: str
    fragments: list[str]


class _StreamParser:
    """Folds Anthropic's stream events into TextDeltas and one Finished."""

    def __init__(self) -> None:
        self.done = False
        self.stop_reason: object = None
        self.model: str | None = None
        self.raw_usage: dict[str, object] = {}
        self.tools: dict[int, _ToolBlock] = {}

    def feed(self, event: SSEvent) -> list[Event]:
        data = event_json(event)
        kind = data.get("type") or event.event
        if kind == "error":
            err = data.get("error")
            err_type = err.get("type") if isinstance(err, dict) else None
            raise StreamBroken(f"the provider reported an error mid-stream ({err_type or 'unknown'})")
        try:
            return self._apply(kind, data)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise StreamBroken(f"the provider sent a malformed {str(kind)[:40]} event") from exc

    def _apply(self, kind: object, data: Any) -> list[Event]:
        match kind:
            case "message_start":
                self.model = data["message"].get("model") or self.model
                self._merge_usage(data["message"].get("usage"))
            case "content_block_start":
                block = data["content_block"]
                if block["type"] == "tool_use":
                    self.tools[int(data["index"])] = _ToolBlock(block["id"], block["name"], [])
                elif block["type"] == "text" and block.get("text"):
                    return [TextDelta(block["text"])]
            case "content_block_delta":
                delta = data["delta"]
                if delta["type"] == "text_delta" and delta["text"]:
                    return [TextDelta(delta["text"])]
                if delta["type"] == "input_json_delta":
                    self.tools[int(data["index"])].fragments.append(delta["partial_json"])
            case "message_delta":
                self.stop_reason = data["delta"].get("stop_reason") or self.stop_reason
                self._merge_usage(data.get("usage"))
            case "message_stop":
                self.done = True
        # `ping`, `content_block_stop`, thinking deltas and event types added after this
        # adapter was written carry nothing we report.
        return []

    def _merge_usage(self, usage: object) -> None:
        # Counts on a later event are cumulative, so they replace the earlier ones.
        if isinstance(usage, dict):
            self.raw_usage.update({k: v for k, v in usage.items() if v is not None})

    def close(self) -> list[Event]:
        if not self.done:
            raise StreamBroken("the provider's stream ended before its message_stop event")
        calls = [
            ToolCall(id=t.id, name=t.name, arguments=_arguments(t.name, "".join(t.fragments)))
            for _, t in sorted(self.tools.items())
        ]
        return [
            Finished(
                finish_reason=_finish(self.stop_reason),
                usage=_usage(self.raw_usage),
                raw_usage=self.raw_usage or None,
                tool_calls=calls,
                model=self.model,
            )
        ]


def stream_parser() -> _StreamParser:
    return _StreamParser()


# --- errors ----------------------------------------------------------------------


class _Rule(NamedTuple):
    code: ErrorCode
    retry: bool
    summary: str
    echo: bool = False
    """Append the provider's message: only where it helps the caller and cannot hold a secret."""
    credit_exhausted: bool = False


# One table keyed by Anthropic's `error.type`; the HTTP status stands in when the body has none.
_RULES: dict[str, _Rule] = {
    "rate_limit_error": _Rule(ErrorCode.PROVIDER_ERROR, True, "the provider is rate limiting"),
    "overloaded_error": _Rule(ErrorCode.PROVIDER_ERROR, True, "the provider is overloaded"),
    "api_error": _Rule(ErrorCode.PROVIDER_ERROR, True, "the provider failed"),
    "timeout_error": _Rule(ErrorCode.PROVIDER_ERROR, True, "the provider timed out"),
    "authentication_error": _Rule(ErrorCode.UNAUTHORIZED, False, "the provider rejected the API key"),
    "permission_error": _Rule(ErrorCode.UNAUTHORIZED, False, "the API key may not use this resource"),
    "billing_error": _Rule(
        ErrorCode.PROVIDER_UNAVAILABLE, False, "the provider account has a billing problem",
        credit_exhausted=True,
    ),
    "not_found_error": _Rule(
        ErrorCode.PROVIDER_ERROR, False, "the provider does not know this model or endpoint"
    ),
    "request_too_large": _Rule(ErrorCode.INVALID_REQUEST, False, "the request body is too large"),
    "invalid_request_error": _Rule(
        ErrorCode.INVALID_REQUEST, False, "the provider refused the request", echo=True
    ),
}

_TYPE_OF_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}

# An invalid_request_error is refined by its message: the API has no finer type for these.
_REFINED: tuple[tuple[str, _Rule], ...] = (
    ("prompt is too long", _Rule(
        ErrorCode.CONTEXT_TOO_LONG, False, "the prompt is longer than the model's context window")),
    ("exceed context limit", _Rule(
        ErrorCode.CONTEXT_TOO_LONG, False, "the prompt and max_tokens exceed the model's context window")),
    ("credit balance is too low", _Rule(
        ErrorCode.PROVIDER_UNAVAILABLE, False, "the provider account has no credit left",
        credit_exhausted=True)),
)

_AUTH_STATUSES = (401, 403)


def _rule(status: int, err_type: str, message: str) -> _Rule:
    if status in _AUTH_STATUSES:
        # Whatever the body says, a rejected key is a rejected key.
        err_type = _TYPE_OF_STATUS[status]
    elif err_type not in _RULES:
        err_type = _TYPE_OF_STATUS.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    if err_type == "invalid_request_error":
        lowered = message.lower()
        for phrase, rule in _REFINED:
            if phrase in lowered:
                return rule
    return _RULES[err_type]


def translate_error(status: int, headers: httpx.Headers, body: bytes) -> ProviderFailure:
    """Our ProviderFailure for an HTTP error answer. Never echoes the key or an auth error's text."""
    err = error_body(body).get("error")
    err = err if isinstance(err, dict) else {}
    err_type = str(err.get("type") or "")
    message = str(err.get("message") or "")
    rule = _rule(status, err_type, message)
    text = f"{rule.summary} (HTTP {status})"
    if rule.echo and message:
        text = f"{text}: {message[:300]}"
    return ProviderFailure(
        rule.code,
        text,
        retry=rule.retry,
        retry_after_ms=retry_after_ms(headers) if rule.retry else None,
        http_status=status,
        credit_exhausted=rule.credit_exhausted,
    )
