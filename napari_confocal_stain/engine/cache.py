"""Tile caches: an in-memory LRU bounded in bytes, and an optional on-disk zarr cache.

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

__all__ = ["DiskTileCache", "TileCache", "scope_key"]


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


class DiskTileCache:
    """Finished tiles of one scope (slide + parameters) kept in a zarr store on disk.

    The store is ``root/<scope>.zarr`` with one array per pyramid level, chunked by the
    tile size, and a small boolean ``done`` array per level recording which tiles are
    complete. A tile's pixels are written before its ``done`` flag, so a crash in
    between leaves the tile merely missing, never half-written-but-trusted.

    Parameters
    ----------
    root
        Cache folder (created if missing). Never a user's input folder.
    scope
        :func:`scope_key` of the parameters.
    level_shapes
        ``(H, W)`` of each pyramid level.
    tile
        Tile size in pixels.
    channels, dtype
        Per-pixel channels and dtype of the stored tiles.
    """

    def __init__(
        self,
        root: str | Path,
        scope: str,
        level_shapes: list[tuple[int, int]],
        tile: int,
        channels: int = 3,
        dtype: str = "uint8",
    ) -> None:
        import zarr

        self.path = Path(root) / f"{scope}.zarr"
        self.tile = int(tile)
        self.dtype = np.dtype(dtype)
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(str(self.path), mode="a")
        self._levels = []
        for i, (h, w) in enumerate(level_shapes):
            name = str(i)
            grid = (-(-h // self.tile), -(-w // self.tile))
            if name in group and tuple(group[name].shape) == (h, w, channels):
                arr, done = group[name], group[f"{name}_done"]
            else:
                arr = group.create_array(
                    name,
                    shape=(h, w, channels),
                    chunks=(self.tile, self.tile, channels),
                    dtype=self.dtype,
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
            self._levels.append((arr, done))

    def _slices(self, level: int, ty: int, tx: int) -> tuple[slice, slice]:
        arr, _ = self._levels[level]
        h, w = arr.shape[:2]
        y0, x0 = ty * self.tile, tx * self.tile
        return slice(y0, min(y0 + self.tile, h)), slice(x0, min(x0 + self.tile, w))

    def get(self, level: int, ty: int, tx: int) -> np.ndarray | None:
        """The stored tile, or None if it was never completed."""
        arr, done = self._levels[level]
        if not bool(done[ty, tx]):
            return None
        return np.asarray(arr[self._slices(level, ty, tx)])

    def put(self, level: int, ty: int, tx: int, tile: np.ndarray) -> None:
        """Store a finished tile, then mark it done."""
        arr, done = self._levels[level]
        ys, xs = self._slices(level, ty, tx)
        tile = np.asarray(tile)
        expected = (ys.stop - ys.start, xs.stop - xs.start, arr.shape[2])
        if tile.shape != expected:
            raise ValueError(
                f"tile ({level}, {ty}, {tx}) has shape {tile.shape}, expected {expected}"
            )
        arr[ys, xs] = tile.astype(self.dtype, copy=False)
        # The done grid is one small chunk: serialise its read-modify-write.
        with self._lock:
            done[ty, tx] = True

    def done_fraction(self, level: int) -> float:
        """Fraction of the level's tiles already on disk."""
        return float(np.asarray(self._levels[level][1][...]).mean())
