"""The `switchyard` command."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nats
from nats.aio.client import Client as NATS

from router.client import Client
from router.config import ConfigError
from router.errors import SwitchyardError
from schemas import Done, Message

from . import processes
from .runtime import configure_logging, run


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="switchyard", description="An LLM request router on a NATS worker fleet.")
    p.add_argument("--log-level", default=os.environ.get("SWITCHYARD_LOG_LEVEL", "info"))
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="the whole fleet on embedded NATS and PostgreSQL")
    up.add_argument("--config", help="routing config (TOML); default: the shipped example")
    up.add_argument("--data-dir", type=Path, default=None, help="where NATS and PostgreSQL keep data (.switchyard)")
    up.add_argument("--nats-port", type=int, default=0, help="port of the embedded nats-server (default: a free one)")

    for name, text in (("dispatcher", "the dispatcher"), ("auditor", "the auditor")):
        s = sub.add_parser(name, help=f"run {text} (NATS_URL, DATABASE_URL)")
        s.add_argument("--config")
    w = sub.add_parser("worker", help="run one pool's provider worker (NATS_URL)")
    w.add_argument("--pool", required=True)
    w.add_argument("--config")

    st = sub.add_parser("status", help="queues and consumers: what waits, what is in flight, live replicas")
    st.add_argument("--data-dir", type=Path, default=None, help="find the fleet `switchyard up` started here")

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
    return p


def _nats_url_for_client(data_dir: Path | None) -> str:
    from .up import default_data_dir, read_state

    if os.environ.get("NATS_URL"):
        return os.environ["NATS_URL"]
    state = read_state(data_dir or default_data_dir())
    return state.nats_url if state else "nats://127.0.0.1:4222"


async def _connect_once(url: str) -> NATS:
    """One attempt, no reconnect loop and no traceback: a CLI reports an unreachable fleet and exits."""

    async def quiet(_exc: Exception) -> None:
        return None

    # max_reconnect_attempts=0 would mean "forever" to nats-py; 1 is one retry, then NoServersError.
    return await nats.connect(
        url, connect_timeout=3, allow_reconnect=False, max_reconnect_attempts=1, reconnect_time_wait=0.1,
        error_cb=quiet,
    )


def _summary(done: Done, wall_ms: float) -> str:
    u = done.usage
    cost = f"${done.cost_usd:.6f}" if done.cost_usd is not None else "unknown"
    ttft = f"{done.ttft_ms} ms" if done.ttft_ms is not None else "-"
    return (
        f"provider: {done.provider}  model: {done.model}  tokens: {u.input_tokens} in / {u.output_tokens} out"
        f"  cost: {cost}  latency: {done.latency_ms} ms (ttft {ttft}, round trip {wall_ms:.0f} ms)"
    )


async def _ask(args: argparse.Namespace) -> int:
    url = _nats_url_for_client(args.data_dir)
    try:
        nc = await _connect_once(url)
    except Exception as exc:
        print(f"switchyard: cannot reach NATS at {url} ({type(exc).__name__}); is `switchyard up` running?",
              file=sys.stderr)
        return 2
    client = await Client.connect(nc)
    messages = [Message(role="system", content=args.system)] if args.system else []
    messages.append(Message(role="user", content=args.prompt))
    fields = {"tier": args.tier, "model": args.model, "timeout_ms": args.timeout_ms}
    started = time.monotonic()
    try:
        if args.stream:
            stream = client.stream(args.use_case, args.account, messages, **fields)
            async for text in stream:
                print(text, end="", flush=True)
            print()
            assert stream.done is not None
            done = stream.done
        else:
            done = await client.complete(args.use_case, args.account, messages, **fields)
            print(done.text)
        for call in done.tool_calls:
            print(f"tool call: {call.name}({call.arguments})")
        print(_summary(done, (time.monotonic() - started) * 1000), file=sys.stderr)
        return 0
    except SwitchyardError as exc:
        print(f"\nswitchyard: {exc.code.value} ({exc.status}): {exc.message}", file=sys.stderr)
        return 1
    finally:
        await client.close()
        await nc.close()


async def _status(args: argparse.Namespace) -> int:
    from .status import report

    url = _nats_url_for_client(args.data_dir)
    try:
        nc = await _connect_once(url)
    except Exception as exc:
        print(f"switchyard: cannot reach NATS at {url} ({type(exc).__name__}); is the fleet up?", file=sys.stderr)
        return 2
    try:
        print(f"NATS: {url}\n")
        print(await report(nc.jetstream()))
        return 0
    finally:
        await nc.close()


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command in ("ask", "status"):
        import uvloop

        sys.exit(uvloop.run(_ask(args) if args.command == "ask" else _status(args)))
    configure_logging(args.log_level)
    try:
        if args.command == "up":
            from .up import default_data_dir, up

            data_dir = args.data_dir or default_data_dir()
            run(lambda stop: up(stop, config_path=args.config, data_dir=data_dir, nats_port=args.nats_port))
            return
        cfg = processes.load_config(args.config)
        nats_url = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
        if args.command == "dispatcher":
            run(lambda stop: processes.run_dispatcher(stop, cfg, nats_url))
        elif args.command == "worker":
            run(lambda stop: processes.run_worker(stop, cfg, nats_url, args.pool))
        elif args.command == "auditor":
            db = os.environ.get("DATABASE_URL")
            if not db:
                sys.exit("switchyard auditor: set DATABASE_URL to the PostgreSQL the audit ledger lives in")
            run(lambda stop: processes.run_auditor(stop, cfg, nats_url, db))
    except ConfigError as exc:
        sys.exit(f"switchyard: bad config: {exc}")


if __name__ == "__main__":
    main()
