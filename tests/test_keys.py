"""Provider keys stored encrypted: the crypto, the `switchyard keys` commands, and workers using them."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest
import structlog.testing
from nats.aio.client import Client as NATS

from router.providers.fakes import FakeOpenAI
from router.secrets import MASTER_KEYS_ENV, Sealed, SecretsError, mask, parse_master_keys
from schemas import Done, Error
from workers.keys import KeyRing, keyring_for_worker, stored_names

from .conftest import fleet_config, running_fleet
from .helpers import ask_raw, request, switchyard

NAME = "SY_TEST_OPENAI_KEY"
"""The key name fleet_config's openai provider reads (its api_key_env)."""


def master(version: int) -> str:
    return f"{version}:{base64.b64encode(os.urandom(32)).decode()}"


def a_key(prefix: str = "sk-proj-") -> str:
    return prefix + uuid.uuid4().hex + uuid.uuid4().hex[:8]


@pytest.fixture
async def clean_keys(db: asyncpg.Pool) -> AsyncIterator[asyncpg.Pool]:
    """The database is shared by the session: this file's tests start and end with no stored key."""
    await db.execute("TRUNCATE llm_provider_keys")
    yield db
    await db.execute("TRUNCATE llm_provider_keys")


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pg_url: str, clean_keys: asyncpg.Pool) -> str:
    """DATABASE_URL and one master key (version 1) for the commands; returns that master key entry."""
    entry = master(1)
    monkeypatch.setenv("DATABASE_URL", pg_url)
    monkeypatch.setenv(MASTER_KEYS_ENV, entry)
    monkeypatch.setenv("SWITCHYARD_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("SWITCHYARD_CONFIG", raising=False)
    return entry


async def keys_set(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, secret: str, *args: str,
                   ) -> tuple[int, str, str]:
    """`switchyard keys set ARGS` with `secret` piped on stdin."""
    monkeypatch.setattr("sys.stdin", io.StringIO(secret + "\n"))
    return await switchyard(capsys, "keys", "set", *args)


async def seen(check: Callable[[], bool], seconds: float = 10.0) -> None:
    """Wait until `check()` holds (a worker follows the table within about two seconds)."""
    end = time.monotonic() + seconds
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"not seen within {seconds} s")
        await asyncio.sleep(0.02)


# --- the crypto -----------------------------------------------------------------------------------


def test_the_newest_version_encrypts_and_every_listed_one_decrypts() -> None:
    old, new = master(1), master(2)
    sealed_old = parse_master_keys(old).seal("OPENAI_API_KEY", None, "sk-old-secret-value")
    keys = parse_master_keys(f"{new},{old}")
    assert keys.newest == 2 and sealed_old.version == 1
    assert keys.open("OPENAI_API_KEY", None, sealed_old) == "sk-old-secret-value"
    fresh = keys.seal("OPENAI_API_KEY", "acme", "sk-new-secret-value")
    assert fresh.version == 2 and b"sk-new" not in fresh.ciphertext
    assert keys.open("OPENAI_API_KEY", "acme", fresh) == "sk-new-secret-value"
    # The highest version encrypts whatever the order it is listed in.
    assert parse_master_keys(f"{old},{new}").newest == 2


def test_a_ciphertext_fits_only_its_own_row() -> None:
    entry = master(1)
    keys = parse_master_keys(entry)
    sealed = keys.seal("OPENAI_API_KEY", "acme", "sk-acme-only-1234567890")
    for name, account in (("OPENAI_API_KEY", "globex"), ("OPENAI_API_KEY", None), ("ZAI_API_KEY", "acme")):
        with pytest.raises(SecretsError, match="does not decrypt"):
            keys.open(name, account, sealed)
    # Relabelled with another version, even one whose master key is the same: refused.
    same_twice = parse_master_keys(f"2:{entry.partition(':')[2]},{entry}")
    relabelled = Sealed(ciphertext=sealed.ciphertext, nonce=sealed.nonce, version=2)
    with pytest.raises(SecretsError, match="does not decrypt with master key version 2"):
        same_twice.open("OPENAI_API_KEY", "acme", relabelled)
    assert same_twice.open("OPENAI_API_KEY", "acme", sealed) == "sk-acme-only-1234567890"
    with pytest.raises(SecretsError, match="version 1, which SWITCHYARD_MASTER_KEYS does not list"):
        parse_master_keys(master(2)).open("OPENAI_API_KEY", "acme", sealed)


