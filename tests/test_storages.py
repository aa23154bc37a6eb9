"""StorageMap: a dead storage reads as absent, and its address is not handed to a new storage meanwhile."""

from __future__ import annotations

import torch

from memopt._storages import StorageMap


def test_dead_storage_is_absent_and_its_address_not_reused():
    storages = StorageMap()
    old = torch.empty(4096)
    storages.add(old.untyped_storage(), "old")
    address = old.untyped_storage()._cdata
    assert old.untyped_storage() in storages and storages.get(old.untyped_storage()) == "old"
    del old
    for _ in range(200):
        new = torch.empty(4096)
        assert new.untyped_storage()._cdata != address
        assert new.untyped_storage() not in storages and storages.get(new.untyped_storage(), "none") == "none"
        del new


def test_pop_expired_returns_the_values_of_freed_storages():
    storages = StorageMap()
    kept, freed = torch.empty(8), torch.empty(8)
    storages.add(kept.untyped_storage(), 1)
    storages.add(freed.untyped_storage(), 2)
    del freed
    assert storages.pop_expired() == [2] and len(storages) == 1
    assert kept.untyped_storage() in storages
