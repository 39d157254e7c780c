"""Dask chunking of stored planes and lazily built pyramid levels.

A slide's pyramid is the file's own levels, cut at the first level whose larger side
is at most :data:`COARSEST_SIDE` px, plus ×2 levels built lazily below the file's
coarsest level when the file stops early (or has no pyramid at all). A built level is
the 2×2 block mean of the level above it (``dask.array.coarsen``), so reading a region
of it reads only the region under it one level up; nothing is computed at open.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np

__all__ = [
    "COARSEST_SIDE",
    "STATS_MIN_PIXELS",
    "TARGET_CHUNK",
    "as_dask",
    "dask_chunks",
    "downsample_factors",
    "extend_pyramid",
    "sample_blocks",
    "stats_level_index",
]

TARGET_CHUNK = 1024
"""Dask chunk side (px) aimed at: small enough that a 1024² region read touches little
more than itself (dask computes whole chunks), big enough that a 100k² level has ~10^4
chunks, not 10^5."""

COARSEST_SIDE = 1024
"""The pyramid goes down to the first level whose larger side is at most this."""

STATS_MIN_PIXELS = 512 * 512
"""Normalisation statistics come from the coarsest stored level with at least this many
pixels."""

FULL_READ_PIXELS = 1 << 21
"""A single-level image up to this size (2 Mpx) is read whole for statistics; a larger one
is sampled (see :func:`sample_blocks`) so that opening never reads the full resolution."""


def _axis_chunks(size: int, step: int) -> tuple[int, ...]:
    n_full, rest = divmod(size, step)
    return (step,) * n_full + ((rest,) if rest else ())


def dask_chunks(
    shape: tuple[int, int],
    storage_chunk: tuple[int, int],
    kind: str = "tiled",
    target: int = TARGET_CHUNK,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Choose dask chunks for a 2-D plane stored in tiles, strips or contiguously.

    Parameters
    ----------
    shape
        ``(height, width)`` of the plane.
    storage_chunk
        The file's tile (or strip, or zarr chunk) ``(height, width)``.
    kind
        ``"tiled"`` (tiles, zarr chunks), ``"strips"`` (compressed full-width strips) or
        ``"contiguous"`` (uncompressed; any row range is directly addressable).
    target
        Preferred chunk side in px.

    Returns
    -------
    tuple
        Dask ``chunks`` for ``(height, width)``; chunk boundaries fall on tile
        boundaries so that no tile is decoded for two chunks.
    """
    h, w = shape
    th, tw = (max(1, min(int(c), n)) for c, n in zip(storage_chunk, shape, strict=True))

    def multiple(tile: int, n: int) -> int:
        return min(n, tile * max(1, round(target / tile)))

    if kind == "contiguous":
        ch, cw = min(h, target), min(w, target)
    elif kind == "strips":
        # Every chunk decodes whole full-width strips, so wider chunks mean fewer
        # repeated decodes of a strip when a whole row of chunks is read.
        ch, cw = multiple(th, h), min(w, 4 * target)
    else:
        ch, cw = multiple(th, h), multiple(tw, w)
    return _axis_chunks(h, max(1, ch)), _axis_chunks(w, max(1, cw))


def as_dask(plane: Any, *, name: str, chunks: Any) -> da.Array:
    """Wrap a lazily readable 2-D plane (``TiffPlane``, zarr view, numpy) as a dask array.

    Parameters
    ----------
    plane
        Any object with ``shape``, ``dtype``, ``ndim`` and step-1 slicing.
    name
        Unique, deterministic dask name (path, level, channel, file stamp).
    chunks
        Dask chunks, e.g. from :func:`dask_chunks`.

    Returns
    -------
    dask.array.Array
        In the plane's own dtype; each chunk slices ``plane`` once.
    """
    return da.from_array(
        plane,
        chunks=chunks,
        name=name,
        asarray=False,
        fancy=False,
        lock=False,
        meta=np.empty((0, 0), dtype=plane.dtype),
    )


def _mean2x2(block: np.ndarray) -> np.ndarray:
    h, w = block.shape[0] // 2 * 2, block.shape[1] // 2 * 2
    b = block[:h, :w].astype(np.float32, copy=False)
    out = b[0::2, 0::2] + b[1::2, 0::2]
    out += b[0::2, 1::2]
    out += b[1::2, 1::2]
    out *= np.float32(0.25)
    return out


