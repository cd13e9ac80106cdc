"""The admin's sign-in state in the store: sessions and failed sign-ins.

Sessions live server-side so that signing out or a password change makes a
replayed cookie worthless; the cookie names a row by a random id whose SHA-256
is the key, so a stolen database hands out no live cookies. Failures are
counted in the store so every web process enforces one lockout, and each
attempt counts as a failure before its password is checked (forgiven if it was
right): attempts arriving together cannot all pass the check, and at most
``LOGIN_FAILURE_LIMIT`` passwords are checked per window. Cookies belong to
``relay_web.admin.sessions``.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from .accounts import Admin
from ..db import Connection, serialize, transaction
from .part import Part

LOGIN_FAILURE_LIMIT = 5  # failed sign-ins per window, per IP and per username
LOGIN_WINDOW_SECONDS = 60.0
SESSION_TOUCH_SECONDS = 60.0  # last_seen is written at most this often: a page view is not a write
SESSION_MAX_AGE_SECONDS = 24 * 3600.0  # even an active session signs in again after a day


def _user_key(username: str) -> str:
    """How a username is kept among the failures: usernames differing in case or spaces are one."""
    return username.strip().lower()[:200]


def session_hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


@dataclass(frozen=True)
class AdminSession:
    id_hash: str
    admin: Admin
    created_at: float
    last_seen: float
    ip: str
    user_agent: str


class LockedOut(Exception):
    def __init__(self, until: float) -> None:
        super().__init__(until)
        self.until = until


class Sessions(Part):
    # -- sessions ------------------------------------------------------------
    def create_session(self, admin_id: int, session_id: str, ip: str, user_agent: str,
                       now: float | None = None, replaces: str | None = None) -> None:
        """Store a new session; ``replaces`` (a session id hash) is deleted in the same transaction."""
        now = time.time() if now is None else now
        conn = self.conn()
        with transaction(conn):
            if replaces:
                conn.execute("DELETE FROM admin_sessions WHERE id_hash = ?", (replaces,))
            conn.execute("INSERT INTO admin_sessions (id_hash, admin_id, created_at, last_seen, ip, user_agent)"
                         " VALUES (?, ?, ?, ?, ?, ?)",
                         (session_hash(session_id), admin_id, now, now, ip[:64], user_agent[:300]))

    def find_session(self, session_id: str, idle_seconds: float, now: float | None = None,
                     touch: bool = True) -> AdminSession | None:
        """The live session with this id, or None (an idle or too old one is deleted).

        ``touch`` records the visit (at most once a minute); an automatic
        refresh passes False so that a forgotten tab still times out.
        """
        now = time.time() if now is None else now
        id_hash = session_hash(session_id)
        conn = self.conn()
        row = conn.execute(
            "SELECT s.id_hash, s.created_at, s.last_seen, s.ip, s.user_agent, a.id, a.username, a.must_change"
            " FROM admin_sessions s JOIN admins a ON a.id = s.admin_id WHERE s.id_hash = ?", (id_hash,)).fetchone()
        if row is None:
            return None
        if row["last_seen"] + idle_seconds < now or row["created_at"] + SESSION_MAX_AGE_SECONDS < now:
            self.delete_session(session_id)
            return None
        # At most one write a minute, and never so seldom that an active session outlives its last write.
        if touch and row["last_seen"] + min(SESSION_TOUCH_SECONDS, idle_seconds / 10) < now:
            with transaction(conn):
                conn.execute("UPDATE admin_sessions SET last_seen = ? WHERE id_hash = ?", (now, id_hash))
        admin = Admin(int(row["id"]), row["username"], bool(row["must_change"]))
        return AdminSession(row["id_hash"], admin, row["created_at"], row["last_seen"], row["ip"],
                            row["user_agent"])

    def delete_session(self, session_id: str) -> bool:
        conn = self.conn()
        with transaction(conn):
            cur = conn.execute("DELETE FROM admin_sessions WHERE id_hash = ?", (session_hash(session_id),))
        return cur.rowcount == 1

    def session_count(self, admin_id: int) -> int:
        return int(self.conn().execute("SELECT COUNT(*) FROM admin_sessions WHERE admin_id = ?",
                                       (admin_id,)).fetchone()[0])

    def prune_sessions(self, now: float, idle_seconds: float) -> int:
        conn = self.conn()
        with transaction(conn):
            cur = conn.execute("DELETE FROM admin_sessions WHERE last_seen < ? OR created_at < ?",
                               (now - idle_seconds, now - SESSION_MAX_AGE_SECONDS))
            conn.execute("DELETE FROM login_failures WHERE ts < ?", (now - LOGIN_WINDOW_SECONDS,))
        return cur.rowcount

    # -- failed sign-ins ---------------------------------------------------------
    def locked_until(self, ip: str, username: str, now: float | None = None) -> float | None:
        now = time.time() if now is None else now
        return self._locked_until(self.conn(), ip, _user_key(username), now)

    @staticmethod
    def _locked_until(conn: Connection, ip: str, username: str, now: float) -> float | None:
        """Locked while the last ``LOGIN_FAILURE_LIMIT`` failures of either fall within one
        window: it opens a window after the oldest of them."""
        until = None
        for column, value in (("ip", ip), ("username", username)):
            row = conn.execute(f"SELECT ts FROM login_failures WHERE {column} = ? AND ts > ?"
                               " ORDER BY ts DESC LIMIT 1 OFFSET ?",
                               (value, now - LOGIN_WINDOW_SECONDS, LOGIN_FAILURE_LIMIT - 1)).fetchone()
            if row is not None:
                opens = float(row["ts"]) + LOGIN_WINDOW_SECONDS
                until = opens if until is None else max(until, opens)
        return until

    def claim_login_attempt(self, ip: str, username: str, now: float | None = None) -> int:
        """Record this attempt as a failure, unless sign-ins are locked (then ``LockedOut``).

        Call it before checking the password, and ``forgive_login_attempt``
        with the id it returns when the password was right. The check and
        the record are one transaction, taken one at a time (SQLite's write
        lock; an advisory lock on PostgreSQL).
        """
        now = time.time() if now is None else now
        username = _user_key(username)
        conn = self.conn()
        with transaction(conn):
            serialize(conn, "tspro-relay sign-in attempts")
            until = self._locked_until(conn, ip, username, now)
            if until is None:
                # Rows older than the window count for nothing; keeping the table that small
                # keeps the lockout check an index probe (it is bounded by 5 rows a minute per IP).
                conn.execute("DELETE FROM login_failures WHERE ts < ?", (now - LOGIN_WINDOW_SECONDS,))
                row = conn.execute("INSERT INTO login_failures (ts, ip, username) VALUES (?, ?, ?) RETURNING id",
                                   (now, ip, username)).fetchone()
        if until is not None:
            raise LockedOut(until)
        return int(row[0])

    def forgive_login_attempt(self, attempt_id: int) -> None:
        conn = self.conn()
        with transaction(conn):
            conn.execute("DELETE FROM login_failures WHERE id = ?", (attempt_id,))

    def clear_login_failures(self, username: str) -> None:
        conn = self.conn()
        with transaction(conn):
            conn.execute("DELETE FROM login_failures WHERE username = ?", (_user_key(username),))
