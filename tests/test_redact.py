"""The log processor that keeps keys and tokens out of log lines."""

from __future__ import annotations

import io
import json
import uuid

import structlog

from router.redact import MASK, redact_secrets, remember_secret, scrub

FAKE_OPENAI = "sk-proj-" + "A1b2C3d4E5f6G7h8I9j0K1l2"
FAKE_ANTHROPIC = "sk-ant-" + "api03-abcdefghijklmnopqrstu"
FAKE_GOOGLE = "AIza" + "SyA-1234567890abcdefghijklmnopqrs"


def test_secret_named_keys_are_masked_at_any_depth() -> None:
    event = {"event": "call", "api_key": "whatever", "headers": {"Authorization": "Bearer abc", "x-goog-api-key": "k"},
             "nested": [{"password": "hunter2"}]}
    out = redact_secrets(None, "info", event)
    assert out["api_key"] == MASK
    assert out["headers"] == {"Authorization": MASK, "x-goog-api-key": MASK}
    assert out["nested"] == [{"password": MASK}]
    assert out["event"] == "call"


def test_key_shaped_values_are_masked_inside_text() -> None:
    for key in (FAKE_OPENAI, FAKE_ANTHROPIC, FAKE_GOOGLE):
        text = scrub(f"provider said: invalid key {key} (check it)")
        assert key not in text and MASK in text and text.startswith("provider said")
    assert "hunter2" not in scrub("postgresql://app:hunter2@db:5432/llm")
    assert "abcdefgh12345" not in scrub("Authorization: Bearer abcdefgh12345")


def test_the_configured_logger_never_prints_a_key() -> None:
    buf = io.StringIO()
    structlog.configure(
        processors=[redact_secrets, structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(buf),
        cache_logger_on_first_use=False,
    )
    try:
        structlog.get_logger().error("provider_failed", error=f"401 for key {FAKE_OPENAI}", api_key=FAKE_OPENAI)
    finally:
        structlog.reset_defaults()
    line = json.loads(buf.getvalue())
    assert FAKE_OPENAI not in buf.getvalue()
    assert line["api_key"] == MASK and line["event"] == "provider_failed"


def test_a_remembered_key_of_no_known_shape_is_masked_in_replies_and_log_lines() -> None:
    # Fresh for this test: what a process remembers stays remembered, and other tests remember keys too.
    prefix, secret = uuid.uuid4().hex[:6], uuid.uuid4().hex
    key = f"{prefix}.{secret}"
    assert scrub(f"bad key {key}") == f"bad key {key}"  # no pattern knows it
    remember_secret(key)
    assert scrub(f"bad key {key}") == f"bad key {MASK}"
    assert scrub(f"the part {secret} alone") == f"the part {MASK} alone"  # a distinctive part too
    line = redact_secrets(None, "warning", {"event": "failed", "error": f"Invalid request made with key {key}"})
    assert secret not in json.dumps(line)
    remember_secret(None)  # a worker without a key: nothing to remember
    remember_secret("")
