"""Tile caches: byte-bounded LRU and the on-disk zarr cache."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from napari_confocal_stain.engine.cache import TileCache, scope_key


def tile(value, n=8):
    return np.full((n, n, 3), value, np.uint8)  # 192 bytes


def test_lru_respects_byte_bound_and_recency():
    cache = TileCache(max_bytes=192 * 3)
    for i in range(3):
        cache.put(i, tile(i))
    assert cache.get(0) is not None  # 0 is now most recent
    cache.put(3, tile(3))  # evicts 1, the least recently used
    assert 1 not in cache and {0, 2, 3} <= set(cache._data)
    assert cache.nbytes == 192 * 3 <= cache.max_bytes
    assert cache.hits == 1
    cache.put(9, np.zeros((100, 100, 3), np.uint8))  # larger than the bound: not stored
    assert 9 not in cache and cache.nbytes <= cache.max_bytes


def test_cached_tiles_are_read_only_and_replace_in_place():
    cache = TileCache(max_bytes=10_000)
    cache.put("a", tile(1))
    with pytest.raises(ValueError):
        cache.get("a")[0, 0, 0] = 5
    cache.put("a", tile(2, n=4))
    assert cache.nbytes == 48 and cache.get("a")[0, 0, 0] == 2


def test_invalidate_by_predicate():
    cache = TileCache(max_bytes=10_000)
    for scope in ("s1", "s2"):
        for i in range(3):
            cache.put((scope, 0, i, 0), tile(i))
    assert cache.invalidate(lambda k: k[0] == "s1") == 3
    assert len(cache) == 3 and cache.nbytes == 3 * 192
    assert cache.invalidate() == 3 and cache.nbytes == 0


def test_concurrent_puts_keep_the_bound():
    cache = TileCache(max_bytes=192 * 10)

    def worker(offset):
        for i in range(200):
            cache.put((offset, i), tile(i % 255))
            cache.get((offset, i - 1))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.nbytes == sum(a.nbytes for a in cache._data.values()) <= cache.max_bytes


def test_scope_key_is_stable_and_order_free():
    a = scope_key(slide="x", model="unet", params={"h": [0.3, 0.2, 1.0], "tile": 512})
    b = scope_key(params={"tile": 512, "h": [0.3, 0.2, 1.0]}, model="unet", slide="x")
    assert a == b and len(a) == 16
    assert scope_key(slide="x", model="unet", params={"tile": 256}) != a
