"""A fake Google Gemini API server (v1beta `generateContent` and `streamGenerateContent`)."""

from __future__ import annotations

import base64
import json
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

_GRPC = {
    400: ("INVALID_ARGUMENT", "Request contains an invalid argument."),
    401: (
        "UNAUTHENTICATED",
        "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie "
        "or other valid authentication credential.",
    ),
    403: (
        "PERMISSION_DENIED",
        "Method doesn't allow unregistered callers (callers without established identity). "
        "Please use API Key or other form of API consumer identity to call this API.",
    ),
    404: ("NOT_FOUND", "Requested entity was not found."),
    409: ("ABORTED", "The operation was aborted."),
    429: ("RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota)."),
    499: ("CANCELLED", "The operation was cancelled."),
    500: (
        "INTERNAL",
        "An internal error has occurred. Please retry or report in "
        "https://developers.generativeai.google/guide/troubleshooting",
    ),
    503: ("UNAVAILABLE", "The model is overloaded. Please try again later."),
    504: ("DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
}

# Our vocabulary → Gemini's, so one Scenario means the same against every fake.
_FINISH = {
    "stop": "STOP",
    "tool_calls": "STOP",
    "length": "MAX_TOKENS",
    "content_filter": "SAFETY",
    "error": "OTHER",
}

# The `data` oneof of a Part: exactly one of these is set.
_DATA_FIELDS = (
    "text",
    "inlineData",
    "fileData",
    "functionCall",
    "functionResponse",
    "executableCode",
    "codeExecutionResult",
)


def google_error(
    status: int, message: str | None = None, details: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """A Google API error body: `{"error": {"code", "message", "status", "details"?}}`."""
    fallback = ("INVALID_ARGUMENT" if status < 500 else "UNAVAILABLE", "The request failed.")
    grpc, default_message = _GRPC.get(status, fallback)
    err: dict[str, Any] = {"code": status, "message": message or default_message, "status": grpc}
    if details is not None:
        err["details"] = details
    return {"error": err}


def _rate_limited() -> dict[str, Any]:
    # A per-minute window as the real API describes one: it reopens after `retryDelay`.
    metric = "generativelanguage.googleapis.com/generate_content_paid_tier_requests"
    return google_error(
        429,
        "You exceeded your current quota, please check your plan and billing details. For more "
        "information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.\n"
        f"* Quota exceeded for metric: {metric}, limit: 1000\nPlease retry in 1s.",
        [
            {
                "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                "violations": [
                    {
                        "quotaMetric": metric,
                        "quotaId": "GenerateRequestsPerMinutePerProjectPerModel",
                        "quotaDimensions": {"location": "global", "model": "gemini-2.5-flash"},
                        "quotaValue": "1000",
                    }
                ],
            },
            {
                "@type": "type.googleapis.com/google.rpc.Help",
                "links": [
                    {
                        "description": "Learn more about Gemini API quotas",
                        "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                    }
                ],
            },
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1s"},
        ],
    )


def _invalid(body: dict[str, Any]) -> str | None:
    """What the real API would refuse in a request body, as its message; None if it looks valid."""
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        return "* GenerateContentRequest.contents: contents is not specified"
    calls = 0
    for i, content in enumerate(contents):
        where = f"* GenerateContentRequest.contents[{i}]"
        if not isinstance(content, dict) or content.get("role", "user") not in ("user", "model"):
            return f"{where}.role: Please use a valid role: user, model."
        parts = content.get("parts")
        if not isinstance(parts, list) or not parts:
            return f"{where}.parts: contents.parts must not be empty."
        for j, part in enumerate(parts):
            if not isinstance(part, dict) or sum(k in part for k in _DATA_FIELDS) != 1:
                return f"{where}.parts[{j}].data: required oneof field 'data' must have one initialized field"
        answers = sum("functionResponse" in p for p in parts)
        if answers and answers != calls:
            return (
                "Please ensure that the number of function response parts is equal to the number of "
                "function call parts of the function call turn."
            )
        calls = sum("functionCall" in p for p in parts) if content.get("role") == "model" else 0
    return None


def _question(contents: list[dict[str, Any]]) -> str:
    """The text of the last user content that has any, for the made-up answer."""
    for c in reversed(contents):
        texts = [p["text"] for p in c["parts"] if "text" in p]
        if c.get("role", "user") == "user" and texts:
            return " ".join(texts)
    return ""


class FakeGemini(FakeServer):
    def __init__(self, default: Scenario | None = None) -> None:
        super().__init__(default)
        self.paths: list[str] = []
        """The path and query string of every generate request, to check where credentials travel."""

    def routes(self) -> list[web.RouteDef]:
        # aiohttp has no literal ':' between two placeholders; `model:action` is split by hand.
        # The real API serves the same methods under v1, which google-genai 3.x calls by default.
        return [
            route
            for version in ("v1beta", "v1")
            for route in (
                web.post(f"/{version}/models/{{model_action}}", self.generate),
                web.get(f"/{version}/models", self.models),
            )
        ]

    async def models(self, request: web.Request) -> web.Response:
        answer = {"models": [{
            "name": "models/gemini-2.5-flash", "version": "001", "displayName": "Gemini 2.5 Flash",
            "inputTokenLimit": 1048576, "outputTokenLimit": 65536,
            "supportedGenerationMethods": ["generateContent", "countTokens"],
        }]}
        return await self.list_models(
            request, answer, lambda status: _rate_limited() if status == 429 else google_error(status)
        )

    async def generate(self, request: web.Request) -> web.StreamResponse:
        self.paths.append(request.path_qs)
        model, _, action = request.match_info["model_action"].partition(":")
        if action not in ("generateContent", "streamGenerateContent"):
            version = request.path.split("/")[1]
            message = (
                f"models/{model} is not found for API version {version}, or is not supported for {action}."
            )
            return web.json_response(google_error(404, message), status=404)
        body = await self.read_json(request)
        sc = self.pick(request, body)
        if sc.status is not None:
            await sleep_ms(sc.ttft_ms)
            default = _rate_limited() if sc.status == 429 else google_error(sc.status)
            return web.json_response(sc.error_body or default, status=sc.status, headers=sc.headers)
        problem = _invalid(body)
        if problem is not None:
            return web.json_response(google_error(400, problem), status=400)

        contents: list[dict[str, Any]] = body["contents"]
        answered = any("functionResponse" in p for c in contents for p in c["parts"])
        calls: list[dict[str, Any]] = []
        if sc.tool_calls and not answered:
            text = ""
            for i, c in enumerate(sc.tool_calls):
                fc: dict[str, Any] = {"name": c.name, "args": c.arguments}
                if c.id:
                    fc["id"] = c.id
                part: dict[str, Any] = {"functionCall": fc}
                if i == 0:
                    # Thinking models sign the first call of a step, for the client to send back.
                    part["thoughtSignature"] = base64.b64encode(uuid.uuid4().bytes * 2).decode()
                calls.append(part)
        else:
            text = sc.text if sc.text is not None else made_up_answer(_question(contents))
        finish = _FINISH.get(sc.finish_reason or "stop", sc.finish_reason or "STOP")
        prompt_tokens = count_tokens(" ".join(texts_in([body.get("systemInstruction"), contents])))
        call_tokens = count_tokens(json.dumps([p["functionCall"] for p in calls])) if calls else 0
        model_version = model.removeprefix("models/")
        response_id = uuid.uuid4().hex[:22]

        def usage(generated: str) -> dict[str, Any]:
            out = (count_tokens(generated) if generated else 0) + call_tokens
            meta: dict[str, Any] = {
                "promptTokenCount": prompt_tokens,
                "candidatesTokenCount": out,
                "totalTokenCount": prompt_tokens + out + sc.reasoning_tokens,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt_tokens}],
            }
            # Like the real API, counts that are zero are left out.
            cached = min(sc.cache_read_tokens, prompt_tokens)
            if cached:
                meta["cachedContentTokenCount"] = cached
                meta["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": cached}]
            if sc.reasoning_tokens:
                meta["thoughtsTokenCount"] = sc.reasoning_tokens
            return meta

        def response(parts: list[dict[str, Any]], generated: str, reason: str | None) -> dict[str, Any]:
            candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}}
            if reason:
                candidate["finishReason"] = reason
            candidate["index"] = 0
            return {
                "candidates": [candidate],
                "usageMetadata": usage(generated),
                "modelVersion": model_version,
                "responseId": response_id,
            }

        if action == "generateContent":
            await sleep_ms(sc.ttft_ms)
            return web.json_response(response(([{"text": text}] if text else []) + calls, text, finish))

        pieces = chunks_of(text, sc.words_per_chunk) if text else []
        sent: list[str] = []

        def chunk(piece: str) -> dict[str, Any]:
            sent.append(piece)
            return response([{"text": piece}], "".join(sent), None)

        def last() -> dict[str, Any]:
            # The last chunk carries the calls (Gemini sends them whole), finishReason and final usage.
            return response(calls or [{"text": ""}], text, finish)

        if request.query.get("alt") != "sse":
            # Without alt=sse the real API answers with one JSON array of the same responses.
            await sleep_ms(sc.ttft_ms)
            return web.json_response([*(chunk(p) for p in pieces), last()])
        return await stream_sse(
            request, sc, pieces, event_for=lambda i, p: sse(chunk(p)), head=b"", tail=lambda: sse(last())
        )
