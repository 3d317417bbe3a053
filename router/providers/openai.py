"""OpenAI Chat Completions format: OpenAI, and every OpenAI-compatible endpoint."""

from __future__ import annotations

import json
from collections.abc import Mapping

import httpx

from schemas import ImagePart, Message, NamedToolChoice, Request, TextPart, ToolCall, Usage

from .. import models
from ..config import Temperature
from ..errors import ErrorCode, ProviderFailure, StreamBroken
from .base import Event, Finished, HttpCall, TextDelta, error_body, event_json, retry_after_ms
from .sse import SSEvent

format = "openai"

_FINISH = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}


def _content(msg: Message) -> str | list[dict[str, object]] | None:
    if msg.content is None or isinstance(msg.content, str):
        return msg.content
    parts: list[dict[str, object]] = []
    for part in msg.content:
        match part:
            case TextPart(text=text):
                parts.append({"type": "text", "text": text})
            case ImagePart(url=str(url)):
                parts.append({"type": "image_url", "image_url": {"url": url}})
            case ImagePart(data=str(data), media_type=media_type):
                parts.append({"type": "image_url", "image_url": {"url": f"data:{media_type};base64,{data}"}})
    return parts


def _message(msg: Message) -> dict[str, object]:
    out: dict[str, object] = {"role": msg.role, "content": _content(msg)}
    if msg.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": json.dumps(c.arguments)},
            }
            for c in msg.tool_calls
        ]
    if msg.tool_call_id is not None:
        out["tool_call_id"] = msg.tool_call_id
    return out


def _max_tokens_field(base_url: str) -> str:
    """OpenAI's own API wants `max_completion_tokens` (its reasoning models refuse `max_tokens`);
    OpenAI-compatible servers (vLLM, Ollama, Groq, Z.ai, ...) know `max_tokens`."""
    return "max_completion_tokens" if httpx.URL(base_url).host == "api.openai.com" else "max_tokens"


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
    body: dict[str, object] = {"model": model, "messages": [_message(m) for m in req.messages]}
    if req.max_tokens is not None:
        body[_max_tokens_field(base_url)] = req.max_tokens
    temperature = models.clamp_temperature(
        temperature_rule or models.temperature_rule(format, model), req.temperature
    )
    if temperature is not None:
        body["temperature"] = temperature
    if req.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {"name": t.name, "parameters": t.parameters}
                | ({"description": t.description} if t.description else {}),
            }
            for t in req.tools
        ]
    match req.tool_choice if req.tools else None:
        case NamedToolChoice(name=name):
            body["tool_choice"] = {"type": "function", "function": {"name": name}}
        case str(choice):
            body["tool_choice"] = choice
    if req.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    h = {"content-type": "application/json", **headers}
    if api_key:
        h["authorization"] = f"Bearer {api_key}"
    return HttpCall(url=base_url.rstrip("/") + "/chat/completions", headers=h, body=body)


def probe(*, base_url: str, api_key: str | None, headers: Mapping[str, str]) -> HttpCall:
    """The cheapest call that proves the base URL and the key: `GET /models` (no tokens, no cost)."""
    h = dict(headers)
    if api_key:
        h["authorization"] = f"Bearer {api_key}"
    return HttpCall(url=base_url.rstrip("/") + "/models", headers=h, body={})


# OpenAI keeps type `insufficient_quota` and names the cause in `code` for these.
_CREDIT_CODES = frozenset({
    "credit_balance_exhausted",
    "organization_spend_limit_exceeded",
    "project_spend_limit_exceeded",
    "organization_usage_limit_exceeded",
})


def _usage(raw: object) -> tuple[Usage, dict[str, object] | None]:
    if not isinstance(raw, dict):
        return Usage(), None
    prompt = raw.get("prompt_tokens_details") or {}
    completion = raw.get("completion_tokens_details") or {}
    return (
        Usage(
            input_tokens=int(raw.get("prompt_tokens") or 0),
            output_tokens=int(raw.get("completion_tokens") or 0),
            cache_read_tokens=int(prompt.get("cached_tokens") or 0),
            reasoning_tokens=int(completion.get("reasoning_tokens") or 0),
        ),
        raw,
    )


def _tool_call(raw_id: str, name: str, arguments: object) -> ToolCall:
    # Some OpenAI-compatible servers send the arguments as an object rather than a JSON string.
    try:
        if isinstance(arguments, str):
            args = json.loads(arguments) if arguments.strip() else {}
        else:
            args = arguments if arguments is not None else {}
    except ValueError as exc:
        raise StreamBroken(f"tool call {name!r} came with arguments that are not JSON") from exc
    if not isinstance(args, dict):
        raise StreamBroken(f"tool call {name!r} came with arguments that are not a JSON object")
    return ToolCall(id=raw_id, name=name, arguments=args)


