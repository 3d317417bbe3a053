"""`switchyard dlq`: the copies processes gave up on, for an operator to read, replay or purge.

A process that gives up on a message copies its body to `<prefix>.dlq.<stage>` (stream
`LLM_DLQ`) with headers saying why (`Switchyard-Error-Code`, `Switchyard-Error`), where it
came from (`Switchyard-Subject`) and, when the body had to be cut to fit the server's
max_payload, its original size (`Switchyard-Truncated`). docs/protocol.md, "Dead letters".
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import re
import sys
import time
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NoStreamResponseError, NotFoundError

from ..publish import MAX_SUBJECT
from .fleet import OK, REFUSED, connected, fleet_prefix, say

STREAM = "LLM_DLQ"
STAGES = ("dispatch", "work", "audit")
ERROR_CODE = "Switchyard-Error-Code"
ERROR = "Switchyard-Error"
SUBJECT = "Switchyard-Subject"
TRUNCATED = "Switchyard-Truncated"
_LIST_ERROR_CHARS = 72
_BATCH = 256


class DeadLetter(msgspec.Struct, kw_only=True):
    """One copy, as `list --json` prints it. `truncated` is the original size of a body that was cut."""

    seq: int
    stage: str
    time: datetime
    code: str | None
    error: str | None
    subject: str | None
    size: int
    truncated: int | None = None


class Copy(NamedTuple):
    letter: DeadLetter
    headers: dict[str, str]
    body: bytes


def _letter(prefix: str, subject: str, seq: int, when: datetime, headers: dict[str, str], size: int) -> DeadLetter:
    truncated = headers.get(TRUNCATED, "")
    return DeadLetter(
        seq=seq, stage=subject.removeprefix(f"{prefix}.dlq."), time=when, code=headers.get(ERROR_CODE),
        error=headers.get(ERROR), subject=headers.get(SUBJECT), size=size,
        truncated=int(truncated) if truncated.isdigit() else None,
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--data-dir", type=Path, default=None, help="find the fleet `switchyard up` started here")
    dlq = sub.add_parser("dlq", help="dead letters: list, show, replay or purge the copies in LLM_DLQ")
    actions = dlq.add_subparsers(dest="action", required=True)

    ls = actions.add_parser("list", parents=[where], help="one line per copy, newest last")
    ls.add_argument("--stage", choices=STAGES)
    ls.add_argument("--limit", type=_count, default=100, help="the newest N copies (default 100; 0: all)")
    ls.add_argument("--json", action="store_true", help="a JSON array instead of lines")

    show = actions.add_parser("show", parents=[where], help="one copy's headers and body")
    show.add_argument("seq", type=_sequence, help="its sequence in LLM_DLQ (from `dlq list`)")
    show.add_argument("--json", action="store_true")

    replay = actions.add_parser("replay", parents=[where], help="publish a copy again, then delete it")
    replay.add_argument("seq", type=_sequence)
    replay.add_argument("--to", metavar="SUBJECT", help="publish here instead of the original subject")
    replay.add_argument("--keep", action="store_true", help="keep the copy after publishing it")

    purge = actions.add_parser("purge", parents=[where], help="delete the copies, all or of one stage")
    purge.add_argument("--stage", choices=STAGES)
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    dlq.set_defaults(run=dlq_command)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (0, 1, 2, …)")
    return int(text)


def _sequence(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a stream sequence (1, 2, …; see `switchyard dlq list`)")
    return int(text)


async def dlq_command(args: argparse.Namespace) -> int:
    """Raises NoFleet when NATS is unreachable or holds no fleet."""
    async with connected(args.data_dir) as (nc, url):
        js = nc.jetstream()
        prefix = await fleet_prefix(js, url, STREAM)
        match args.action:
            case "list":
                return await _list(js, prefix, args.stage, args.limit, as_json=args.json)
            case "show":
                return await _show(js, prefix, args.seq, as_json=args.json)
            case "replay":
                return await _replay(js, prefix, args.seq, args.to, keep=args.keep)
            case _:
                return await _purge(js, prefix, args.stage, yes=args.yes)


async def _letters(js: JetStreamContext, prefix: str, stage: str | None, limit: int) -> tuple[list[DeadLetter], int]:
    """The newest `limit` copies (0: all), oldest first, and how many there are.

    Read through a consumer of headers only: one round trip per batch, and bodies (up to
    max_payload each) stay on the server.
    """
    config = js_api.ConsumerConfig(
        ack_policy=js_api.AckPolicy.NONE, headers_only=True, mem_storage=True, inactive_threshold=30.0,
    )
    sub = await js.pull_subscribe(f"{prefix}.dlq.{stage or '>'}", stream=STREAM, config=config)
    info = await sub.consumer_info()
    total = info.num_pending or 0
    kept: deque[DeadLetter] = deque(maxlen=limit or None)
    try:
        seen = 0
        while seen < total:
            try:
                batch = await sub.fetch(min(_BATCH, total - seen), timeout=5)
            except TimeoutError:  # copies purged or expired while reading
                break
            seen += len(batch)
            kept.extend(_from_msg(prefix, m) for m in batch)
    finally:
        await sub.unsubscribe()
        await js.delete_consumer(STREAM, info.name)
    return list(kept), total


def _from_msg(prefix: str, msg: Msg) -> DeadLetter:
    headers = dict(msg.headers or {})
    size = int(headers.pop("Nats-Msg-Size", "0"))
    meta = msg.metadata
    return _letter(prefix, msg.subject, meta.sequence.stream, meta.timestamp, headers, size)


async def _get(js: JetStreamContext, prefix: str, seq: int) -> Copy | None:
    try:
        raw = await js.get_msg(STREAM, seq=seq)
    except NotFoundError:
        return None
    # Parsed here rather than taken from nats-py, whose parser turns a non-ASCII value into an email Header.
    headers = _parse_headers(base64.b64decode(raw.hdrs)) if raw.hdrs else {}
    body = raw.data or b""
    assert raw.subject is not None and raw.time is not None
    return Copy(_letter(prefix, raw.subject, seq, raw.time, headers, len(body)), headers, body)


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.decode("utf-8", "replace").split("\r\n")[1:]:  # the first line is `NATS/1.0`
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip()] = value.strip()
    return headers


def _missing(seq: int) -> int:
    say(f"no dead letter with sequence {seq} in {STREAM}; `switchyard dlq list` shows what there is")
    return REFUSED


async def _list(js: JetStreamContext, prefix: str, stage: str | None, limit: int, *, as_json: bool) -> int:
    letters, total = await _letters(js, prefix, stage, limit)
    if as_json:
        print(msgspec.json.encode(letters).decode())
        return OK
    rows = [_row(x) for x in letters]
    if rows:
        table = [("seq", "stage", "time (UTC)", "code", "size", "subject", "error"), *rows]
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]) - 1)]  # the error, last, is not padded
        for row in table:
            cells = [row[i].rjust(w) if i in (0, 4) else row[i].ljust(w) for i, w in enumerate(widths)]
            print("  ".join([*cells, row[-1]]).rstrip())
    print(_tally(len(letters), total, stage))
    return OK


def _row(x: DeadLetter) -> tuple[str, ...]:
    size = f"{x.size} (truncated from {x.truncated})" if x.truncated is not None else str(x.size)
    return (str(x.seq), x.stage, f"{x.time:%Y-%m-%d %H:%M:%S}", x.code or "-", size, _shorten(x.subject or "-", 60),
            _shorten(x.error or "", _LIST_ERROR_CHARS))


def _shorten(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: chars - 1] + "…"


def _tally(shown: int, total: int, stage: str | None) -> str:
    of_stage = f" of stage {stage}" if stage else ""
    if total == 0:
        return f"no dead letters{of_stage}"
    noun = "dead letter" if total == 1 else "dead letters"
    if shown < total:
        return f"the newest {shown} of {total} {noun}{of_stage} (--limit 0 shows all)"
    return f"{total} {noun}{of_stage}"


async def _show(js: JetStreamContext, prefix: str, seq: int, *, as_json: bool) -> int:
    copy = await _get(js, prefix, seq)
    if copy is None:
        return _missing(seq)
    letter, headers, body = copy
    try:
        parsed = msgspec.json.decode(body)
        is_json = True
    except msgspec.DecodeError:
        parsed, is_json = None, False
    if as_json:
        out = {**msgspec.to_builtins(letter), "headers": headers, "body": parsed,
               "body_base64": base64.b64encode(body).decode()}
        print(msgspec.json.encode(out).decode())
        return OK
    print(f"sequence: {letter.seq}\nstage:    {letter.stage}\ntime:     {letter.time:%Y-%m-%d %H:%M:%S.%f} UTC\n")
    for name, value in headers.items():
        print(f"{name}: {value}")
    if letter.truncated is not None:
        what = f"{letter.size} of {letter.truncated} bytes: cut to fit max_payload, cannot be replayed as is"
    else:
        what = f"{letter.size} bytes" + (", JSON" if is_json else ", not JSON")
    print(f"\nbody ({what}):")
    print(msgspec.json.format(body, indent=2).decode() if is_json else _escaped(body))
    return OK


def _escaped(body: bytes) -> str:
    """Text as it is, bytes that are not UTF-8 and control characters (but newline and tab) escaped."""
    text = body.decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def _replayable(prefix: str, subject: str) -> bool:
    """A plain subject (no wildcard, space or control character) under a fleet stream's prefix."""
    pattern = rf"{re.escape(prefix)}\.(?:req|work|events)(?:\.[^.*>\s\x00-\x1f\x7f]+)+"
    return len(subject) <= MAX_SUBJECT and re.fullmatch(pattern, subject) is not None


