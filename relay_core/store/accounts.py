"""The accounts side of the store: the portal's API keys and the admin login.

API keys are found by an HMAC of the presented key (never compared or kept in
clear) and kept Fernet-encrypted for the Reveal button; the admin password is
an Argon2id hash (``crypto``); an older or weaker one is replaced at the next
successful sign-in. ``must_change`` marks a password someone else chose (the first-boot
seed): the admin UI opens no page until it is changed.
"""

from __future__ import annotations

import functools
import secrets
import time
from dataclasses import dataclass

from .. import crypto
from .audit import insert_audit
from ..db import Connection, transaction
from .part import Part


@dataclass(frozen=True)
class ApiKey:
    id: int
    label: str
    is_primary: bool
    created_at: float
    revoked_at: float | None
    lookup: str
    per_hour: int | None = None  # its own send limit (0: unlimited); None: the global one
    allowed_from: str = ""  # its own Allowed From list, on top of the relay's; empty: none

    @property
    def allowed_from_items(self) -> tuple[str, ...]:
        return tuple(item.strip() for item in self.allowed_from.split(",") if item.strip())


@dataclass(frozen=True)
class Admin:
    id: int
    username: str
    must_change: bool


# Seen in the guide and the compose file: signing in with one of these always forces a change.
WELL_KNOWN_PASSWORDS = frozenset({"admin", "change-me-on-first-login", "password", "changeme"})
TOKEN_HASHES_KEPT = 32  # tokens whose lookup hashes are remembered (only ones that matched a key)
KEY_USE_RESOLUTION = 60.0  # last-used times are kept to the minute: one write per key per minute at most


@functools.lru_cache(maxsize=1)
def _dummy_hash() -> str:
    return crypto.hash_password(secrets.token_urlsafe(16))


class ApiKeys(Part):
    """``store.api_keys`` (with their send limits, limits.py)."""

    def insert(self, conn: Connection, label: str, key: str, primary: bool,
               per_hour: int | None = None, allowed_from: str = "") -> int:
        row = conn.execute(
            "INSERT INTO api_keys (label, lookup, secret, is_primary, created_at, per_hour, allowed_from)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (label, self.store.keys.lookup_hash(key), self.store.keys.encrypt_text(key), int(primary), time.time(),
             per_hour, allowed_from),
        ).fetchone()
        return int(row[0])  # (the caller has moved the revision)

    def all(self) -> list[ApiKey]:
        return self.store.snapshot()[1]

    def authenticate(self, token: str, keys: list[ApiKey] | None = None) -> ApiKey | None:
        """The live key matching a Bearer token, or None. Compares HMACs, never keys.

        The HMACs of the few tokens that matched a key are remembered (they depend
        only on the token and RELAY_SECRET_KEY), so the portal's key is hashed once;
        whether its key is still live is checked against ``keys`` every time.
        """
        if not token:
            return None
        known: dict[str, frozenset[str]] = self.__dict__.setdefault("_token_hashes", {})
        wanted = known.get(token)
        if wanted is None:
            wanted = frozenset(self.store.keys.lookup_hashes(token))
        for key in self.all() if keys is None else keys:
            if key.revoked_at is None and key.lookup in wanted:
                if token not in known:
                    if len(known) >= TOKEN_HASHES_KEPT:
                        known.clear()  # a handful of live keys at most: this only bounds memory
                    known[token] = wanted
                return key
        return None

    def reveal(self, key_id: int | None = None) -> str:
        conn = self.conn()
        if key_id is None:
            row = conn.execute("SELECT label, secret FROM api_keys WHERE is_primary = 1 AND revoked_at IS NULL"
                               " ORDER BY id DESC LIMIT 1").fetchone()
        else:
            row = conn.execute("SELECT label, secret FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        if row is None:
            raise LookupError("no such API key")
        try:
            return self.store.keys.decrypt_text(row["secret"])
        except crypto.DecryptionError:
            raise crypto.DecryptionError(
                f"the stored copy of the API key “{row['label']}” cannot be decrypted with RELAY_SECRET_KEY (it was "
                "made with another secret: run `tspro-relay rotate-secret` with the previous one as "
                "RELAY_SECRET_KEY_OLD, or generate a new key)") from None

    def new_primary(self) -> str:
        """Replace the portal's key; the old one stops working at once (its limits carry over)."""
        key = crypto.new_api_key()
        conn = self.conn()
        with transaction(conn):
            self.store._bump_rev(conn)
            old = conn.execute("SELECT per_hour, allowed_from FROM api_keys WHERE is_primary = 1 AND revoked_at IS NULL"
                               " ORDER BY id DESC LIMIT 1").fetchone()
            conn.execute("UPDATE api_keys SET revoked_at = ? WHERE is_primary = 1 AND revoked_at IS NULL",
                         (time.time(),))
            self.insert(conn, "portal", key, primary=True, per_hour=old["per_hour"] if old else None,
                        allowed_from=old["allowed_from"] if old else "")
        return key

    def add(self, label: str, per_hour: int | None = None, allowed_from: str = "") -> tuple[int, str]:
        key = crypto.new_api_key()
        conn = self.conn()
        with transaction(conn):
            self.store._bump_rev(conn)
            key_id = self.insert(conn, label, key, primary=False, per_hour=per_hour,
                                 allowed_from=allowed_from)
        return key_id, key

    def set_limits(self, key_id: int, *, per_hour: int | None | str = "keep",
                   allowed_from: str | None = None, audit: tuple[str, str, str, str] | None = None) -> bool:
        """Change a live key's own send limit (None: the global one) and/or Allowed From list.

        ``per_hour="keep"`` and ``allowed_from=None`` leave that one as it is.
        False when there is no live key with this id. ``audit`` (actor, ip,
        action, detail) is recorded in the same transaction.
        """
        conn = self.conn()
        with transaction(conn):
            if conn.execute("SELECT 1 FROM api_keys WHERE id = ? AND revoked_at IS NULL", (key_id,)).fetchone() is None:
                return False
            self.store._bump_rev(conn)
            if per_hour != "keep":
                conn.execute("UPDATE api_keys SET per_hour = ? WHERE id = ?", (per_hour, key_id))
            if allowed_from is not None:
                conn.execute("UPDATE api_keys SET allowed_from = ? WHERE id = ?", (allowed_from, key_id))
            if audit is not None:
                insert_audit(conn, *audit)
        return True

    def revoke(self, key_id: int) -> bool:
        conn = self.conn()
        with transaction(conn):
            self.store._bump_rev(conn)
            cur = conn.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                               (time.time(), key_id))
        return cur.rowcount == 1

    def note_use(self, conn: Connection, key_id: int, now: float) -> None:
        conn.execute("UPDATE api_keys SET last_used_at = ? WHERE id = ?"
                     " AND (last_used_at IS NULL OR last_used_at < ?)",
                     (now, key_id, now - KEY_USE_RESOLUTION))

    def usage(self) -> dict[int, float]:
        """Each key's last use (to the minute), read fresh: it is not part of the cached snapshot."""
        rows = self.conn().execute("SELECT id, last_used_at FROM api_keys WHERE last_used_at IS NOT NULL")
        return {int(r["id"]): float(r["last_used_at"]) for r in rows}