@pytest.mark.parametrize(("value", "says"), [
    (None, "SWITCHYARD_MASTER_KEYS is not set"),
    ("  ", "SWITCHYARD_MASTER_KEYS is not set"),
    ("c2VjcmV0LW1hdGVyaWFs", "entry 1 has no `:`"),
    ("x:c2VjcmV0LW1hdGVyaWFs", "entry 1: the version before `:` must be a whole number"),
    ("0:c2VjcmV0LW1hdGVyaWFs", "entry 1: the version before `:` must be a whole number"),
    ("1:!!secret-material!!", "entry 1 (version 1): the key after `:` is not base64"),
    ("1:c2VjcmV0LW1hdGVyaWFs", "entry 1 (version 1): the key is 15 bytes, a master key is 32"),
])
def test_a_malformed_master_key_variable_is_one_line_that_never_quotes_it(value: str | None, says: str) -> None:
    with pytest.raises(SecretsError) as err:
        parse_master_keys(value)
    text = str(err.value)
    assert says in text and "\n" not in text
    assert "c2VjcmV0LW1hdGVyaWFs" not in text and "secret-material" not in text


def test_a_version_listed_twice_is_refused() -> None:
    with pytest.raises(SecretsError, match=r"entry 2 \(version 3\): version 3 is listed twice"):
        parse_master_keys(f"{master(3)},{master(3)}")


def test_a_masked_key_shows_its_prefix_and_last_four_only() -> None:
    assert mask("sk-proj-" + "A" * 40 + "f3a9") == "sk-proj-…f3a9"
    assert mask("sk-" + "b" * 40 + "f3a9") == "sk-…f3a9"
    assert mask("sk-ant-api03-" + "c" * 40 + "f3a9") == "sk-ant-…f3a9"
    assert mask("zaiprobe.SECRETSECRETSECRET") == "…CRET"  # `zaiprobe` is a distinctive part: not shown
    assert mask("short-key") == "…"


# --- the commands ---------------------------------------------------------------------------------


async def test_set_list_rotate_and_delete(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, cli_env: str, clean_keys: asyncpg.Pool
) -> None:
    global_key, acme_key = a_key(), a_key("zaiprobe.")
    r = await keys_set(capsys, monkeypatch, global_key, NAME)
    assert r.code == 0, r.err
    assert r.out.startswith(f"stored key {NAME} (every account) (sk-proj-…{global_key[-4:]}), encrypted under master"
                            " key version 1")
    r = await keys_set(capsys, monkeypatch, acme_key, NAME, "--account", "acme")
    assert r.code == 0 and r.out.startswith(f"stored key {NAME} of account acme (…{acme_key[-4:]})")
    # In the table: encrypted, never the key.
    rows = await clean_keys.fetch("SELECT * FROM llm_provider_keys ORDER BY account NULLS FIRST")
    assert [(x["name"], x["account"], x["key_version"]) for x in rows] == [(NAME, None, 1), (NAME, "acme", 1)]
    for row in rows:
        assert global_key.encode() not in bytes(row["ciphertext"]) and acme_key.encode() not in bytes(row["ciphertext"])

    r = await switchyard(capsys, "keys", "list", "--json")
    assert r.code == 0, r.err
    listed = json.loads(r.out)
    assert [(x["name"], x["account"], x["key"], x["version"], x["rotated_at"]) for x in listed] == [
        (NAME, None, f"sk-proj-…{global_key[-4:]}", 1, None), (NAME, "acme", f"…{acme_key[-4:]}", 1, None)]
    r = await switchyard(capsys, "keys", "list")
    assert r.code == 0 and r.out.splitlines()[-1] == "2 stored keys"
    assert global_key not in r.out and acme_key not in r.out
    assert await stored_names(os.environ["DATABASE_URL"]) == {NAME}  # what `switchyard up` counts as keyed

    # Replacing a key keeps one row.
    r = await keys_set(capsys, monkeypatch, a_key(), NAME, "--account", "acme")
    assert r.code == 0 and r.out.startswith(f"replaced key {NAME} of account acme")

    # A new master key: the old one still decrypts, rotate moves every row onto the new one, all at once.
    monkeypatch.setenv(MASTER_KEYS_ENV, f"{master(2)},{cli_env}")
    r = await switchyard(capsys, "keys", "rotate")
    assert (r.code, r.out) == (0, "re-encrypted 2 keys under master key version 2 (2 from version 1); 0 already"
                                  " under it\n")
    r = await switchyard(capsys, "keys", "rotate", "--json")
    assert json.loads(r.out) == {"version": 2, "rotated": 0, "already": 2, "from_versions": {}}
    r = await switchyard(capsys, "keys", "list", "--json")
    listed = json.loads(r.out)
    assert [x["version"] for x in listed] == [2, 2] and all(x["rotated_at"] for x in listed)
    assert listed[0]["key"] == f"sk-proj-…{global_key[-4:]}"  # the same key, under another master key

    r = await switchyard(capsys, "keys", "delete", NAME, "--account", "acme")
    assert (r.code, r.out) == (0, f"deleted the stored key {NAME} of account acme; workers stop using it within"
                                  " seconds\n")
    r = await switchyard(capsys, "keys", "delete", NAME, "--account", "acme")
    assert r.code == 1 and r.err.count("\n") == 1 and f"no stored key {NAME} of account acme" in r.err
    assert await clean_keys.fetchval("SELECT count(*) FROM llm_provider_keys") == 1


