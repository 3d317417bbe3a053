"""A fake Anthropic Messages API server (`POST /v1/messages`)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import msgspec
from aiohttp import web

from .common import (
    FakeServer,
    Scenario,
    chunks_of,
    count_tokens,
    made_up_answer,
    sleep_ms,
    sse,
    stream_sse,
    texts_in,
)

_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Your request is invalid."),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "There is a problem with your billing."),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "The requested resource could not be found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of requests has exceeded your rate limit."),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}

# Scenarios only this format has; tests may also set their own in `server.scenarios`.
ANTHROPIC_SCENARIOS: dict[str, Scenario] = {
    "credit_exhausted": Scenario(status=400, error_body={
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "Your credit balance is too low to access the Anthropic API. "
                       "Please go to Plans & Billing to upgrade or purchase credits.",
        },
    }),
    "prompt_too_long": Scenario(status=400, error_body={
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "prompt is too long: 215000 tokens > 200000 maximum",
        },
    }),
}

# Scenarios may name a finish reason in our vocabulary; the fake answers in Anthropic's.
_STOP_REASON = {
    "stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal",
}


def error(status: int, message: str | None = None) -> dict[str, Any]:
    kind, default = _ERRORS.get(status, ("api_error" if status >= 500 else "invalid_request_error", "Error"))
    return {
        "type": "error",
        "error": {"type": kind, "message": message or default},
        "request_id": f"req_{uuid.uuid4().hex[:24]}",
    }


def _missing_field(body: dict[str, Any]) -> str | None:
    for name in ("model", "max_tokens", "messages"):
        if name not in body:
            return name
    return None


def _user_text(messages: list[Any]) -> str:
    """The text of the last user turn that has any (tool results are not the user speaking)."""
    for m in reversed(messages):
        if not isinstance(m, dict) or m.get("role") != "user":
            continue
        content = m.get("content")
        if isinstance(content, str):
            text = content
        else:
            text = " ".join(
                b.get("text", "") for b in content or [] if isinstance(b, dict) and b.get("type") == "text"
            )
        if text.strip():
            return text
    return ""


def _has_tool_result(messages: list[Any]) -> bool:
    return any(
        isinstance(b, dict) and b.get("type") == "tool_result"
        for m in messages
        if isinstance(m, dict) and isinstance(m.get("content"), list)
        for b in m["content"]
    )


class FakeAnthropic(FakeServer):
    def __init__(self, default: Scenario | None = None) -> None:
        super().__init__(default)
        for name, sc in ANTHROPIC_SCENARIOS.items():
            self.scenarios.setdefault(name, msgspec.structs.replace(sc))

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/messages", self.messages), web.get("/v1/models", self.models)]

    async def models(self, request: web.Request) -> web.Response:
        if "anthropic-version" not in request.headers:
            return web.json_response(error(400, "anthropic-version: header is required"), status=400)
        listed = [
            {"type": "model", "id": "claude-haiku-4-5-20251001", "display_name": "Claude Haiku 4.5",
             "created_at": "2025-10-15T00:00:00Z"},
            {"type": "model", "id": "claude-sonnet-4-5-20250929", "display_name": "Claude Sonnet 4.5",
             "created_at": "2025-09-29T00:00:00Z"},
        ]
        # Paged by `limit` and `after_id`, as the real API pages it (the SDK's iteration follows `last_id`).
        ids = [m["id"] for m in listed]
        after = request.query.get("after_id")
        rest = listed[ids.index(after) + 1:] if after in ids else listed
        limit = request.query.get("limit", "20")
        page = rest[: int(limit)] if limit.isdigit() and int(limit) > 0 else rest
        answer = {"data": page, "has_more": len(page) < len(rest),
                  "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None}
        return await self.list_models(request, answer, error)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_json(request)
        if "anthropic-version" not in request.headers:
            return web.json_response(error(400, "anthropic-version: header is required"), status=400)
        missing = _missing_field(body)
        if missing is not None:
            return web.json_response(error(400, f"{missing}: Field required"), status=400)
        sc = self.pick(request, body)
        if sc.status is not None:
            await sleep_ms(sc.ttft_ms)
            return web.json_response(sc.error_body or error(sc.status), status=sc.status, headers=sc.headers)
        messages = body.get("messages") or []
        model = str(body["model"])
        text = sc.text if sc.text is not None else made_up_answer(_user_text(messages))
        calls: list[dict[str, Any]] = []
        if sc.tool_calls and not _has_tool_result(messages):
            text = ""
            calls = [
                {"type": "tool_use", "id": c.id or f"toolu_{uuid.uuid4().hex[:24]}", "name": c.name,
                 "input": c.arguments}
                for c in sc.tool_calls
            ]
        stop_reason = _STOP_REASON.get(sc.finish_reason or "", sc.finish_reason) or (
            "tool_use" if calls else "end_turn"
        )
        prompt = " ".join(texts_in([body.get("system"), messages]))
        usage = self._usage(prompt, text, calls, sc)
        mid = f"msg_{uuid.uuid4().hex[:24]}"
        if not body.get("stream"):
            await sleep_ms(sc.ttft_ms)
            content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
            return web.json_response({
                "id": mid, "type": "message", "role": "assistant", "model": model,
                "content": content + calls, "stop_reason": stop_reason, "stop_sequence": None,
                "usage": usage,
            })

        start_usage = {k: usage[k] for k in ("input_tokens", "cache_creation_input_tokens",
                                             "cache_read_input_tokens", "cache_creation", "service_tier")}
        head = sse({"type": "message_start", "message": {
            "id": mid, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {**start_usage, "output_tokens": 1},
        }}, "message_start")
        if text:
            head += sse({"type": "content_block_start", "index": 0,
                         "content_block": {"type": "text", "text": ""}}, "content_block_start")
        head += sse({"type": "ping"}, "ping")

        def tail() -> bytes:
            out = b""
            index = 0
            if text:
                out += sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
                index = 1
            for c in calls:
                block = {"type": "tool_use", "id": c["id"], "name": c["name"], "input": {}}
                out += sse({"type": "content_block_start", "index": index, "content_block": block},
                           "content_block_start")
                # The input arrives as JSON text in fragments, the first one empty, as real streams do.
                args = json.dumps(c["input"])
                half = len(args) // 2
                for frag in ("", args[:half], args[half:]):
                    out += sse({"type": "content_block_delta", "index": index,
                                "delta": {"type": "input_json_delta", "partial_json": frag}},
                               "content_block_delta")
                out += sse({"type": "content_block_stop", "index": index}, "content_block_stop")
                index += 1
            out += sse({"type": "message_delta",
                        "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                        "usage": {"output_tokens": usage["output_tokens"]}}, "message_delta")
            return out + sse({"type": "message_stop"}, "message_stop")

        return await stream_sse(
            request, sc, chunks_of(text, sc.words_per_chunk) if text else [],
            event_for=lambda i, piece: sse({"type": "content_block_delta", "index": 0,
                                            "delta": {"type": "text_delta", "text": piece}},
                                           "content_block_delta"),
            head=head,
            tail=tail,
            malformed=b"event: content_block_delta\ndata: {not json\n\n",
        )

    @staticmethod
    def _usage(prompt: str, text: str, calls: list[dict[str, Any]], sc: Scenario) -> dict[str, Any]:
        # Anthropic's `input_tokens` counts only the uncached part of the prompt.
        output = count_tokens(text + "".join(json.dumps(c["input"]) for c in calls)) + sc.reasoning_tokens
        return {
            "input_tokens": count_tokens(prompt),
            "cache_creation_input_tokens": sc.cache_write_tokens,
            "cache_read_input_tokens": sc.cache_read_tokens,
            "cache_creation": {
                "ephemeral_5m_input_tokens": sc.cache_write_tokens, "ephemeral_1h_input_tokens": 0,
            },
            "output_tokens": output,
            "service_tier": "standard",
        }
