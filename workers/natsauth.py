"""The credentials of a secure fleet (`switchyard up --secure`): nkey users, their seeds, the server config.

Everything lives in one directory (`<data dir>/auth`, mode 0700): `users.json` lists each user's role,
name and public key; `<role>[-<name>].nk` holds each user's seed (the secret, mode 0600); `nats.conf`
is the nats-server authorization generated from them and `router/natsperms.py`'s tables (mode 0600).
A seed is written once, to its own file, and never printed or logged: what is shown is its path.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
from pathlib import Path

import msgspec
import nkeys  # type: ignore[import-untyped]

from router.natsperms import Role, User, permissions
from schemas.messages import Token

USERS_FILE = "users.json"
SERVER_CONFIG = "nats.conf"
PID_FILE = "nats.pid"


class _UsersFile(msgspec.Struct, kw_only=True):
    prefix: str = "llm"
    users: list[User] = msgspec.field(default_factory=list)


class AuthError(Exception):
    """A credential cannot be made or found; the message says what to do."""


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` readable by its owner alone, never world-readable even for an instant."""
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _check_name(role: Role, name: str) -> None:
    if role in ("producer", "worker"):
        try:
            msgspec.convert(name, type=Token)
        except msgspec.ValidationError:
            what = "account" if role == "producer" else "pool"
            raise AuthError(f"{what} {name[:140]!r}: names are 1-128 characters of A-Z a-z 0-9 _ -") from None


class AuthDir:
    """The users of a secure fleet and their seeds, in one directory."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def server_config(self) -> Path:
        return self.path / SERVER_CONFIG

    @property
    def pid_file(self) -> Path:
        return self.path / PID_FILE

    def _read(self) -> _UsersFile:
        try:
            return msgspec.json.decode((self.path / USERS_FILE).read_bytes(), type=_UsersFile)
        except FileNotFoundError:
            return _UsersFile()
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise AuthError(f"{self.path / USERS_FILE} is damaged ({exc}); remove {self.path} to start afresh"
                            " (every credential is made again)") from None

    def exists(self) -> bool:
        return (self.path / USERS_FILE).exists()

    def users(self) -> list[User]:
        return self._read().users

    @property
    def prefix(self) -> str:
        """The subject prefix the permissions are written for."""
        return self._read().prefix

    def seed_file(self, role: Role, name: str = "") -> Path:
        """Where the seed of the user `role`/`name` is (whether it exists or not)."""
        return self.path / (f"{role}-{name}.nk" if name else f"{role}.nk")

    def find(self, role: Role, name: str = "") -> User | None:
        return next((u for u in self.users() if u.role == role and u.name == name), None)

    def add(self, role: Role, name: str = "") -> tuple[User, bool]:
        """The user `role`/`name`, made with a fresh nkey when missing. Returns it and whether it is new.
        Raises AuthError for a name that cannot be an account or a pool."""
        _check_name(role, name)
        found = self.find(role, name)
        if found is not None and self.seed_file(role, name).exists():
            return found, False
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        seed = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER)
        kp = nkeys.from_seed(bytearray(seed))
        public_key = kp.public_key.decode()
        kp.wipe()
        _write_private(self.seed_file(role, name), bytes(seed) + b"\n")
        user = User(role=role, name=name, public_key=public_key)
        known = self._read()
        others = [u for u in known.users if not (u.role == role and u.name == name)]
        self._save(_UsersFile(prefix=known.prefix, users=[*others, user]))
        return user, True

    def _save(self, users: _UsersFile) -> None:
        _write_private(self.path / USERS_FILE, msgspec.json.encode(users))

    def write_server_config(self, prefix: str | None = None) -> Path:
        """nats-server's `authorization` block for every user, written to `nats.conf` (mode 0600), with
        the permissions for subject prefix `prefix` (default: the one it was last written for)."""
        known = self._read()
        if prefix is not None and prefix != known.prefix:
            known = _UsersFile(prefix=prefix, users=known.users)
            self._save(known)
        prefix = known.prefix
        entries = []
        for user in known.users:
            entry: dict[str, object] = {"nkey": user.public_key}
            perms = permissions(user, prefix)
            if perms is not None:
                entry["permissions"] = {"publish": {"allow": list(perms.publish)},
                                        "subscribe": {"allow": list(perms.subscribe)}}
            entries.append("    " + json.dumps(entry))
        text = (
            "# Generated by switchyard (workers/natsauth.py) from users.json; edits are overwritten.\n"
            "authorization {\n  users = [\n" + ",\n".join(entries) + "\n  ]\n}\n"
        )
        _write_private(self.server_config, text.encode())
        return self.server_config

    def reload_server(self) -> bool:
        """Ask the running nats-server to read its config again (SIGHUP to the pid it wrote). Returns
        False when no server of this directory runs."""
        try:
            pid = int(self.pid_file.read_text().strip())
            os.kill(pid, signal.SIGHUP)
        except (OSError, ValueError):
            return False
        return True


def ensure_fleet_users(auth: AuthDir, pools: list[str], demo_account: str | None = None) -> None:
    """The users a secure fleet runs with, made when missing: admin (`up` and the CLI), the dispatcher,
    the auditor, one worker per pool, and a producer of `demo_account` when given."""
    auth.add("admin")
    auth.add("dispatcher")
    auth.add("auditor")
    for pool in pools:
        auth.add("worker", pool)
    if demo_account is not None:
        auth.add("producer", demo_account)


def role_env(env: dict[str, str], auth: AuthDir | None, role: Role, name: str = "") -> dict[str, str]:
    """A fleet process's environment with its role's credential (NATS_NKEY_SEED_FILE); `env` itself
    when the fleet is not secure."""
    if auth is None:
        return env
    return {**env, "NATS_NKEY_SEED_FILE": str(auth.seed_file(role, name))}


def add_pool_user(auth: AuthDir | None, prefix: str, pool: str) -> None:
    """A pool added while a secure fleet runs gets its worker credential; the server reloads its config."""
    if auth is None:
        return
    _, new = auth.add("worker", pool)
    if new:
        auth.write_server_config(prefix)
        auth.reload_server()


DEMO_ACCOUNT = "demo"
"""The account `switchyard up --secure` makes a producer credential for (`switchyard ask`'s default)."""


def secure_fleet(data_dir: Path, prefix: str, pools: list[str]) -> AuthDir:
    """The credentials of a secure `switchyard up` under `data_dir/auth`, made when missing (existing
    ones are kept, so producers made with `switchyard creds` survive a restart), and the server config."""
    auth = AuthDir(data_dir / "auth")
    ensure_fleet_users(auth, pools, DEMO_ACCOUNT)
    auth.write_server_config(prefix)
    return auth
