"""The export's pyramid store: an OME-Zarr (NGFF 0.4) image group written chunk by chunk.

Layout: zarr v2 arrays ``0, 1, …`` (level 0 first) of shape ``(C, H, W)`` uint8, axes
``c, y, x``, chunks ``(C, tile/2, tile/2)``, ``/``-separated chunk keys (NGFF 0.4), fill value
255 (a never-written chunk reads as white, which is what a tissue-free stain is; zarr also
skips writing chunks equal to it).

Why NGFF 0.4 on zarr v2 and ``c, y, x``: NGFF 0.4 is what every current reader takes
(ome-zarr-py, napari-ome-zarr, QuPath, Fiji/BigDataViewer, OMERO); 0.5 (zarr v3) is still
missing from several. NGFF requires the channel axis *before* the spatial ones, so ``y, x, c``
(which napari's builtin reader would take as RGB) is invalid NGFF and ome-zarr-py rejects
it. With ``c, y, x`` and ``omero`` channel colours red/green/blue over a 0–255 window,
napari-ome-zarr opens the three channels as additive red, green and blue layers, which
composite to exactly the RGB image, and ``omero.rgb = true`` tells viewers that honour it.

The multiscales metadata (``.zattrs``) is written last: a group without it is not an image
to any NGFF reader, so a half-written export is never mistaken for a finished one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from napari_confocal_stain._fs import write_atomic
from napari_confocal_stain.export.plan import Box, ExportPlan

__all__ = [
    "CHANNELS",
    "CODECS",
    "Level",
    "create_pyramid",
    "downsample2",
    "open_level",
    "sync_folder",
    "write_block",
    "write_multiscales",
]

CHANNELS = {
    3: (("R", "FF0000"), ("G", "00FF00"), ("B", "0000FF")),
    1: (("despeckled R", "FFFFFF"),),
}
"""Channel labels and display colours by channel count: an RGB stain, or the grey product
(the despeckled reflectance)."""


CODECS = ("zstd", "lz4", "zlib", "none")

_REGISTERED = False


def _register_codecs() -> None:
    global _REGISTERED
    if not _REGISTERED:
        from imagecodecs.numcodecs import register_codecs

        register_codecs(["imagecodecs_deflate"], verbose=False)
        _REGISTERED = True


def _compressor(codec: str) -> Any:
    import numcodecs

    if codec == "zstd":  # the final OME-Zarr: good ratio, fast decode, in every NGFF reader
        return numcodecs.Blosc(cname="zstd", clevel=1, shuffle=numcodecs.Blosc.NOSHUFFLE)
    if codec == "lz4":  # a scratch store decoded again for a TIFF: cheapest to write and read
        return numcodecs.Blosc(cname="lz4", clevel=1, shuffle=numcodecs.Blosc.NOSHUFFLE)
    if codec == "zlib":
        # A chunk file is then byte for byte a TIFF deflate tile (a zlib stream). libdeflate
        # (imagecodecs) writes it 2.6x faster than zlib at the same size; the codec id is
        # imagecodecs', which only this scratch store (never an output) uses.
        from imagecodecs.numcodecs import Deflate

        _register_codecs()
        return Deflate(level=6)
    return None


def create_pyramid(
    path: str | Path, plan: ExportPlan, channels: int, *, layout: str = "cyx", codec: str = "zstd"
) -> None:
    """Create (or reopen, on resume) the empty level arrays of an export.

    Parameters
    ----------
    path
        The image group's folder.
    plan
        The export's geometry.
    channels
        3 for RGB, 1 for a grey product.
    layout
        ``"cyx"`` (NGFF, the OME-Zarr output) or ``"yxc"`` (interleaved samples: a scratch
        store whose chunks are TIFF tiles).
    codec
        One of :data:`CODECS`. With ``layout="yxc"`` and ``"zlib"`` or ``"none"`` every chunk
        file is already an encoded TIFF tile (zarr v2 stores edge chunks full size, as TIFF
        does), so the OME-TIFF is assembled by copying bytes, and the encoding work is done
        by the chunk tasks, in parallel and resumably.
    """
    path = Path(path)
    if (path / ".zgroup").is_file():
        return  # resume: arrays exist already (each created before the .zgroup below)
    if layout not in ("cyx", "yxc") or codec not in CODECS:
        raise ValueError(f"bad store layout {layout!r} or codec {codec!r}")
    c = plan.store_chunk
    for k, (h, w) in enumerate(plan.levels):
        shape, chunks = (
            ((channels, h, w), (channels, c, c)) if layout == "cyx"
            else ((h, w, channels), (c, c, channels))
        )  # fmt: skip
        zarr.create_array(
            store=str(path / str(k)),
            shape=shape,
            chunks=chunks,
            dtype="uint8",
            fill_value=255,
            zarr_format=2,
            compressors=_compressor(codec),
            chunk_key_encoding={"name": "v2", "separator": "/"},
            attributes={} if layout == "cyx" else {"layout": layout, "codec": codec},
            overwrite=True,
        )
    write_atomic(path / ".zgroup", json.dumps({"zarr_format": 2}))


class Level:
    """One pyramid level of a store, read and written as ``(C, h, w)`` whatever its layout."""

    def __init__(self, path: str | Path, level: int) -> None:
        _register_codecs()  # a scratch store's deflate codec (also in worker processes)
        self.root = Path(path) / str(level)
        self.array = zarr.open_array(str(self.root), mode="r+")
        attrs = dict(self.array.attrs)
        self.layout = attrs.get("layout", "cyx")
        self.codec = attrs.get("codec")
        if self.layout == "cyx":
            self.channels, self.height, self.width = (int(n) for n in self.array.shape)
            self.chunk = int(self.array.chunks[1])
        else:
            self.height, self.width, self.channels = (int(n) for n in self.array.shape)
            self.chunk = int(self.array.chunks[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return self.channels, self.height, self.width

    def read(self, box: Box) -> np.ndarray:
        """``(C, h, w)`` uint8 of a box."""
        y0, y1, x0, x1 = box
        if self.layout == "cyx":
            return np.asarray(self.array[:, y0:y1, x0:x1])
        return np.moveaxis(np.asarray(self.array[y0:y1, x0:x1]), -1, 0)

    def write(self, box: Box, image: np.ndarray) -> None:
        """Store ``(C, h, w)`` uint8 at ``box`` (chunk-aligned), one storage chunk at a time.

        zarr writes the chunks of one assignment concurrently and, when one write fails
        (a full disk, say), lets the others run on: they would write into a work folder
        the runner is removing. One chunk per assignment leaves nothing running when an
        error surfaces (measured: the same speed within noise, the export's tasks
        already run in parallel).
        """
        y0, y1, x0, x1 = box
        if self.layout != "cyx":
            image = np.ascontiguousarray(np.moveaxis(image, 0, -1))
        c = self.chunk
        for y in range(y0, y1, c):
            for x in range(x0, x1, c):
                ya, yb, xa, xb = y - y0, min(y1, y + c) - y0, x - x0, min(x1, x + c) - x0
                if self.layout == "cyx":
                    self.array[:, y : y0 + yb, x : x0 + xb] = image[:, ya:yb, xa:xb]
                else:
                    self.array[y : y0 + yb, x : x0 + xb] = image[ya:yb, xa:xb]

    def chunk_file(self, cy: int, cx: int) -> Path:
        """The file of storage chunk ``(cy, cx)`` (absent when it was all fill value)."""
        if self.layout == "cyx":
            return self.root / "0" / str(cy) / str(cx)
        return self.root / str(cy) / str(cx) / "0"


_LEVELS: dict[str, tuple[tuple[int, int, int], Level]] = {}


def open_level(path: str | Path, level: int) -> Level:
    """A level of a store (opened once per process while its metadata file is unchanged).

    A worker process serves many exports; a store re-created under the same name (an
    ``--overwrite`` or a batch re-run) has a new ``.zarray``, so a cached handle is checked
    against the file's identity (one ``stat``) before it is reused.
    """
    key = os.path.join(str(path), str(level))
    st = os.stat(os.path.join(key, ".zarray"))
    stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
    hit = _LEVELS.get(key)
    if hit is None or hit[0] != stamp:
        hit = (stamp, Level(path, level))
        _LEVELS[key] = hit
    return hit[1]


def forget_arrays(path: str | Path) -> None:
    """Drop cached handles under ``path`` (before it is renamed or removed)."""
    prefix = str(path)
    for key in [k for k in _LEVELS if k.startswith(prefix)]:
        del _LEVELS[key]


def write_block(path: str | Path, level: int, box: Box, image: np.ndarray) -> None:
    """Write ``image`` (``(C, h, w)`` uint8) at ``box`` of a level.

    ``box`` must be aligned to storage chunks (or end at the level's edge) so every chunk it
    touches is written whole: concurrent tasks never share a chunk. zarr writes each chunk
    file atomically (temporary name, rename); durability against power loss is the
    runner's :func:`sync_folder` before it records chunks as done.
    """
    open_level(path, level).write(box, image)


def sync_folder(path: str | Path) -> None:
    """Make everything written under ``path`` durable (``syncfs`` of its filesystem).

    One ``syncfs`` per batch of finished chunks costs far less than an fsync per chunk
    file (measured: 15–30 % of a linear export's time on this machine). Falls back to
    ``os.sync()`` where ``syncfs`` is missing.
    """
    fd = os.open(str(path), os.O_RDONLY)
    try:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.syncfs(fd) == 0:
                return
        except (OSError, AttributeError):
            pass
        os.sync()
    finally:
        os.close(fd)


def downsample2(image: np.ndarray) -> np.ndarray:
    """2×2 mean of a ``(C, h, w)`` uint8 block, rounded half up (odd edge row/column dropped)."""
    h, w = image.shape[1] // 2 * 2, image.shape[2] // 2 * 2
    b = image[:, :h, :w].astype(np.uint16)
    s = b[:, 0::2, 0::2] + b[:, 1::2, 0::2] + b[:, 0::2, 1::2] + b[:, 1::2, 1::2]
    return ((s + 2) >> 2).astype(np.uint8)


def write_multiscales(
    path: str | Path,
    plan: ExportPlan,
    *,
    channels: int,
    pixel_size_um: float,
    name: str,
    provenance: dict[str, Any],
) -> None:
    """Write the NGFF 0.4 ``multiscales`` + ``omero`` metadata: the image's completion mark.

    Level ``k``'s scale is ``pixel_size · 2^k`` µm; every level is translated to the region's
    corner on the slide, so an exported region overlays the slide it came from. ``channels``
    is 3 (RGB) or 1 (grey).
    """
    y0, _, x0, _ = plan.region
    px = float(pixel_size_um)
    chans = CHANNELS[channels]
    rgb = channels == 3
    datasets = []
    for k in range(len(plan.levels)):
        s = px * 2**k
        datasets.append(
            {
                "path": str(k),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [1.0, s, s]},
                    {"type": "translation", "translation": [0.0, y0 * px, x0 * px]},
                ],
            }
        )
    attrs = {
        "multiscales": [
            {
                "version": "0.4",
                "name": name,
                "axes": [
                    {"name": "c", "type": "channel"},
                    {"name": "y", "type": "space", "unit": "micrometer"},
                    {"name": "x", "type": "space", "unit": "micrometer"},
                ],
                "datasets": datasets,
                "type": "mean",
                "metadata": {"method": "2x2 mean of uint8, rounded half up"},
            }
        ],
        "omero": {
            "name": name,
            "version": "0.4",
            "rgb": rgb,
            "rdefs": {"model": "color" if rgb else "greyscale"},
            "channels": [
                {
                    "label": label,
                    "color": color,
                    "active": True,
                    "coefficient": 1.0,
                    "family": "linear",
                    "inverted": False,
                    "window": {"start": 0, "end": 255, "min": 0, "max": 255},
                }
                for label, color in chans
            ],
        },
        "napari_confocal_stain": provenance,
    }
    write_atomic(Path(path) / ".zattrs", json.dumps(attrs, indent=1))
