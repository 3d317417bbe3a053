"""What the checks at the door cost per request, and what the tolerant peek costs on hostile bodies.

For each body: `typed` is msgspec's typed decode alone (what the dispatcher did before the limits),
`door` is `schemas.decode_request` (the typed decode plus every limit and rule). For refused bodies,
`peek` is `schemas.peek_request`, which finds `id` and `reply_to` for the error reply. Single
process, best of 5 repeats of a timed loop.

    .venv/bin/python bench/bench_door.py
"""

from __future__ import annotations

import json
import platform
import timeit
from collections.abc import Callable

import msgspec
from machine import cpu_model, version  # bench/ is on sys.path when a bench runs

from schemas import InvalidMessage, Request, decode_request, peek_request

_typed = msgspec.json.Decoder(Request)


def _request(**fields: object) -> bytes:
    body: dict[str, object] = {
        "v": 1, "id": "01JD7S8Q0Z6W2E4T8X1M3N5P7R", "account": "acme", "tier": "pro",
        "messages": [{"role": "system", "content": "You write short, friendly emails."},
                     {"role": "user", "content": "Write a follow-up about the two sketches we discussed."}],
        "max_tokens": 400, "temperature": 0.4, "stream": True, "reply_to": "_INBOX.k3Jq9sPz0aXcVb7Ye1Rt.1",
        "timeout_ms": 30000, "metadata": {"team": "sales-tools"},
    }
    body.update(fields)
    return json.dumps(body).encode()


TOOL = {"name": "get_weather", "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                        "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}

VALID = {
    "typical (600 B)": _request(),
    "8 tools": _request(tools=[{**TOOL, "name": f"tool_{i}"} for i in range(8)]),
    "100 KB prompt": _request(messages=[{"role": "user", "content": "word " * 20_000}]),
    "a prompt quoting \\u0000": _request(messages=[{"role": "user", "content": "what is \\u0000 in JSON?"}]),
}
deep = b'{"a":' * 5000 + b"1" + b"}" * 5000
HOSTILE = {
    "nested 5000 deep (50 KB)": _request(tools=[{"name": "t", "parameters": "D"}]).replace(b'"D"', deep),
    "lone surrogate": _request(messages=[{"role": "user", "content": "S"}]).replace(b'"S"', b'"\\udcff"'),
    "1 MB of nesting": _request(tools=[{"name": "t", "parameters": "D"}]).replace(
        b'"D"', b"[" * 500_000 + b"]" * 500_000),
    "1 MB of nesting, then id": b'{"tools": ' + b"[" * 500_000 + b"]" * 500_000 + b", " + _request()[1:],
}


def _per_call_us(fn: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def _refused(data: bytes) -> Callable[[], object]:
    def call() -> object:
        try:
            return decode_request(data, use_case="draft", account="acme", max_payload=2 * 1024 * 1024)
        except InvalidMessage as exc:
            return exc
    return call


def main() -> None:
    print(f"Machine: {cpu_model()}, Python {platform.python_version()}, msgspec {version('msgspec')}.\n")
    print("| body | bytes | typed decode µs | door µs | peek µs |")
    print("|---|---:|---:|---:|---:|")
    for name, data in VALID.items():
        n = 200 if len(data) > 10_000 else 20_000
        typed = _per_call_us(lambda d=data: _typed.decode(d), n)  # type: ignore[misc]
        door = _per_call_us(lambda d=data: decode_request(d, use_case="draft", account="acme"), n)  # type: ignore[misc]
        print(f"| {name} | {len(data):,} | {typed:.1f} | {door:.1f} | - |")
    for name, data in HOSTILE.items():
        n = 5 if len(data) > 100_000 else 200
        door = _per_call_us(_refused(data), n)
        peek = _per_call_us(lambda d=data: peek_request(d), n)  # type: ignore[misc]
        print(f"| {name} (refused) | {len(data):,} | - | {door:.1f} | {peek:.1f} |")


if __name__ == "__main__":
    main()
