"""The messages that used to stop the fleet, against a real `switchyard up` with its own nats-server and
PostgreSQL: no process exits or is restarted, the fleet keeps serving, its processes' memory stays
bounded, and `up` started again on the same data dir comes up clean (before, the message was still in the
stream and stopped the next start too).

Memory: each Switchyard process's resident set (`up` itself, the dispatcher, every worker, the auditor) is
read after a warm-up (the named cases, 300 generated messages and WARM_BIG_COUNT large hostile ones, so
that the allocator's heap has reached what handling them takes, then a request answered) and again
after a second round (100 other generated messages and BIG_COUNT hostile messages of BIG_SIZE bytes each,
then a request answered). Growth must stay below MEMORY_BOUND per process. The second round carries
BIG_COUNT × BIG_SIZE = 48 MiB of hostile bodies, so a process that kept any per-message copy of what it
was sent (the raw body, its decoded text, a log context or an error holding it) would grow by at least
that, over the bound; a process that frees what it handled returns the large buffers to the system.
What it cannot see: a small fixed leak per message, under MEMORY_BOUND / ~200 messages (about 160 KiB)
each; the generated corpus of test_hostile.py (a few thousand messages, 100,000 in its long mode) is
where such a leak would add up, and it does not measure memory. nats-server and PostgreSQL are not
measured: their caches are theirs, sized by their own config."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import threading
from pathlib import Path

import msgspec
import nats
import psutil
from nats.js import JetStreamContext

from .helpers import request
from .test_hostile import corpus
from .test_up import _clean_env
from .test_up_supervise import _ask, _switchyard_up

MEMORY_BOUND = 32 * 2**20
"""How much a Switchyard process may grow over the second round: well above what freeing allocators and
warm caches move (a few MiB), well below the 48 MiB of hostile bodies that round carries."""
BIG_COUNT = 96
WARM_BIG_COUNT = 24
BIG_SIZE = 512 * 1024
"""Half of nats-server's default max_payload (1 MiB): with a dead-letter copy's headers it still fits."""


def _big_cases(count: int, seed: int) -> list[tuple[str, bytes]]:
    """(subject, body) of `count` hostile messages of BIG_SIZE bytes, each different: requests whose huge
    text is decoded before a wrong field refuses them, and bytes that are not even UTF-8."""
    rng = random.Random(seed)
    cases: list[tuple[str, bytes]] = []
    for i in range(count):
        if i % 2:
            cases.append((f"llm.req.big{i}.acme", rng.randbytes(BIG_SIZE)))
            continue
        body = request(reply_to=f"_INBOX.big{i}", max_tokens=-1, text="")
        body["messages"][0]["content"] = rng.randbytes(BIG_SIZE // 2 - 100).hex()
        cases.append((f"llm.req.big{i}.acme", msgspec.json.encode(body)))
    return cases


def _named_cases(max_payload: int) -> list[tuple[str, bytes]]:
    """(subject, body) of every message the issue saw stop the fleet."""
    long_inbox = "_INBOX." + "x" * 5000
    near_max = request(reply_to="_INBOX.near", text="")
    near_max["messages"][0]["content"] = "y" * (max_payload - 100 - len(msgspec.json.encode(near_max)))
    deep = msgspec.json.encode(request(reply_to="_INBOX.deep", tools=[{"name": "t", "parameters": "D"}]))
    surrogate = msgspec.json.encode(request(reply_to="_INBOX.s", text="S"))
    return [
        ("llm.req.draft.acme", msgspec.json.encode(request(reply_to=long_inbox))),
        ("llm.req.draft.acme", msgspec.json.encode(request(reply_to=long_inbox, max_tokens=-1))),
        ("llm.req.draft.acme", msgspec.json.encode(near_max)),
        ("llm.req.draft.acme", msgspec.json.encode(request(id="nul\u0000id", reply_to="_INBOX.nul"))),
        ("llm.req.draft.acme", msgspec.json.encode(request(metadata={"k": "a\u0000b"}, reply_to="_INBOX.m"))),
        ("llm.req.draft.acme", deep.replace(b'"D"', b'{"a":' * 5000 + b"1" + b"}" * 5000)),
        ("llm.req.draft.acme", surrogate.replace(b'"S"', b'"\\udcff"')),
        ("llm.req.draft.acme", msgspec.json.encode(request(id="a.b", reply_to="_INBOX.dot"))),
        ("llm.req.draft.acme.extra", msgspec.json.encode(request(reply_to="_INBOX.x"))),
        ("llm.req.draft", b"\xff\xfe not even UTF-8"),
    ]


async def test_hostile_messages_under_up_stop_nothing_and_a_restart_comes_up_clean(tmp_path: Path) -> None:
    env = _clean_env(tmp_path / "data")
    async with _switchyard_up(env) as up:
        url = _nats_url(up.lines)
        drain = _drain(up.proc, up.lines)  # the fleet logs every refusal: keep its pipe from filling
        children = {p.pid: p for p in psutil.Process(up.proc.pid).children(recursive=True)}
        nc = await nats.connect(url)
        js = nc.jetstream()
        cases = _named_cases(nc.max_payload)
        cases += [(f"llm.req.h{i}.acme", data) for i, h in enumerate(corpus(300)) if len(data := h.encode(i)[0])
                  <= nc.max_payload]
        cases += _big_cases(WARM_BIG_COUNT, seed=1)
        await _publish_all(js, cases, up.lines)
        ask = await _ask(env)
        assert ask.returncode == 0, ask.stderr
        warm = _memory(up.proc.pid)

        second = [(f"llm.req.m{i}.acme", data) for i, h in enumerate(corpus(100, batch=1))
                  if len(data := h.encode(i)[0]) <= nc.max_payload]
        big = _big_cases(BIG_COUNT, seed=2)
        await _publish_all(js, [c for pair in zip(second, big, strict=False) for c in pair]
                           + second[len(big):], up.lines)
        ask = await _ask(env)
        assert ask.returncode == 0, ask.stderr
        after = _memory(up.proc.pid)
        growth = {name: after[name] - rss for name, rss in warm.items() if name in after}
        print("RSS growth over the second round (MiB):", {n: round(g / 2**20, 1) for n, g in growth.items()})
        assert set(growth) == set(warm) and len(growth) >= 4, (warm, after)
        assert all(g < MEMORY_BOUND for g in growth.values()), growth
        now = {p.pid for p in psutil.Process(up.proc.pid).children(recursive=True)}
        assert set(children) <= now, "a process of the fleet exited"
        assert not any("exited" in line for line in up.lines), "".join(up.lines)
        await nc.close()
        await _stop(up.proc, drain, up.lines)

    async with _switchyard_up(env) as again:
        drain = _drain(again.proc, again.lines)
        ask = await _ask(env)
        assert ask.returncode == 0, ask.stderr
        await asyncio.sleep(3)  # the old fleet died a few seconds after "ready"
        assert not any("exited" in line for line in again.lines), "".join(again.lines)
        nc = await nats.connect(_nats_url(again.lines))
        for stream in ("LLM_REQ", "LLM_WORK"):
            assert (await nc.jetstream().stream_info(stream)).state.messages == 0
        await nc.close()
        await _stop(again.proc, drain, again.lines)


async def _publish_all(js: JetStreamContext, cases: list[tuple[str, bytes]], lines: list[str]) -> None:
    """Publish every case, then wait until the dispatcher has handled all of them."""
    for subject, body in cases:
        await js.publish(subject, body)
    for _ in range(600):
        info = await js.consumer_info("LLM_REQ", "dispatch")
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"requests left: {info}\n" + "".join(lines[-30:]))


def _memory(up_pid: int) -> dict[str, int]:
    """Resident set size of `up` and of each Switchyard process it runs, by name (`dispatcher`, `worker
    demo`, `auditor`): the processes started as `python -m workers.cli`."""
    up = psutil.Process(up_pid)
    sizes = {"up": up.memory_info().rss}
    for p in up.children(recursive=True):
        cmd = p.cmdline()
        if "workers.cli" in cmd:
            role = cmd[cmd.index("workers.cli") + 1]
            name = f"worker {cmd[cmd.index('--pool') + 1]}" if role == "worker" else role
            sizes[name] = p.memory_info().rss
    return sizes


def _nats_url(lines: list[str]) -> str:
    for line in lines:
        if "NATS:" in line:
            return line.split("NATS:", 1)[1].strip()
    raise AssertionError("up printed no NATS URL:\n" + "".join(lines))


def _drain(proc: subprocess.Popen[str], lines: list[str]) -> threading.Thread:
    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


async def _stop(proc: subprocess.Popen[str], drain: threading.Thread, lines: list[str]) -> None:
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 60) == 0, "".join(lines[-30:])
    await asyncio.to_thread(drain.join, 10)
    assert any("switchyard: stopped" in line for line in lines)
    await asyncio.sleep(0.3)
    assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
