"""The linear stain of any box of any level, fast enough to follow the camera.

napari slices the linear-stain layer on the main thread at every camera move. Staining
through the mosaic's dask graph there costs three to six times what is on screen: it
decodes, normalises and stains whole dask chunks (1024² by default) around the view. A
:class:`LinearStainView` reads only the file tiles under the box, straight from the stored
planes (R and F in two threads), and when both modes are 8-bit it stains by table lookup:
every R code pairs with every F code in 256 × 256 entries, so the stain of an image is one
``np.take`` (:func:`~napari_confocal_stain.core.linear_stain.lookup_pairs`). The pixels are
exactly those of the dask path (the table is built with the same functions); levels the file
does not store (2×2 means) and non-8-bit data take the general path.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from napari_confocal_stain.core.box import Box
from napari_confocal_stain.core.linear_stain import linear_stain, linear_stain_table, lookup_pairs
from napari_confocal_stain.core.normalize import apply_normalization
from napari_confocal_stain.engine.pipeline import read_normalized, to_uint8
from napari_confocal_stain.io.mosaic import ConfocalMosaic

__all__ = ["LinearStainView"]


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    # One small pool for the whole process: decoding releases the GIL, so R and F are
    # read side by side; more threads would only compete with the tile worker.
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="linear-read")
        return _POOL


def _split(box: Box, chunk: Sequence[int]) -> list[Box]:
    """Cut ``box`` in two at the file-tile boundary nearest its middle (rows, else columns)."""
    y0, y1, x0, x1 = box
    for axis, (lo, hi), step in ((0, (y0, y1), chunk[0]), (1, (x0, x1), chunk[1])):
        step = max(1, int(step))
        cuts = range((lo // step + 1) * step, hi, step)
        if len(cuts) and hi - lo >= 128:
            cut = min(cuts, key=lambda c: abs(c - (lo + hi) / 2))
            if axis == 0:
                return [(y0, cut, x0, x1), (cut, y1, x0, x1)]
            return [(y0, y1, x0, cut), (y0, y1, cut, x1)]
    return [box]


class LinearStainView:
    """Linear stain (uint8 RGB) of any box of any pyramid level of a mosaic.

    Parameters
    ----------
    mosaic
        The opened slide (its stored planes ``r_raw``/``f_raw`` give the fast path).
    method
        ``"gareau"`` or ``"beer-lambert"``.
    coefficients
        The method's coefficient overrides (see
        :func:`~napari_confocal_stain.core.linear_stain.linear_stain`).

    Notes
    -----
    :meth:`read` equals ``to_uint8(linear_stain(mosaic.r[level][box], mosaic.f[level][box]))``
    bit for bit on every level; :meth:`levels` wraps it as array views for a napari
    multiscale layer.
    """

    channels = 3

    def __init__(
        self,
        mosaic: ConfocalMosaic,
        method: str = "gareau",
        coefficients: Mapping[str, Any] | None = None,
    ) -> None:
        self.mosaic = mosaic
        self.method = method
        self.coefficients = dict(coefficients or {})
        self.level_shapes: list[tuple[int, int]] = [tuple(a.shape) for a in mosaic.r]
        # Validate now (one pixel): an error must surface here, not in napari's slicing.
        linear_stain(np.zeros(1, np.float32), np.zeros(1, np.float32), method, **self.coefficients)
        # 8-bit stored levels normalised by known statistics: stain by table lookup.
        stats = mosaic.metadata.get("norm_stats") or {}
        self._table: np.ndarray | None = None
        if (
            mosaic.r_raw
            and "r" in stats
            and "f" in stats
            and all(np.dtype(p[0].dtype) == np.uint8 for p in (mosaic.r_raw, mosaic.f_raw))
        ):
            codes = np.arange(256, dtype=np.uint8)
            values = [apply_normalization(codes, stats[m]["low"], stats[m]["high"]) for m in "rf"]
            self._table = to_uint8(linear_stain_table(*values, method, **self.coefficients))
        self.scope = f"linear:{method}:{mosaic.source}"

    @property
    def uses_table(self) -> bool:
        """True when stored 8-bit levels are stained by table lookup."""
        return self._table is not None

    def _check(self, level: int, box: Sequence[int]) -> Box:
        if not 0 <= level < len(self.level_shapes):
            raise IndexError(f"level {level} out of range (0..{len(self.level_shapes) - 1})")
        h, w = self.level_shapes[level]
        y0, y1, x0, x1 = (int(v) for v in box)
        if not (0 <= y0 <= y1 <= h and 0 <= x0 <= x1 <= w):
            raise IndexError(f"box {box} outside level {level} of shape {(h, w)}")
        return y0, y1, x0, x1

    def read(self, level: int, box: Sequence[int]) -> np.ndarray:
        """The linear stain of ``box = (y0, y1, x0, x1)`` of ``level``.

        Returns
        -------
        numpy.ndarray
            uint8 ``(y1 - y0, x1 - x0, 3)``.
        """
        y0, y1, x0, x1 = self._check(level, box)
        if y1 == y0 or x1 == x0:
            return np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
        if self._table is None or level >= len(self.mosaic.r_raw):
            # Not 8-bit codes (other dtypes, or a level built from 2×2 means).
            r = read_normalized(self.mosaic, "r", level, (y0, y1, x0, x1))
            f = read_normalized(self.mosaic, "f", level, (y0, y1, x0, x1))
            return to_uint8(linear_stain(r, f, self.method, **self.coefficients))
        # Two halves in two threads (decoding and np.take release the GIL), split on a
        # file-tile boundary so that no tile is decoded twice.
        chunk = getattr(self.mosaic.r_raw[level], "chunk", None) or (256, 256)
        halves = _split((y0, y1, x0, x1), chunk)
        if len(halves) == 1:
            return self._lookup(level, halves[0])
        out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        a, b = halves
        pending = _pool().submit(self._lookup, level, b)
        out[a[0] - y0 : a[1] - y0, a[2] - x0 : a[3] - x0] = self._lookup(level, a)
        out[b[0] - y0 : b[1] - y0, b[2] - x0 : b[3] - x0] = pending.result()
        return out

    def _lookup(self, level: int, box: Box) -> np.ndarray:
        """Stain a box of a stored 8-bit level by table lookup of its raw codes."""
        y0, y1, x0, x1 = box
        r = np.asarray(self.mosaic.r_raw[level][y0:y1, x0:x1])
        f = np.asarray(self.mosaic.f_raw[level][y0:y1, x0:x1])
        return lookup_pairs(r, f, self._table)

    def levels(self) -> list[Any]:
        """Array views of every level, for a napari multiscale layer (read on slicing)."""
        from napari_confocal_stain.engine.renderer import RenderedLevel

        return [RenderedLevel(self, i) for i in range(len(self.level_shapes))]
