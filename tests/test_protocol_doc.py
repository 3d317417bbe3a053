"""docs/protocol.md is the public reference: its examples must decode, its error table must match the code."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from router.errors import ErrorCode
from schemas import (
    Chunk,
    CompletionEvent,
    Done,
    Error,
    Request,
    Usage,
    decode_event,
    decode_reply,
    decode_request,
    decode_work,
    encode,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
TAGS = ("request", "chunk", "done", "error", "work", "event")
REPLY_TYPES = {"chunk": Chunk, "done": Done, "error": Error}

_FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def _text() -> str:
    return DOC.read_text(encoding="utf-8")


def _json_blocks() -> list[tuple[str, str, int]]:
    """(info words after `json`, body, line number) of every ```json block."""
    text = _text()
    blocks = []
    for m in _FENCE.finditer(text):
        words = m["info"].split()
        if words and words[0] == "json":
            line = text.count("\n", 0, m.start()) + 1
            blocks.append((" ".join(words[1:]), m["body"], line))
    return blocks


def _tagged() -> list[tuple[str, str, int]]:
    return [b for b in _json_blocks() if b[0]]


def test_every_json_block_tag_is_known() -> None:
    unknown = [(tag, line) for tag, _, line in _tagged() if tag not in TAGS]
    assert unknown == [], f"json blocks with an unknown tag (tag, line): {unknown}"


@pytest.mark.parametrize("tag", TAGS)
def test_each_tag_has_an_example(tag: str) -> None:
    assert any(t == tag for t, _, _ in _tagged()), f"docs/protocol.md has no ```json {tag} block"


@pytest.mark.parametrize(
    ("tag", "body"),
    [pytest.param(tag, body, id=f"{tag}-line{line}") for tag, body, line in _tagged() if tag in TAGS],
)
def test_tagged_example_decodes(tag: str, body: str) -> None:
    data = body.encode()
    match tag:
        case "request":
            req = decode_request(data)
            assert decode_request(encode(req)) == req
        case "chunk" | "done" | "error":
            reply = decode_reply(data)
            assert type(reply) is REPLY_TYPES[tag], f"block tagged {tag} decodes as {type(reply).__name__}"
        case "work":
            work = decode_work(data)
            # The request inside a work item was accepted, so it must pass every request rule too.
            decode_request(encode(work.request), use_case=work.request.use_case, account=work.request.account)
        case "event":
            event = decode_event(data)
            assert event.status == ("ok" if event.code is None else "error")


def test_plain_json_blocks_are_valid_json() -> None:
    for tag, body, line in _json_blocks():
        if tag:
            continue
        try:
            msgspec.json.decode(body.encode())
        except msgspec.DecodeError as exc:
            pytest.fail(f"```json block at line {line} is not valid JSON: {exc}")


def _section(heading: str) -> str:
    """The text under a markdown heading, up to the next heading of the same or a higher level."""
    level = heading.split(" ", 1)[0]
    lines = _text().splitlines()
    start = lines.index(heading) + 1
    end = next(
        (i for i in range(start, len(lines)) if re.match(rf"#{{1,{len(level)}}} ", lines[i])),
        len(lines),
    )
    return "\n".join(lines[start:end])


def _error_table() -> list[tuple[str, int, bool]]:
    rows = []
    for line in _section("## Error codes").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not re.fullmatch(r"`[A-Z_]+`", cells[0]):
            continue
        assert cells[2] in ("yes", "no"), f"retryable must be yes/no: {line}"
        rows.append((cells[0].strip("`"), int(cells[1]), cells[2] == "yes"))
    return rows


def test_error_table_matches_error_codes() -> None:
    documented = _error_table()
    expected = [(c.value, c.status, c.retryable) for c in ErrorCode]
    assert sorted(documented) == sorted(expected)


FIELD_TABLES = {
    Request: "## Request",
    Chunk: "### chunk",
    Done: "### done",
    Error: "### error",
    Usage: "### Usage",
    CompletionEvent: "## Completion event",
}


@pytest.mark.parametrize("struct", list(FIELD_TABLES), ids=lambda s: s.__name__)
def test_every_field_is_documented(struct: type[msgspec.Struct]) -> None:
    """Each field has a row of its own in the table under the message's heading."""
    section = _section(FIELD_TABLES[struct])
    missing = [
        f.encode_name for f in msgspec.structs.fields(struct) if f"| `{f.encode_name}` |" not in section
    ]
    assert missing == [], f"{struct.__name__} fields without a row in docs/protocol.md: {missing}"