async def test_a_key_never_comes_from_the_command_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, cli_env: str, clean_keys: asyncpg.Pool
) -> None:
    r = await keys_set(capsys, monkeypatch, "", NAME)
    assert r.code == 1 and r.err.startswith("switchyard: the key is empty") and r.err.count("\n") == 1
    r = await keys_set(capsys, monkeypatch, "sk-one two", NAME)
    assert r.code == 1 and "spaces, line breaks or control characters" in r.err and "sk-one" not in r.err
    with pytest.raises(SystemExit):  # argparse: there is no argument for the key
        from workers.cli import main

        main(["keys", "set", NAME, "sk-on-the-command-line"])
    r = await keys_set(capsys, monkeypatch, a_key(), "OPENAI-KEY")
    assert r.code == 2 and "is not a key name" in r.err
    assert await clean_keys.fetchval("SELECT count(*) FROM llm_provider_keys") == 0


async def test_missing_or_wrong_master_keys_and_no_database_are_one_line_each(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, cli_env: str, clean_keys: asyncpg.Pool
) -> None:
    # The operator's master keys are the operator's mistake (exit 1); no database is no fleet (exit 2).
    assert (await keys_set(capsys, monkeypatch, a_key(), NAME)).code == 0
    # Another master key under the same version: nothing decrypts, nothing is changed.
    other = master(1)
    monkeypatch.setenv(MASTER_KEYS_ENV, other)
    r = await switchyard(capsys, "keys", "rotate")
    assert r.code == 1 and r.err.count("\n") == 1
    assert r.err.startswith(f"switchyard: key {NAME} (global) does not decrypt with master key version 1")
    assert other.partition(":")[2] not in r.err and cli_env.partition(":")[2] not in r.err
    r = await switchyard(capsys, "keys", "list")
    assert r.code == 1 and "(unreadable)" in r.out and "does not decrypt" in r.err
    # Only a newer version listed: the row's version is not there.
    monkeypatch.setenv(MASTER_KEYS_ENV, master(2))
    r = await switchyard(capsys, "keys", "rotate")
    assert r.code == 1 and r.err.count("\n") == 1
    assert "is encrypted under master key version 1, which SWITCHYARD_MASTER_KEYS does not list" in r.err
    assert "nothing was rotated" in r.err
    assert await clean_keys.fetchval("SELECT key_version FROM llm_provider_keys") == 1

    monkeypatch.delenv(MASTER_KEYS_ENV)
    r = await keys_set(capsys, monkeypatch, a_key(), NAME)
    assert r.code == 1 and r.err.startswith("switchyard: SWITCHYARD_MASTER_KEYS is not set;") and r.err.count("\n") == 1
    monkeypatch.setenv(MASTER_KEYS_ENV, "1:bm90LTMyLWJ5dGVz")
    r = await switchyard(capsys, "keys", "list")
    assert r.code == 1 and "the key is 12 bytes" in r.err and "bm90LTMyLWJ5dGVz" not in r.err
    monkeypatch.setenv(MASTER_KEYS_ENV, cli_env)
    monkeypatch.delenv("DATABASE_URL")
    r = await switchyard(capsys, "keys", "list")
    assert r.code == 2 and r.err.startswith("switchyard: no database: set DATABASE_URL") and r.err.count("\n") == 1