async def _replay(js: JetStreamContext, prefix: str, seq: int, to: str | None, *, keep: bool) -> int:
    copy = await _get(js, prefix, seq)
    if copy is None:
        return _missing(seq)
    letter = copy.letter
    if letter.truncated is not None:
        say(f"dead letter {seq} was cut to {letter.size} of its {letter.truncated} bytes to fit max_payload and"
            f" cannot be replayed as is; `switchyard dlq show {seq}` shows what was kept")
        return REFUSED
    target = to or letter.subject
    if not target:
        say(f"dead letter {seq} does not say where it came from (no {SUBJECT} header); give --to SUBJECT")
        return REFUSED
    if not _replayable(prefix, target):
        say(f"will not publish on {target[:200]!r}: a replay goes only to {prefix}.req.…, {prefix}.work.…"
            f" or {prefix}.events.… subjects")
        return REFUSED
    # A fresh id: the streams drop a second message with the same Nats-Msg-Id for two minutes.
    msg_id = f"replay:{seq}:{time.time_ns()}"
    try:
        ack = await js.publish(target, copy.body, headers={"Nats-Msg-Id": msg_id})
    except NoStreamResponseError:
        say(f"no stream takes {target!r}; nothing was published, dead letter {seq} is kept")
        return REFUSED
    if ack.duplicate:  # only if two replays of this copy picked the same nanosecond
        say(f"{ack.stream} took the replay for a duplicate and dropped it; dead letter {seq} is kept")
        return REFUSED
    print(f"replayed dead letter {seq} ({letter.stage}, {letter.code or 'no code'}) on {target}:"
          f" {ack.stream} sequence {ack.seq}")
    if keep:
        print(f"kept dead letter {seq} (--keep)")
        return OK
    try:
        await js.delete_msg(STREAM, seq)
    except NotFoundError:
        print(f"dead letter {seq} was already deleted")
        return OK
    print(f"deleted dead letter {seq}")
    return OK