def halve(level: da.Array, target: int = TARGET_CHUNK) -> da.Array:
    """Return the 2×2 block mean of a 2-D dask array (odd edge row/column dropped), lazily.

    Parameters
    ----------
    level
        2-D dask array.
    target
        Chunk side to rechunk the result to once its chunks have shrunk below half of it.

    Returns
    -------
    dask.array.Array
        float32, shape ``(h // 2, w // 2)``.
    """
    h, w = level.shape
    x = level[: h // 2 * 2, : w // 2 * 2]
    # Every chunk must have even sides so that 2×2 blocks never straddle two chunks.
    even = tuple(tuple(_even_chunks(c)) if any(v % 2 for v in c) else c for c in x.chunks)
    if even != x.chunks:
        x = x.rechunk(even)
    out = x.map_blocks(
        _mean2x2,
        chunks=tuple(tuple(v // 2 for v in c) for c in x.chunks),
        dtype=np.float32,
        meta=np.empty((0, 0), np.float32),
    )
    if out.chunksize and max(out.chunksize) < target // 2:
        out = out.rechunk(
            tuple(min(n, max(target, c)) for n, c in zip(out.shape, out.chunksize, strict=True))
        )
    return out


def _even_chunks(chunks: Sequence[int]) -> list[int]:
    total = sum(chunks)
    step = max(2, max(chunks) // 2 * 2)
    return list(_axis_chunks(total, step))


def extend_pyramid(
    levels: list[da.Array], coarsest_side: int = COARSEST_SIDE
) -> tuple[list[da.Array], int]:
    """Cut a list of stored levels at the first small one and add lazily built ×2 levels.

    Parameters
    ----------
    levels
        Level 0 first, each coarser than the previous (the file's pyramid; may be one).
    coarsest_side
        Stop at the first level whose larger side is at most this.

    Returns
    -------
    tuple
        ``(levels, n_stored)``: the full pyramid and how many of its levels came from
        ``levels`` (the rest are 2×2 means of the level above).
    """
    out: list[da.Array] = []
    for level in levels:
        out.append(level)
        if max(level.shape) <= coarsest_side:
            return out, len(out)
    n_stored = len(out)
    while max(out[-1].shape) > coarsest_side and min(out[-1].shape) >= 2:
        out.append(halve(out[-1]))
    return out, n_stored


def downsample_factors(shapes: Sequence[tuple[int, int]]) -> list[float]:
    """Level-0 size / level size for each level (exact powers of two where sizes round).

    Parameters
    ----------
    shapes
        ``(height, width)`` per level, level 0 first.

    Returns
    -------
    list of float
        ``2**k`` when the level is level 0 halved ``k`` times (sizes rounded up or down
        at each halving), otherwise the mean of the two axes' ratios.
    """
    h0, w0 = shapes[0]
    factors = []
    for h, w in shapes:
        fy, fx = h0 / h, w0 / w
        k = round(math.log2(max(1.0, (fy + fx) / 2)))
        p = 2**k
        if abs(h - h0 / p) <= 1 + k and abs(w - w0 / p) <= 1 + k:
            factors.append(float(p))
        else:
            factors.append((fy + fx) / 2)
    return factors


def stats_level_index(
    shapes: Sequence[tuple[int, int]], min_pixels: int = STATS_MIN_PIXELS
) -> int:
    """Index of the coarsest level with at least ``min_pixels`` pixels (0 if none has).

    Parameters
    ----------
    shapes
        ``(height, width)`` per level, level 0 first.
    min_pixels
        Smallest acceptable size.

    Returns
    -------
    int
    """
    best = 0
    for i, (h, w) in enumerate(shapes):
        if h * w >= min_pixels:
            best = i
    return best


def sample_blocks(
    plane: Any, *, grid: int = 8, block: int = 256, align: int = 256
) -> tuple[np.ndarray, str]:
    """Read a deterministic grid of blocks spread over a large plane.

    Used for the normalisation statistics of a single-level image too large to read
    whole at open: up to ``grid × grid`` blocks of ``block²`` px (about 4 Mpx and 64 tile
    reads in all, and never more than an eighth of the plane), aligned to ``align`` so a
    block usually lies in one tile.

    Parameters
    ----------
    plane
        2-D array-like supporting step-1 slicing that reads only what is sliced.
    grid, block, align
        Blocks per axis, block side, and alignment of block origins (px).

    Returns
    -------
    tuple
        ``(samples, description)``: the blocks stacked as ``(n, block, block)`` (edge
        blocks cropped to equal size) and a words description for the metadata.
    """
    h, w = plane.shape
    bh, bw = min(block, h), min(block, w)
    # Never more than an eighth of the plane: sampling must stay far from a full pass.
    grid = max(1, min(grid, math.isqrt(h * w // 8) // block))
    origins_y = sorted({_aligned_origin(i, grid, h, bh, align) for i in range(grid)})
    origins_x = sorted({_aligned_origin(i, grid, w, bw, align) for i in range(grid)})
    blocks = [np.asarray(plane[y : y + bh, x : x + bw]) for y in origins_y for x in origins_x]
    desc = f"{len(blocks)} blocks of {bh}x{bw} px sampled from level 0"
    return np.stack(blocks), desc


def _aligned_origin(i: int, grid: int, size: int, block: int, align: int) -> int:
    centre = (i + 0.5) * size / grid
    start = int(centre - block / 2) // align * align
    return max(0, min(start, size - block))
