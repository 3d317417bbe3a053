"""Google Gemini API format: `generateContent` and `streamGenerateContent?alt=sse` (v1beta)."""

from __future__ import annotations

import json
import mimetypes
import re
from collections.abc import Mapping
from typing import Any, NamedTuple
from urllib.parse import quote, urlsplit

import httpx

from schemas import ImagePart, Message, NamedToolChoice, Request, TextPart, ToolCall, Usage

from .. import models
from ..config import Temperature
from ..errors import ErrorCode, ProviderFailure, StreamBroken
from .base import Event, Finished, HttpCall, TextDelta, error_body, event_json, retry_after_ms
from .sse import SSEvent

format = "gemini"

_FILTERED = "content_filter"
_FINISH = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": _FILTERED,
    "RECITATION": _FILTERED,
    "BLOCKLIST": _FILTERED,
    "PROHIBITED_CONTENT": _FILTERED,
    "SPII": _FILTERED,
    "IMAGE_SAFETY": _FILTERED,
    "IMAGE_PROHIBITED_CONTENT": _FILTERED,
    "IMAGE_RECITATION": _FILTERED,
}

# A prompt refused before any candidate was generated (`promptFeedback.blockReason`).
_BLOCKED = {"SAFETY", "BLOCKLIST", "PROHIBITED_CONTENT", "IMAGE_SAFETY"}

_TOOL_MODE = {"auto": "AUTO", "none": "NONE", "required": "ANY"}

# Python's mimetypes table depends on the host's /etc/mime.types; image types are pinned here.
_IMAGE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".heic": "image/heic",
    ".heif": "image/heif",
}

# Gemini 3 models refuse a replayed step whose first functionCall has no thought signature (400).
# A call Gemini made carries its own (`ToolCall.signature`); for one it did not make (another
# provider's turn, a rebuilt history) Google documents this value instead.
_FOREIGN_SIGNATURE = "skip_thought_signature_validator"

_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?:;[^;,]*)*;base64,(?P<data>.*)$", re.DOTALL)


# --- request -------------------------------------------------------------------


def _mime_for(url: str) -> str | None:
    path = urlsplit(url).path.lower()
    dot = path.rfind(".")
    ext = path[dot:] if dot >= 0 else ""
    return _IMAGE_TYPES.get(ext) or mimetypes.guess_type(path, strict=False)[0]


def _image(part: ImagePart) -> dict[str, object]:
    if part.data is not None:
        return {"inlineData": {"mimeType": part.media_type, "data": part.data}}
    url = part.url or ""
    inline = _DATA_URL.match(url)
    if inline:
        return {"inlineData": {"mimeType": part.media_type or inline["mime"], "data": inline["data"]}}
    ref: dict[str, object] = {}
    mime = part.media_type or _mime_for(url)
    if mime:
        ref["mimeType"] = mime
    ref["fileUri"] = url
    return {"fileData": ref}


