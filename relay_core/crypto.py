"""Keys derived from RELAY_SECRET_KEY, encryption at rest, password hashing.

HKDF gives each purpose its own key, so a cookie signature can never be
replayed as a ciphertext. Bodies use AES-256-GCM bound to the message id rather
than Fernet, which would base64 a 28 MiB body again and hold four copies; a body
copied onto another row fails to decrypt. Argon2id's 19 MiB per check (scrypt's
was 128 MiB) keeps the sign-in page from running the box out of memory.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import os
import secrets
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .config import Settings

if TYPE_CHECKING:
    from argon2 import PasswordHasher

_SALT = b"tspro-relay/v1"
_NONCE = 12
BODY_OVERHEAD = _NONCE + 16  # nonce and GCM tag around each stored body
_LEGACY_SCRYPT = threading.Lock()  # an old scrypt hash costs 128 MiB to check: one such check at a time


class DecryptionError(Exception):
    """A ciphertext was made with another secret key, or was altered."""


def _derive(secret: str, purpose: str, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=_SALT,
                info=purpose.encode()).derive(secret.encode())


@dataclass(frozen=True)
class KeySet:
    """Every key the relay uses, derived once at start-up."""

    session_key: bytes
    fernet: MultiFernet
    body_keys: tuple[AESGCM, ...]
    lookup_keys: tuple[bytes, ...]
    fernets: tuple[Fernet, ...] = ()  # one per secret, the current one first (rotate-secret tells them apart)

    def encrypt_text(self, value: str) -> str:
        return self.fernet.encrypt(value.encode()).decode()

    def decrypt_text(self, token: str) -> str:
        try:
            return self.fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            raise DecryptionError(
                "a stored secret cannot be decrypted with RELAY_SECRET_KEY (was the key changed?)"
            ) from None

    def encrypt_body(self, data: bytes | bytearray, bound_to: str) -> bytearray:
        """The nonce, then the ciphertext and tag, written into one buffer (nonce + ciphertext would
        copy the ciphertext: a third copy of a 28 MB body beside the document and the sealed one)."""
        nonce = random_bytes(_NONCE)
        sealed = bytearray(BODY_OVERHEAD + len(data))
        sealed[:_NONCE] = nonce
        with memoryview(sealed) as view:
            self.body_keys[0].encrypt_into(nonce, data, bound_to.encode(), view[_NONCE:])
        return sealed

    def decrypt_body(self, blob: bytes, bound_to: str) -> bytes:
        nonce, sealed = blob[:_NONCE], memoryview(blob)[_NONCE:]
        for key in self.body_keys:
            try:
                return key.decrypt(nonce, sealed, bound_to.encode())
            except InvalidTag:
                continue
        raise DecryptionError("a stored message body cannot be decrypted with RELAY_SECRET_KEY")

    def lookup_hash(self, api_key: str) -> str:
        return self.lookup_hashes(api_key)[0]

    def lookup_hashes(self, api_key: str) -> list[str]:
        """The key's lookup hash under the current secret, then under the old one."""
        return [hmac.new(k, api_key.encode(), hashlib.sha256).hexdigest() for k in self.lookup_keys]


class _RandomPool:
    """Bytes from os.urandom, read 4 KiB at a time (one system call, not two per message) and
    each handed out once; a forked child starts empty, since a repeated nonce breaks AES-GCM."""

    SIZE = 4096

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()  # a new lock: a child may be forked while one is held
        self._buffer = b""
        self._used = 0

    def take(self, count: int) -> bytes:
        with self._lock:
            if self._used + count > len(self._buffer):
                self._buffer = os.urandom(max(self.SIZE, count))
                self._used = 0
            start = self._used
            self._used += count
            return self._buffer[start:self._used]


_POOL = _RandomPool()
os.register_at_fork(after_in_child=_POOL._reset)


def random_bytes(count: int) -> bytes:
    return _POOL.take(count)


def derive_keys(settings: Settings) -> KeySet:
    secrets_in_order = [str(settings.secret_key)]
    if settings.secret_key_old:
        secrets_in_order.append(str(settings.secret_key_old))
    fernets = [Fernet(base64.urlsafe_b64encode(_derive(s, "fernet"))) for s in secrets_in_order]
    return KeySet(
        session_key=_derive(secrets_in_order[0], "session"),
        fernet=MultiFernet(fernets),
        body_keys=tuple(AESGCM(_derive(s, "body")) for s in secrets_in_order),
        lookup_keys=tuple(_derive(s, "api-key-lookup") for s in secrets_in_order),
        fernets=tuple(fernets),
    )


def new_api_key() -> str:
    """A 256-bit key, URL-safe, with a prefix that makes leaked keys greppable."""
    return "tsr_" + secrets.token_urlsafe(32)


def new_password() -> str:
    return secrets.token_urlsafe(18)


@functools.cache
def _hasher() -> PasswordHasher:
    """Imported at first use: only the web's sign-in and the CLI hash passwords, not the worker."""
    from argon2 import PasswordHasher
    return PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)  # OWASP's Argon2id minimum


def hash_password(password: str) -> str:
    return _hasher().hash(password)


def needs_rehash(encoded: str) -> bool:
    """True when a stored hash is not Argon2id at today's parameters (or is unreadable)."""
    from argon2.exceptions import InvalidHashError
    try:
        return _hasher().check_needs_rehash(encoded)
    except InvalidHashError:
        return True


def verify_password(password: str, encoded: str) -> bool:
    if encoded.startswith("scrypt$"):
        return _verify_scrypt(password, encoded)
    from argon2.exceptions import InvalidHashError, VerificationError
    try:
        return _hasher().verify(encoded, password)
    except (VerificationError, InvalidHashError):
        return False  # a wrong password, or a damaged hash: either fails the sign-in, neither crashes it


def _verify_scrypt(password: str, encoded: str) -> bool:
    """A hash from before Argon2id: ``scrypt$N$r$p$salt$digest``."""
    try:
        _scheme, n, r, p, salt, digest = encoded.split("$")
        expected = base64.b64decode(digest, validate=True)
        with _LEGACY_SCRYPT:
            actual = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt, validate=True), n=int(n),
                                    r=int(r), p=int(p), maxmem=129 * 1024 * 1024, dklen=len(expected))
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(actual, expected)
