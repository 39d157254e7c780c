"""A tile renderer: compute only what is on screen, centre first, in a background thread.

No Qt and no napari here: the napari shell (``napari/_live.py``) tells a
:class:`TileRenderer` what is visible (:meth:`TileRenderer.request`) and gives napari the
renderer's per-level array views (:meth:`TileRenderer.levels`). Those views never run a
model: :meth:`TileRenderer.read` returns finished tiles, and the cheap placeholder (the
linear stain) everywhere else, so napari's slicing on the main thread stays fast.

Tiles
    Every pyramid level is cut into ``tile × tile`` tiles on a grid anchored at the level's
    pixel (0, 0). A tile's *raw* result is its product computed on the tile grown by
    ``margin`` pixels of context; what is *displayed* is the cross-fade
    (:func:`~napari_confocal_stain.engine.blend.compose`) of the raw results of the tile and
    whichever of its eight neighbours are done. With ``margin = 0`` (exact products such as
    despeckling and linear stains) a displayed tile is its raw result.

Scheduling
    :meth:`~TileRenderer.request` replaces the wanted set with the visible tiles plus a ring of
    ``prefetch`` tiles around them, visible tiles first and each group nearest the view's
    centre first. One worker thread takes the best wanted tile that is not done; a tile that
    stops being wanted while it computes is cancelled at the next block boundary (the
    ``cancel`` callback the compute function receives). Finished raw tiles go to the
    in-memory :class:`~napari_confocal_stain.engine.cache.TileCache` (bounded in bytes) and,
    if given, to an on-disk :class:`~napari_confocal_stain.engine.cache.RawTileStore`;
    ``on_tile`` is then called from the worker thread (the shell moves it to the main
    thread).
"""

from __future__ import annotations

import atexit
import math
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_confocal_stain.core.box import Box
from napari_confocal_stain.engine.blend import compose_uint8
from napari_confocal_stain.engine.cache import RawTileStore, TileCache, TileKey

__all__ = ["RenderedLevel", "RendererStats", "TileRenderer"]


ComputeFn = Callable[[int, Box, Callable[[], bool]], np.ndarray]
"""``compute(level, grown_box, cancel) -> uint8 image of grown_box``."""

PlaceholderFn = Callable[[int, Box], np.ndarray]
"""``placeholder(level, box) -> uint8 image of box`` (cheap: no model)."""


_RENDERERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Join the workers before the interpreter tears down (a daemon thread killed inside a
    torch kernel aborts the process)."""
    for renderer in list(_RENDERERS):
        renderer.close(timeout=30.0)


class _Cancel(Exception):
    """Internal: the tile being computed left the wanted set."""


@dataclass
class RendererStats:
    """What the renderer has done (read by the status line, tests and benchmarks)."""

    computed: list[TileKey] = field(default_factory=list)
    """Tiles whose product was computed, in order."""
    loaded: list[TileKey] = field(default_factory=list)
    """Tiles read back from the on-disk store instead of computed."""
    cancelled: list[TileKey] = field(default_factory=list)
    """Tiles whose computation was abandoned because they left the screen."""
    compute_seconds: float = 0.0
    computed_pixels: int = 0
    first_tile_seconds: float | None = None
    """From the first request to the first finished tile."""
    error: str | None = None

    @property
    def megapixels_per_second(self) -> float:
        """Output (core) megapixels computed per second of compute time."""
        return self.computed_pixels / 1e6 / self.compute_seconds if self.compute_seconds else 0.0


class TileRenderer:
    """Compute a product tile by tile for what is on screen, in a background thread.

    Parameters
    ----------
    level_shapes
        ``(H, W)`` of every pyramid level, level 0 first.
    compute
        ``compute(level, grown_box, cancel) -> uint8 (gh, gw[, C])``; must call ``cancel()``
        between expensive steps and stop (raise anything) when it returns True.
    placeholder
        ``placeholder(level, box) -> uint8 (h, w[, C])`` shown where tiles are not done.
    scope
        Key of everything that determines the pixels (part of every cache key).
    channels
        3 for RGB products, 1 for grey (the level views are then ``(H, W)``).
    tile
        Tile side in pixels of every level.
    margin
        Context each tile is computed with and cross-faded over (0 for exact products).
    prefetch
        Rings of tiles around the visible ones that are computed too (after them).
    cache
        In-memory cache (shared between renderers is fine: keys include the scope).
    store
        Optional on-disk :class:`~napari_confocal_stain.engine.cache.RawTileStore` of this
        scope.
    placeholder_scope
        Key of what determines the placeholder's pixels (default ``scope``): renderers of
        different models on one slide then share the placeholder tiles.
    on_tile
        Called as ``on_tile(level, ty, tx)`` from the worker when a tile is done.
    on_error
        Called once with a one-line message (:func:`~napari_confocal_stain.errors.explain`)
        when ``compute`` fails with an error other than a cancellation; the renderer then
        stops computing (the placeholder stays).
    thread_init
        Called first in the worker thread (per-thread state such as floating-point flags).
    """

    def __init__(
        self,
        level_shapes: list[tuple[int, int]],
        compute: ComputeFn,
        placeholder: PlaceholderFn,
        *,
        scope: str,
        channels: int = 3,
        tile: int = 512,
        margin: int = 0,
        prefetch: int = 1,
        cache: TileCache | None = None,
        store: RawTileStore | None = None,
        placeholder_scope: str | None = None,
        on_tile: Callable[[int, int, int], None] | None = None,
        on_error: Callable[[str], None] | None = None,
        thread_init: Callable[[], None] | None = None,
    ) -> None:
        if tile < 16:
            raise ValueError(f"tile must be ≥ 16 pixels, got {tile}")
        if not 0 <= 2 * margin <= tile:
            raise ValueError(f"margin must be in [0, tile/2], got {margin} for tile {tile}")
        self.level_shapes = [(int(h), int(w)) for h, w in level_shapes]
        self.compute_fn = compute
        self.placeholder_fn = placeholder
        self.scope = scope
        self.channels = int(channels)
        self.tile = int(tile)
        self.margin = int(margin)
        self.prefetch = int(prefetch)
        self.cache = cache if cache is not None else TileCache()
        self.store = store
        self.placeholder_scope = placeholder_scope or scope
        self.on_tile = on_tile
        self.on_error = on_error
        self.thread_init = thread_init
        self.stats = RendererStats()
        self._cond = threading.Condition()
        self._wanted: list[TileKey] = []  # priority order
        self._wanted_set: set[TileKey] = set()
        self._visible: set[TileKey] = set()
        self._running: TileKey | None = None
        self._closed = False
        self._paused = False
        self._first_request: float | None = None
        self._thread = threading.Thread(target=self._work, name="tile-renderer", daemon=True)
        self._thread.start()
        _RENDERERS.add(self)

    # ---------------------------------------------------------------- geometry

    def grid(self, level: int) -> tuple[int, int]:
        """Number of tile rows and columns of a level."""
        h, w = self.level_shapes[level]
        return -(-h // self.tile), -(-w // self.tile)

    def tile_box(self, level: int, ty: int, tx: int) -> Box:
        """The tile's own box (its core) in level pixels."""
        h, w = self.level_shapes[level]
        t = self.tile
        return ty * t, min(h, (ty + 1) * t), tx * t, min(w, (tx + 1) * t)

    def grown_box(self, level: int, ty: int, tx: int) -> Box:
        """The tile's box grown by ``margin``, clipped to the level (what is computed)."""
        h, w = self.level_shapes[level]
        y0, y1, x0, x1 = self.tile_box(level, ty, tx)
        m = self.margin
        return max(0, y0 - m), min(h, y1 + m), max(0, x0 - m), min(w, x1 + m)

    def tiles_in(self, level: int, box: Box, ring: int = 0) -> list[tuple[int, int]]:
        """Tiles of ``level`` that intersect ``box`` grown by ``ring`` tiles."""
        gy, gx = self.grid(level)
        y0, y1, x0, x1 = box
        t = self.tile
        ty0, ty1 = max(0, y0 // t - ring), min(gy, -(-y1 // t) + ring)
        tx0, tx1 = max(0, x0 // t - ring), min(gx, -(-x1 // t) + ring)
        return [(ty, tx) for ty in range(ty0, ty1) for tx in range(tx0, tx1)]

    def _raw_key(self, key: TileKey) -> tuple:
        return ("raw", self.scope, *key)

    def _raw_shape(self, key: TileKey) -> tuple[int, int, int]:
        y0, y1, x0, x1 = self.grown_box(*key)
        return y1 - y0, x1 - x0, self.channels

    # ---------------------------------------------------------------- state

    def is_done(self, level: int, ty: int, tx: int) -> bool:
        """Whether the tile's raw result is in memory (ready to display)."""
        return self._raw_key((level, ty, tx)) in self.cache

    @property
    def wanted(self) -> list[TileKey]:
        """The tiles currently wanted, in the order they will be computed."""
        with self._cond:
            return list(self._wanted)

    @property
    def visible(self) -> set[TileKey]:
        """Tiles of the last requested view (without the prefetch ring)."""
        with self._cond:
            return set(self._visible)

    def progress(self) -> tuple[int, int]:
        """``(done, needed)`` over the visible tiles of the last request."""
        vis = self.visible
        return sum(self.is_done(*k) for k in vis), len(vis)

    @property
    def busy(self) -> bool:
        """Whether a wanted tile is not done yet (and the renderer can still compute)."""
        with self._cond:
            if self._closed or self._paused or self.stats.error is not None:
                return False
            return self._running is not None or any(not self.is_done(*k) for k in self._wanted)

    # ---------------------------------------------------------------- scheduling

    def request(self, level: int, box: Box) -> list[TileKey]:
        """Make the tiles of ``box`` on ``level`` (plus the prefetch ring) the wanted set.

        Parameters
        ----------
        level
            Pyramid level napari displays (``layer.data_level``).
        box
            Visible ``(y0, y1, x0, x1)`` in that level's pixels (from ``corner_pixels``),
            clipped to the level.

        Returns
        -------
        list
            The tiles that still need work, in the order they will be computed.
        """
        h, w = self.level_shapes[level]
        y0, y1, x0, x1 = box
        y0, y1 = max(0, min(h, int(y0))), max(0, min(h, int(y1)))
        x0, x1 = max(0, min(w, int(x0))), max(0, min(w, int(x1)))
        if y1 <= y0 or x1 <= x0:
            order: list[TileKey] = []
            visible: set[TileKey] = set()
        else:
            cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
            t = self.tile

            def dist(tyx: tuple[int, int]) -> float:
                return math.hypot((tyx[0] + 0.5) * t - cy, (tyx[1] + 0.5) * t - cx)

            vis = sorted(self.tiles_in(level, (y0, y1, x0, x1)), key=dist)
            ring = [
                k
                for k in self.tiles_in(level, (y0, y1, x0, x1), self.prefetch)
                if k not in set(vis)
            ]
            order = [(level, *k) for k in vis + sorted(ring, key=dist)]
            visible = {(level, *k) for k in vis}
        with self._cond:
            if self._first_request is None and order:
                self._first_request = time.perf_counter()
            self._wanted = order
            self._wanted_set = set(order)
            self._visible = visible
            self._cond.notify_all()
        return [k for k in order if not self.is_done(*k)]

    def pause(self, paused: bool = True) -> None:
        """Stop (or resume) starting new tiles; a tile being computed is cancelled."""
        with self._cond:
            self._paused = paused
            self._cond.notify_all()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker thread (the tile in progress is cancelled) and wait for it."""
        with self._cond:
            self._closed = True
            self._wanted, self._wanted_set = [], set()
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until every wanted tile is done (or the renderer stopped); for scripts/tests."""
        end = time.perf_counter() + timeout
        while time.perf_counter() < end:
            if not self.busy:
                return True
            time.sleep(0.01)
        return not self.busy

    def _next(self) -> TileKey | None:
        """The best wanted tile that is not done (called with the lock held)."""
        for key in self._wanted:
            if not self.is_done(*key):
                return key
        return None

    def _work(self) -> None:
        if self.thread_init is not None:
            try:
                self.thread_init()
            except Exception:
                traceback.print_exc()
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    key = None
                    if not self._paused and self.stats.error is None:
                        key = self._next()
                    if key is not None:
                        break
                    self._cond.wait()
                self._running = key
            try:
                self._do(key)
            finally:
                with self._cond:
                    self._running = None

    def _cancelled(self, key: TileKey) -> bool:
        # Read without the lock: a stale answer only delays the cancel by one block.
        return self._closed or self._paused or key not in self._wanted_set

    def _do(self, key: TileKey) -> None:
        shape = self._raw_shape(key)
        if self.store is not None:
            raw = self.store.get(key, shape)
            if raw is not None:
                self._finish(key, raw, loaded=True)
                return
        grown = self.grown_box(*key)
        t0 = time.perf_counter()
        try:

            def cancel() -> bool:
                return self._cancelled(key)

            if cancel():
                raise _Cancel
            raw = self.compute_fn(key[0], grown, cancel)
        except Exception as exc:
            if isinstance(exc, _Cancel) or self._cancelled(key):
                self.stats.cancelled.append(key)
                return
            from napari_confocal_stain.errors import INTERNAL_ERROR, explain

            msg, status = explain(exc)  # one line naming the file and the problem
            if status == INTERNAL_ERROR:
                traceback.print_exc()  # a bug: keep its traceback for the report
            self.stats.error = msg
            if self.on_error is not None:
                try:
                    self.on_error(msg)
                except Exception:  # the callback must never kill the worker
                    traceback.print_exc()
            return
        raw = np.asarray(raw)
        if raw.dtype != np.uint8:
            raise TypeError(f"compute returned {raw.dtype}; the renderer stores uint8")
        raw = raw.reshape(shape)
        dt = time.perf_counter() - t0
        y0, y1, x0, x1 = self.tile_box(*key)
        self.stats.compute_seconds += dt
        self.stats.computed_pixels += (y1 - y0) * (x1 - x0)
        self.stats.computed.append(key)
        if self.store is not None:
            self.store.put(key, raw)
        self._finish(key, raw)

    def _finish(self, key: TileKey, raw: np.ndarray, loaded: bool = False) -> None:
        self.cache.put(self._raw_key(key), raw)
        if loaded:
            self.stats.loaded.append(key)
        if self.stats.first_tile_seconds is None and self._first_request is not None:
            self.stats.first_tile_seconds = time.perf_counter() - self._first_request
        if self.margin:
            # Compose the displays this tile changes here, off the main thread.
            level, ty, tx = key
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    nb = (level, ty + dy, tx + dx)
                    gy, gx = self.grid(level)
                    if 0 <= nb[1] < gy and 0 <= nb[2] < gx and self.is_done(*nb):
                        self.display_tile(*nb)
        if self.on_tile is not None:
            try:
                self.on_tile(*key)
            except Exception:
                traceback.print_exc()

    # ---------------------------------------------------------------- reading

    def _neighbours(self, level: int, ty: int, tx: int) -> list[tuple[TileKey, np.ndarray]]:
        gy, gx = self.grid(level)
        out = []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                k = (level, ty + dy, tx + dx)
                if 0 <= k[1] < gy and 0 <= k[2] < gx:
                    raw = self.cache.get(self._raw_key(k))
                    if raw is not None:
                        out.append((k, raw))
        return out

    def display_tile(self, level: int, ty: int, tx: int) -> np.ndarray | None:
        """The displayed pixels of a done tile (cross-faded with done neighbours), or None."""
        raw = self.cache.get(self._raw_key((level, ty, tx)))
        if raw is None:
            return None
        y0, y1, x0, x1 = self.tile_box(level, ty, tx)
        if not self.margin:
            return raw
        pieces = self._neighbours(level, ty, tx)
        mask = tuple(k for k, _ in pieces)
        dkey = ("display", self.scope, level, ty, tx, mask)
        hit = self.cache.get(dkey)
        if hit is not None:
            return hit
        # Raws are uint8: the weighted mean stays in range.
        out = compose_uint8(
            (y0, y1, x0, x1),
            (self.grown_box(level, ty, tx), raw),
            [(self.grown_box(*k), r) for k, r in pieces],
            self.level_shapes[level],
            self.margin,
        )
        self.cache.put(dkey, out)
        return out

    def placeholder_tile(self, level: int, ty: int, tx: int) -> np.ndarray:
        """The placeholder of a tile (cached: revisits and refreshes cost a copy)."""
        key = ("placeholder", self.placeholder_scope, self.tile, level, ty, tx)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        box = self.tile_box(level, ty, tx)
        img = np.asarray(self.placeholder_fn(level, box))
        if img.dtype != np.uint8:
            raise TypeError(f"placeholder returned {img.dtype}; the renderer shows uint8")
        img = img.reshape(box[1] - box[0], box[3] - box[2], self.channels)
        self.cache.put(key, img)
        return img

    def read(self, level: int, box: Box) -> np.ndarray:
        """What is displayed in ``box`` of ``level``: done tiles, placeholder elsewhere.

        Never runs the model (the placeholder is cheap), so it is safe on the main thread.

        Returns
        -------
        numpy.ndarray
            uint8 ``(h, w, C)`` (``(h, w)`` for one channel).
        """
        y0, y1, x0, x1 = box
        out = np.empty((y1 - y0, x1 - x0, self.channels), dtype=np.uint8)
        for ty, tx in self.tiles_in(level, box):
            ty0, ty1, tx0, tx1 = self.tile_box(level, ty, tx)
            a0, a1, b0, b1 = max(y0, ty0), min(y1, ty1), max(x0, tx0), min(x1, tx1)
            img = self.display_tile(level, ty, tx)
            if img is None:
                img = self.placeholder_tile(level, ty, tx)
            out[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] = img[
                a0 - ty0 : a1 - ty0, b0 - tx0 : b1 - tx0
            ]
        return out if self.channels > 1 else out[..., 0]

    def levels(self) -> list[RenderedLevel]:
        """Array views of every level, for a napari multiscale layer."""
        return [RenderedLevel(self, i) for i in range(len(self.level_shapes))]


class RenderedLevel:
    """A read-only array view of one level of a :class:`TileRenderer` (what napari slices).

    Supports basic slicing of the two spatial axes (steps included) and anything numpy
    supports on the result; ``np.asarray`` reads the whole level, which is meant only for
    the small coarse levels napari uses for thumbnails.
    """

    def __init__(self, renderer: TileRenderer, level: int) -> None:
        self.renderer = renderer
        self.level = level
        h, w = renderer.level_shapes[level]
        self.shape: tuple[int, ...] = (h, w, 3) if renderer.channels == 3 else (h, w)
        if renderer.channels not in (1, 3):
            self.shape = (h, w, renderer.channels)
        self.dtype = np.dtype(np.uint8)
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape))

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return (
            f"RenderedLevel(level={self.level}, shape={self.shape}, scope={self.renderer.scope})"
        )

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (self.ndim - len(key) + 1) + key[i + 1 :]
        key = key + (slice(None),) * (self.ndim - len(key))
        spatial, rest = key[:2], key[2:]
        bounds, steps, squeeze = [], [], []
        for k, n in zip(spatial, self.shape[:2], strict=True):
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step < 0:
                    raise IndexError("negative steps are not supported")
                stop = max(start, stop)
                bounds.append((start, stop))
                steps.append(step)
                squeeze.append(False)
            else:
                i = int(np.asarray(k))
                i = i + n if i < 0 else i
                if not 0 <= i < n:
                    raise IndexError(f"index {k} out of range for axis of size {n}")
                bounds.append((i, i + 1))
                steps.append(1)
                squeeze.append(True)
        (y0, y1), (x0, x1) = bounds
        if y1 <= y0 or x1 <= x0:
            out = np.zeros((max(0, y1 - y0), max(0, x1 - x0), *self.shape[2:]), np.uint8)
        else:
            out = self.renderer.read(self.level, (y0, y1, x0, x1))
        out = out[:: steps[0], :: steps[1]]
        index = tuple(0 if s else slice(None) for s in squeeze)
        out = out[index]
        return out[(Ellipsis, *rest)] if rest else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:, :]
        return out if dtype is None else out.astype(dtype)