class AdminAccount(Part):
    """``store.admin``'s account (with its sign-in state, sessions.py)."""

    def set_password(self, username: str, password: str, must_change: bool = False) -> None:
        """Reset the login (the CLI's); every signed-in browser is signed out."""
        hashed = crypto.hash_password(password)
        now = time.time()
        conn = self.conn()
        with transaction(conn):
            cur = conn.execute("UPDATE admins SET username = ?, password_hash = ?, must_change = ?, updated_at = ?"
                               " WHERE id = (SELECT MIN(id) FROM admins)", (username, hashed, int(must_change), now))
            if cur.rowcount == 0:
                conn.execute("INSERT INTO admins (username, password_hash, must_change, created_at, updated_at)"
                             " VALUES (?, ?, ?, ?, ?)", (username, hashed, int(must_change), now, now))
            conn.execute("DELETE FROM admin_sessions")

    def check_password(self, username: str, password: str) -> bool:
        return self.verify(username, password) is not None

    def verify(self, username: str, password: str) -> Admin | None:
        """The admin whose username and password these are, or None.

        Costs one password hash whether or not the username exists (no
        username oracle). A hash of an older kind or weaker parameters than
        today's is replaced now, while the password is at hand.
        """
        row = self.conn().execute("SELECT id, username, password_hash, must_change FROM admins"
                                  " WHERE username = ?", (username,)).fetchone()
        if row is None:
            crypto.verify_password(password, _dummy_hash())
            return None
        if not crypto.verify_password(password, row["password_hash"]):
            return None
        if crypto.needs_rehash(row["password_hash"]):
            conn = self.conn()
            with transaction(conn):
                conn.execute("UPDATE admins SET password_hash = ? WHERE id = ? AND password_hash = ?",
                             (crypto.hash_password(password), row["id"], row["password_hash"]))
        return Admin(int(row["id"]), row["username"], bool(row["must_change"]))

    def get(self, admin_id: int) -> Admin | None:
        row = self.conn().execute("SELECT id, username, must_change FROM admins WHERE id = ?",
                                  (admin_id,)).fetchone()
        return Admin(int(row["id"]), row["username"], bool(row["must_change"])) if row else None

    def require_password_change(self, admin_id: int) -> None:
        conn = self.conn()
        with transaction(conn):
            conn.execute("UPDATE admins SET must_change = 1 WHERE id = ?", (admin_id,))

    def update(self, admin_id: int, *, username: str | None = None, password: str | None = None,
               keep_session: str | None = None) -> None:
        """Change the username and/or password (the admin UI's); clears ``must_change``.

        A new password signs out every other session of this admin.
        """
        conn = self.conn()
        hashed = crypto.hash_password(password) if password is not None else None
        with transaction(conn):
            if username is not None:
                taken = conn.execute("SELECT 1 FROM admins WHERE username = ? AND id <> ?",
                                     (username, admin_id)).fetchone()
                if taken:
                    raise ValueError(f"the username {username!r} is taken")
                conn.execute("UPDATE admins SET username = ?, updated_at = ? WHERE id = ?",
                             (username, time.time(), admin_id))
            if hashed is not None:
                conn.execute("UPDATE admins SET password_hash = ?, must_change = 0, updated_at = ? WHERE id = ?",
                             (hashed, time.time(), admin_id))
                conn.execute("DELETE FROM admin_sessions WHERE admin_id = ? AND id_hash <> ?",
                             (admin_id, keep_session or ""))

