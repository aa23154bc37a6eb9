"""``StorageMap``: values keyed by a storage, safe against a freed storage's address being reused.

Storages are told apart by their C address (``_cdata``), and the allocator hands a freed address to the
next storage, so a plain dict keyed by address mistakes a new storage for an old one. This map keeps a
weak reference beside each value: it keeps a dead storage's object (not its data) allocated, so no new
storage can take that address while the entry exists, and an entry whose storage has died reads as absent.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef

__all__ = ["StorageMap"]


class StorageMap:
    """A mapping from live ``torch.UntypedStorage`` objects to values."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[int, tuple[StorageWeakRef, Any]] = {}

    def get(self, storage: torch.UntypedStorage, default: Any = None) -> Any:
        entry = self._entries.get(storage._cdata)
        if entry is None or entry[0].expired():
            return default
        return entry[1]

    def __contains__(self, storage: torch.UntypedStorage) -> bool:
        entry = self._entries.get(storage._cdata)
        return entry is not None and not entry[0].expired()

    def add(self, storage: torch.UntypedStorage, value: Any) -> None:
        self._entries[storage._cdata] = (StorageWeakRef(storage), value)

    def pop_expired(self) -> list[Any]:
        """Remove the entries whose storage has been freed; returns their values."""
        dead = [key for key, (ref, _) in self._entries.items() if ref.expired()]
        return [self._entries.pop(key)[1] for key in dead]

    def __len__(self) -> int:
        return len(self._entries)
