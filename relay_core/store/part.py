"""What each named part of the store (``store.messages``, ``store.log``...) stands on: the Store
that holds it, whose connection, keys and settings every part shares."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..db import Connection

if TYPE_CHECKING:
    from . import Store


class Part:
    def __init__(self, store: Store) -> None:
        self.store = store

    def conn(self) -> Connection:
        return self.store.conn()
