"""A fake OpenAI Chat Completions server (also the demo provider of `switchyard up`)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

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


def _error(status: int) -> dict[str, Any]:
    kinds = {
        401: ("invalid_api_key", "invalid_request_error", "Incorrect API key provided."),
        403: ("unsupported_country_region_territory", "request_forbidden", "Request forbidden."),
        429: ("rate_limit_exceeded", "requests", "Rate limit reached for requests."),
    }
    code, typ, msg = kinds.get(status, (None, "server_error", "The server had an error."))
    return {"error": {"message": msg, "type": typ, "param": None, "code": code}}


class FakeOpenAI(FakeServer):
    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/chat/completions", self.chat),
            web.get("/v1/models", self.models),
        ]

    async def models(self, request: web.Request) -> web.Response:
        answer = {"object": "list", "data": [
            {"id": model, "object": "model", "created": 1721172741, "owned_by": "system"}
            for model in ("gpt-4o-mini", "gpt-4o")
        ]}
        return await self.list_models(request, answer, _error)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_json(request)
        sc = self.pick(request, body)
        model = str(body.get("model") or "gpt-4o-mini")
        if sc.status is not None:
            await sleep_ms(sc.ttft_ms)
            return web.json_response(sc.error_body or _error(sc.status), status=sc.status, headers=sc.headers)
        prompt = " ".join(texts_in(body.get("messages")))
        last_user = next(
            (m for m in reversed(body.get("messages") or []) if isinstance(m, dict) and m.get("role") == "user"),
            {},
        )
        text = sc.text if sc.text is not None else made_up_answer(" ".join(texts_in(last_user.get("content"))))
        if sc.tool_calls and not any(m.get("role") == "tool" for m in body.get("messages") or []):
            text = ""
            calls: list[dict[str, Any]] = [
                {"id": c.id or f"call_{uuid.uuid4().hex[:12]}", "type": "function",
                 "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
                for c in sc.tool_calls
            ]
        else:
            calls = []  # no tool call once the conversation carries the tool's result
        finish = sc.finish_reason or ("tool_calls" if calls else "stop")
        usage = self._usage(prompt, text, sc)
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if not body.get("stream"):
            await sleep_ms(sc.ttft_ms)
            message: dict[str, Any] = {"role": "assistant", "content": text or None, "refusal": None}
            if calls:
                message["tool_calls"] = calls
            return web.json_response({
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "system_fingerprint": "fp_switchyard",
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": usage,
            })

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "system_fingerprint": "fp_switchyard",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def tail() -> bytes:
            out = b""
            for i, c in enumerate(calls):
                # Arguments arrive in two fragments, as real streams split them.
                fn: dict[str, str] = c["function"]
                args = fn["arguments"]
                half = len(args) // 2
                first = {"name": fn["name"], "arguments": args[:half]}
                out += sse(chunk({"tool_calls": [{"index": i, "id": c["id"], "type": "function", "function": first}]}))
                out += sse(chunk({"tool_calls": [{"index": i, "function": {"arguments": args[half:]}}]}))
            out += sse(chunk({}, finish))
            if include_usage:
                out += sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "system_fingerprint": "fp_switchyard", "choices": [], "usage": usage})
            return out + b"data: [DONE]\n\n"

        pieces = chunks_of(text, sc.words_per_chunk) if text else []
        return await stream_sse(
            request, sc, pieces,
            event_for=lambda i, piece: sse(chunk({"content": piece})),
            head=sse(chunk({"role": "assistant", "content": "", "refusal": None})),
            tail=tail,
        )

    @staticmethod
    def _usage(prompt: str, text: str, sc: Scenario) -> dict[str, Any]:
        inp, out = count_tokens(prompt), count_tokens(text) + sc.reasoning_tokens
        return {
            "prompt_tokens": inp, "completion_tokens": out, "total_tokens": inp + out,
            "prompt_tokens_details": {"cached_tokens": min(sc.cache_read_tokens, inp), "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": sc.reasoning_tokens, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
        }
