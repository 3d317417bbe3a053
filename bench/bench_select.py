"""What route selection costs per request: `router.routing.select()` as the dispatcher calls it.

The shipped config (workers/example.toml), requests already decoded (the door is bench_door.py),
and a health view answering from dicts as `workers.health.HealthView` does from its KV mirrors.
`needs` is the part of select() that reads the request (the prompt estimate); the rest walks the
chain (model table, health). Single process, best of 5 repeats of a timed loop.

    .venv/bin/python bench/bench_select.py
"""

from __future__ import annotations

import platform
import timeit
from collections.abc import Callable

from machine import cpu_model, version  # bench/ is on sys.path when a bench runs

from router.config import load, parse_target
from router.routing import AccountRoute, AlwaysHealthy, Health, needs, select
from schemas import ImagePart, Message, Request, TextPart, Tool
from workers.processes import DEFAULT_CONFIG

CFG = load(DEFAULT_CONFIG)
NOW = 1_700_000_000_000


class DictHealth:
    """Breakers, credit and key reports held in dicts, as HealthView keeps its KV mirrors."""

    def __init__(self, open_pools: set[str]) -> None:
        self.until = {p: NOW + 60_000 for p in open_pools}
        self.credit: dict[str, int] = {}
        self.keys = {p: True for p in CFG.pools}

    def pool_open(self, pool: str, now_ms: int) -> bool:
        return self.until.get(pool, 0) > now_ms

    def provider_exhausted(self, provider: str, now_ms: int) -> bool:
        return self.credit.get(provider, 0) > now_ms

    def pool_has_key(self, pool: str) -> bool | None:
        return self.keys.get(pool)


def _req(use_case: str = "draft", tier: str = "default", text: str = "Write a follow-up about the sketches.",
         **fields: object) -> Request:
    messages = fields.pop("messages", None) or [
        Message(role="system", content="You write short, friendly emails."), Message(role="user", content=text)]
    return Request(id="01JD7S8Q0Z6W2E4T8X1M3N5P7R", use_case=use_case, account="acme", tier=tier,
                   reply_to="_INBOX.k3Jq9sPz0aXcVb7Ye1Rt.1", messages=messages, **fields)  # type: ignore[arg-type]


TOOL = Tool(name="get_weather", description="Current weather for a city",
            parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
IMAGE = [TextPart(text="What is on this whiteboard?"), ImagePart(url="https://files.example.com/board.png")]
OWN = AccountRoute(account="acme", use_case="draft", tier="*",
                   targets=[parse_target("openai:gpt-4o"), parse_target("anthropic:claude-sonnet-4-5")])

CASES: dict[str, tuple[Request, Health, AccountRoute | None]] = {
    "default tier (3 targets)": (_req(), AlwaysHealthy(), None),
    "pro tier (3 targets)": (_req(tier="pro"), AlwaysHealthy(), None),
    "the account's own route (2 targets)": (_req(), AlwaysHealthy(), OWN),
    "live health, first breaker open": (_req(), DictHealth({"anthropic"}), None),
    "forced model on the route": (_req(model="gpt-4o-mini"), AlwaysHealthy(), None),
    "forced model, admin tier searches the config": (_req(tier="admin", model="zai:glm-4.6"), AlwaysHealthy(), None),
    "forced model not allowed (refused)": (_req(model="gpt-4o"), AlwaysHealthy(), None),
    "an image": (_req("vision", messages=[Message(role="user", content=IMAGE)]), AlwaysHealthy(), None),
    "8 tools": (_req(tools=[TOOL] * 8), AlwaysHealthy(), None),
    "100 KB prompt": (_req(text="word " * 20_000), AlwaysHealthy(), None),
    "200 messages": (_req(messages=[Message(role="user", content="a short turn of a long chat")] * 200),
                     AlwaysHealthy(), None),
}


def _per_call_us(fn: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> None:
    print(f"Machine: {cpu_model()}, Python {platform.python_version()}, msgspec {version('msgspec')}.\n")
    print("| request | chain | select() µs | of which needs() µs |")
    print("|---|---|---:|---:|")
    for name, (r, health, own) in CASES.items():
        s = select(CFG, r, health, account_route=own, now_ms=NOW)
        what = " → ".join(str(t) for t in s.chain) if s.chain else f"refused: {s.code}"
        if s.skipped:
            what += f" (skipped {', '.join(f'{x.pool}:{x.model}' for x in s.skipped)})"
        total = _per_call_us(lambda r=r, h=health, o=own: select(CFG, r, h, account_route=o, now_ms=NOW), 20_000)
        estimate = _per_call_us(lambda r=r: needs(r), 20_000)  # type: ignore[misc]
        print(f"| {name} | {what} | {total:.1f} | {estimate:.1f} |")


if __name__ == "__main__":
    main()
