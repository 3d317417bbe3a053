"""`switchyard status`: what each queue holds and how busy each consumer is, for operators."""

from __future__ import annotations

import argparse
from pathlib import Path

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from .fleet import OK, connected, fleet_prefix

STREAMS = ("LLM_REQ", "LLM_WORK", "LLM_EVENTS", "LLM_DLQ", "LLM_RES")


async def report(js: JetStreamContext) -> str:
    """A plain-text table of streams and consumers. Raises nothing for a stream that is missing."""
    lines = ["stream       messages  bytes", "------------ --------- ----------"]
    consumers: list[tuple[str, str, int, int, int, int, int]] = []
    for name in STREAMS:
        try:
            info = await js.stream_info(name)
        except NotFoundError:
            lines.append(f"{name:<12} (missing: no fleet process has started on this server yet)")
            continue
        lines.append(f"{name:<12} {info.state.messages:>9} {info.state.bytes:>10}")
        for c in await js.consumers_info(name):
            consumers.append((
                name, c.name, c.num_pending or 0, c.num_ack_pending or 0, c.config.max_ack_pending or 0,
                c.num_redelivered or 0, c.num_waiting or 0,
            ))
    lines += [
        "",
        "consumer            stream      waiting  in flight (max)  redelivered  pull requests",
        "------------------- ---------- -------- ---------------- ------------ --------------",
    ]
    for stream, name, pending, acking, cap, redelivered, waiting in consumers:
        lines.append(
            f"{name:<19} {stream:<10} {pending:>8} {acking:>7} ({cap:>6}) {redelivered:>12} {waiting:>14}"
        )
    lines += [
        "",
        "waiting: not yet delivered; in flight: delivered, not acked (capped by max_ack_pending);",
        "pull requests: open requests from the consumer's replicas (about one per live replica).",
    ]
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    st = sub.add_parser("status", help="queues and consumers: what waits, what is in flight, live replicas")
    st.add_argument("--data-dir", type=Path, default=None, help="find the fleet `switchyard up` started here")
    st.set_defaults(run=status)


async def status(args: argparse.Namespace) -> int:
    """Print the report. Raises NoFleet when NATS is unreachable or holds no fleet: another
    team's streams on the same server are none of this command's business."""
    async with connected(args.data_dir) as (nc, url):
        js = nc.jetstream()
        await fleet_prefix(js, url)
        print(f"NATS: {url}\n")
        print(await report(js))
        return OK
