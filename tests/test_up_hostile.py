"""The messages that used to stop the fleet, against a real `switchyard up` with its own nats-server and
PostgreSQL: no process exits or is restarted, the fleet keeps serving, and `up` started again on the same
data dir comes up clean (before, the message was still in the stream and stopped the next start too)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
from pathlib import Path

import msgspec
import nats
import psutil

from .helpers import request
from .test_hostile import corpus
from .test_up import _clean_env
from .test_up_supervise import _ask, _switchyard_up


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
        for subject, body in cases:
            await js.publish(subject, body)
        for i, h in enumerate(corpus(300)):
            data, _ = h.encode(i)
            if len(data) <= nc.max_payload:
                await js.publish(f"llm.req.h{i}.acme", data)
        for _ in range(300):
            info = await js.consumer_info("LLM_REQ", "dispatch")
            if info.num_pending == 0 and info.num_ack_pending == 0:
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError(f"requests left: {info}\n" + "".join(up.lines[-30:]))
        ask = await _ask(env)
        assert ask.returncode == 0, ask.stderr
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