def parse_response(body: bytes) -> list[Event]:
    try:
        data = json.loads(body)
        choice = data["choices"][0]
        msg = choice["message"]
        if not isinstance(msg, dict):
            raise TypeError("message is not an object")
        calls = [
            _tool_call(c["id"], c["function"]["name"], c["function"].get("arguments"))
            for c in msg.get("tool_calls") or []
        ]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ProviderFailure(
            ErrorCode.PROVIDER_ERROR, "the provider's answer is not a chat completion", retry=True
        ) from exc
    usage, raw_usage = _usage(data.get("usage"))
    events: list[Event] = []
    if msg.get("content"):
        events.append(TextDelta(msg["content"]))
    events.append(
        Finished(
            finish_reason=_FINISH.get(choice.get("finish_reason") or "stop", "stop"),
            usage=usage,
            raw_usage=raw_usage,
            tool_calls=calls,
            model=data.get("model"),
        )
    )
    return events


class _StreamParser:
    def __init__(self) -> None:
        self.finish: str | None = None
        self.done = False
        self.usage = Usage()
        self.raw_usage: dict[str, object] | None = None
        self.model: str | None = None
        self.calls: dict[int, list[str]] = {}  # index -> [id, name, arguments]

    def feed(self, event: SSEvent) -> list[Event]:
        if event.data == "[DONE]":
            self.done = True
            return []
        data = event_json(event)
        if "error" in data:
            raise StreamBroken("the provider reported an error mid-stream")
        self.model = data.get("model") or self.model
        if data.get("usage"):
            self.usage, self.raw_usage = _usage(data["usage"])
        out: list[Event] = []
        for choice in data.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                out.append(TextDelta(delta["content"]))
            for frag in delta.get("tool_calls") or []:
                slot = self.calls.setdefault(int(frag.get("index", 0)), ["", "", ""])
                fn = frag.get("function") or {}
                slot[0] = frag.get("id") or slot[0]
                slot[1] = fn.get("name") or slot[1]
                slot[2] += fn.get("arguments") or ""
            if choice.get("finish_reason"):
                self.finish = _FINISH.get(choice["finish_reason"], "stop")
        return out

    def close(self) -> list[Event]:
        if not self.done or self.finish is None:
            raise StreamBroken("the provider's stream ended before its final event")
        calls = [_tool_call(i or f"call_{n}", name, args) for n, (i, name, args) in sorted(self.calls.items())]
        return [
            Finished(
                finish_reason=self.finish,
                usage=self.usage,
                raw_usage=self.raw_usage,
                tool_calls=calls,
                model=self.model,
            )
        ]


def stream_parser() -> _StreamParser:
    return _StreamParser()


def translate_error(status: int, headers: httpx.Headers, body: bytes) -> ProviderFailure:
    """One table: HTTP status and OpenAI error code → our code. Never echoes the key."""
    err = error_body(body).get("error")
    err = err if isinstance(err, dict) else {}
    code = str(err.get("code") or "")
    kind = str(err.get("type") or "")
    delay = retry_after_ms(headers)
    if "insufficient_quota" in (code, kind) or code in _CREDIT_CODES:
        return ProviderFailure(
            ErrorCode.PROVIDER_UNAVAILABLE,
            "the provider account has no credit left (insufficient_quota)",
            retry=False,
            http_status=status,
            credit_exhausted=True,
        )
    if status in (401, 403):
        return ProviderFailure(
            ErrorCode.UNAUTHORIZED, f"the provider rejected the API key (HTTP {status})", retry=False,
            http_status=status,
        )
    if code == "context_length_exceeded":
        return ProviderFailure(
            ErrorCode.CONTEXT_TOO_LONG, "the prompt is longer than the model's context window", retry=False,
            http_status=status,
        )
    if status == 429:
        return ProviderFailure(
            ErrorCode.PROVIDER_ERROR, "the provider is rate limiting (HTTP 429)", retry=True,
            retry_after_ms=delay, http_status=status,
        )
    if status in (408, 409) or status >= 500:
        return ProviderFailure(
            ErrorCode.PROVIDER_ERROR, f"the provider failed (HTTP {status})", retry=True,
            retry_after_ms=delay, http_status=status,
        )
    if status == 404:
        return ProviderFailure(
            ErrorCode.PROVIDER_ERROR, "the provider does not know this model or endpoint (HTTP 404)",
            retry=False, http_status=status,
        )
    detail = str(err.get("message") or "")[:300]
    return ProviderFailure(
        ErrorCode.INVALID_REQUEST, f"the provider refused the request (HTTP {status}): {detail}".rstrip(": "),
        retry=False, http_status=status,
    )
