"""`switchyard status`: what each queue holds and how busy each consumer is, for operators."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

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


