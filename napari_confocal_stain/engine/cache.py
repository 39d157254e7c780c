"""Tile caches: an in-memory LRU bounded in bytes, and an optional on-disk zarr store.

Keys are plain tuples. The renderer builds them as ``(scope, level, ty, tx)`` where
``scope`` is a hash of everything that changes a tile's pixels (slide, model, strategy,
tile size, stain parameters), so changing a parameter invalidates exactly the tiles it
affects: they simply stop being asked for, and age out of the LRU.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["RawTileStore", "TileCache", "TileKey", "scope_key"]

TileKey = tuple[int, int, int]
"""``(level, ty, tx)``."""


def scope_key(**fields: Any) -> str:
    """A short stable hash of the parameters that determine a tile's pixels.

    Parameters
    ----------
    **fields
        JSON-serialisable values (numbers, strings, lists, dicts); key order is ignored.

    Returns
    -------
    str
        16 hex characters.
    """
    text = json.dumps(fields, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class TileCache:
    """A thread-safe least-recently-used cache of numpy tiles, bounded in bytes.

    Parameters
    ----------
    max_bytes
        Upper bound of the summed ``nbytes`` of the stored tiles. A tile larger than the
        bound is not stored at all.
    """

    def __init__(self, max_bytes: int = 512 * 2**20) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._data: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        """Bytes currently held."""
        return self._nbytes

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data

    def get(self, key: Hashable) -> np.ndarray | None:
        """Return the tile (marking it recently used) or None."""
        with self._lock:
            tile = self._data.get(key)
            if tile is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return tile

    def put(self, key: Hashable, tile: np.ndarray) -> None:
        """Store a tile (read-only from then on), evicting the least recently used."""
        tile = np.asarray(tile)
        if tile.nbytes > self.max_bytes:
            return
        tile.setflags(write=False)  # cached tiles are shared with the display
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._nbytes -= old.nbytes
            self._data[key] = tile
            self._nbytes += tile.nbytes
            while self._nbytes > self.max_bytes:
                _, evicted = self._data.popitem(last=False)
                self._nbytes -= evicted.nbytes

    def invalidate(self, predicate: Callable[[Hashable], bool] | None = None) -> int:
        """Drop the tiles whose key matches ``predicate`` (all if None); return how many."""
        with self._lock:
            keys = [k for k in self._data if predicate is None or predicate(k)]
            for k in keys:
                self._nbytes -= self._data.pop(k).nbytes
            return len(keys)


class RawTileStore:
    """Raw (grown) tiles of one scope on disk, in a zarr group, so a slide reopens instantly.

    Each level is an array of shape ``(gy, gx, S, S, C)`` chunked one tile slot per chunk
    (``S = tile + 2·margin``); a tile smaller than its slot (at the slide's edge) sits in
    its top-left corner: its geometry is a function of its index, so nothing else is stored.
    A ``done`` flag per tile is written after the pixels, so a crash in between leaves the
    tile merely missing. The folder is the user's cache, never a slide folder.

    Parameters
    ----------
    root
        Cache folder.
    scope
        :func:`scope_key` of the product's parameters.
    level_shapes, tile, margin, channels
        The renderer's geometry.
    """

    def __init__(
        self,
        root: str | Path,
        scope: str,
        level_shapes: list[tuple[int, int]],
        tile: int,
        margin: int,
        channels: int,
    ) -> None:
        import zarr

        self.path = Path(root) / f"{scope}.zarr"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        slot = tile + 2 * margin
        group = zarr.open_group(str(self.path), mode="a")
        self._lock = threading.Lock()
        self._levels = []
        for i, (h, w) in enumerate(level_shapes):
            grid = (-(-h // tile), -(-w // tile))
            shape = (*grid, slot, slot, channels)
            name = f"raw{i}"
            if name in group and tuple(group[name].shape) == shape:
                arr, done = group[name], group[f"{name}_done"]
            else:
                arr = group.create_array(
                    name,
                    shape=shape,
                    chunks=(1, 1, slot, slot, channels),
                    dtype="uint8",
                    fill_value=0,
                    overwrite=True,
                )
                done = group.create_array(
                    f"{name}_done",
                    shape=grid,
                    chunks=grid,
                    dtype=bool,
                    fill_value=False,
                    overwrite=True,
                )
            self._levels.append((arr, done, np.asarray(done[...])))

    def get(self, key: TileKey, shape: tuple[int, ...]) -> np.ndarray | None:
        """The stored raw tile of ``shape`` (its grown box's), or None."""
        level, ty, tx = key
        arr, _, flags = self._levels[level]
        if not flags[ty, tx]:
            return None
        slot = np.asarray(arr[ty, tx])
        return np.ascontiguousarray(slot[: shape[0], : shape[1], : shape[2]])

    def put(self, key: TileKey, image: np.ndarray) -> None:
        """Store a raw tile, then mark it done."""
        level, ty, tx = key
        arr, done, flags = self._levels[level]
        h, w = image.shape[:2]
        slot = np.zeros(arr.shape[2:], dtype=np.uint8)
        slot[:h, :w] = image.reshape(h, w, -1)
        arr[ty, tx] = slot
        with self._lock:  # the done grid is one small chunk: serialise read-modify-write
            flags[ty, tx] = True
            done[ty, tx] = True
