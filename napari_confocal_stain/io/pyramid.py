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
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np

__all__ = [
    "COARSEST_SIDE",
    "FULL_READ_PIXELS",
    "MAX_CHUNK_BYTES",
    "MAX_DASK_CHUNKS",
    "MAX_LEVEL_PIXELS",
    "SAMPLE_DECODE_BUDGET",
    "STATS_MIN_PIXELS",
    "TARGET_CHUNK",
    "StoredImage",
    "as_dask",
    "dask_chunks",
    "decoded_pixels",
    "downsample_factors",
    "extend_pyramid",
    "sample_blocks",
    "stats_level_index",
]


@dataclass
class StoredImage:
    """What a reader of a file format returns: lazy planes per channel and pyramid level.

    Attributes
    ----------
    path
        The file (or zarr folder).
    levels
        ``levels[k][c]``: channel ``c`` of pyramid level ``k`` (level 0 first); each plane
        has ``shape``, ``dtype`` and numpy slicing.
    channel_names
        One name (or ``None``) per channel, from the file's metadata.
    dtype
        Data type of the pixels.
    pixel_size_um
        Level-0 pixel size in µm from the file's metadata, or ``None``.
    pixel_size_source
        Where the pixel size came from, or why none was taken.
    axes
        The format's axes string, in storage order.
    """

    path: str
    levels: list[list[Any]]
    channel_names: list[str | None]
    dtype: np.dtype
    pixel_size_um: float | None
    pixel_size_source: str
    axes: str

    @property
    def n_channels(self) -> int:
        """Channels per level."""
        return len(self.levels[0])

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` of level 0."""
        return self.levels[0][0].shape


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
"""A statistics level up to this size (2 Mpx) is read whole; a larger one (a single-level
image, or a file whose pyramid stops early) is sampled (see :func:`sample_blocks`), so
that opening never reads a whole large level."""

SAMPLE_DECODE_BUDGET = 1 << 24
"""Most pixels (16 Mpx, summed over R and F) decoded to sample a large level."""

MAX_LEVEL_PIXELS = 1 << 36
"""Largest level 0 a slide may declare (68.7 Gpx, e.g. 262144² px: 19.7 cm square at
0.75 µm/px). Opening builds dask graphs whose size grows with the level (~4 s at this
size); a header declaring more is damaged or hostile, not a microscope slide."""

MAX_DASK_CHUNKS = 1 << 17
"""Most dask chunks a level may be cut into (a thin image of huge width still makes a
graph of one chunk per 1024 columns)."""

MAX_CHUNK_BYTES = 512 << 20
"""Largest decoded tile, strip or zarr chunk (bytes) a slide may have. Reading any pixel
decodes its whole chunk, so a larger one makes every read that costly (a single-strip
compressed image, or a zarr array stored as one chunk)."""


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


def decoded_pixels(box: tuple[int, int, int, int], plane: Any) -> int:
    """Pixels a plane decodes to read ``box = (y0, y1, x0, x1)``: whole tiles or strips.

    Parameters
    ----------
    box
        Rows ``y0:y1`` and columns ``x0:x1``.
    plane
        A stored plane with ``shape``, ``chunk`` (tile or strip size) and ``kind``
        (``"contiguous"`` planes read any box directly).

    Returns
    -------
    int
    """
    y0, y1, x0, x1 = box
    if getattr(plane, "kind", "tiled") == "contiguous":
        return (y1 - y0) * (x1 - x0)
    h, w = plane.shape
    th, tw = (max(1, int(c)) for c in getattr(plane, "chunk", plane.shape))
    rows = min(h, -(-y1 // th) * th) - y0 // th * th
    cols = min(w, -(-x1 // tw) * tw) - x0 // tw * tw
    return rows * cols


def _spread(n: int, size: int, block: int, align: int) -> list[int]:
    """``n`` block origins spread evenly over ``size``, aligned where that keeps them inside."""
    origins = set()
    for i in range(n):
        centre = (i + 0.5) * size / n
        start = int(centre - block / 2) // align * align
        origins.add(max(0, min(start, size - block)))
    return sorted(origins)


def sample_blocks(
    planes: Sequence[Any],
    *,
    budget: int = SAMPLE_DECODE_BUDGET,
    max_blocks: int = 64,
    block_pixels: int = 256 * 256,
) -> tuple[list[np.ndarray], str]:
    """Read the same deterministic blocks, spread over a level, from each of its planes.

    The normalisation statistics and contrast limits of a level too large to read whole
    come from these. The work is bounded whatever size the level declares: at most
    ``budget`` decoded pixels in all (whole tiles or strips count in full), at most
    ``max_blocks`` blocks, never more than an eighth of the level, and at least one block.

    Parameters
    ----------
    planes
        Equal-shaped 2-D array-likes (e.g. R and F of one level) with step-1 slicing that
        reads only what is sliced; ``chunk`` and ``kind`` attributes (see
        :func:`decoded_pixels`) tell what a read decodes.
    budget
        Decoded pixels allowed, summed over the planes.
    max_blocks
        Most blocks.
    block_pixels
        Pixels in a block: 256 × 256; or a whole tile when the planes store larger tiles
        (up to 16 times that), since reading part of a tile decodes all of it; or a band
        of strip rows when they store short, wide strips (a square block would decode
        hundreds of strips).

    Returns
    -------
    tuple
        ``(samples, description)``: per plane, the blocks stacked as ``(n, bh, bw)``
        (pixels at the same place in every plane); and a words description.
    """
    h, w = planes[0].shape
    side = math.isqrt(block_pixels)
    shapes = {(min(side, h), min(side, w))}
    for p in planes:
        th, tw = (int(c) for c in getattr(p, "chunk", (side, side)))
        kind = getattr(p, "kind", "tiled")
        if kind == "strips" and th < side:
            shapes.add((min(th, h), min(w, max(side, block_pixels // th))))
        elif kind == "tiled" and th * tw <= 16 * block_pixels:
            # Tiles larger than a block are decoded whole anyway: sample all of one.
            shapes.add((min(th, h), min(tw, w)))

    def cost(shape: tuple[int, int]) -> float:
        box = (0, shape[0], 0, shape[1])
        return sum(decoded_pixels(box, p) for p in planes) / (shape[0] * shape[1])

    bh, bw = min(shapes, key=lambda s: (cost(s), -s[0] * s[1]))
    aligns = []
    for axis, b in ((0, bh), (1, bw)):
        chunk = max(int(getattr(p, "chunk", (b, b))[axis]) for p in planes)
        aligns.append(chunk if chunk <= b else b)
    per_block = max(1, math.ceil(cost((bh, bw)) * bh * bw))
    n = max(1, min(max_blocks, budget // per_block, h * w // 8 // (bh * bw)))
    ny_max, nx_max = max(1, h // bh), max(1, w // bw)
    while True:
        gx = max(1, min(nx_max, round(math.sqrt(n * nx_max / ny_max))))
        gy = max(1, min(ny_max, n // gx))
        boxes = [
            (y, y + bh, x, x + bw)
            for y in _spread(gy, h, bh, aligns[0])
            for x in _spread(gx, w, bw, aligns[1])
        ]
        total = sum(decoded_pixels(b, p) for b in boxes for p in planes)
        if total <= budget or len(boxes) == 1:
            break
        n = max(1, min(len(boxes) - 1, len(boxes) * budget // total))
    samples = [np.stack([np.asarray(p[y0:y1, x0:x1]) for y0, y1, x0, x1 in boxes]) for p in planes]
    desc = f"{len(boxes)} blocks of {bh}x{bw} px sampled"
    return samples, desc