def _parts(content: str | list[TextPart | ImagePart] | None) -> list[dict[str, object]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content else []
    out: list[dict[str, object]] = []
    for part in content:
        match part:
            case TextPart(text=text):
                out.append({"text": text})
            case ImagePart():
                out.append(_image(part))
    return out


def _text_of(content: str | list[TextPart | ImagePart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(p.text for p in content if isinstance(p, TextPart))


def _tool_result(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _contents(messages: list[Message]) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """(systemInstruction parts, contents). Tool results become `user` functionResponse parts."""
    system: list[dict[str, object]] = []
    contents: list[dict[str, object]] = []
    results: list[dict[str, object]] | None = None  # parts of the tool-result content being filled
    names: dict[str, str] = {}  # tool call id -> function name; a later call with the same id wins
    for msg in messages:
        if msg.role == "system":
            system.extend(_parts(msg.content))
            continue
        if msg.role == "tool":
            call_id = msg.tool_call_id or ""
            if call_id not in names:
                raise ProviderFailure(
                    ErrorCode.INVALID_REQUEST,
                    f"tool result {call_id!r} answers no earlier assistant tool call",
                    retry=False,
                )
            response = {"result": _tool_result(_text_of(msg.content))}
            part: dict[str, object] = {
                "functionResponse": {"id": call_id, "name": names[call_id], "response": response}
            }
            # Gemini wants the answers to one step's calls together in a single content.
            if results is None:
                results = []
                contents.append({"role": "user", "parts": results})
            results.append(part)
            continue
        results = None
        parts = _parts(msg.content)
        for i, call in enumerate(msg.tool_calls or []):
            names[call.id] = call.name
            fc: dict[str, object] = {
                "functionCall": {"id": call.id, "name": call.name, "args": call.arguments}
            }
            # Of parallel calls Gemini signs only the first; the others go back as they came.
            signature = call.signature if isinstance(call.signature, str) and call.signature else None
            if signature is None and i == 0:
                signature = _FOREIGN_SIGNATURE
            if signature is not None:
                fc["thoughtSignature"] = signature
            parts.append(fc)
        if parts:
            contents.append({"role": "model" if msg.role == "assistant" else "user", "parts": parts})
    return system, contents


def _declaration(name: str, description: str, parameters: dict[str, object]) -> dict[str, object]:
    out: dict[str, object] = {"name": name, "description": description}
    # Gemini rejects an OBJECT schema with no properties; a function without arguments omits it.
    if parameters.get("properties") or parameters.get("type") != "object":
        out["parameters"] = parameters
    return out


def build(
    req: Request,
    *,
    model: str,
    base_url: str,
    api_key: str | None,
    headers: Mapping[str, str],
    temperature_rule: Temperature | None = None,
) -> HttpCall:
    """The HTTP call for `req`. Raises ProviderFailure(INVALID_REQUEST) for a tool result with no call.

    `temperature_rule` is the config's rule for `model` (`router.models.model_info(...).temperature`);
    without it, the built-in table's.
    """
    system, contents = _contents(req.messages)
    body: dict[str, object] = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": system}
    if req.tools:
        body["tools"] = [
            {"functionDeclarations": [_declaration(t.name, t.description, t.parameters) for t in req.tools]}
        ]
    match req.tool_choice:
        case NamedToolChoice(name=name):
            body["toolConfig"] = {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}}
        case str(choice):
            body["toolConfig"] = {"functionCallingConfig": {"mode": _TOOL_MODE[choice]}}
    config: dict[str, object] = {}
    if req.max_tokens is not None:
        config["maxOutputTokens"] = req.max_tokens
    temperature = models.clamp_temperature(
        temperature_rule or models.temperature_rule(format, model), req.temperature
    )
    if temperature is not None:
        config["temperature"] = temperature
    if config:
        body["generationConfig"] = config
    h = {"content-type": "application/json", **headers}
    if api_key:
        # Never `?key=`: a key in the URL ends up in proxy and access logs.
        h["x-goog-api-key"] = api_key
    name = quote(model.removeprefix("models/"), safe="-._~")
    action = ":streamGenerateContent?alt=sse" if req.stream else ":generateContent"
    return HttpCall(url=f"{base_url.rstrip('/')}/v1beta/models/{name}{action}", headers=h, body=body)


def probe(*, base_url: str, api_key: str | None, headers: Mapping[str, str]) -> HttpCall:
    """The cheapest call that proves the base URL and the key: one model of `GET /v1beta/models` (no tokens)."""
    h = dict(headers)
    if api_key:
        h["x-goog-api-key"] = api_key  # never `?key=`, as for every call
    return HttpCall(url=f"{base_url.rstrip('/')}/v1beta/models?pageSize=1", headers=h, body={})


# --- response ------------------------------------------------------------------


def _int(raw: Mapping[str, Any], key: str) -> int:
    value = raw.get(key)
    return int(value) if isinstance(value, int | float) else 0


def _usage(raw: object) -> tuple[Usage, dict[str, object] | None]:
    if not isinstance(raw, dict):
        return Usage(), None
    thoughts = _int(raw, "thoughtsTokenCount")
    return (
        Usage(
            # promptTokenCount already includes the cached tokens.
            input_tokens=_int(raw, "promptTokenCount"),
            output_tokens=_int(raw, "candidatesTokenCount") + thoughts,
            cache_read_tokens=_int(raw, "cachedContentTokenCount"),
            reasoning_tokens=thoughts,
        ),
        raw,
    )


class _Answer:
    """What the chunks of one answer add up to; a whole response is a one-chunk answer."""

    def __init__(self) -> None:
        self.finish: str | None = None
        self.usage = Usage()
        self.raw_usage: dict[str, object] | None = None
        self.model: str | None = None
        self.calls: list[ToolCall] = []

    def add(self, data: dict[str, Any]) -> list[Event]:
        """Take in one GenerateContentResponse; return its text. Raises ValueError if misshapen."""
        if data.get("usageMetadata"):
            self.usage, self.raw_usage = _usage(data["usageMetadata"])
        self.model = data.get("modelVersion") or self.model
        candidates = data.get("candidates") or []
        if not isinstance(candidates, list):
            raise ValueError("candidates is not a list")
        if not candidates:
            blocked = (data.get("promptFeedback") or {}).get("blockReason")
            if blocked:
                self.finish = _FILTERED if blocked in _BLOCKED else "error"
            return []
        # We never ask for more than one candidate.
        cand = candidates[0]
        out: list[Event] = []
        for part in (cand.get("content") or {}).get("parts") or []:
            if part.get("thought"):
                continue  # a thought summary, not the answer
            if part.get("text"):
                out.append(TextDelta(str(part["text"])))
            if "functionCall" in part:
                self.calls.append(self._call(part["functionCall"], part.get("thoughtSignature")))
        reason = cand.get("finishReason")
        if reason:
            self.finish = _FINISH.get(str(reason), "error")
        return out

    def _call(self, fc: Any, signature: Any) -> ToolCall:
        if not isinstance(fc, dict) or not fc.get("name"):
            raise ValueError("a functionCall without a name")
        args = fc.get("args") or {}
        if not isinstance(args, dict):
            raise ValueError("functionCall args is not an object")
        call = ToolCall(id=fc.get("id") or f"call_{len(self.calls)}", name=str(fc["name"]), arguments=args)
        if isinstance(signature, str) and signature:
            call.signature = signature
        return call

    def finished(self) -> Finished:
        finish = self.finish or "stop"
        if finish == "stop" and self.calls:
            finish = "tool_calls"
        return Finished(
            finish_reason=finish, usage=self.usage, raw_usage=self.raw_usage, tool_calls=self.calls,
            model=self.model,
        )


def parse_response(body: bytes) -> list[Event]:
    """Events of a whole `generateContent` answer. Raises ProviderFailure if it is not one."""
    answer = _Answer()
    try:
        data = json.loads(body)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        events = answer.add(data)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ProviderFailure(
            ErrorCode.PROVIDER_ERROR, "the provider's answer is not a GenerateContentResponse", retry=True
        ) from exc
    return [*events, answer.finished()]


class _StreamParser:
    def __init__(self) -> None:
        self.answer = _Answer()

    def feed(self, event: SSEvent) -> list[Event]:
        data = event_json(event)
        if "error" in data:
            raise StreamBroken("the provider reported an error mid-stream")
        try:
            return self.answer.add(data)
        except (ValueError, TypeError, AttributeError) as exc:
            raise StreamBroken("the provider sent a stream event of an unknown shape") from exc

    def close(self) -> list[Event]:
        # Gemini has no end-of-stream sentinel: only a finishReason says the answer is whole.
        if self.answer.finish is None:
            raise StreamBroken("the provider's stream ended before its final event")
        return [self.answer.finished()]


def stream_parser() -> _StreamParser:
    return _StreamParser()


# --- errors --------------------------------------------------------------------

_TYPE = "type.googleapis.com/google.rpc."
_AUTH_REASONS = {"API_KEY_INVALID", "API_KEY_EXPIRED", "API_KEY_SERVICE_BLOCKED"}
_CONTEXT = re.compile(r"input token count.*exceeds the maximum", re.IGNORECASE | re.DOTALL)
# Only for an error that carries no QuotaFailure detail to decide by.
_NO_CREDIT = re.compile(
    r"prepayment credits are depleted|check your plan and billing details|limit: 0\b", re.IGNORECASE
)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")


class _Row(NamedTuple):
    code: ErrorCode
    retry: bool
    text: str
    credit: bool = False


# Auth rows never carry the provider's message: it may quote the credential.
_TABLE = {
    "credit": _Row(
        ErrorCode.PROVIDER_UNAVAILABLE,
        False,
        "the provider project has no quota or credit left (HTTP {status})",
        credit=True,
    ),
    "auth": _Row(ErrorCode.UNAUTHORIZED, False, "the provider rejected the API key (HTTP {status})"),
    "context": _Row(
        ErrorCode.CONTEXT_TOO_LONG, False, "the prompt is longer than the model's context window"
    ),
    "rate": _Row(ErrorCode.PROVIDER_ERROR, True, "the provider is rate limiting (HTTP {status})"),
    "server": _Row(ErrorCode.PROVIDER_ERROR, True, "the provider failed (HTTP {status})"),
    "not_found": _Row(
        ErrorCode.PROVIDER_ERROR, False, "the provider does not know this model or endpoint (HTTP {status})"
    ),
    "invalid": _Row(ErrorCode.INVALID_REQUEST, False, "the provider refused the request (HTTP {status})"),
}


def _details(err: Mapping[str, Any], kind: str) -> list[dict[str, Any]]:
    raw = err.get("details")
    if not isinstance(raw, list):
        return []
    return [d for d in raw if isinstance(d, dict) and d.get("@type") == _TYPE + kind]


def _retry_delay_ms(err: Mapping[str, Any]) -> int | None:
    for info in _details(err, "RetryInfo"):
        m = _DURATION.match(str(info.get("retryDelay") or ""))
        if m:
            return int(float(m[1]) * 1000)
    return None


def _out_of_credit(err: Mapping[str, Any], message: str) -> bool:
    violations = [
        v for q in _details(err, "QuotaFailure") for v in q.get("violations") or [] if isinstance(v, dict)
    ]
    if violations:
        # A limit of 0 means the project may not use the model at all (free tier without billing).
        # Any other limit is a window that reopens, even though the message says "check your billing".
        return any(str(v.get("quotaValue")) == "0" for v in violations)
    return bool(_NO_CREDIT.search(message))


def _kind(status: int, err: Mapping[str, Any]) -> str:
    grpc = str(err.get("status") or "")
    message = str(err.get("message") or "")
    reasons = {str(d.get("reason")) for d in _details(err, "ErrorInfo")}
    if status in (401, 403) or grpc in ("UNAUTHENTICATED", "PERMISSION_DENIED") or reasons & _AUTH_REASONS:
        return "auth"
    if status == 400 and not reasons and "api key not valid" in message.lower():
        return "auth"
    if status == 429 or grpc == "RESOURCE_EXHAUSTED":
        return "credit" if _out_of_credit(err, message) else "rate"
    if status == 400 and _CONTEXT.search(message):
        return "context"
    if status >= 500 or status == 408 or grpc in ("INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED"):
        return "server"
    if status == 404 or grpc == "NOT_FOUND":
        return "not_found"
    return "invalid"


def translate_error(status: int, headers: httpx.Headers, body: bytes) -> ProviderFailure:
    """One table: HTTP status and the Google error (`status`, details) → our code. Never echoes the key."""
    err = error_body(body).get("error")
    err = err if isinstance(err, dict) else {}
    kind = _kind(status, err)
    row = _TABLE[kind]
    text = row.text.format(status=status)
    if kind == "invalid":
        detail = " ".join(str(err.get("message") or "").split())[:300]
        text = f"{text}: {detail}" if detail else text
    delay = None
    if row.retry:
        delay = retry_after_ms(headers)
        if delay is None:
            delay = _retry_delay_ms(err)
    return ProviderFailure(
        row.code, text, retry=row.retry, retry_after_ms=delay, http_status=status, credit_exhausted=row.credit
    )