# --- workers --------------------------------------------------------------------------------------


@pytest.fixture
async def keyring(pg_url: str, clean_keys: asyncpg.Pool, cli_env: str) -> AsyncIterator[KeyRing]:
    """A worker's view of the stored keys, under the master key the commands use."""
    ring = KeyRing(pg_url, parse_master_keys(cli_env))
    stop = asyncio.Event()
    task = asyncio.create_task(ring.run(stop))
    await asyncio.wait_for(ring.loaded.wait(), 10)
    yield ring
    stop.set()
    await asyncio.wait_for(task, 10)


def bearer(fake: FakeOpenAI) -> str:
    """The key the fake provider was last called with."""
    headers = {k.lower(): v for k, v in fake.request_headers[-1].items()}
    return headers["authorization"].removeprefix("Bearer ")


async def answered(nc: NATS, account: str) -> Done | Error:
    replies = await ask_raw(nc, request(account=account), subject=f"llm.req.draft.{account}", timeout=20)
    last = replies[-1]
    assert isinstance(last, Done | Error)
    return last


async def test_a_worker_uses_a_changed_key_without_a_restart_and_an_accounts_key_for_it_alone(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, nats_url: str, nc: NATS,
    fake_openai: FakeOpenAI, keyring: KeyRing,
) -> None:
    cfg = fleet_config({"openai": fake_openai.url + "/v1"})
    first, second, globex_own = a_key(), a_key(), a_key("gx-")
    async with running_fleet(nats_url, cfg, None, api_keys={"openai": None}, keyring=keyring):
        # No key anywhere: refused (by the dispatcher or the worker, whichever knows first) before any call.
        refused = await answered(nc, "acme")
        assert isinstance(refused, Error) and refused.code == "UNAUTHORIZED" and not fake_openai.requests

        assert (await keys_set(capsys, monkeypatch, first, NAME)).code == 0
        await seen(lambda: keyring.get(NAME, None) == first)
        assert isinstance(await answered(nc, "acme"), Done) and bearer(fake_openai) == first

        assert (await keys_set(capsys, monkeypatch, second, NAME)).code == 0
        await seen(lambda: keyring.get(NAME, None) == second)
        assert isinstance(await answered(nc, "acme"), Done) and bearer(fake_openai) == second

        # globex's own key serves globex, and globex only.
        assert (await keys_set(capsys, monkeypatch, globex_own, NAME, "--account", "globex")).code == 0
        await seen(lambda: keyring.get(NAME, "globex") == globex_own)
        assert isinstance(await answered(nc, "globex"), Done) and bearer(fake_openai) == globex_own
        assert isinstance(await answered(nc, "acme"), Done) and bearer(fake_openai) == second

        # Deleted: globex falls back to the global key.
        assert (await switchyard(capsys, "keys", "delete", NAME, "--account", "globex")).code == 0
        await seen(lambda: keyring.get(NAME, "globex") is None)
        assert isinstance(await answered(nc, "globex"), Done) and bearer(fake_openai) == second


