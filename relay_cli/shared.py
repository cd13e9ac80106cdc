"""What the commands share: how they fail, and how they open the store."""

from __future__ import annotations

import sys

from relay_core import crypto
from relay_core.config import Settings
from relay_core.store import Store


def fail(message: str, code: int = 1) -> int:
    print(f"tspro-relay: {message}", file=sys.stderr)
    return code


def open_store(settings: Settings) -> Store:
    store = Store.open(settings, crypto.derive_keys(settings))
    report = store.bootstrap(settings)
    if report.admin_password_generated:
        print(f"Created the admin account {settings.admin_user!r} with the password "
              f"{report.admin_password_generated} (change it after signing in).", file=sys.stderr)
    return store