async def _purge(js: JetStreamContext, prefix: str, stage: str | None, *, yes: bool) -> int:
    subject = f"{prefix}.dlq.{stage or '>'}"
    info = await js.stream_info(STREAM, subjects_filter=subject)
    count = sum((info.state.subjects or {}).values())
    of_stage = f" of stage {stage}" if stage else ""
    what = f"{count} dead letter{'' if count == 1 else 's'}{of_stage}"
    if count == 0:
        print(f"no dead letters{of_stage}; nothing to purge")
        return OK
    if not yes:
        if not sys.stdin.isatty():
            say(f"purge would delete {what} for good; add --yes to do it without a terminal to confirm on")
            return REFUSED
        if not await _confirm(f"delete {what} from {STREAM} for good? [y/N]"):
            print("nothing deleted")
            return REFUSED
    # Up to what was counted: a copy that arrives meanwhile is news to read, not part of this purge.
    await js.purge_stream(STREAM, seq=info.state.last_seq + 1, subject=subject)
    print(f"deleted {what}")
    return OK


async def _confirm(question: str) -> bool:
    """Ask on the terminal; Ctrl-C while waiting cancels like anywhere else (no thread blocked on stdin)."""
    print(question, end=" ", file=sys.stderr, flush=True)
    loop = asyncio.get_running_loop()
    line: asyncio.Future[str] = loop.create_future()
    fd = sys.stdin.fileno()

    def readable() -> None:
        if not line.done():
            line.set_result(sys.stdin.readline())

    loop.add_reader(fd, readable)
    try:
        answer = await line
    finally:
        loop.remove_reader(fd)
    return answer.strip().lower() in ("y", "yes")
