"""`tspro-relay rotate-secret`: re-encrypt everything from RELAY_SECRET_KEY_OLD to RELAY_SECRET_KEY.

One transaction, so either every item is under the new secret or none changed
(docs/operating.md lists the items and the steps). Safe while the relay runs: its
processes, restarted with both secrets, read either and re-read their caches when
the rotation bumps the revision; a worker mid-delivery holds the body it claimed
and never writes it back, so nothing is corrupted or sent twice.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.fernet import InvalidToken

from ..config import ConfigError, Settings
from ..crypto import KeySet
from ..db import serialize, transaction
from ..options import SECRET_OPTIONS
from ..store import Store


class RotationError(Exception):
    """Nothing was rotated; the message says which item could not be read, and what to do."""


@dataclass
class RotationReport:
    settings: int = 0
    api_keys: int = 0
    key_check: int = 0
    bodies: int = 0
    current: int = 0  # items that were already under the new secret (a second run finds only these)

    @property
    def rotated(self) -> int:
        return self.settings + self.api_keys + self.key_check + self.bodies

    def sentence(self) -> str:
        return (f"Rotated {self.rotated} item(s) from RELAY_SECRET_KEY_OLD to RELAY_SECRET_KEY in one transaction: "
                f"{self.settings} secret setting(s), {self.api_keys} API key(s) (their Reveal copies and lookup "
                f"hashes), {self.key_check} key check, {self.bodies} message bodies; {self.current} item(s) were "
                "already under the new secret.")


class _Rekey:
    """The new secret's keys and the old one's, apart (``KeySet`` tries them in turn)."""

    def __init__(self, keys: KeySet) -> None:
        if len(keys.fernets) != 2:
            raise ConfigError("rotate-secret needs the new secret as RELAY_SECRET_KEY and the previous one as "
                              "RELAY_SECRET_KEY_OLD; nothing was changed.")
        self.keys = keys
        self.new_fernet, self.old_fernet = keys.fernets
        self.new_body, self.old_body = keys.body_keys
        self.new_lookup = keys.lookup_keys[0]

    def text(self, token: str, what: str) -> tuple[str, bool]:
        """The token under the new secret, and whether it had to change."""
        try:
            self.new_fernet.decrypt(token.encode())
            return token, False
        except InvalidToken:
            pass
        try:
            plain = self.old_fernet.decrypt(token.encode())
        except InvalidToken:
            raise RotationError(f"{what} cannot be decrypted with RELAY_SECRET_KEY or RELAY_SECRET_KEY_OLD; nothing "
                                "was rotated. Re-enter it (or clear it), then run rotate-secret again.") from None
        return self.new_fernet.encrypt(plain).decode(), True

    def body(self, blob: bytes, message_id: str) -> tuple[bytes, bool]:
        nonce, sealed, bound = blob[:12], blob[12:], message_id.encode()
        try:
            self.new_body.decrypt(nonce, sealed, bound)
            return blob, False
        except InvalidTag:
            pass
        try:
            plain = self.old_body.decrypt(nonce, sealed, bound)
        except InvalidTag:
            raise RotationError(f"the stored body of message {message_id} cannot be decrypted with RELAY_SECRET_KEY "
                                "or RELAY_SECRET_KEY_OLD; nothing was rotated. Cancel that message (or restore its "
                                "secret), then run rotate-secret again.") from None
        return self.keys.encrypt_body(plain, message_id), True

    def lookup(self, api_key: str) -> str:
        return hmac.new(self.new_lookup, api_key.encode(), hashlib.sha256).hexdigest()


def rotate(store: Store) -> RotationReport:
    """Re-encrypt every item in one transaction; raises ``RotationError`` having changed nothing."""
    rekey = _Rekey(store.keys)
    report = RotationReport()
    conn = store.conn()
    with transaction(conn):
        serialize(conn, "tspro-relay rotate-secret")
        store._bump_rev(conn)  # first, as always (see Store._bump_rev): the key rows are rewritten below
        for name in sorted(SECRET_OPTIONS):
            row = conn.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
            if row is None or not row["value"]:
                continue
            token, changed = rekey.text(row["value"], f"the stored {name}")
            if changed:
                conn.execute("UPDATE settings SET value = ? WHERE name = ?", (token, name))
            report.settings += changed
            report.current += not changed
        for key in conn.execute("SELECT id, label, secret FROM api_keys ORDER BY id").fetchall():
            token, changed = rekey.text(key["secret"], f"the stored copy of the API key “{key['label']}”")
            if changed:
                api_key = rekey.new_fernet.decrypt(token.encode()).decode()
                conn.execute("UPDATE api_keys SET secret = ?, lookup = ? WHERE id = ?",
                             (token, rekey.lookup(api_key), key["id"]))
            report.api_keys += changed
            report.current += not changed
        check = conn.execute("SELECT value FROM meta WHERE name = 'key_check'").fetchone()
        if check is not None:
            token, changed = rekey.text(check["value"], "the key check")
            if changed:
                conn.execute("UPDATE meta SET value = ? WHERE name = 'key_check'", (token,))
            report.key_check += changed
            report.current += not changed
        ids = [r[0] for r in conn.execute("SELECT id FROM messages WHERE body IS NOT NULL ORDER BY id").fetchall()]
        for message_id in ids:  # one body in memory at a time: some are tens of MiB
            row = conn.execute("SELECT body FROM messages WHERE id = ? AND body IS NOT NULL", (message_id,)).fetchone()
            if row is None:
                continue  # pruned meanwhile (PostgreSQL: another transaction)
            blob, changed = rekey.body(bytes(row["body"]), message_id)
            if changed:
                conn.execute("UPDATE messages SET body = ? WHERE id = ? AND body IS NOT NULL", (blob, message_id))
            report.bodies += changed
            report.current += not changed
    return report


def rotate_secret(settings: Settings, store: Store) -> RotationReport:
    if not settings.secret_key_old:
        raise ConfigError("rotate-secret needs the previous secret as RELAY_SECRET_KEY_OLD (and the new one as "
                          "RELAY_SECRET_KEY); nothing was changed.")
    if str(settings.secret_key_old) == str(settings.secret_key):
        raise ConfigError("RELAY_SECRET_KEY_OLD is the same as RELAY_SECRET_KEY; set RELAY_SECRET_KEY to the new "
                          "secret. Nothing was changed.")
    return rotate(store)
