"""`switchyard ask`: one request to the fleet, its answer printed as it arrives."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import msgspec
from nats.js.errors import NoStreamResponseError

from router.client import Client
from router.errors import SwitchyardError
from schemas import Done, Message
from schemas.messages import Token

from .fleet import OK, REFUSED, NoFleet, connected, fleet_prefix, say


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ask = sub.add_parser("ask", help="send one request and print the answer")
    ask.add_argument("prompt")
    ask.add_argument("--use-case", default="draft")
    ask.add_argument("--account", default="demo")
    ask.add_argument("--tier", default="default")
    ask.add_argument("--model", default=None)
    ask.add_argument("--system", default=None, help="a system prompt")
    ask.add_argument("--stream", action="store_true", help="print the answer as it arrives")
    ask.add_argument("--timeout-ms", type=int, default=60_000)
    ask.add_argument("--data-dir", type=Path, default=None, help="find the fleet `switchyard up` started here")
    ask.set_defaults(run=ask_command)


def name_problem(flag: str, value: str) -> str | None:
    """Why a use case, account or tier name cannot be used, in one line; None when it can.

    They are subject tokens (`llm.req.<use_case>.<account>`): a dot or a space would put the
    request on another subject, or on none, so the wire schema's own rule is checked here.
    """
    try:
        msgspec.convert(value, type=Token)
    except msgspec.ValidationError:
        return (f"{flag} {value[:140]!r}: names are 1-128 characters of A-Z a-z 0-9 _ -"
                " (no spaces, dots or other characters)")
    return None


def _summary(done: Done, wall_ms: float) -> str:
    u = done.usage
    cost = f"${done.cost_usd:.6f}" if done.cost_usd is not None else "unknown"
    ttft = f"{done.ttft_ms} ms" if done.ttft_ms is not None else "-"
    return (
        f"provider: {done.provider}  model: {done.model}  tokens: {u.input_tokens} in / {u.output_tokens} out"
        f"  cost: {cost}  latency: {done.latency_ms} ms (ttft {ttft}, round trip {wall_ms:.0f} ms)"
    )


async def ask_command(args: argparse.Namespace) -> int:
    """Send the request and print the answer. Raises NoFleet when there is no fleet to ask."""
    for flag, value in (("--use-case", args.use_case), ("--account", args.account), ("--tier", args.tier)):
        problem = name_problem(flag, value)
        if problem:
            say(problem)
            return REFUSED
    async with connected(args.data_dir, account=args.account) as (nc, url):
        prefix = await fleet_prefix(nc.jetstream(), url)
        client = await Client.connect(nc, prefix=prefix)
        try:
            return await _ask(client, args)
        except NoStreamResponseError:  # LLM_REQ went away after it was found
            raise NoFleet(f"NATS at {url} took no request: its LLM_REQ stream is gone") from None
        finally:
            await client.close()


async def _ask(client: Client, args: argparse.Namespace) -> int:
    messages = [Message(role="system", content=args.system)] if args.system else []
    messages.append(Message(role="user", content=args.prompt))
    fields = {"tier": args.tier, "model": args.model, "timeout_ms": args.timeout_ms}
    started = time.monotonic()
    printed = False
    try:
        if args.stream:
            stream = client.stream(args.use_case, args.account, messages, **fields)
            async for text in stream:
                printed = True
                print(text, end="", flush=True)
            print()
            assert stream.done is not None
            done = stream.done
        else:
            done = await client.complete(args.use_case, args.account, messages, **fields)
            print(done.text)
    except SwitchyardError as exc:
        if printed:
            print()  # end the partial answer's line before the error's
        say(f"{exc.code.value} ({exc.status}): {exc.message}")
        return REFUSED
    for call in done.tool_calls:
        print(f"tool call: {call.name}({call.arguments})")
    print(_summary(done, (time.monotonic() - started) * 1000), file=sys.stderr)
    return OK
