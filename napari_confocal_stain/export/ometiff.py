"""Pyramidal tiled OME-TIFF from a finished export pyramid (streamed tile by tile).

Layout: BigTIFF; level 0 is the first page, with OME-XML (``PhysicalSizeX/Y`` in µm) and
TIFF resolution tags (pixels per cm, for libvips/OpenSlide-style readers); coarser levels
are its SubIFDs (``subfiletype`` 1), as the OME-TIFF pyramid specification and Bio-Formats /
QuPath expect. RGB is interleaved (``photometric=rgb``), a grey product is ``minisblack``.
Tiles are read from the pyramid store a row of tiles at a time, so memory stays at one tile
row whatever the slide's size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TIFF_COMPRESSIONS", "write_ome_tiff"]

TIFF_COMPRESSIONS = {
    "deflate": ("zlib", {"level": 6}),
    "jpeg": ("jpeg", {"level": 90}),
    "lzw": ("lzw", None),
    "none": (None, None),
}
"""Codecs every pyramidal-TIFF reader we target (libtiff, OpenSlide, Bio-Formats) decodes.
``deflate`` (lossless) is the default: the export is a record, not a preview."""


def _tiles(level: Any, tile: int, row_tiles: int = 16) -> Iterator[np.ndarray]:
    """Row-major ``(tile, tile[, C])`` tiles of a store level, edges padded."""
    c, h, w = level.shape
    for y in range(0, h, tile):
        for xs in range(0, w, tile * row_tiles):
            strip = level.read((y, min(h, y + tile), xs, min(w, xs + tile * row_tiles)))
            strip = np.moveaxis(strip, 0, -1)  # (C, h, w) → (h, w, C): interleaved samples
            for x in range(0, strip.shape[1], tile):
                t = strip[:, x : x + tile]
                if t.shape[0] != tile or t.shape[1] != tile:
                    t = np.pad(t, ((0, tile - t.shape[0]), (0, tile - t.shape[1]), (0, 0)))
                yield np.ascontiguousarray(t if c > 1 else t[..., 0])


_STORE_CODEC = {"deflate": "zlib", "none": "none"}
"""TIFF compressions whose tiles a ``yxc`` store with this codec already holds, encoded."""


def _encoded_tiles(level: Any, compression: str) -> Iterator[bytes]:
    """Row-major encoded tiles: the store's chunk files, as they are on disk."""
    c = level.chunk
    blank = np.full((c, c, level.channels), 255, np.uint8).tobytes()
    if compression == "deflate":
        import zlib

        blank = zlib.compress(blank, 6)
    for cy in range(-(-level.height // c)):
        for cx in range(-(-level.width // c)):
            try:
                yield level.chunk_file(cy, cx).read_bytes()
            except FileNotFoundError:
                yield blank  # never written: all fill value (white)


def write_ome_tiff(
    levels: list[Any],
    path: str | Path,
    *,
    pixel_size_um: float,
    name: str,
    tile: int = 512,
    compression: str = "deflate",
    workers: int = 2,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write a pyramid of ``(C, H, W)`` uint8 arrays as a pyramidal tiled OME-TIFF.

    Parameters
    ----------
    levels
        :class:`~napari_confocal_stain.export.store.Level` s, level 0 first, each half the
        previous. If they are ``yxc`` stores whose codec is the TIFF's (``zlib`` for
        ``deflate``), their chunk files are copied as the TIFF's tiles (no re-encoding);
        otherwise tiles are read and encoded here.
    path
        File to write (the caller writes to a temporary name and renames).
    pixel_size_um
        Level-0 pixel size.
    name
        OME image name.
    tile
        TIFF tile side (a multiple of 16).
    compression
        A key of :data:`TIFF_COMPRESSIONS`.
    workers
        Threads encoding tiles.
    progress
        Called with the number of pixels of each tile row written.

    Returns
    -------
    pathlib.Path
    """
    import tifffile

    if compression not in TIFF_COMPRESSIONS:
        raise ValueError(
            f"compression must be one of {sorted(TIFF_COMPRESSIONS)}, got {compression!r}"
        )
    c = int(levels[0].channels)
    common = _common_options(compression, c, tile, workers)
    path = Path(path)
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        for k, level in enumerate(levels):
            shape = (level.height, level.width, c) if c > 1 else (level.height, level.width)
            tif.write(
                _level_tiles(level, tile, compression, progress),
                shape=shape,
                **common,
                **_level_options(k, len(levels), float(pixel_size_um), c, name),
            )
    return path


def _common_options(compression: str, channels: int, tile: int, workers: int) -> dict[str, Any]:
    """``TiffWriter.write`` options shared by every level."""
    codec, args = TIFF_COMPRESSIONS[compression]
    common: dict[str, Any] = {
        "dtype": np.uint8,
        "tile": (tile, tile),
        "photometric": "rgb" if channels == 3 else "minisblack",
        "compression": codec,
        "compressionargs": args,
        "resolutionunit": "CENTIMETER",
        "maxworkers": workers,
    }
    if channels == 3:
        common["planarconfig"] = "contig"
    return common


def _level_options(k: int, n_levels: int, px: float, channels: int, name: str) -> dict[str, Any]:
    """Level ``k``'s own options: level 0 is the page with OME-XML, the others its SubIFDs."""
    res = 1e4 / (px * 2**k)  # pixels per cm
    extra: dict[str, Any] = {"resolution": (res, res)}
    if k == 0:
        extra["subifds"] = n_levels - 1
        extra["metadata"] = {
            "axes": "YXS" if channels > 1 else "YX",
            "Name": name,
            "PhysicalSizeX": px,
            "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": px,
            "PhysicalSizeYUnit": "µm",
        }
    else:
        extra["subfiletype"] = 1
        extra["metadata"] = None
    return extra


def _level_tiles(
    level: Any, tile: int, compression: str, progress: Callable[[int], None] | None
) -> Iterator[Any]:
    """A level's tiles in row-major order: the store's encoded chunk files when they are
    already the TIFF's tiles (same layout, codec and side), else pixels to encode."""
    raw = (
        getattr(level, "layout", None) == "yxc"
        and level.codec == _STORE_CODEC.get(compression)
        and level.chunk == tile
    )
    for t in _encoded_tiles(level, compression) if raw else _tiles(level, tile):
        yield t
        if progress is not None:
            progress(tile * tile)
