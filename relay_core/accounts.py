"""The accounts side of the store: the portal's API keys and the admin login.

API keys are found by an HMAC of the presented key (never compared or kept in
clear) and kept Fernet-encrypted for the Reveal button; the admin password is
an scrypt hash.
"""

from __future__ import annotations

import functools
import secrets
import sqlite3
import time
from dataclasses import dataclass

from . import crypto
from .crypto import KeySet
from .db import transaction
from .options import Options


@dataclass(frozen=True)
class ApiKey:
    id: int
    label: str
    is_primary: bool
    created_at: float
    revoked_at: float | None
    lookup: str


@functools.lru_cache(maxsize=1)
def _dummy_hash() -> str:
    return crypto.hash_password(secrets.token_urlsafe(16))


class Accounts:
    """API keys and the admin; mixed into ``Store``, which provides the connection, keys and cache."""

    keys: KeySet

    def conn(self) -> sqlite3.Connection:
        raise NotImplementedError

    def _load_cache(self) -> tuple[Options, list[ApiKey]]:
        raise NotImplementedError

    def _bump_rev(self, conn: sqlite3.Connection) -> None:
        raise NotImplementedError

    # -- API keys ----------------------------------------------------------
    def _insert_api_key(self, conn: sqlite3.Connection, label: str, key: str, primary: bool) -> int:
        cur = conn.execute(
            "INSERT INTO api_keys (label, lookup, secret, is_primary, created_at) VALUES (?, ?, ?, ?, ?)",
            (label, self.keys.lookup_hash(key), self.keys.encrypt_text(key), int(primary), time.time()),
        )
        self._bump_rev(conn)
        return int(cur.lastrowid or 0)

    def api_keys(self) -> list[ApiKey]:
        return self._load_cache()[1]

    def authenticate(self, token: str, keys: list[ApiKey] | None = None) -> ApiKey | None:
        """The live key matching a Bearer token, or None. Compares HMACs, never keys."""
        if not token:
            return None
        wanted = set(self.keys.lookup_hashes(token))
        for key in self.api_keys() if keys is None else keys:
            if key.revoked_at is None and key.lookup in wanted:
                return key
        return None

    def reveal_api_key(self, key_id: int | None = None) -> str:
        conn = self.conn()
        if key_id is None:
            row = conn.execute("SELECT secret FROM api_keys WHERE is_primary = 1 AND revoked_at IS NULL"
                               " ORDER BY id DESC LIMIT 1").fetchone()
        else:
            row = conn.execute("SELECT secret FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        if row is None:
            raise LookupError("no such API key")
        return self.keys.decrypt_text(row["secret"])

    def new_primary_api_key(self) -> str:
        """Replace the portal's key; the old one stops working at once."""
        key = crypto.new_api_key()
        conn = self.conn()
        with transaction(conn):
            conn.execute("UPDATE api_keys SET revoked_at = ? WHERE is_primary = 1 AND revoked_at IS NULL",
                         (time.time(),))
            self._insert_api_key(conn, "portal", key, primary=True)
        return key

    def add_api_key(self, label: str) -> tuple[int, str]:
        key = crypto.new_api_key()
        conn = self.conn()
        with transaction(conn):
            key_id = self._insert_api_key(conn, label, key, primary=False)
        return key_id, key

    def revoke_api_key(self, key_id: int) -> bool:
        conn = self.conn()
        with transaction(conn):
            cur = conn.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                               (time.time(), key_id))
            self._bump_rev(conn)
        return cur.rowcount == 1

    # -- admin -------------------------------------------------------------
    def set_admin_password(self, username: str, password: str) -> None:
        hashed = crypto.hash_password(password)
        now = time.time()
        conn = self.conn()
        with transaction(conn):
            cur = conn.execute("UPDATE admins SET username = ?, password_hash = ?, updated_at = ?"
                               " WHERE id = (SELECT MIN(id) FROM admins)", (username, hashed, now))
            if cur.rowcount == 0:
                conn.execute("INSERT INTO admins (username, password_hash, created_at, updated_at)"
                             " VALUES (?, ?, ?, ?)", (username, hashed, now, now))

    def check_admin(self, username: str, password: str) -> bool:
        row = self.conn().execute("SELECT password_hash FROM admins WHERE username = ?", (username,)).fetchone()
        if row is None:
            crypto.verify_password(password, _dummy_hash())  # one scrypt either way: no username oracle
            return False
        return crypto.verify_password(password, row["password_hash"])

