"""Provider keys encrypted at rest: AES-256-GCM under versioned master keys.

The master keys come from one environment variable, `SWITCHYARD_MASTER_KEYS`, as
`VERSION:BASE64` entries separated by commas (`2:…,1:…`), each 32 random bytes. The highest
version encrypts; every listed version decrypts, so a new master key is rolled out by listing it
beside the old one, running `switchyard keys rotate`, then dropping the old one.

Each stored key is sealed with its row's identity as associated data (its name, its account or
`global`, and the master key's version): a ciphertext copied onto another row, or relabelled with
another version, does not decrypt. Nothing here does I/O, and no error message carries key
material, a master key's or a provider's.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MASTER_KEYS_ENV = "SWITCHYARD_MASTER_KEYS"
KEY_BYTES = 32
NONCE_BYTES = 12
MAX_SECRET_CHARS = 4096

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_ACCOUNT = re.compile(r"[A-Za-z0-9_-]{1,128}")
_HOW = f"{MASTER_KEYS_ENV} is VERSION:BASE64 entries separated by commas (e.g. `2:…,1:…`), each 32 bytes:" \
       " `openssl rand -base64 32` makes one"


class SecretsError(ValueError):
    """A master key or a stored key cannot be used; the message is one line and holds no key material."""


@dataclass(frozen=True)
class Sealed:
    """A key as it is stored: never the key itself."""

    ciphertext: bytes
    nonce: bytes
    version: int


def check_name(name: str) -> str:
    """A stored key's name: the environment variable a provider's `api_key_env` names. Raises SecretsError."""
    if not _NAME.fullmatch(name):
        raise SecretsError(f"{name[:200]!r} is not a key name: the name of the environment variable the provider's"
                           " api_key_env names (letters, digits and _, not starting with a digit, e.g. OPENAI_API_KEY)")
    return name


def check_account(account: str) -> str:
    """Raises SecretsError for what is not an account name."""
    if not _ACCOUNT.fullmatch(account):
        raise SecretsError(f"{account[:200]!r} is not an account name (1-128 characters from A-Z a-z 0-9 _ -)")
    return account


def check_secret(text: str) -> str:
    """The key as given (one trailing newline dropped). Raises SecretsError, never quoting it."""
    secret = text.removesuffix("\n").removesuffix("\r")
    if not secret:
        raise SecretsError("the key is empty: pipe it on stdin (`printf %s \"$KEY\" | switchyard keys set NAME`)"
                           " or type it at the prompt")
    if len(secret) > MAX_SECRET_CHARS:
        raise SecretsError(f"the key is {len(secret)} characters long, more than {MAX_SECRET_CHARS}: is it the"
                           " right input?")
    if secret != secret.strip() or any(c.isspace() or not c.isprintable() for c in secret):
        raise SecretsError("the key holds spaces, line breaks or control characters, which no HTTP header carries:"
                           " give the key alone, on one line")
    return secret


def identity(name: str, account: str | None, version: int) -> bytes:
    """The associated data a row's key is sealed with: what the row is, so a ciphertext fits no other row."""
    scope = f"account:{account}" if account is not None else "global"
    return f"switchyard/provider-key/v1\n{name}\n{scope}\n{version}".encode()


def describe(name: str, account: str | None) -> str:
    """The row in words, for messages."""
    return f"key {name}" + (f" of account {account}" if account is not None else " (global)")


class MasterKeys:
    """The master keys of a process, by version. Built by `parse_master_keys`."""

    def __init__(self, keys: dict[int, bytes]) -> None:
        if not keys:
            raise SecretsError(f"{MASTER_KEYS_ENV} lists no master key; {_HOW}")
        self._aead = {version: AESGCM(key) for version, key in keys.items()}
        self.newest = max(keys)

    @property
    def versions(self) -> list[int]:
        return sorted(self._aead, reverse=True)

    def seal(self, name: str, account: str | None, secret: str) -> Sealed:
        """Encrypt under the newest master key, with a fresh random nonce."""
        nonce = os.urandom(NONCE_BYTES)
        ciphertext = self._aead[self.newest].encrypt(nonce, secret.encode(), identity(name, account, self.newest))
        return Sealed(ciphertext=ciphertext, nonce=nonce, version=self.newest)

    def open(self, name: str, account: str | None, sealed: Sealed) -> str:
        """Decrypt a row's key. Raises SecretsError when its version is not listed, or the master key under
        that version is not the one it was sealed with (or the row was altered)."""
        aead = self._aead.get(sealed.version)
        if aead is None:
            listed = ", ".join(str(v) for v in self.versions)
            raise SecretsError(f"{describe(name, account)} is encrypted under master key version {sealed.version},"
                               f" which {MASTER_KEYS_ENV} does not list (it lists {listed}); add that version back")
        try:
            plain = aead.decrypt(sealed.nonce, sealed.ciphertext, identity(name, account, sealed.version))
        except (InvalidTag, ValueError):
            raise SecretsError(f"{describe(name, account)} does not decrypt with master key version {sealed.version}:"
                               f" {MASTER_KEYS_ENV} holds another key under that version, or the row was altered")\
                from None
        try:
            return plain.decode()
        except UnicodeDecodeError:
            raise SecretsError(f"{describe(name, account)} decrypts to something that is not text") from None


def parse_master_keys(text: str | None) -> MasterKeys:
    """The master keys from the variable's value. Raises SecretsError saying which entry is wrong and how,
    never quoting it."""
    if text is None or not text.strip():
        raise SecretsError(f"{MASTER_KEYS_ENV} is not set; {_HOW}")
    keys: dict[int, bytes] = {}
    for i, entry in enumerate(text.split(","), start=1):
        where = f"{MASTER_KEYS_ENV} entry {i}"
        version_text, sep, material = entry.strip().partition(":")
        if not sep:
            raise SecretsError(f"{where} has no `:`; {_HOW}")
        if not version_text.isascii() or not version_text.isdigit() or int(version_text) < 1 \
                or len(version_text) > 9:
            raise SecretsError(f"{where}: the version before `:` must be a whole number from 1; {_HOW}")
        version = int(version_text)
        where = f"{where} (version {version})"
        if version in keys:
            raise SecretsError(f"{where}: version {version} is listed twice")
        try:
            key = base64.b64decode(material.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise SecretsError(f"{where}: the key after `:` is not base64; {_HOW}") from None
        if len(key) != KEY_BYTES:
            raise SecretsError(f"{where}: the key is {len(key)} bytes, a master key is {KEY_BYTES}; {_HOW}")
        keys[version] = key
    return MasterKeys(keys)


def master_keys_from_env() -> MasterKeys:
    """Read at the edge only (a command, a process's start). Raises SecretsError."""
    return parse_master_keys(os.environ.get(MASTER_KEYS_ENV))


_PREFIX_PART = re.compile(r"[A-Za-z0-9]{1,4}[-_.]")
_PREFIX_CHARS = 8
"""At most this much of a key's start is shown: less than a distinctive part (router/redact.py)."""


def mask(secret: str) -> str:
    """A key as `keys list` shows it: its short prefix (`sk-`, `sk-ant-`) and its last four characters, e.g.
    `sk-…f3a9`. Less of a short key; never a whole part long enough to be distinctive."""
    prefix = ""
    while len(secret) >= 20:
        m = _PREFIX_PART.match(secret, len(prefix))
        if m is None or m.end() > _PREFIX_CHARS:
            break
        prefix = secret[: m.end()]
    tail = secret[-4:] if len(secret) >= 16 else ""
    return f"{prefix}…{tail}"
