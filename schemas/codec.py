"""Encoders and decoders, built once; `decode_request` applies the subject rules too."""

from __future__ import annotations

import json
import re

import msgspec

from . import limits
from .messages import CompletionEvent, ImagePart, Reply, Request, WorkItem


class InvalidMessage(ValueError):
    """A message that does not decode or breaks a rule. `field` names the culprit when known."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


_encoder = msgspec.json.Encoder()
_request = msgspec.json.Decoder(Request)
_reply = msgspec.json.Decoder(Reply)
_work = msgspec.json.Decoder(WorkItem)
_event = msgspec.json.Decoder(CompletionEvent)


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def _field_from(err: msgspec.ValidationError) -> str | None:
    text = str(err)
    if " - at `" in text:
        return text.rsplit(" - at `", 1)[1].rstrip("`")
    if "missing required field `" in text:
        return "$." + text.split("missing required field `", 1)[1].split("`", 1)[0]
    return None


def decode_request(
    data: bytes,
    *,
    use_case: str | None = None,
    account: str | None = None,
    max_payload: int = limits.DEFAULT_MAX_PAYLOAD,
) -> Request:
    """Decode a request, check the limits at the door and check it against the subject it came on.

    Raises InvalidMessage with a message that names the offending field and, for a limit, the limit.
    """
    most = limits.max_body(max_payload)
    if len(data) > most:
        raise InvalidMessage(
            f"invalid request: the body is {len(data)} bytes; the limit is {most} bytes (the server's"
            f" max_payload of {max_payload} less {limits.ENVELOPE_BYTES} for the fleet's envelope)",
            field="$",
        )
    try:
        req = _request.decode(data)
    except msgspec.ValidationError as exc:
        raise InvalidMessage(f"invalid request: {exc}", field=_field_from(exc)) from exc
    except msgspec.DecodeError as exc:
        raise InvalidMessage(f"request is not valid JSON: {exc}") from exc
    except RecursionError:
        raise InvalidMessage(
            f"invalid request: JSON nested too deeply to decode (the limit is {limits.MAX_DEPTH} levels"
            " inside `parameters` and `arguments`)"
        ) from None
    # The account first: the other rules (`reply_to` under `llm.res.`) are checked against it.
    if account is not None and req.account != account:
        raise InvalidMessage(
            f"invalid request: `account` is {req.account!r} but the subject is for account {account!r}",
            field="$.account",
        )
    _check_rules(req)
    if b"\\u0000" in data:  # JSON writes NUL only as this escape, so most requests skip the walk
        _check_nul(req)
    if use_case is not None:
        if req.use_case is None:
            req.use_case = use_case
        elif req.use_case != use_case:
            raise InvalidMessage(
                f"invalid request: `use_case` is {req.use_case!r} but the subject is for {use_case!r}",
                field="$.use_case",
            )
    return req


def _check_rules(req: Request) -> None:
    """Rules that span fields or that a type cannot say, each reported against the field to fix."""
    problem = limits.id_problem(req.id)
    if problem:
        raise InvalidMessage(f"invalid request: {problem}", field="$.id")
    problem = limits.reply_to_problem(req.reply_to, req.account)
    if problem:
        raise InvalidMessage(f"invalid request: {problem}", field="$.reply_to")
    if req.queue_ms > req.timeout_ms:
        raise InvalidMessage(
            f"invalid request: `queue_ms` ({req.queue_ms}) is more than `timeout_ms` ({req.timeout_ms})",
            field="$.queue_ms",
        )
    if req.tool_choice is not None and req.tool_choice != "none" and not req.tools:
        raise InvalidMessage("invalid request: `tool_choice` is set but `tools` is empty", field="$.tool_choice")
    images = 0
    for i, msg in enumerate(req.messages):
        if isinstance(msg.content, list):
            images += sum(isinstance(p, ImagePart) for p in msg.content)
        for j, call in enumerate(msg.tool_calls or ()):
            _check_json(call.arguments, f"$.messages[{i}].tool_calls[{j}].arguments")
    if images > limits.MAX_IMAGES:
        raise InvalidMessage(
            f"invalid request: {images} images; the limit is {limits.MAX_IMAGES} per request", field="$.messages"
        )
    for i, tool in enumerate(req.tools or ()):
        _check_json(tool.parameters, f"$.tools[{i}].parameters")


def _check_json(value: object, where: str) -> None:
    if limits.too_deep(value):
        raise InvalidMessage(
            f"invalid request: nested more than {limits.MAX_DEPTH} levels deep", field=where
        )


def _check_nul(req: Request) -> None:
    """NUL cannot be stored (PostgreSQL refuses it) nor shown safely: refused in every string."""
    if limits.has_nul(msgspec.to_builtins(req)):
        raise InvalidMessage("invalid request: a string holds a NUL character (\\u0000), which is not accepted")


def decode_reply(data: bytes) -> Reply:
    reply: Reply = _reply.decode(data)
    return reply


def decode_work(data: bytes) -> WorkItem:
    return _work.decode(data)


def decode_event(data: bytes) -> CompletionEvent:
    return _event.decode(data)


class _Peek(msgspec.Struct):
    id: str | None = None
    reply_to: str | None = None


_peek = msgspec.json.Decoder(_Peek)
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}:,\s]+')
_SCAN_TOKENS = 50_000
"""How many tokens the tolerant scan reads before it gives up: bounded work on hostile input."""


def peek_request(data: bytes, account: str | None = None) -> tuple[str | None, str | None]:
    """Best effort `(id, reply_to)` of a message that failed to decode, for the error reply.

    `reply_to` is given only when it passes the door's rules (so answering cannot hurt a
    connection, nor write into the results of another account than `account`), `id` only when it
    can be encoded. Works on bodies no decoder accepts: nested too deep, or holding a lone
    surrogate escape elsewhere.
    """
    try:
        p = _peek.decode(data)
        rid, reply_to = p.id, p.reply_to
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        found = _scan_top_level(data, ("id", "reply_to"))
        rid, reply_to = found.get("id"), found.get("reply_to")
    if rid is not None and (len(rid) > 4 * limits.MAX_ID or not _encodable(rid)):
        rid = None
    if reply_to is not None and limits.reply_to_problem(reply_to, account) is not None:
        reply_to = None
    return rid, reply_to


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


def _scan_top_level(data: bytes, keys: tuple[str, ...]) -> dict[str, str]:
    """The string values of `keys` in a JSON object's top level, read token by token without
    recursion, tolerating what is malformed elsewhere. A run of brackets counts as one token,
    so deep nesting costs little; strings are the tokens that count against the budget."""
    out: dict[str, str] = {}
    depth = 0
    key: str | None = None
    prev = b""
    for n, m in enumerate(_TOKENS.finditer(data)):
        if n >= _SCAN_TOKENS or len(out) == len(keys):
            break
        tok = m.group()
        if tok[:1] != b'"':
            depth += tok.count(b"{") + tok.count(b"[") - tok.count(b"}") - tok.count(b"]")
            prev = tok.strip()[-1:] or prev
            continue
        if depth == 1:
            try:
                text = json.loads(tok.decode("utf-8", "replace"))
            except ValueError:
                text = None
            if prev == b":" and key is not None:
                if key in keys and isinstance(text, str) and key not in out:
                    out[key] = text
                key = None
            else:
                key = text if isinstance(text, str) else None
        prev = b'"'
    return out
