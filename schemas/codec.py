"""Encoders and decoders, built once; `decode_request` applies the subject rules too."""

from __future__ import annotations

import msgspec

from .messages import REPLY_PREFIXES, CompletionEvent, Reply, Request, WorkItem


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


def decode_request(data: bytes, *, use_case: str | None = None, account: str | None = None) -> Request:
    """Decode a request and check it against the subject it came on.

    Raises InvalidMessage with a message that names the offending field.
    """
    try:
        req = _request.decode(data)
    except msgspec.ValidationError as exc:
        raise InvalidMessage(f"invalid request: {exc}", field=_field_from(exc)) from exc
    except msgspec.DecodeError as exc:
        raise InvalidMessage(f"request is not valid JSON: {exc}") from exc
    _check_rules(req)
    if account is not None and req.account != account:
        raise InvalidMessage(
            f"invalid request: `account` is {req.account!r} but the subject is for account {account!r}",
            field="$.account",
        )
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
    """Rules that span fields, each reported against the field a producer must fix."""
    if not req.reply_to.startswith(REPLY_PREFIXES):
        raise InvalidMessage(
            "invalid request: `reply_to` must start with `_INBOX.` or `llm.res.`", field="$.reply_to"
        )
    if any(c in req.reply_to for c in " \t\r\n*>"):
        raise InvalidMessage(
            "invalid request: `reply_to` must be a plain subject (no spaces or wildcards)", field="$.reply_to"
        )
    if req.tool_choice is not None and req.tool_choice != "none" and not req.tools:
        raise InvalidMessage("invalid request: `tool_choice` is set but `tools` is empty", field="$.tool_choice")


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
    account: str | None = None


_peek = msgspec.json.Decoder(_Peek)


def peek_request(data: bytes) -> tuple[str | None, str | None]:
    """Best effort `(id, reply_to)` of a message that failed to decode, for the error reply."""
    try:
        p = _peek.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        try:
            raw = msgspec.json.decode(data)
        except msgspec.DecodeError:
            return None, None
        if not isinstance(raw, dict):
            return None, None
        rid, rt = raw.get("id"), raw.get("reply_to")
        return (rid if isinstance(rid, str) else None, rt if isinstance(rt, str) else None)
    return p.id, p.reply_to
