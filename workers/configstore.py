"""The routing config in the `llm_config` KV bucket: pushed once, followed by every process.

`switchyard config push` (and `switchyard up` at start) validates a config and puts it under one
key; each dispatcher and worker watches that key and swaps its config whole when it changes, so a
change applies everywhere without a restart. A process started before any push runs on its own
`--config` file until the first one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import nats.errors
import structlog
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue

from router import config as config_mod
from router.config import Config, ConfigError

log = structlog.get_logger("config")

BUCKET = "llm_config"
KEY = "current"
HISTORY = 10
"""Earlier configs kept in the bucket, for `switchyard config show --revision`."""


async def bucket(js: JetStreamContext) -> KeyValue:
    try:
        return await js.key_value(BUCKET)
    except BucketNotFoundError:
        return await js.create_key_value(
            js_api.KeyValueConfig(bucket=BUCKET, history=HISTORY, storage=js_api.StorageType.FILE)
        )


async def push(js: JetStreamContext, cfg: Config) -> int:
    """Publish a validated config; returns its revision."""
    kv = await bucket(js)
    return int(await kv.put(KEY, config_mod.encode(cfg)))


async def current(js: JetStreamContext, revision: int | None = None) -> tuple[Config, int] | None:
    """The pushed config (or an earlier revision of it) and its revision; None when nothing was pushed.
    Raises ConfigError when the stored value does not decode (pushed by something that did not validate)."""
    kv = await bucket(js)
    try:
        entry = await kv.get(KEY, revision=revision)
    except KeyNotFoundError:
        return None
    if entry.value is None:
        return None
    return config_mod.decode(entry.value), int(entry.revision or 0)


class LiveConfig:
    """The config a process runs on. `current` is replaced whole, never edited, so a request reads one
    consistent config; listeners are called after each swap."""

    def __init__(self, initial: Config) -> None:
        self.current = initial
        self.revision = 0
        self._listeners: list[Callable[[Config], None]] = []

    def on_change(self, listener: Callable[[Config], None]) -> None:
        self._listeners.append(listener)

    def apply(self, cfg: Config, revision: int) -> None:
        if revision <= self.revision:
            return
        self.current, self.revision = cfg, revision
        for listener in self._listeners:
            try:
                listener(cfg)
            except Exception:
                log.exception("config_listener_failed", revision=revision)
        log.info("config_applied", revision=revision)

    async def follow(self, js: JetStreamContext, stop: asyncio.Event) -> None:
        """Apply every pushed config until `stop` is set. A stored value that does not decode is
        logged and skipped: the running config stays."""
        kv = await bucket(js)
        watcher = await kv.watch(KEY)
        try:
            while not stop.is_set():
                try:
                    entry = await watcher.updates(timeout=1.0)  # type: ignore[no-untyped-call]
                except nats.errors.TimeoutError:
                    continue
                if entry is None or entry.value is None or entry.operation is not None:
                    continue  # the end of the initial replay, or a delete
                try:
                    cfg = config_mod.decode(entry.value)
                except (ConfigError, ValueError, TypeError) as exc:  # not a config: keep the running one
                    log.error("config_refused", revision=entry.revision, error=str(exc))
                    continue
                self.apply(cfg, int(entry.revision or 0))
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]