async def test_the_environment_wins_over_the_global_stored_key_but_not_over_an_accounts_own(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, nats_url: str, nc: NATS,
    fake_openai: FakeOpenAI, keyring: KeyRing,
) -> None:
    cfg = fleet_config({"openai": fake_openai.url + "/v1"})
    from_env, stored, globex_own = a_key(), a_key(), a_key()
    assert (await keys_set(capsys, monkeypatch, stored, NAME)).code == 0
    assert (await keys_set(capsys, monkeypatch, globex_own, NAME, "--account", "globex")).code == 0
    await seen(lambda: keyring.get(NAME, "globex") == globex_own and keyring.get(NAME, None) == stored)
    async with running_fleet(nats_url, cfg, None, api_keys={"openai": from_env}, keyring=keyring):
        assert isinstance(await answered(nc, "acme"), Done) and bearer(fake_openai) == from_env
        assert isinstance(await answered(nc, "globex"), Done) and bearer(fake_openai) == globex_own


async def test_a_row_the_worker_cannot_decrypt_is_skipped_and_logged_by_name_alone(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, pg_url: str, cli_env: str,
    clean_keys: asyncpg.Pool,
) -> None:
    good, other = a_key(), a_key()
    assert (await keys_set(capsys, monkeypatch, good, NAME)).code == 0
    monkeypatch.setenv(MASTER_KEYS_ENV, master(2))  # a row under a master key the worker does not have
    assert (await keys_set(capsys, monkeypatch, other, "OTHER_KEY")).code == 0
    ring = KeyRing(pg_url, parse_master_keys(cli_env))
    stop = asyncio.Event()
    with structlog.testing.capture_logs() as logs:  # the events as logged, before any masking
        task = asyncio.create_task(ring.run(stop))
        try:
            await asyncio.wait_for(ring.loaded.wait(), 10)
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
    assert ring.get(NAME, None) == good and ring.get("OTHER_KEY", None) is None
    assert ring.has(NAME) and not ring.has("OTHER_KEY")
    unreadable = [e for e in logs if e["event"] == "stored_key_unreadable"]
    assert len(unreadable) == 1 and "key OTHER_KEY (global) is encrypted under master key version 2" in \
        unreadable[0]["problem"]
    text = repr(logs)
    assert good not in text and other not in text and "OTHER_KEY" in text


async def test_a_worker_process_reads_stored_keys_with_database_url_and_master_keys(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, nats_url: str, nc: NATS,
    fake_openai: FakeOpenAI, cli_env: str,
) -> None:
    """`switchyard worker` as `up` starts it (DATABASE_URL and SWITCHYARD_MASTER_KEYS in its environment)."""
    from workers.processes import run_worker

    stored = a_key()
    assert (await keys_set(capsys, monkeypatch, stored, NAME)).code == 0
    monkeypatch.delenv(NAME, raising=False)
    cfg = fleet_config({"openai": fake_openai.url + "/v1"})
    async with running_fleet(nats_url, cfg, None, pools=[]):  # the dispatcher; the worker is the process's own
        stop = asyncio.Event()
        worker = asyncio.create_task(run_worker(stop, cfg, nats_url, "openai"))
        try:
            assert isinstance(await answered(nc, "acme"), Done) and bearer(fake_openai) == stored
        finally:
            stop.set()
            await asyncio.wait_for(worker, 20)


def test_a_worker_without_database_url_or_with_a_malformed_master_key_uses_environment_keys_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(MASTER_KEYS_ENV, master(1))
    with structlog.testing.capture_logs() as logs:
        assert keyring_for_worker(None) is None
        monkeypatch.setenv(MASTER_KEYS_ENV, "1:c2VjcmV0LW1hdGVyaWFs")
        assert keyring_for_worker("postgresql://db.invalid/x") is None
        monkeypatch.setenv(MASTER_KEYS_ENV, master(1))
        assert keyring_for_worker("postgresql://db.invalid/x") is not None
    off = [e for e in logs if e["event"] == "stored_keys_off"]
    assert len(off) == 2 and off[0]["reason"] == "DATABASE_URL is not set"
    assert "the key is 15 bytes" in off[1]["reason"] and "c2VjcmV0LW1hdGVyaWFs" not in repr(logs)
